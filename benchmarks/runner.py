"""Detector-level benchmark orchestration: which children run, collecting their results, the report.

The parent process starts, per setting, one training child per round and one inference child,
and per (setting, row) one memory child (:mod:`.children`), each as the benchmark's own script
with the hidden options ``--child-setting``, ``--child-norm``, ``--child-mode`` followed by the
options of the run (:func:`child_args`). A child that fails or times out is recorded and listed
under its setting's table; the other measurements go on.
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Dict, List, Optional

from .measure import load_average, median, run_json_child, write_doc_section
from .report import build_report
from .settings import SECTION

__all__ = ["child_args", "run_child", "run_benchmark"]


def child_args(args) -> List[str]:
    """The options of the run passed on to every child (``--opts`` last: it takes the rest)."""
    out = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--memory-iters", str(args.memory_iters),
           "--min-size", str(args.min_size), "--max-size", str(args.max_size), "--images", str(args.images),
           "--infer-images", str(args.infer_images), "--infer-repeats", str(args.infer_repeats),
           "--start-iter", str(args.start_iter), "--clock", args.clock, "--device", args.device]
    if args.threads:
        out += ["--threads", str(args.threads)]
    out += ["--norms"] + list(args.norms)
    if args.config_file:
        out += ["--config-file", args.config_file]
    if args.opts:
        out += ["--opts"] + [str(o) for o in args.opts]
    return out


def run_child(script: str, args, setting: str, norm: str, mode: str) -> Dict:
    """Run ``script`` as a child of ``mode`` (train, memory, infer) for ``setting`` and ``norm``
    ("all" for the interleaved modes) with the same Python; return its result plus ``"wall"`` (s).

    Raises:
        RuntimeError: the child failed (its stderr's last line is the error).
        subprocess.TimeoutExpired: it ran longer than ``args.child_timeout`` seconds.
    """
    # the child arguments come first: --opts (in child_args) takes the rest of the line
    argv = ["--child-setting", setting, "--child-norm", norm, "--child-mode", mode] + child_args(args)
    t0 = time.time()
    res = run_json_child(script, argv, timeout=args.child_timeout, memory=mode == "memory",
                         label=f"{setting}/{norm}/{mode}")
    res["wall"] = time.time() - t0
    return res


def _run_or_record(script: str, args, setting: str, norm: str, mode: str, label: str, errors: Dict) -> Optional[Dict]:
    """:func:`run_child`, or None after recording its failure under ``(setting, label)`` in
    ``errors`` (listed under the setting's table) and printing it."""
    try:
        return run_child(script, args, setting, norm, mode)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        errors[(setting, label)] = str(e).strip().splitlines()[-1][:200]
        print(f"[{label}] {setting:10s} FAILED: {e}", file=sys.stderr, flush=True)
        return None


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_benchmark(script: str, args) -> Dict[str, str]:
    """Measure every (setting, row) of ``args`` in child processes of ``script``, print the
    report of each setting and (unless ``args.no_write``) write it to its section
    ``benchmark_norms_<setting>`` of ``args.out``.

    Args:
        script: the benchmark script, run as the children (``tools/benchmark_norms.py``).
        args: its parsed options (see that script's ``--help``).
    Returns:
        ``{setting: report}`` (Markdown).
    """
    started = time.time()
    load_before = load_average()
    results, mem, errors, infer = {}, {}, {}, {}
    for r in range(0 if args.no_timing else args.rounds):
        for setting in args.settings:
            res = _run_or_record(script, args, setting, "all", "train", f"round {r + 1} training", errors)
            if res is None:
                continue
            for norm in args.norms:
                results.setdefault((setting, norm), []).append(
                    {"train_times": res["train_times"][norm], "nonfinite_losses": res["nonfinite_losses"][norm]})
            _progress(f"[round {r + 1}] {setting:10s} train " + ", ".join(
                f"{n} {median(t):.2f}" for n, t in res["train_times"].items()) + f" s/iter ({res['wall']:.0f}s)")
    if not (args.no_inference or args.no_timing):
        for setting in args.settings:
            res = _run_or_record(script, args, setting, "all", "infer", "inference", errors)
            if res is None:
                continue
            infer[setting] = res
            _progress(f"[inference] {setting:10s} " + ", ".join(
                f"{k} {median(v):.2f}" for k, v in res["times"].items()) + f" s/img ({res['wall']:.0f}s)")
    if not args.no_memory:
        for setting in args.settings:
            for norm in args.norms:
                res = _run_or_record(script, args, setting, norm, "memory", f"memory {norm}", errors)
                if res is None:
                    continue
                mem[(setting, norm)] = res["peak_bytes"]
                _progress(f"[memory] {setting:10s} {norm:9s} {res['peak_bytes'] / 2**20:.0f} MiB ({res['wall']:.0f}s)")
    finished, load_after = time.time(), load_average()
    reports = {}
    for setting in args.settings:
        report = build_report(args, setting, results, mem, infer, load_before, load_after, started, finished)
        failed = {k: e for k, e in errors.items() if k[0] == setting}
        if failed:
            report += "\n\nFailed: " + "; ".join(f"{s}/{n}: {e}" for (s, n), e in failed.items())
        print(report + "\n")
        if not args.no_write:
            write_doc_section(args.out, f"{SECTION}_{setting}", report)
            _progress(f"wrote section '{SECTION}_{setting}' of {args.out}")
        reports[setting] = report
    return reports
