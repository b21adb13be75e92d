"""``tools/gpu_check.py``: every GPU figure of the project in one command, within a time budget.

On a machine without CUDA it stops at once (exit status 2) with a message saying that CUDA is
needed, before importing torch when no NVIDIA driver is present. With CUDA it runs the stages
below, each as child processes with its own time limit (capped by what is left of the overall
budget, 480 s by default), records every stage's outcome (passed, failed, timed out, skipped;
a failure never stops the next stage) and writes to ``--output-dir``:

* ``gpu_check.log``: what every stage printed;
* ``results.json``: the collected results (raw timings included);
* ``report.md``: :func:`.gpu_report.build_report` of them: Markdown for docs/BENCHMARKS.md.

Stages (:func:`build_stages`), in this order:

1. ``install`` (with ``--wheels DIR``): a venv in the work folder with the system's packages
   (its torch) visible, Detectron2 and the other requirements from DIR offline, smallbn_d2
   editable from this working tree, then an import check (:mod:`.gpu_setup`);
2. ``cuda_tests``: ``pytest tests -k cuda`` (the device-parametrized tests on CUDA); pytest's
   summary line is the result, and a run in which no test passed fails (a GPU that pytest does
   not see makes every CUDA test skip);
3. ``train_cbn_amp``, ``train_mabn_amp``: short training runs of the sample Mask R-CNN with CBN
   and MABN under AMP (fp16), finite losses and COCO AP (:mod:`.gpu`, ``train``);
4. ``block``: the block-level benchmark on CUDA;
5. ``detector_1x``: the detector-level benchmark on CUDA, setting ``1x``;
6. ``ddp``: a two-process (NCCL) training run, only with >= 2 GPUs (else skipped, saying why);
7. ``detector_scratch_3x``: setting ``scratch_3x``, with what is left of the budget.

This module and the two it imports, :mod:`.gpu_setup` and :mod:`.gpu_report`, use only the
standard library and import nothing else of the package: they run in the GPU machine's own
Python before anything is installed (``tools/gpu_check.py`` imports them without running
``smallbn_d2/__init__.py``). The measurements run in child processes (:mod:`.gpu`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from . import gpu_setup
from .gpu_report import build_report

__all__ = ["DEFAULT_BUDGET_S", "REPORT_RESERVE_S", "OUTPUT_FILES", "STAGE_NAMES", "Stage", "OutputDirError",
           "cuda_unavailable_reason", "check_output_dir", "pytest_summary", "run_command",
           "run_stage", "build_stages", "machine_info", "parse_args", "main"]

REPO = Path(__file__).resolve().parent.parent
#: the whole run, install included, in seconds
DEFAULT_BUDGET_S = 480
#: kept free at the end of the budget for writing the report
REPORT_RESERVE_S = 10
#: what the command writes into ``--output-dir``
OUTPUT_FILES = ("report.md", "results.json", "gpu_check.log")
#: the stages, in the order they run
STAGE_NAMES = ("install", "cuda_tests", "train_cbn_amp", "train_mabn_amp", "block", "detector_1x", "ddp",
               "detector_scratch_3x")
#: seconds to wait after SIGTERM before SIGKILL when a stage runs out of time
_KILL_GRACE_S = 5

Step = Union[Sequence[str], Callable[[float, object], None]]


@dataclass
class Stage:
    """One stage: ``steps`` run in order (an argv list, or a callable ``step(seconds_left,
    log_file)``) until one fails, all within ``limit_s`` seconds.

    Attributes:
        name, title: identifier and the report's label.
        limit_s: seconds for the whole stage (capped by the budget left); below ``min_s`` left
            the stage is skipped.
        result_file: JSON that the steps write; loaded into the record's ``data`` even when a
            step failed or timed out (partial results).
        parse: ``parse(record) -> (data, message, ok)`` run after the steps (e.g. pytest's summary;
            the record's ``"log"`` and ``"log_offset"`` locate the stage's output);
            ``ok`` False marks a stage whose steps exited 0 as failed.
        skip: a reason to skip the stage without running it.
    """

    name: str
    title: str
    limit_s: float
    steps: List[Step] = field(default_factory=list)
    min_s: float = 10
    result_file: Optional[str] = None
    parse: Optional[Callable[[Dict], tuple]] = None
    skip: Optional[str] = None


class OutputDirError(ValueError):
    """``--output-dir`` is not usable (a file, or not empty without ``--overwrite``)."""


# ------------------------------------------------------------------------------------ checks
def _driver_present(which=shutil.which, exists=os.path.exists) -> bool:
    """True if an NVIDIA driver shows: ``nvidia-smi`` on PATH, ``/dev/nvidiactl`` or ``/proc/driver/nvidia``."""
    return bool(which("nvidia-smi")) or exists("/dev/nvidiactl") or exists("/proc/driver/nvidia/version")


def cuda_unavailable_reason(which=shutil.which, exists=os.path.exists) -> Optional[str]:
    """Why this machine cannot run the GPU check (a sentence), or None when CUDA works.

    Without any sign of an NVIDIA driver the answer comes without importing torch; otherwise
    torch is imported and asked (``torch.cuda.is_available()``).
    """
    if not _driver_present(which, exists):
        return "no NVIDIA driver found (no nvidia-smi on PATH, no /dev/nvidiactl, no /proc/driver/nvidia)"
    try:
        import torch
    except ImportError as e:
        return f"this Python ({sys.executable}) cannot import torch ({e})"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device: "
                f"torch.cuda.is_available() is False" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
    return None


def check_output_dir(path: os.PathLike, overwrite: bool) -> Path:
    """``path`` as the output folder: absent, empty, or (with ``overwrite``) anything, in which
    case only :data:`OUTPUT_FILES` are replaced. Returns it as a Path (not created).

    Raises:
        OutputDirError: ``path`` is a file, or a non-empty folder without ``overwrite``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"--output-dir {str(p)!r} is a file; allowed: a new or empty folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputDirError(f"--output-dir {str(p)!r} is not empty (it holds {', '.join(sorted(os.listdir(p))[:5])}); "
                             f"pass --overwrite to replace {', '.join(OUTPUT_FILES)} there, or choose a new folder")
    return p


_SUMMARY = re.compile(r"\b(\d+) passed\b")


def pytest_summary(log_path: os.PathLike, offset: int = 0) -> tuple:
    """``(data, message, ok)`` of a ``pytest -q`` run whose output was appended to ``log_path``
    after byte ``offset``: pytest's own summary line (``"12 passed, 600 deselected in 9.1s"``);
    ``ok`` only when at least one test passed (with no GPU visible, every CUDA test skips and
    pytest still exits 0)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        lines = [line.strip(" =") for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " in " in line and re.search(r"\d+ \w+", line)), "")
    passed = int(_SUMMARY.search(summary).group(1)) if _SUMMARY.search(summary) else 0
    if not passed:
        return {"summary": summary}, f"no CUDA test passed ({summary or 'no pytest summary'}): does pytest see the GPU?", False
    return {"summary": summary}, summary, True


# ------------------------------------------------------------------------------------ running
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_command(argv: Sequence[str], log, timeout: float, env: Optional[Dict[str, str]] = None,
                cwd: os.PathLike = REPO) -> Optional[int]:
    """Run ``argv`` in its own process group with stdout and stderr appended to ``log`` (a
    binary file); kill the whole group (children included) after ``timeout`` seconds.

    Returns:
        the exit status, or None if it was killed for running out of time.
    """
    log.flush()
    proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=str(cwd), start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None
    except BaseException:  # Ctrl-C: leave nothing running on the GPU
        _kill_group(proc)
        raise


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*:|^[A-Za-z_][\w.]*Error$|^ERROR: ")


def _tail(path: str, offset: int, lines: int = 3) -> str:
    """What went wrong, from the output written to ``path`` after byte ``offset``: the last
    Python exception line (``ValueError: ...``) or pip error (``ERROR: ...``) if there is one,
    else the last ``lines``
    non-empty lines joined with " / "; at most 600 characters."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in kept if _ERROR_LINE.match(line)]
    return (errors[-1] if errors else " / ".join(kept[-lines:]))[-600:]


def _write(log, text: str) -> None:
    log.write(text.encode())
    log.flush()


def run_stage(stage: Stage, log, deadline: float, env: Optional[Dict[str, str]] = None,
              clock: Callable[[], float] = time.monotonic) -> Dict:
    """Run ``stage`` within ``min(stage.limit_s, deadline - now)`` seconds; never raises for a
    failing step.

    Returns:
        ``{"name", "title", "status": passed|failed|timeout|skipped, "seconds", "limit_s",
        "message", "data"}``.
    """
    rec = {"name": stage.name, "title": stage.title, "status": "passed", "seconds": 0.0, "limit_s": None,
           "message": "", "data": {}}
    left = deadline - clock()
    if stage.skip:
        rec.update(status="skipped", message=stage.skip)
        return rec
    if left < stage.min_s:
        rec.update(status="skipped", message=f"only {max(left, 0):.0f} s of the budget left (needs >= {stage.min_s:.0f} s)")
        return rec
    limit = min(stage.limit_s, left)
    rec["limit_s"] = round(limit, 1)
    t0 = clock()
    _write(log, f"\n===== stage {stage.name}: {stage.title} (limit {limit:.0f} s) =====\n")
    stage_offset = log.tell()
    for step in stage.steps:
        remaining = t0 + limit - clock()
        _write(log, f"+ {getattr(step, '__name__', 'step')}\n" if callable(step)
               else "+ " + " ".join(str(a) for a in step) + "\n")
        offset = log.tell()
        if callable(step):
            try:
                step(remaining, log)
                rc = 0
            except subprocess.TimeoutExpired:
                rc = None
            except Exception as e:  # noqa: BLE001 - recorded, the next stage runs
                _write(log, f"{type(e).__name__}: {e}\n")
                rc = 1
        else:
            try:
                rc = run_command(step, log, remaining, env=env)
            except OSError as e:
                _write(log, f"{type(e).__name__}: {e}\n")
                rc = 1
        if rc is None:
            rec.update(status="timeout", message=f"killed at the stage's limit of {limit:.0f} s")
            break
        if rc != 0:
            rec.update(status="failed", message=f"exit status {rc}: {_tail(log.name, offset)}")
            break
    rec["seconds"] = round(clock() - t0, 1)
    if stage.result_file and os.path.isfile(stage.result_file):
        try:
            with open(stage.result_file) as f:
                rec["data"] = json.load(f)
        except (OSError, ValueError) as e:
            rec["message"] = (rec["message"] + "; " if rec["message"] else "") + f"unreadable result file ({e})"
    if stage.parse is not None:
        try:
            data, message, ok = stage.parse(dict(rec, log=log.name, log_offset=stage_offset))
            rec["data"].update(data)
            if rec["status"] == "passed" and not ok:
                rec["status"] = "failed"
            if message and rec["status"] != "timeout":
                rec["message"] = message
        except Exception as e:  # noqa: BLE001
            rec["message"] = (rec["message"] + "; " if rec["message"] else "") + f"no parsable result ({e})"
    if rec["status"] == "timeout" and rec["data"]:
        rec["message"] += "; partial results kept"
    _write(log, f"===== stage {stage.name}: {rec['status']} after {rec['seconds']:.0f} s {rec['message']}\n")
    return rec


# ------------------------------------------------------------------------------------ the stages
_IMPORT_CHECK = r"""
import json, sys
from importlib.metadata import version
import torch, detectron2, detectron2.layers, fvcore, pycocotools, smallbn_d2
try:
    from smallbn_d2.compat import has_compiled_ops
except ImportError:
    has_compiled_ops = lambda: None
names = ("pb1-detectron2", "fvcore", "iopath", "pycocotools", "omegaconf", "hydra-core", "setuptools", "numpy")
out = {"python": sys.executable, "torch": torch.__version__, "torch_path": torch.__file__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
       "detectron2": detectron2.__file__, "smallbn_d2": smallbn_d2.__file__, "compiled_ops": has_compiled_ops(),
       "versions": {n: version(n) for n in names}}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
"""


def build_stages(python: str, work: Path, gpu_count: int, wheels: Optional[Path] = None,
                 only: Optional[Sequence[str]] = None) -> List[Stage]:
    """The stages of the check (module docstring), for the interpreter ``python`` (the venv's,
    made by the ``install`` stage, when ``wheels`` is given), writing under ``work``.

    Args:
        python: the interpreter of the measuring stages.
        work: folder for the venv, training runs and intermediate files.
        gpu_count: GPUs visible (``ddp`` needs 2).
        wheels: the wheel folder; None: no ``install`` stage (``python`` has everything).
        only: names of the stages to run (default all); the others are left out.
    """
    gpu = [python, "-m", "benchmarks.gpu"]
    stages: List[Stage] = []
    if wheels is not None:
        venv = work / "venv"
        requirements = work / "gpu_requirements.txt"

        def create_venv(seconds_left: float, log) -> None:
            """the venv (gpu_setup.create_venv) and requirements.txt without torch/torchvision"""
            gpu_setup.create_venv(venv, timeout=seconds_left, log=log)
            gpu_setup.write_gpu_requirements(REPO / "requirements.txt", requirements)

        steps: List[Step] = [create_venv]
        steps += gpu_setup.install_commands(python, wheels, requirements, REPO)
        steps.append([python, "-c", _IMPORT_CHECK, str(work / "install.json")])
        stages.append(Stage("install", f"install from {wheels.name}/ into a venv", 90, steps, min_s=30,
                            result_file=str(work / "install.json")))
    stages.append(Stage("cuda_tests", "CUDA tests (pytest tests -k cuda)", 90,
                        [[python, "-m", "pytest", "tests", "-k", "cuda", "-q", "-p", "no:cacheprovider"]], min_s=20,
                        parse=lambda rec: pytest_summary(rec["log"], rec["log_offset"])))
    for norm in ("CBN", "MABN"):
        name = f"train_{norm.lower()}_amp"
        res = str(work / f"{name}.json")
        stages.append(Stage(name, f"training, {norm}, AMP fp16, 60 iterations", 75,
                            [gpu + ["train", "--result", res, "--norm", norm, "--amp", "--iters", "60",
                                    "--output-dir", str(work / name)]], min_s=30, result_file=res))
    res = str(work / "block.json")
    stages.append(Stage("block", "block level benchmark", 45, [gpu + ["block", "--result", res]], min_s=15,
                        result_file=res))
    res = str(work / "detector_1x.json")
    stages.append(Stage("detector_1x", "detector level benchmark, 1x", 150,
                        [gpu + ["detector", "--setting", "1x", "--result", res]], min_s=60, result_file=res))
    res = str(work / "ddp.json")
    stages.append(Stage("ddp", "two processes (DDP, NCCL), CBN, 10 iterations", 60,
                        [gpu + ["train", "--result", res, "--norm", "CBN", "--iters", "10", "--num-gpus", "2",
                                "--output-dir", str(work / "ddp")]], min_s=40, result_file=res,
                        skip=None if gpu_count >= 2 else
                        f"needs >= 2 GPUs; this machine has {gpu_count} (torch.cuda.device_count())"))
    res = str(work / "detector_scratch_3x.json")
    stages.append(Stage("detector_scratch_3x", "detector level benchmark, scratch_3x", 150,
                        [gpu + ["detector", "--setting", "scratch_3x", "--result", res]], min_s=60, result_file=res))
    if only:
        stages = [s for s in stages if s.name in only or s.name == "install"]
    return stages


def machine_info() -> Dict:
    """GPU names, memory and driver (``nvidia-smi``), torch, CUDA and cuDNN versions, Python, CPU
    cores. Creates no CUDA context."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "gpus": []}
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - informative only
        info["cudnn"] = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
        if rows:
            info["gpus"] = [r[0] for r in rows]
            info["gpu_memory"] = rows[0][1] if len(rows[0]) > 1 else None
            info["driver"] = rows[0][2] if len(rows[0]) > 2 else None
    except (OSError, subprocess.SubprocessError):
        pass
    if not info["gpus"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
    return info


# ------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``tools/gpu_check.py`` (``--help``)."""
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                 epilog="Run from the repository root: python3 tools/gpu_check.py --wheels gpu_wheels "
                                        "--output-dir gpu_report (the wheel folder: tools/prepare_gpu_wheels.py).")
    ap.add_argument("--output-dir", required=True, help=f"where {', '.join(OUTPUT_FILES)} go (new or empty folder)")
    ap.add_argument("--overwrite", action="store_true", help=f"replace {', '.join(OUTPUT_FILES)} in a non-empty --output-dir")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="wheel folder of tools/prepare_gpu_wheels.py: install into a new venv first (default: use this "
                         "Python as it is; it must have Detectron2 and smallbn_d2's requirements)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="folder for the venv, training runs and intermediate files (new or empty; default: a new "
                         "temporary folder)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds for the whole run, install included (default %(default)s)")
    ap.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=None,
                    help="run only these stages (install always runs with --wheels)")
    return ap.parse_args(argv)


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed from the repository root: ``python3 tools/gpu_check.py ARGS``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python3", "tools/gpu_check.py"] + [shlex.quote(str(a)) for a in args])


def _error(msg: str) -> int:
    print(f"gpu_check.py: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run the GPU check (module docstring). Exit status: 0 every stage that ran passed; 1 a
    stage failed or timed out (the report says which); 2 no CUDA or bad usage (nothing written)."""
    started, t0 = time.time(), time.monotonic()  # the budget counts from here: the CUDA check included
    args = parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason:
        return _error(f"CUDA is needed: {reason}. Run this on a machine with an NVIDIA GPU and a CUDA build of torch; "
                      "without one, the CPU benchmarks are tools/benchmark_norms.py and tools/benchmark_cbn_layer.py.")
    try:
        out = check_output_dir(args.output_dir, args.overwrite)
    except OutputDirError as e:
        return _error(str(e))
    if args.wheels is not None and not any(args.wheels.glob("*.whl")):
        return _error(f"--wheels {str(args.wheels)!r} holds no wheel; build it with tools/prepare_gpu_wheels.py")
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        return _error(f"--work-dir {str(args.work_dir)!r} is not empty; allowed: a new or empty folder")
    if args.budget_s < 60:
        return _error(f"--budget-s {args.budget_s} is too small; allowed: >= 60")
    deadline = t0 + args.budget_s - REPORT_RESERVE_S
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="smallbn_d2_gpu_check_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    wheels = args.wheels.resolve() if args.wheels is not None else None
    python = gpu_setup.venv_python(work / "venv") if wheels is not None else sys.executable
    machine = machine_info()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    stages = build_stages(python, work, machine["gpu_count"], wheels, args.stages)
    results = {"command": command_line(argv), "machine": machine, "started": started, "budget_s": args.budget_s,
               "work_dir": str(work), "stages": []}
    print(f"[gpu_check] {len(stages)} stages, budget {args.budget_s:.0f} s; log: {out / 'gpu_check.log'}; "
          f"work folder: {work}", flush=True)
    with open(out / "gpu_check.log", "wb") as log:
        for stage in stages:
            print(f"[gpu_check] {stage.name} ...", flush=True)
            rec = run_stage(stage, log, deadline, env=env)
            results["stages"].append(rec)
            print(f"[gpu_check] {stage.name}: {rec['status']} ({rec['seconds']:.0f} s) {rec['message']}", flush=True)
            if stage.name == "install" and rec["data"].get("cudnn"):
                machine.setdefault("cudnn", rec["data"]["cudnn"])
    results["finished"] = started + (time.monotonic() - t0)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    report = build_report(results)
    with open(out / "report.md", "w") as f:
        f.write(report)
    print("\n" + report, flush=True)
    print(f"[gpu_check] wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'gpu_check.log'}", flush=True)
    return 0 if all(r["status"] in ("passed", "skipped") for r in results["stages"]) else 1
