"""Helpers shared by the benchmark scripts (tools/benchmark_norms.py, tools/benchmark_cbn_layer.py).

* Peak memory on CPU (:class:`PeakRSS`): the peak resident set size of the process during a
  measured region minus the resident size at its start, read from ``/proc/self/status``
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux >= 4.0). For this to
  follow tensor allocations, the measuring process must run with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed (:data:`MEMORY_ENV`): every allocation above 64 KiB is then
  its own ``mmap`` and returns to the system when freed, so the resident size tracks the live
  tensors (otherwise freed memory stays in the heap and the high-water mark stays put). That
  setting slows allocation, so memory is measured in separate processes from the timings.
* Machine description, medians, Markdown tables, and the replacement of one script's section
  of docs/BENCHMARKS.md (between ``<!-- BEGIN name -->`` and ``<!-- END name -->``), leaving the
  rest of the file as it is.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, Sequence

#: Environment for memory-measuring subprocesses (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+) kB", f.read())
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} field: peak memory cannot be measured here")
    return int(m.group(1)) * 1024


class PeakRSS:
    """Context manager: ``.peak`` = peak RSS during the block minus RSS at its start, in bytes.

    Raises:
        RuntimeError: /proc/self/status or /proc/self/clear_refs is unavailable (not Linux).
    """

    def __enter__(self):
        self.start = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError as e:
            raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({e})") from e
        return self

    def __exit__(self, *exc):
        self.peak = _status_bytes("VmHWM") - self.start
        self.end = _status_bytes("VmRSS") - self.start
        return False


def memory_env_active() -> bool:
    """True if this process runs with :data:`MEMORY_ENV` (so :class:`PeakRSS` is meaningful)."""
    return all(os.environ.get(k) == v for k, v in MEMORY_ENV.items())


def run_json_subprocess(argv: Sequence[str], timeout: float) -> Dict:
    """Run ``python argv...`` with :data:`MEMORY_ENV`; return the dict it prints as its last line
    (JSON). Raises ``RuntimeError`` with the child's stderr tail if it fails."""
    import json

    env = dict(os.environ)
    env.update(MEMORY_ENV)
    proc = subprocess.run([sys.executable] + list(argv), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description() -> str:
    """CPU model, logical cores, torch threads, torch version, load average."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()}")


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Timer:
    """Seconds of a block: ``with Timer() as t: ...; t.s``. ``clock="wall"``: ``time.perf_counter``;
    ``"cpu"``: ``time.process_time`` (CPU time of all threads of this process).

    Raises:
        ValueError: unknown clock.
    """

    def __init__(self, clock: str = "wall"):
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock = {clock!r} is invalid; allowed: 'wall', 'cpu'")
        self.clock = time.perf_counter if clock == "wall" else time.process_time

    def __enter__(self):
        self.t0 = self.clock()
        return self

    def __exit__(self, *exc):
        self.s = self.clock() - self.t0
        return False


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (tabulate's ``pipe`` format when available)."""
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=header, tablefmt="pipe", disable_numparse=True)
    except ImportError:  # pragma: no cover - tabulate ships with detectron2's requirements
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)


def fmt_ratio(value: float, base: float) -> str:
    if not (base > 0) or value != value:
        return "n/a"
    return f"{value / base:.2f}x"


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
    """The command that ran this script, as typed from the repository root."""
    import shlex

    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
