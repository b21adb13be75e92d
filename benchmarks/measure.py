"""Measurement helpers shared by the benchmarks (detector and block level).

* Peak memory on CPU (:class:`PeakRSS`): the peak resident set size of the process during a
  measured region minus the resident size at its start, read from ``/proc/self/status``
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux >= 4.0). For this to
  follow tensor allocations, the measuring process must run with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed (:data:`MEMORY_ENV`): every allocation above 64 KiB is then
  its own ``mmap`` and returns to the system when freed, so the resident size tracks the live
  tensors (otherwise freed memory stays in the heap and the high-water mark stays put). That
  setting slows allocation, so memory is measured in separate processes from the timings
  (:func:`run_json_child`).
* Peak memory on CUDA (:class:`PeakCUDA`): ``torch.cuda.max_memory_allocated``, tensor memory,
  exact per process (no child process needed).
* Timing (:class:`Timer`, synchronized on CUDA), machine description, medians, Markdown tables,
  and the replacement of one benchmark's section of docs/BENCHMARKS.md (between
  ``<!-- BEGIN name -->`` and ``<!-- END name -->``), leaving the rest of the file as it is.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence

__all__ = ["MEMORY_ENV", "rss_bytes", "PeakRSS", "PeakCUDA", "peak_memory", "check_device", "device_sync",
           "memory_env_active", "run_json_child", "machine_description",
           "load_average", "median", "Timer", "markdown_table", "fmt_ratio", "fmt_seconds", "write_doc_section",
           "command_line"]

#: Environment for memory-measuring subprocesses (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` in bytes (``VmRSS``: resident now; ``VmHWM``: peak).

    Raises:
        RuntimeError: the file or the field is missing (not Linux): memory cannot be measured here.
    """
    try:
        with open("/proc/self/status") as f:
            m = re.search(field + r":\s+(\d+) kB", f.read())
    except OSError as e:
        raise RuntimeError(f"cannot read /proc/self/status ({e}): peak memory cannot be measured here") from e
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} field: peak memory cannot be measured here")
    return int(m.group(1)) * 1024


class PeakRSS:
    """Context manager: ``.peak`` = peak RSS during the block minus RSS at its start, in bytes;
    ``.start`` = RSS at the start, ``.end`` = RSS at the end minus ``.start`` (bytes).

    Raises:
        RuntimeError: /proc/self/status or /proc/self/clear_refs is unavailable (not Linux).
    """

    def __enter__(self):
        self.start = rss_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError as e:
            raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({e})") from e
        return self

    def __exit__(self, *exc):
        self.peak = rss_bytes("VmHWM") - self.start
        self.end = rss_bytes("VmRSS") - self.start
        return False


class PeakCUDA:
    """:class:`PeakRSS` for CUDA tensor memory: ``.start`` = ``torch.cuda.memory_allocated()`` at the
    start, ``.peak`` = ``max_memory_allocated()`` during the block minus ``.start`` (bytes)."""

    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.start
        return False


def peak_memory(device: str):
    """The peak-memory context manager of ``device`` ("cpu" or "cuda"): :class:`PeakRSS` or :class:`PeakCUDA`."""
    return PeakCUDA() if device == "cuda" else PeakRSS()


def device_sync(device: str) -> Optional[Callable[[], None]]:
    """A :class:`Timer`'s ``sync`` for ``device``: ``torch.cuda.synchronize`` on "cuda", None on "cpu"."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else None


def check_device(device: str, prog: str) -> None:
    """Exit with status 2 and a one-line message when ``device`` is "cuda" and torch sees no CUDA device."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda: torch {torch.__version__} sees no CUDA device "
              "(torch.cuda.is_available() is False); allowed here: --device cpu", file=sys.stderr)
        sys.exit(2)


def memory_env_active() -> bool:
    """True if this process runs with :data:`MEMORY_ENV` (so :class:`PeakRSS` is meaningful)."""
    return all(os.environ.get(k) == v for k, v in MEMORY_ENV.items())


def _package_root() -> str:
    """The repository root: the directory holding ``benchmarks/`` and the ``smallbn_d2`` checkout."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json_child(script: str, args: Sequence[str], timeout: float, memory: bool = False,
                   label: Optional[str] = None) -> Dict:
    """Run ``script`` in a child process of this Python; return the JSON dict it prints last.

    The child is ``[sys.executable, script, *args]`` (the same interpreter and environment) with
    the repository root first on ``PYTHONPATH``, so it imports ``benchmarks`` and the checkout's
    ``smallbn_d2`` even when that is not installed; with ``memory`` also :data:`MEMORY_ENV`.

    Args:
        script: path of the Python script to run.
        args: its command-line arguments (converted with ``str``).
        timeout: seconds before the child is killed.
        memory: run the child with :data:`MEMORY_ENV` (for :class:`PeakRSS`).
        label: names the child in the error message (default: the command line).
    Returns:
        the dict printed (as JSON) on the child's last line of stdout.
    Raises:
        RuntimeError: the child exited non-zero (message: its label, exit code and stderr tail,
            whose last line is the child's error).
        subprocess.TimeoutExpired: it ran longer than ``timeout``.
    """
    argv = [sys.executable, script] + [str(a) for a in args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if memory:
        env.update(MEMORY_ENV)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label or ' '.join(argv[1:])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description(device: str = "cpu") -> str:
    """CPU model, logical cores, torch threads, torch version, Python version, OS; on "cuda" first
    the GPU, CUDA and cuDNN versions and the TF32 switches in force (the runs are float32)."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    host = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()}")
    if device != "cuda":
        return host
    on = {True: "on", False: "off"}
    return (f"cuda: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"float32 with TF32 {on[torch.backends.cudnn.allow_tf32]} in cuDNN convs and "
            f"{on[torch.backends.cuda.matmul.allow_tf32]} in matmuls; host: {host}")


def load_average() -> str:
    """The 1/5/15-minute load average as ``"a / b / c"``, or ``"n/a"`` where unavailable."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def median(values: Sequence[float]) -> float:
    """The median of ``values``; NaN for an empty sequence."""
    return statistics.median(values) if values else float("nan")


class Timer:
    """Seconds of a block: ``with Timer() as t: ...; t.s``. ``clock="wall"``: ``time.perf_counter``;
    ``"cpu"``: ``time.process_time`` (CPU time of all threads of this process). ``sync``: called
    when the block starts and when it ends, before the clock is read (e.g. waiting for a GPU's
    queued work, so that the block's kernels are inside the measurement).

    Raises:
        ValueError: unknown clock.
    """

    def __init__(self, clock: str = "wall", sync: Optional[Callable[[], None]] = None):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock = {clock!r} is invalid; allowed: 'wall', 'cpu'")
        self.clock = time.perf_counter if clock == "wall" else time.process_time
        self.sync = sync

    def __enter__(self):
        if self.sync is not None:
            self.sync()
        self.t0 = self.clock()
        return self

    def __exit__(self, *exc):
        if self.sync is not None:
            self.sync()
        self.s = self.clock() - self.t0
        return False


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (tabulate's ``pipe`` format; cells are printed as given)."""
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="pipe", disable_numparse=True)


def fmt_ratio(value: float, base: float) -> str:
    """``value / base`` as ``"1.23x"``; ``"n/a"`` if ``base`` is not > 0 or ``value`` is NaN."""
    if not (base > 0) or value != value:
        return "n/a"
    return f"{value / base:.2f}x"


def fmt_seconds(value: Optional[float]) -> str:
    """Seconds with 3 decimals; ``"n/a"`` for None or NaN."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def write_doc_section(path: str, name: str, body: str) -> None:
    """Replace the section ``name`` of the Markdown file ``path`` with ``body`` (creating the file
    or appending the section if absent). Only that section changes; the rest is kept verbatim."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def command_line() -> str:
    """The command that ran this process's script, as typed from the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
