#!/usr/bin/env python
"""Build the wheel folder that ``tools/gpu_check.py`` installs from on a GPU machine without an index.

Run on a machine with PyPI, with the project's environment (``.venv/bin/python``, made by
tools/install.sh), from the repository root::

    python tools/prepare_gpu_wheels.py [--dest gpu_wheels] [--python-version 3.12] [--overwrite]

The folder then holds, for CPython 3.12 on manylinux x86_64 (see
:mod:`benchmarks.gpu_setup`):

* Detectron2 v0.6 as the pure-Python wheel that ``tools/install_detectron2.py`` builds from the
  ``pb1-detectron2==0.6`` sdist (model-zoo configs and start-up fix included);
* every other requirement of requirements.txt and their dependencies, at the versions installed
  in this environment, except torch, torchvision and what the GPU machine's Python provides
  (``gpu_setup.GPU_PROVIDED``): ``pip download --no-deps --only-binary=:all: --python-version
  3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 ...`` for each, or, for a
  project published only as an sdist (fvcore, antlr4-python3-runtime), its pure-Python wheel
  built with ``pip wheel --no-deps``.

It then checks offline that the folder is closed (every requirement of every wheel is in the
folder or provided by the GPU machine) and prints its size; the folder travels with the working
tree (``gpu_wheels/`` is git-ignored). smallbn_d2 itself is not in it: gpu_check.py installs the
working tree in editable mode. Exit status 0 on success, 1 when a download or the check fails,
2 on bad usage (a non-empty ``--dest`` without ``--overwrite``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import gpu_setup  # noqa: E402


def log(msg: str) -> None:
    """Print ``msg`` with this script's prefix."""
    print(f"[prepare_gpu_wheels] {msg}", flush=True)


def fetch(spec: str, dest: Path, python_version: str) -> str:
    """Put the wheel of ``spec`` into ``dest``: the binary wheel for the target, else (sdist only)
    a pure-Python wheel built here. Returns how (``"downloaded"`` / ``"built from the sdist"``).

    Raises:
        RuntimeError: neither worked, or the built wheel is not pure Python.
    """
    before = set(dest.glob("*.whl"))
    cmd = gpu_setup.download_command(spec, dest, python_version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return "downloaded"
    proc2 = subprocess.run(gpu_setup.build_command(spec, dest), capture_output=True, text=True)
    if proc2.returncode != 0:
        raise RuntimeError(f"{spec}: no wheel for CPython {python_version} ({proc.stderr.strip().splitlines()[-1:]}) "
                           f"and building one failed:\n{proc2.stderr[-2000:]}")
    new = sorted(set(dest.glob("*.whl")) - before)
    impure = [w.name for w in new if not gpu_setup.is_pure_wheel(w.name)]
    if impure:
        for w in new:
            w.unlink()
        raise RuntimeError(f"{spec}: no wheel for CPython {python_version} on PyPI, and the one built here "
                           f"({', '.join(impure)}) is not pure Python, so it would not run there")
    return "built from the sdist"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / "gpu_wheels", help="the folder (default: gpu_wheels/)")
    ap.add_argument("--python-version", default=gpu_setup.TARGET_PYTHON,
                    help="CPython version of the GPU machine (default %(default)s)")
    ap.add_argument("--overwrite", action="store_true",
                    help="remove the .whl files of an existing --dest first (other files are kept)")
    args = ap.parse_args(argv)
    dest = args.dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        if not args.overwrite:
            print(f"prepare_gpu_wheels.py: error: --dest {dest} is not empty; pass --overwrite to replace its "
                  "wheels, or choose a new folder", file=sys.stderr)
            return 2
        old = sorted(dest.glob("*.whl"))
        log(f"--overwrite: removing {len(old)} wheel(s) from {dest}")
        for w in old:
            w.unlink()
    dest.mkdir(parents=True, exist_ok=True)

    requirements = REPO / "requirements.txt"
    try:
        plan = gpu_setup.download_plan(requirements)
    except gpu_setup.PlanError as e:
        print(f"prepare_gpu_wheels.py: error: {e}", file=sys.stderr)
        return 1
    log(f"{len(plan)} distributions for CPython {args.python_version} (versions of {sys.prefix}): {' '.join(plan)}")
    try:
        for spec in plan:
            log(f"{spec}: {fetch(spec, dest, args.python_version)}")
    except RuntimeError as e:
        print(f"prepare_gpu_wheels.py: error: {e}", file=sys.stderr)
        return 1
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "install_detectron2.py"), "--wheel-dir", str(dest)])
    if proc.returncode != 0:
        print("prepare_gpu_wheels.py: error: building the Detectron2 wheel failed (see above)", file=sys.stderr)
        return 1
    gpu_reqs = [line for line in gpu_setup.requirement_lines(requirements)]
    problems = gpu_setup.missing_requirements(dest, gpu_reqs + [gpu_setup.DETECTRON2_REQUIREMENT],
                                              python_version=args.python_version)
    if problems:
        print("prepare_gpu_wheels.py: error: an offline install from the folder would fail:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 1
    wheels = sorted(dest.glob("*.whl"))
    size = gpu_setup.folder_size_bytes(dest)
    for w in wheels:
        log(f"  {w.stat().st_size / 2**10:8.0f} KiB  {w.name}")
    log(f"ok: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {os.path.relpath(dest)}; on the GPU machine: "
        f"python3 tools/gpu_check.py --wheels {os.path.relpath(dest, REPO)} --output-dir gpu_report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
