"""The wheel folder for a GPU machine without a package index, and the install from it.

A GPU machine of the kind ``tools/gpu_check.py`` targets has Python with its own torch and
torchvision (and numpy, Pillow, OpenCV, matplotlib, TensorBoard, pytest: :data:`GPU_PROVIDED`)
but no Detectron2, none of Detectron2's other dependencies and no package index. Two halves:

* **Preparation** (``tools/prepare_gpu_wheels.py``, on a machine with PyPI, in the project's own
  environment): :func:`download_plan` lists ``name==version`` for every requirement of
  requirements.txt and every dependency of those, except torch/torchvision and
  :data:`GPU_PROVIDED`, at the versions installed in the preparing environment (a consistent set
  that the test suite ran with; resolving each requirement on its own can pick versions that
  conflict, e.g. an omegaconf that hydra-core excludes). :func:`download_command` fetches each as
  a wheel for the target Python (CPython 3.12, manylinux x86_64); a requirement published only
  as an sdist is built into a pure-Python wheel instead (:func:`build_command`,
  :func:`is_pure_wheel`). Detectron2's wheel is built by ``tools/install_detectron2.py
  --wheel-dir``. :func:`missing_requirements` then checks, offline, that the folder is closed:
  every requirement of every wheel (markers evaluated for the target Python) is in the folder
  or in :data:`GPU_PROVIDED`.
* **Install** (``tools/gpu_check.py``, on the GPU machine): :func:`create_venv` makes a venv with
  ``--system-site-packages`` that also sees the packages of the interpreter that created it
  (a venv made from a venv would otherwise see only the base interpreter's packages, not the
  torch of the first venv), and :func:`install_commands` installs from the folder with
  ``pip --isolated install --no-index --find-links`` and smallbn_d2 itself in editable mode.

Only the standard library is used (``packaging`` where available, for markers and version
specifiers): this module runs before anything is installed. It is importable without
``smallbn_d2/__init__.py`` (see ``tools/gpu_check.py``).
"""
from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

__all__ = ["TARGET_PYTHON", "PLATFORMS", "TORCH_PACKAGES", "GPU_PROVIDED", "DETECTRON2_REQUIREMENT",
           "PARENT_SITE_PTH", "canonical_name", "requirement_lines", "download_plan", "download_command",
           "build_command", "is_pure_wheel", "wheel_name_version", "missing_requirements", "folder_size_bytes",
           "write_gpu_requirements", "venv_python", "create_venv", "install_commands", "PlanError"]

#: CPython version of the GPU machine's interpreter.
TARGET_PYTHON = "3.12"
#: ``pip download --platform`` values: manylinux2014 (= manylinux_2_17) and manylinux_2_28, the
#: glibc floor of the torch builds such machines carry. pip matches each name exactly.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
#: Never put in the folder: the GPU machine's own builds are used.
TORCH_PACKAGES = ("torch", "torchvision")
#: Packages the GPU machine's Python provides (with torch, torchvision and their dependencies);
#: not downloaded. Requirements on anything else must be met by the folder.
GPU_PROVIDED = ("numpy", "pillow", "opencv-python-headless", "matplotlib", "tensorboard", "pytest", "packaging",
                "onnx", "onnxruntime",
                "typing-extensions")
#: Detectron2's distribution, built by ``tools/install_detectron2.py --wheel-dir``.
DETECTRON2_REQUIREMENT = "pb1-detectron2==0.6"
#: File in the new venv's site-packages that lists the creating interpreter's site-packages.
PARENT_SITE_PTH = "_smallbn_d2_parent_site.pth"

_TORCH_LINE = re.compile(r"^\s*(torch|torchvision)\s*([=<>!~;\[]|$)")


class PlanError(RuntimeError):
    """The wheel folder cannot be planned: a requirement is not installed here, or its installed
    version does not satisfy requirements.txt."""


def canonical_name(name: str) -> str:
    """PEP 503 normalized project name: ``"Hydra_Core"`` -> ``"hydra-core"``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_class():
    """``packaging.requirements.Requirement`` (or pip's vendored copy, present wherever pip is)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip's copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def requirement_lines(requirements_file: os.PathLike) -> List[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    out = []
    for line in Path(requirements_file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _target_environment(python_version: str) -> Dict[str, str]:
    """PEP 508 marker environment of CPython ``python_version`` on Linux x86_64, no extra."""
    return {"python_version": python_version, "python_full_version": python_version + ".0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def download_plan(requirements_file: os.PathLike, provided: Sequence[str] = GPU_PROVIDED,
                  version_of: Callable[[str], str] = None,
                  requires_of: Callable[[str], Optional[List[str]]] = None) -> List[str]:
    """``name==version`` of everything the folder must hold, sorted by name (Detectron2 aside).

    The requirements of ``requirements_file`` without torch/torchvision and ``provided``, and,
    recursively, their dependencies (markers evaluated for this interpreter, extras not
    followed) that are not provided either; each at the version installed here.

    Args:
        requirements_file: the project's requirements.txt.
        provided: names the GPU machine provides (:data:`GPU_PROVIDED`).
        version_of, requires_of: installed version and ``Requires-Dist`` list of a distribution
            (default: ``importlib.metadata.version`` / ``.requires`` of this interpreter).
    Raises:
        PlanError: a needed distribution is not installed here, or its version does not satisfy
            requirements.txt (names both).
    """
    import importlib.metadata as md

    Requirement = _requirement_class()
    version_of = version_of or md.version
    requires_of = requires_of or md.requires
    skip = {canonical_name(n) for n in (*TORCH_PACKAGES, *provided)}
    queue, specs = [], {}
    for line in requirement_lines(requirements_file):
        req = Requirement(line)
        if canonical_name(req.name) not in skip:
            queue.append((req, "requirements.txt"))
    pinned: Dict[str, str] = {}
    while queue:
        req, wanted_by = queue.pop(0)
        name = canonical_name(req.name)
        if name in pinned:
            continue
        try:
            version = version_of(req.name)
        except md.PackageNotFoundError:
            raise PlanError(f"{req} (required by {wanted_by}) is not installed in this environment "
                            f"({sys.prefix}); run tools/install.sh first") from None
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            raise PlanError(f"{req.name} {version} is installed here, but {wanted_by} requires {req}")
        pinned[name] = version
        specs[name] = f"{name}=={version}"
        for dep in requires_of(req.name) or []:
            dreq = Requirement(dep)
            if dreq.marker is not None and not dreq.marker.evaluate({"extra": ""}):
                continue
            if canonical_name(dreq.name) not in skip:
                queue.append((dreq, f"{name} {version}"))
    return [specs[n] for n in sorted(specs)]


def _abi(python_version: str) -> str:
    """``"3.12"`` -> ``"cp312"``."""
    return "cp" + python_version.replace(".", "")


def download_command(spec: str, dest: os.PathLike, python_version: str = TARGET_PYTHON,
                     python: str = sys.executable) -> List[str]:
    """``pip download`` of the binary wheel of ``spec`` (no dependencies) for CPython
    ``python_version`` on manylinux x86_64 (:data:`PLATFORMS`) into ``dest``."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "--abi", _abi(python_version)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + ["-d", str(dest), spec]


def build_command(spec: str, dest: os.PathLike, python: str = sys.executable) -> List[str]:
    """``pip wheel`` of ``spec`` (no dependencies) into ``dest``: for a requirement published only
    as an sdist; the result must be a pure-Python wheel (:func:`is_pure_wheel`)."""
    return [python, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), spec]


def _wheel_tags(filename: str):
    """``(name, version, python tags, abi tags, platform tags)`` of a wheel file name.

    Raises:
        ValueError: not a wheel file name (``name-version[-build]-python-abi-platform.whl``).
    """
    base = os.path.basename(filename)
    parts = base[:-4].split("-") if base.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise ValueError(f"{base!r} is not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    return parts[0], parts[1], parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")


def wheel_name_version(filename: str):
    """``(canonical name, version)`` of a wheel file name (see :func:`_wheel_tags`)."""
    name, version, *_ = _wheel_tags(filename)
    return canonical_name(name), version


def is_pure_wheel(filename: str) -> bool:
    """True for a wheel that runs on any CPython 3 (``py3``/``py2.py3``, ABI ``none``, ``any``)."""
    _, _, py, abi, plat = _wheel_tags(filename)
    return "py3" in py and abi == ["none"] and plat == ["any"]


def _wheel_fits(filename: str, python_version: str) -> bool:
    """True if the wheel installs on CPython ``python_version``, Linux x86_64 (glibc >= 2.28)."""
    if is_pure_wheel(filename):
        return True
    _, _, py, abi, plat = _wheel_tags(filename)
    cp = _abi(python_version)
    abi_ok = cp in abi or ("abi3" in abi and any(p.startswith("cp3") and int(p[3:]) <= int(cp[3:]) for p in py))
    py_ok = cp in py or "abi3" in abi

    def plat_ok(p):
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
        if m:
            return (int(m.group(1)), int(m.group(2))) <= (2, 28)
        return p in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64")

    return abi_ok and py_ok and any(plat_ok(p) for p in plat)


def _wheel_requires(path: Path) -> List[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not meta:
            raise ValueError(f"{path.name} has no .dist-info/METADATA: not a wheel")
        text = z.read(meta[0]).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def missing_requirements(wheel_dir: os.PathLike, requirements: Iterable[str] = (),
                         provided: Sequence[str] = GPU_PROVIDED, python_version: str = TARGET_PYTHON) -> List[str]:
    """What an offline install from ``wheel_dir`` on the GPU machine would miss; empty if none.

    Checks, for CPython ``python_version`` on Linux x86_64: every wheel installs there; no
    project has two wheels; every ``requirements`` line (torch/torchvision and ``provided``
    aside) and every ``Requires-Dist`` of every wheel (markers evaluated for the target, extras
    not followed) is met by a wheel of the folder at a matching version, or by ``provided`` /
    torch / torchvision.

    Returns:
        one sentence per problem, naming the wheel or requirement.
    """
    Requirement = _requirement_class()
    env = _target_environment(python_version)
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    problems: List[str] = []
    have: Dict[str, str] = {}
    for w in wheels:
        name, version = wheel_name_version(w.name)
        if name in have:
            problems.append(f"{name} has two wheels ({have[name]} and {version}); keep one")
        have[name] = version
        if not _wheel_fits(w.name, python_version):
            problems.append(f"{w.name} does not install on CPython {python_version} / manylinux x86_64")
    external = {canonical_name(n) for n in (*TORCH_PACKAGES, *provided)}

    def check(req_text: str, wanted_by: str) -> None:
        req = Requirement(req_text)
        if req.marker is not None and not req.marker.evaluate(env):
            return
        name = canonical_name(req.name)
        if name in external:
            return
        if name not in have:
            problems.append(f"{req.name} (required by {wanted_by}) is neither in {wheel_dir} nor provided by the "
                            "GPU machine")
        elif req.specifier and not req.specifier.contains(have[name], prereleases=True):
            problems.append(f"{wanted_by} requires {req}, but {wheel_dir} has {name} {have[name]}")

    for line in requirements:
        check(line, "requirements.txt")
    for w in wheels:
        name, version = wheel_name_version(w.name)
        for req_text in _wheel_requires(w):
            check(req_text, f"{name} {version}")
    return problems


def folder_size_bytes(path: os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_gpu_requirements(requirements_file: os.PathLike, dest: os.PathLike) -> Path:
    """Write ``requirements_file`` without its torch/torchvision lines to ``dest`` (the GPU
    machine's own torch is used); returns ``dest``."""
    lines = [line for line in requirement_lines(requirements_file) if not _TORCH_LINE.match(line)]
    dest = Path(dest)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def venv_python(venv: os.PathLike) -> str:
    """The interpreter of the venv ``venv`` (POSIX layout)."""
    return str(Path(venv) / "bin" / "python")


def _run(cmd: Sequence[str], timeout: float, log=None) -> subprocess.CompletedProcess:
    """Run ``cmd``, output to ``log`` (a binary file) or captured; CalledProcessError on failure."""
    if log is not None:
        log.flush()
        return subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=True)
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=True)


def create_venv(venv: os.PathLike, timeout: float = 120, log=None, parent_site: Optional[Sequence[str]] = None) -> str:
    """Create a venv that sees this interpreter's packages (its torch); return its python.

    ``python -m venv --system-site-packages --without-pip`` with this interpreter, then a
    :data:`PARENT_SITE_PTH` file in the venv's site-packages that adds this interpreter's
    site-packages (``site.getsitepackages()``) with ``site.addsitedir``, their own ``.pth`` files
    included: a venv made from a venv otherwise sees only the *base* interpreter's packages. The venv's own packages come first on ``sys.path``, so what is
    installed there wins. pip comes from this interpreter through that file; where it does not
    (no pip here), ``ensurepip`` installs one.

    Args:
        venv: the directory to create (must not exist or be empty).
        timeout: seconds for each subprocess.
        log: binary file for the subprocesses' output (default: captured).
        parent_site: directories to list instead of this interpreter's site-packages.
    Raises:
        FileExistsError: ``venv`` exists and is not empty.
        subprocess.CalledProcessError, subprocess.TimeoutExpired: a step failed.
    """
    venv = Path(venv)
    if venv.exists() and any(venv.iterdir()):
        raise FileExistsError(f"venv directory {str(venv)!r} exists and is not empty; allowed: a new or empty one")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], timeout, log)
    py = venv_python(venv)
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()
    dirs = parent_site if parent_site is not None else site.getsitepackages()
    dirs = [d for d in dirs if os.path.isdir(d) and os.path.realpath(d) != os.path.realpath(purelib)]
    # addsitedir (not a bare path): the .pth files of those directories are processed too
    Path(purelib, PARENT_SITE_PTH).write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    if subprocess.run([py, "-m", "pip", "--version"], capture_output=True, timeout=timeout).returncode != 0:
        _run([py, "-m", "ensurepip", "--default-pip"], timeout, log)
    return py


def install_commands(python: str, wheel_dir: os.PathLike, gpu_requirements: os.PathLike,
                     repo: os.PathLike) -> List[List[str]]:
    """The pip commands that install into ``python``'s environment, offline:

    1. ``gpu_requirements`` (:func:`write_gpu_requirements`) and :data:`DETECTRON2_REQUIREMENT`
       from ``wheel_dir`` only (``--no-index --find-links``); what the environment already has
       (torch, numpy, ...) stays, except setuptools: the folder's version is installed into the
       venv (pinned), so that the editable install below builds with a known setuptools (an old
       one needs the ``wheel`` package for it; 81 and later lack ``pkg_resources``);
    2. smallbn_d2 from ``repo`` in editable mode, without dependencies or build isolation.

    ``--isolated``: no pip configuration file or ``PIP_*`` variable adds an index or a folder.
    """
    pip = [python, "-m", "pip", "--isolated", "--disable-pip-version-check"]
    wheels = sorted(p.name for p in Path(wheel_dir).glob("*.whl"))
    pins = [f"{name}=={version}" for name, version in map(wheel_name_version, wheels) if name == "setuptools"]
    return [
        pip + ["install", "--no-index", "--find-links", str(wheel_dir), "-r", str(gpu_requirements),
               DETECTRON2_REQUIREMENT] + pins,
        pip + ["install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(repo)],
    ]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("benchmarks/gpu_setup.py is a library; run tools/prepare_gpu_wheels.py or tools/gpu_check.py")
