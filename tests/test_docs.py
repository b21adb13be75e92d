"""The documentation a user follows works: links resolve, nothing points outside the repository,
every tool answers ``--help``.

* Every relative Markdown link (and image) in README.md, docs/*.md, projects/*/README.md and
  configs/**/*.md resolves to a file or folder inside the repository, and a ``#anchor`` on a
  Markdown target names one of its headings (GitHub's anchor rule) or an explicit
  ``<a id="...">``.
* No file of README.md, docs/, smallbn_d2/, tools/, configs/ or projects/ refers to ``../shared``
  or ``/shared/`` (a folder next to the repository that users do not have).
* Every ``tools/*.py`` prints its usage for ``--help`` and exits with status 0 (in subprocesses,
  one per core at a time: about 15 s on 2 idle cores), and every ``--option`` that a document
  passes to a tool is one that the tool's ``--help`` lists.

The link checker itself is tested on planted broken links, so the repository checks cannot pass
by finding no links.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_TIMEOUT_S = 300  # per tool; a few seconds on idle cores, much more on overloaded ones


# ---------------------------------------------------------------------------------- Markdown
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); target up to the first space (a title may follow) or ")".
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def _prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    in_fence = False
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield no, _INLINE_CODE.sub("", line)


def markdown_links(text: str) -> List[Tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    out = []
    for no, line in _prose_lines(text):
        out += [(no, m.group(1)) for m in _LINK.finditer(line)]
        m = _REF_DEF.match(line)
        if m:
            out.append((no, m.group(1)))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline links reduced to their text, lower case,
    punctuation removed (letters, digits, ``_``, ``-`` and spaces kept), spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def markdown_anchors(text: str) -> Set[str]:
    """Every anchor of a Markdown text: heading slugs (duplicates numbered -1, -2, ... as GitHub
    does) and explicit ``<a id="...">`` / ``<a name="...">``."""
    anchors: Set[str] = set()
    seen: Dict[str, int] = {}
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        anchors.update(_HTML_ID.findall(line))
        m = _HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(md_path: str, repo: str = REPO) -> List[str]:
    """Problems with the relative links of the Markdown file ``md_path``: targets that do not
    exist or lie outside ``repo``, and ``#anchors`` that name no heading of a Markdown target."""
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    rel = os.path.relpath(md_path, repo)
    problems = []
    for no, target in markdown_links(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(md_path), path)) if path else md_path
        where = f"{rel}:{no}: link {target!r}"
        if os.path.commonpath([os.path.abspath(repo), os.path.abspath(dest)]) != os.path.abspath(repo):
            problems.append(f"{where} points outside the repository ({dest})")
            continue
        if not os.path.exists(dest):
            problems.append(f"{where}: {os.path.relpath(dest, repo)} does not exist")
            continue
        if anchor and dest.endswith(".md"):
            with open(dest, encoding="utf-8") as f:
                anchors = markdown_anchors(f.read())
            if anchor not in anchors:
                problems.append(f"{where}: no heading or <a id> {anchor!r} in {os.path.relpath(dest, repo)}")
    return problems


def user_markdown_files(repo: str = REPO) -> List[str]:
    """README.md, docs/*.md, projects/*/README.md and configs/**/*.md."""
    files = [os.path.join(repo, "README.md")]
    files += glob.glob(os.path.join(repo, "docs", "*.md"))
    files += glob.glob(os.path.join(repo, "projects", "*", "README.md"))
    files += glob.glob(os.path.join(repo, "configs", "**", "*.md"), recursive=True)
    return sorted(f for f in files if os.path.isfile(f))


# ---------------------------------------------------------------------- the checker itself
def test_github_slug_matches_githubs_rule():
    assert github_slug("CBN 6. Window size k and burn-in") == "cbn-6-window-size-k-and-burn-in"
    assert github_slug('Rethinking "Batch" in BatchNorm') == "rethinking-batch-in-batchnorm"
    assert github_slug("Related: population statistics during and after training") == \
        "related-population-statistics-during-and-after-training"
    assert github_slug("4. Mixed precision") == "4-mixed-precision"
    assert github_slug("Comparing runs: `tools/compare_runs.py`") == "comparing-runs-toolscompare_runspy"
    assert github_slug("See [the docs](docs/X.md) now") == "see-the-docs-now"


def test_checker_finds_planted_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("# Title\n\n## Second part\n\n<a id=\"short\"></a>\n### Item 1\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/A.md) [ok anchor](docs/A.md#second-part) [ok id](docs/A.md#short) [web](https://x.org/y)\n"
        "[missing](docs/B.md)\n"
        "[bad anchor](docs/A.md#third-part)\n"
        "![missing image](docs/fig.png)\n"
        "[outside](../elsewhere/METHODS.md)\n"
        "`[in code](docs/C.md)`\n"
        "```\n[in fence](docs/D.md)\n```\n"
        "[ref]: docs/E.md\n"
        "[self](#nowhere)\n"
    )
    problems = broken_links(str(tmp_path / "README.md"), repo=str(tmp_path))
    text = "\n".join(problems)
    assert len(problems) == 6, text
    for bad in ("docs/B.md", "#third-part", "docs/fig.png", "outside the repository", "docs/E.md", "#nowhere"):
        assert bad in text, (bad, text)
    for fine in ("docs/C.md", "docs/D.md", "x.org"):
        assert fine not in text


# ---------------------------------------------------------------------- the repository
def test_user_docs_exist():
    files = [os.path.relpath(f, REPO) for f in user_markdown_files()]
    for expected in ("README.md", "docs/METHODS.md", "docs/MODEL_ZOO.md", "docs/DEPLOY.md"):
        assert expected in files


@pytest.mark.parametrize("md", [os.path.relpath(f, REPO) for f in user_markdown_files()])
def test_relative_links_resolve(md):
    problems = broken_links(os.path.join(REPO, md))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_methods_items_have_their_anchors():
    """Code cites docs/METHODS.md by item ("CBN 6", "MABN item 2"): each item has its anchor."""
    with open(os.path.join(REPO, "docs", "METHODS.md"), encoding="utf-8") as f:
        anchors = markdown_anchors(f.read())
    expected = {f"cbn-{i}" for i in range(1, 10)} | {f"mabn-{i}" for i in range(1, 7)}
    assert expected <= anchors, sorted(expected - anchors)
    assert "rethinking-batch-in-batchnorm" in anchors


_NO_SHARED_ROOTS = ("README.md", "docs", "smallbn_d2", "tools", "configs", "projects")
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}


def _product_files() -> Iterator[str]:
    for root in _NO_SHARED_ROOTS:
        path = os.path.join(REPO, root)
        if os.path.isfile(path):
            yield path
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            for name in filenames:
                if not name.endswith((".pyc", ".pyo")):
                    yield os.path.join(dirpath, name)


def test_no_reference_to_the_shared_folder():
    pattern = re.compile(rb"\.\./shared|/shared/")
    hits = []
    for path in _product_files():
        with open(path, "rb") as f:
            data = f.read()
        for m in pattern.finditer(data):
            line = data.count(b"\n", 0, m.start()) + 1
            hits.append(f"{os.path.relpath(path, REPO)}:{line}")
    assert not hits, "references to ../shared (not part of the repository):\n" + "\n".join(hits)


# ---------------------------------------------------------------------- tools --help
TOOLS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tools", "*.py")))


def _run_help(tool: str) -> Tuple[int, str]:
    """``python tool --help`` in the repository root: (exit status or -1 on timeout, stdout + stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run([sys.executable, tool, "--help"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        return -1, f"timed out after {HELP_TIMEOUT_S} s\n{out}"
    return proc.returncode, proc.stdout.decode(errors="replace")


@pytest.fixture(scope="module")
def help_results() -> Dict[str, Tuple[int, str]]:
    """Every tool run with ``--help``, one process per core at a time (the tools that import
    torch and Detectron2 take a few seconds each); tool -> (exit status, stdout + stderr)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(TOOLS, pool.map(_run_help, TOOLS)))


def test_tools_found():
    assert "tools/train_net.py" in TOOLS and "tools/compare_runs.py" in TOOLS


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_tool_answers_help(tool, help_results):
    rc, out = help_results[tool]
    assert rc == 0, f"python {tool} --help exited with {rc}:\n{out[-3000:]}"
    assert "usage:" in out.lower(), f"python {tool} --help printed no usage:\n{out[-3000:]}"


_TOOL_CALL = re.compile(r"tools/(\w+\.py)\b(.*)")
_OPTION = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


def documented_tool_options(text: str) -> List[Tuple[int, str, str]]:
    """(line number, ``tools/X.py``, ``--option``) for every option given to a tool in a command
    of a Markdown text: in fenced code blocks (backslash continuations joined) and in inline code
    spans. A command ends at ``;``, ``&&``, ``|`` or ``&``."""
    commands: List[Tuple[int, str]] = []
    in_fence, pending, start = False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence, pending = not in_fence, ""
            continue
        if in_fence:
            if not pending:
                start = no
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            commands.append((start, pending))
            pending = ""
        else:
            commands += [(no, span.strip("`")) for span in _INLINE_CODE.findall(line)]
    found = []
    for no, command in commands:
        for part in re.split(r";|&&|\||&", command):
            m = _TOOL_CALL.search(part)
            if m:
                found += [(no, f"tools/{m.group(1)}", opt) for opt in _OPTION.findall(m.group(2))]
    return found


def test_documented_options_parser():
    text = ("```\npython tools/a.py --x 1 \\\n    --y-z 2 KEY --v\nfor n in 1; do tools/b.py --w; done\n```\n"
            "Run `tools/a.py --inline` or `--not-a-tool-option`.\n")
    assert documented_tool_options(text) == [(2, "tools/a.py", "--x"), (2, "tools/a.py", "--y-z"),
                                             (2, "tools/a.py", "--v"), (4, "tools/b.py", "--w"),
                                             (6, "tools/a.py", "--inline")]


@pytest.mark.slow
@pytest.mark.parametrize("md", [os.path.relpath(f, REPO) for f in user_markdown_files()])
def test_documented_tool_options_exist(md, help_results):
    """Every ``--option`` a document passes to a tool is one the tool's ``--help`` lists (so the
    docs use the spelling each tool really accepts, e.g. ``--output-dir``)."""
    with open(os.path.join(REPO, md), encoding="utf-8") as f:
        uses = documented_tool_options(f.read())
    problems = []
    for no, tool, option in uses:
        if tool not in help_results:
            problems.append(f"{md}:{no}: {tool} does not exist")
            continue
        rc, out = help_results[tool]
        if rc == 0 and not re.search(re.escape(option) + r"(?![\w-])", out):
            problems.append(f"{md}:{no}: {tool} does not list {option} in its --help")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------- --help texts
def options_without_help(help_text: str) -> List[str]:
    """The options of an argparse ``--help`` output that have no help text: an option line with
    nothing after the option (two or more spaces apart) and no indented help line below it."""
    lines = help_text.splitlines()
    bad, in_section = [], False
    for i, line in enumerate(lines):
        if re.match(r"^\S.*:$", line):  # "options:", "positional arguments:", group titles
            in_section = True
            continue
        if line.strip() and not line.startswith(" "):
            in_section = False
            continue
        if in_section and re.match(r"^  \S", line):
            inline = re.search(r"\S\s{2,}\S", line.strip())
            below = lines[i + 1] if i + 1 < len(lines) else ""
            if not inline and not re.match(r"^\s{4,}\S", below):
                bad.append(line.strip())
    return bad


def test_options_without_help_finds_planted_ones():
    import argparse

    p = argparse.ArgumentParser(prog="t", description="d")
    p.add_argument("--documented", help="what it does")
    p.add_argument("--bare", type=int)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--long-option-name-with-metavar", metavar="A_VERY_LONG_METAVAR", help="wrapped below")
    assert options_without_help(p.format_help()) == ["--bare BARE", "--flag"]


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_describes_the_tool_and_every_option(tool, help_results):
    rc, out = help_results[tool]
    assert rc == 0, out[-3000:]
    # argparse prints the description between the usage and the first section
    paragraphs = [p for p in re.split(r"\n\s*\n", out.split("usage:", 1)[-1]) if p.strip()]
    assert len(paragraphs) > 1 and not re.match(r"^\s*(positional arguments|options|optional arguments):",
                                                paragraphs[1]), f"{tool} --help has no description:\n{out[:2000]}"
    assert options_without_help(out) == [], f"{tool} --help: options without help"


@pytest.mark.slow
def test_lazyconfig_tool_help_shows_lazyconfig_overrides(help_results):
    _, out = help_results["tools/lazyconfig_train_net.py"]
    assert "train.max_iter=" in out and "smallbn.norms.CBN.window_size=" in out
    assert "SOLVER.BASE_LR" not in out and "MODEL.WEIGHTS" not in out and "PATH.KEY VALUE" not in out
    _, out = help_results["tools/train_net.py"]
    assert "SOLVER.MAX_ITER 20" in out and "path.key=value" not in out


@pytest.mark.slow
def test_detectron2_main_script_answers_help():
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "test_detectron2_main.sh"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash tools/test_detectron2_main.sh TARBALL [PYTEST ARGS...]")
    assert "SMALLBN_D2_EXPECT_DETECTRON2" in proc.stdout and proc.stderr == ""
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "test_detectron2_main.sh"), "--verbose"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --verbose" in proc.stderr


@pytest.mark.parametrize("tool", ["benchmark_cbn_layer.py", "benchmark_norms.py"])
def test_benchmark_default_output_is_not_a_tracked_page(tool):
    """A benchmark run without --out must not rewrite a page of the repository."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(tool[:-3], os.path.join(REPO, "tools", tool))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = os.path.normpath(module.parse_args([]).out)
    assert not os.path.isabs(out) and out.split(os.sep)[0] == "output", out
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert out not in tracked  # (empty outside a git checkout)


# ---------------------------------------------------------------------------------- about the software only
#: Words that describe where the project was developed or tested, not the software: none of
#: them may appear in README.md, docs/, the projects' READMEs or a test's skip message.
DEVELOPMENT_WORDS = ("shared subset", "other jobs", "80-image", "80 train images", "../shared", "package index",
                     "64 MiB", "locally patched", "79 val images", "the subset CI has", "larger COCO subset")


def _skip_messages() -> Iterator[Tuple[str, int, str]]:
    """(test file, line, text) of every string literal in tests/*.py that is a skip reason:
    the ``reason=``/``skip(...)`` arguments and the strings a ``*_missing()``/``skip`` helper returns."""
    import ast

    for path in sorted(glob.glob(os.path.join(REPO, "tests", "*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            texts = []
            if name in ("skip", "skipif", "importorskip", "xfail"):
                texts += node.args
            texts += [kw.value for kw in node.keywords if kw.arg == "reason"]
            for t in texts:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield os.path.relpath(path, REPO), sub.lineno, sub.value
        for node in ast.walk(tree):  # helpers that compute a reason: "return '...'" in *_missing/*skip* functions
            if isinstance(node, ast.FunctionDef) and ("missing" in node.name or "skip" in node.name
                                                      or "reason" in node.name):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield os.path.relpath(path, REPO), sub.lineno, sub.value


def development_words_in(text: str) -> List[str]:
    low = text.lower()
    return [w for w in DEVELOPMENT_WORDS if w.lower() in low]


def test_development_word_checker_finds_planted_words():
    assert development_words_in("runs on the Shared Subset of COCO") == ["shared subset"]
    assert development_words_in("load average 7 (from other jobs)") == ["other jobs"]
    assert development_words_in("the wheels travel, 64 MiB at most") == ["64 MiB"]
    assert development_words_in("COCO AP of the 24 val images") == []


def test_docs_and_skip_messages_describe_the_software_only():
    problems = []
    docs = ["README.md"] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))) + sorted(
        glob.glob(os.path.join(REPO, "projects", "*", "README.md")))
    for path in docs:
        path = os.path.join(REPO, path)
        for no, line in enumerate(open(path, encoding="utf-8"), 1):
            for word in development_words_in(line):
                problems.append(f"{os.path.relpath(path, REPO)}:{no}: {word!r}")
    messages = list(_skip_messages())
    assert any("CUDA" in text or "cuda" in text for _, _, text in messages), "no skip message found: the scan is broken"
    for path, no, text in messages:
        for word in development_words_in(text):
            problems.append(f"{path}:{no} (skip message): {word!r}")
    assert not problems, "text about the development setup, not the software:\n" + "\n".join(problems)
