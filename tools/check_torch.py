#!/usr/bin/env python
"""Check the torch and torchvision of this interpreter's environment (used by tools/install.sh).

Two modes:

* ``--pinned REQUIREMENTS``: after installing the pinned versions, check that the installed
  torch and torchvision have the versions that ``REQUIREMENTS`` pins and come from one build
  family (the same local version label, e.g. both ``+cu130`` or both without a label: a CPU-only
  ``+cpu`` torch next to a CUDA torchvision breaks torchvision's compiled ops).
* ``--existing``: before installing anything into an environment that already has torch
  (``tools/install.sh --use-existing-torch``), check that torch satisfies the requirement in
  ``setup.py``'s ``install_requires`` and that torchvision's own requirement on torch holds.

Both modes then run ``torchvision.ops.nms`` on three boxes and compare it with the expected
result. Prints one line per package (version and location); exits with status 1 and a message
naming the problem and the fix otherwise.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging; it is present wherever pip is
    from pip._vendor.packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


class TorchCheckError(RuntimeError):
    """The environment's torch/torchvision do not meet the requirement named in the message."""


def read_requirements(path: Path) -> dict[str, Requirement]:
    """The torch and torchvision requirements of a pip requirements file, by name."""
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            if req.name in ("torch", "torchvision"):
                reqs[req.name] = req
    return reqs


def setup_py_requirements(path: Path = REPO / "setup.py") -> dict[str, Requirement]:
    """The ``install_requires`` of ``setup.py`` (a list literal), by name."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {r.name: r for r in map(Requirement, ast.literal_eval(node.value))}
    raise TorchCheckError(f"{path}: no install_requires list")


def _label(version: str) -> str:
    return version.split("+", 1)[1] if "+" in version else ""


def _import(name: str):
    try:
        return __import__(name)
    except Exception as e:  # noqa: BLE001  (any import failure means the package is unusable)
        raise TorchCheckError(f"cannot import {name} in {sys.executable}: {type(e).__name__}: {e}") from e


def _dist_version(name: str, module) -> str:
    """The distribution's version (pip's view), or the module's ``__version__`` if no metadata."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return module.__version__


def check_nms(torch, torchvision) -> None:
    """``torchvision.ops.nms`` on three boxes: the second overlaps the first (IoU 0.68) and is
    suppressed at threshold 0.5; the third is disjoint and kept."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    try:
        keep = torchvision.ops.nms(boxes, scores, 0.5).tolist()
    except Exception as e:  # noqa: BLE001
        raise TorchCheckError(
            f"torchvision.ops.nms fails ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            f"torch {torch.__version__} and torchvision {torchvision.__version__} are not builds that "
            "belong together") from e
    if keep != [0, 2]:
        raise TorchCheckError(f"torchvision.ops.nms returned {keep}, expected [0, 2]")


def check(mode: str, requirements: Path | None) -> list[str]:
    """Run the checks of ``mode`` ("pinned" or "existing"); return the report lines.

    Raises:
        TorchCheckError: a version, build-family or nms problem (the message says which).
    """
    torch = _import("torch")
    try:
        torchvision = _import("torchvision")
    except TorchCheckError as e:
        raise TorchCheckError(
            f"{e}; next to torch {torch.__version__} at {Path(torch.__file__).parent}. torch and "
            "torchvision are not builds that belong together (e.g. a CPU-only torch wheel from a local "
            f"find-links folder next to the index's torchvision). Fix: {sys.executable} -m pip uninstall -y "
            "torch torchvision, then run tools/install.sh again") from e
    versions = {"torch": _dist_version("torch", torch), "torchvision": _dist_version("torchvision", torchvision)}
    if mode == "pinned":
        wanted = read_requirements(requirements)
        for name, req in wanted.items():
            if not req.specifier.contains(versions[name], prereleases=True):
                raise TorchCheckError(f"{name} {versions[name]} is installed, {requirements.name} wants {req}")
        labels = {_label(torch.__version__), _label(torchvision.__version__)}
        if len(labels) > 1:
            raise TorchCheckError(
                f"torch {torch.__version__} and torchvision {torchvision.__version__} come from different "
                "builds (local version labels differ), e.g. a CPU-only torch wheel from a local find-links "
                f"folder next to a torchvision from the index. Fix: {sys.executable} -m pip uninstall -y "
                "torch torchvision, then run tools/install.sh again")
    else:
        req = setup_py_requirements()["torch"]
        if not req.specifier.contains(versions["torch"], prereleases=True):
            raise TorchCheckError(f"--use-existing-torch: torch {versions['torch']} is installed, setup.py "
                                  f"requires {req}; upgrade it or install without --use-existing-torch")
        try:
            tv_reqs = importlib.metadata.requires("torchvision") or []
        except importlib.metadata.PackageNotFoundError:
            tv_reqs = []
        for r in map(Requirement, tv_reqs):
            if r.name == "torch" and not r.marker and not r.specifier.contains(versions["torch"], prereleases=True):
                raise TorchCheckError(f"--use-existing-torch: torchvision {versions['torchvision']} requires {r}, "
                                      f"but torch {versions['torch']} is installed")
    check_nms(torch, torchvision)
    return [f"{name} {mod.__version__} at {Path(mod.__file__).parent}" for name, mod in
            (("torch", torch), ("torchvision", torchvision))] + ["torchvision.ops.nms: ok"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--pinned", type=Path, metavar="REQUIREMENTS",
                       help="check the versions pinned in this requirements file")
    group.add_argument("--existing", action="store_true", help="check an existing torch against setup.py")
    args = parser.parse_args()
    try:
        lines = check("pinned" if args.pinned else "existing", args.pinned)
    except TorchCheckError as e:
        print(f"[check_torch] error: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"[check_torch] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
