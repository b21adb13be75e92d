"""The package's shape (issue 19, docs/ARCHITECTURE.md): the method and its Detectron2 integration in
at most 6,000 lines, no stack walking or source parsing, and every private Detectron2 or torch name in
``smallbn_d2/compat.py``. Each check reads the package's source files; a planted ``sys._getframe``, a
``layer.conv._forward_pre_hooks`` outside compat.py or 500 extra lines fails it."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "smallbn_d2"
MAX_LINES = 6000


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_package_is_at_most_6000_lines():
    lines = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in _sources()}
    largest = sorted(lines.items(), key=lambda kv: -kv[1])[:5]
    assert sum(lines.values()) <= MAX_LINES, f"{sum(lines.values())} lines; the largest files: {largest}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_stack_walking_and_no_source_parsing(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "ast" not in imported
    assert not attributes & {"_getframe", "currentframe", "f_locals", "f_back"}


def _private_uses(tree: ast.AST):
    """``x._name`` on anything but ``self``/``cls``, and ``from <not smallbn_d2> import _name``.
    Names starting with ``_smallbn`` are this package's own markers."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, ast.unparse(node.value)
            if name.startswith("_") and not name.startswith(("__", "_smallbn")) and owner not in ("self", "cls"):
                yield f"line {node.lineno}: {owner}.{name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not node.module.startswith("smallbn_d2"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"line {node.lineno}: from {node.module} import {alias.name}"


@pytest.mark.parametrize("path", [p for p in _sources() if p.name != "compat.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_names_only_in_compat(path):
    assert list(_private_uses(ast.parse(path.read_text()))) == []


def test_the_private_name_check_sees_a_planted_use():
    planted = "def f(layer, self):\n    self._ok = layer.conv._forward_pre_hooks\nfrom detectron2.utils.comm import _LOCAL_PROCESS_GROUP\n"
    assert sorted(_private_uses(ast.parse(planted))) == [
        "line 2: layer.conv._forward_pre_hooks", "line 3: from detectron2.utils.comm import _LOCAL_PROCESS_GROUP"]
