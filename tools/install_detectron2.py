#!/usr/bin/env python
"""Install Detectron2 v0.6 (Python only) from the ``pb1-detectron2==0.6`` sdist, ready to use.

Detectron2 is not published on PyPI. The ``pb1-detectron2==0.6`` sdist holds the official
v0.6 Python source (identical to the v0.6 tag) and its model-zoo configs, but not
``detectron2/layers/csrc``, so its own ``setup.py`` cannot build the ``detectron2._C`` extension
and ``pip install`` of it fails. Run with the interpreter of the target environment, this script:

1. leaves a Detectron2 it did not install untouched: if ``detectron2`` is importable and is not
   the ``pb1-detectron2`` distribution this script installs (for instance your own source build
   with its compiled ``_C``), it says so and changes nothing;
2. otherwise (no Detectron2, or a previous install of this script) downloads the sdist with pip
   (your pip configuration applies: index, proxy, certificates) and checks its sha256;
3. builds and installs a wheel of the Python packages that upstream's ``setup.py`` declares
   (``detectron2.*`` and the three ``detectron2.projects.*``) without the extension, plus
   * the model-zoo configs as ``detectron2/model_zoo/configs`` (YAML and LazyConfig ``.py``), as
     upstream's ``setup.py`` installs them, so ``detectron2.model_zoo.get_config_file`` and
     ``get_config`` work;
   * the start-up fix ``smallbn_d2_detectron2_compat`` (source: ``tools/detectron2_compat/``) and
     ``smallbn_d2_detectron2_compat.pth``, which runs it at interpreter start-up: a fallback for
     the missing ``detectron2._C`` (used only when no compiled one exists) and the NumPy/Pillow
     aliases that v0.6 needs, applied when ``detectron2`` is first imported. Every program in
     the environment can then use Detectron2 without importing smallbn_d2;
4. checks in a fresh interpreter that ``import detectron2.layers`` and
   ``model_zoo.get_config_file`` work.

All of it belongs to the ``pb1-detectron2`` distribution: ``pip uninstall pb1-detectron2``
removes it. Exit status 0 on success or when a foreign Detectron2 is left untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DISTRIBUTION = "pb1-detectron2"
COMPAT_MODULE = "smallbn_d2_detectron2_compat"
COMPAT_SOURCE = Path(__file__).resolve().parent / "detectron2_compat" / f"{COMPAT_MODULE}.py"
PTH_LINE = f"import {COMPAT_MODULE}; {COMPAT_MODULE}.install()\n"
CHECK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"

# The packaging part of upstream's setup.py (v0.6) without ``ext_modules``: same name, version,
# packages, project mapping and model-zoo package data; plus the start-up fix (a top-level module
# and a .pth file copied into the wheel's root, as setuptools ships its own .pth).
# Runtime dependencies come from requirements.txt.
_SETUP_PY = f'''
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PROJECTS = {{
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}}
PTH = "{COMPAT_MODULE}.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


setup(
    name="{DISTRIBUTION}",
    version="0.6",
    description="Detectron2 v0.6 Python sources and model-zoo configs (no C++ extension), "
    "from the pb1-detectron2 sdist, with smallbn_d2's start-up compatibility fix",
    packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    py_modules=["{COMPAT_MODULE}"],
    cmdclass={{"build_py": BuildPyWithPth}},
    python_requires=">=3.6",
)
'''

# Run in a fresh interpreter of the target environment after installing (smallbn_d2 not imported).
_CHECK = f"""
import sys
import detectron2, detectron2.layers
from detectron2 import model_zoo
path = model_zoo.get_config_file({CHECK_CONFIG!r})
assert model_zoo.get_config({CHECK_CONFIG!r}).MODEL.MASK_ON
assert "smallbn_d2" not in sys.modules
print(detectron2.__file__)
"""


def log(msg: str) -> None:
    """Print ``msg`` with this script's prefix."""
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str) -> None:
    """Run ``python -m pip ARGS`` with this interpreter; the user's pip configuration applies.

    Raises:
        subprocess.CalledProcessError: pip failed.
    """
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log(" ".join(cmd))
    subprocess.check_call(cmd)


def installed_by_this_script(init_file: str) -> bool:
    """True if ``init_file`` (the ``detectron2/__init__.py`` that imports) belongs to the
    ``pb1-detectron2`` distribution, i.e. was installed by this script (no other installer
    can build that sdist)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    target = Path(init_file).resolve()
    return any(
        Path(dist.locate_file(f)).resolve() == target
        for f in (dist.files or ())
        if f.parts == ("detectron2", "__init__.py")
    )


def build_source_tree(sdist: Path, workdir: Path) -> Path:
    """Extract ``sdist`` (sha256-checked) into ``workdir`` and replace its ``setup.py``.

    Returns the source directory. Raises SystemExit on a wrong checksum or when the sdist lacks
    ``detectron2/model_zoo/configs``.
    """
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist.name}: sha256 {digest} != expected {SDIST_SHA256}")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    src = workdir / "pb1-detectron2-0.6"
    configs = src / "detectron2" / "model_zoo" / "configs"
    if not any(configs.glob("**/*.yaml")):
        raise SystemExit(f"{sdist.name}: no model-zoo configs under {configs.relative_to(workdir)}")
    (src / "setup.py").write_text(_SETUP_PY)
    shutil.copyfile(COMPAT_SOURCE, src / f"{COMPAT_MODULE}.py")
    (src / f"{COMPAT_MODULE}.pth").write_text(PTH_LINE)
    return src


def build_wheel(wheel_dir: Path) -> Path:
    """Write the wheel that :func:`main` installs (same sdist, checks and contents) into
    ``wheel_dir`` instead of installing it, e.g. for a machine without a package index
    (``tools/prepare_gpu_wheels.sh``). Pure Python (``py3-none-any``). Returns its path.

    Raises:
        subprocess.CalledProcessError: pip failed; SystemExit: as :func:`build_source_tree`.
    """
    wheel_dir = Path(wheel_dir).resolve()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pb1-detectron2-") as tmp:
        tmp = Path(tmp)
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmp), SDIST)
        (sdist,) = tmp.glob("pb1*detectron2-0.6.tar.gz")
        src = build_source_tree(sdist, tmp)
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(src))
    (wheel,) = wheel_dir.glob("pb1_detectron2-0.6-*.whl")
    return wheel


def main() -> int:
    """Install (or upgrade) as described in the module docstring; returns the exit status.

    Raises:
        SystemExit: wrong sdist checksum, no configs in the sdist, or the installed Detectron2
            fails the fresh-interpreter check (the message has its error output).
        subprocess.CalledProcessError: pip failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="write the wheel into this folder instead of installing it (see build_wheel)")
    args = parser.parse_args()
    if args.wheel_dir is not None:
        log(f"ok: wrote {build_wheel(args.wheel_dir)}")
        return 0

    spec = importlib.util.find_spec("detectron2")
    if spec is not None and spec.origin:
        if not installed_by_this_script(spec.origin):
            log(f"detectron2 at {Path(spec.origin).parent} was not installed by this script (it is not "
                f"the {DISTRIBUTION} distribution); leaving it untouched: no model-zoo configs or "
                f"start-up fixes are added to it")
            return 0
        log(f"upgrading the {DISTRIBUTION} install at {Path(spec.origin).parent} "
            "(configs and start-up fix are reinstalled)")

    with tempfile.TemporaryDirectory(prefix="pb1-detectron2-") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: upstream's setup.py imports torch to describe its extension.
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmp), SDIST)
        (sdist,) = tmp.glob("pb1*detectron2-0.6.tar.gz")
        src = build_source_tree(sdist, tmp)
        pip("install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(src))

    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[install_detectron2] installed, but a fresh interpreter cannot use it:\n{proc.stderr}")
    log(f"ok: detectron2 at {Path(proc.stdout.strip()).parent} imports without smallbn_d2 "
        f"and model_zoo.get_config_file({CHECK_CONFIG!r}) works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
