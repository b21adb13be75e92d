#!/usr/bin/env python
"""Install Detectron2 v0.6 (Python only) from the ``pb1-detectron2==0.6`` sdist.

Detectron2 is not published on PyPI. The ``pb1-detectron2==0.6`` sdist holds the official
v0.6 Python source (identical to the v0.6 tag) but not ``detectron2/layers/csrc``, so its own
``setup.py`` cannot build the ``detectron2._C`` extension and ``pip install`` of it fails.
This script:

1. does nothing if ``detectron2`` is already importable (a user's official source build, with
   its compiled ``_C``, stays untouched; pass ``--force`` to reinstall anyway);
2. downloads the sdist with pip and checks its sha256;
3. builds and installs a wheel of the same Python packages that upstream's ``setup.py``
   declares (``detectron2.*`` and the three ``detectron2.projects.*``), without the extension.

What the missing extension means at run time is handled in one place,
:mod:`smallbn_d2.compat` (see README, "Detectron2 without its C++ extension").
"""
import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# The packaging part of upstream's setup.py (v0.6) without ``ext_modules``: same name,
# version, packages and project mapping. Runtime dependencies come from requirements.txt.
_SETUP_PY = '''
from setuptools import find_packages, setup

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
setup(
    name="pb1-detectron2",
    version="0.6",
    description="Detectron2 v0.6 Python sources (no C++ extension), from the pb1-detectron2 sdist",
    packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS),
    package_dir=PROJECTS,
    python_requires=">=3.6",
)
'''


def pip(*args: str) -> None:
    """Run ``python -m pip --isolated ARGS`` (PyPI only, ignoring local pip configuration)."""
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args]
    print("[install_detectron2]", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 is importable")
    args = parser.parse_args()

    if not args.force and importlib.util.find_spec("detectron2") is not None:
        import detectron2

        print(f"[install_detectron2] detectron2 {detectron2.__version__} already installed at "
              f"{Path(detectron2.__file__).parent}; leaving it untouched")
        return 0

    with tempfile.TemporaryDirectory(prefix="pb1-detectron2-") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: upstream's setup.py imports torch to describe its extension.
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmp), SDIST)
        (sdist,) = tmp.glob("pb1*detectron2-0.6.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist.name}: sha256 {digest} != expected {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6"
        (src / "setup.py").write_text(_SETUP_PY)
        pip("install", "--no-deps", "--no-build-isolation", str(src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
