#!/usr/bin/env python
"""Block-level benchmark of the normalization layers (CBN issue, item 9).

A stack of 4 x (3x3 conv, 256 -> 256 channels, no bias, norm, ReLU) on a 64 x 256 x 14 x 14
input (the shape of a Mask R-CNN mask head batch: 64 RoIs of 14 x 14), forward + backward
(input, conv and norm parameters all need gradients; the upstream gradient is a fixed random
tensor). Norms:

* ``BN``: ``torch.nn.BatchNorm2d``;
* ``floor``: BN plus one extra weight-gradient conv per block (``conv2d_weight`` with the conv's
  output as grad_output), the arithmetic CBN's d nu / d theta adds: the floor of an exact CBN;
* ``CBN``: :class:`smallbn_d2.CrossIterationBatchNorm2d`, k = 4, after its burn-in (window
  full), ``grad_mode="closed_form"`` (fused normalization + closed-form statistics gradients);
* ``CBN-autograd``: the same layer with ``grad_mode="autograd"`` (statistics gradients by two
  ``torch.autograd.grad`` calls, normalization through autograd ops: the released code's way);
* ``CBN-sub2``: CBN with ``grad_subsample=2`` (d nu / d theta estimated from every second RoI:
  an approximation, the only way below the floor);
* ``NaiveCBN`` (k = 4), ``MABN`` (m = 16, past every warm-up: SMA and renormalization active),
  ``GN`` (32 groups).

Time: median over the measured steps of all rounds; norms are interleaved round by round (each
round runs every norm), so a load change on the machine hits all of them alike. Memory: for each
norm a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` measures the peak resident memory
of a step above the memory at its start (activations, gradients, temporaries; see
tools/bench_utils.py), after 3 warm-up steps; the maximum over 2 measured steps.

The result is printed as a Markdown table and written to the ``benchmark_cbn_layer`` section of
docs/BENCHMARKS.md (``--no-write`` to skip), with the command and the machine.

Run from the repository root: ``python tools/benchmark_cbn_layer.py`` (about 6-8 minutes on 2
quiet cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smallbn_d2  # noqa: E402,F401  (compat fixes, norm names)
from smallbn_d2.layers import (  # noqa: E402
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
)
from bench_utils import (  # noqa: E402
    PeakRSS,
    Timer,
    command_line,
    fmt_ratio,
    load_average,
    machine_description,
    markdown_table,
    median,
    memory_env_active,
    run_json_subprocess,
    write_doc_section,
)

NORMS = ("BN", "floor", "CBN", "CBN-autograd", "CBN-sub2", "NaiveCBN", "MABN", "GN")
DESCRIPTIONS = {
    "BN": "torch.nn.BatchNorm2d",
    "floor": "BN + one extra weight-gradient conv per block (exact CBN's arithmetic floor)",
    "CBN": "CBN k=4, closed form (grad_mode='closed_form')",
    "CBN-autograd": "CBN k=4, autograd path (grad_mode='autograd', the released code's way)",
    "CBN-sub2": "CBN k=4, closed form, d nu/d theta from every 2nd RoI (grad_subsample=2, approximate)",  # rows if N < 8
    "NaiveCBN": "Naive CBN k=4 (no compensation)",
    "MABN": "MABN m=16, SMA and renormalization active",
    "GN": "GroupNorm, 32 groups",
}
START_ITER = {"MABN": 2000}  # past MABN's warm-ups (renormalization from iteration 1000)
SECTION = "benchmark_cbn_layer"
ACCURACY_SECTION = "cbn_subsample_accuracy"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(nn.Module):
    """conv3x3 (no bias) -> norm -> ReLU; ``floor`` adds the weight-gradient conv of d nu/d theta."""

    def __init__(self, channels: int, norm: str, window: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.extra_wgrad = norm == "floor"
        if norm in ("BN", "floor"):
            self.norm = nn.BatchNorm2d(channels)
        elif norm == "GN":
            self.norm = nn.GroupNorm(32, channels)
        elif norm in ("CBN", "CBN-autograd", "CBN-sub2"):
            mode = "autograd" if norm == "CBN-autograd" else "closed_form"
            self.norm = CrossIterationBatchNorm2d(channels, window_size=window, burn_in=0, grad_mode=mode,
                                                  grad_subsample=2 if norm == "CBN-sub2" else 1)
        elif norm == "NaiveCBN":
            self.norm = NaiveCrossIterationBatchNorm2d(channels, window_size=window, burn_in=0)
        elif norm == "MABN":
            self.norm = MovingAverageBatchNorm2d(channels)
        else:
            raise ValueError(f"unknown norm {norm!r}; allowed: {NORMS}")
        if hasattr(self.norm, "attach_conv"):
            self.norm.attach_conv(self.conv)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if self.extra_wgrad and self.training:
            with torch.no_grad():
                conv2d_weight(x.detach(), self.conv.weight.shape, y.detach(), 1, 1)
        return self.act(self.norm(y))


class Bench:
    """One norm's block stack with its input, upstream gradient and trainer iteration."""

    def __init__(self, norm: str, args):
        torch.manual_seed(0)
        self.model = nn.Sequential(*[Block(args.channels, norm, args.window) for _ in range(args.depth)]).train()
        g = torch.Generator().manual_seed(1)
        shape = (args.batch, args.channels, args.size, args.size)
        self.x = torch.randn(shape, generator=g).requires_grad_(True)
        self.gy = torch.randn(shape, generator=g)
        self.t = START_ITER.get(norm, 0)

    def step(self) -> None:
        for m in self.model.modules():
            if hasattr(m, "set_iteration"):
                m.set_iteration(self.t)
        self.t += 1
        self.model(self.x).backward(self.gy)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None


def measure_memory(norm: str, args) -> dict:
    """Peak step memory above the step's start (bytes), in this process; needs MEMORY_ENV."""
    b = Bench(norm, args)
    for _ in range(args.warmup):
        b.zero_grad()
        b.step()
    peaks = []
    for _ in range(2):
        b.zero_grad()
        with PeakRSS() as p:
            b.step()
        peaks.append(p.peak)
    return {"norm": norm, "peak_bytes": max(peaks)}


def state_bytes(norm: str, args) -> int:
    """Bytes of the stack's parameters and buffers (CBN's window of statistics gradients included)."""
    model = Bench(norm, args).model
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def subsample_accuracy(args) -> str:
    """Effect of ``grad_subsample`` on the compensated statistics, measured with the CBN
    statistics diagnostic (projects/CBNStatistics): the same SGD run on the shared COCO subset
    (tiny Mask R-CNN, BN-trained, seed 0) is probed once per s, with the diagnostic's
    d nu / d theta replaced by the subsampled estimate; all other estimators, the training and
    the truth are identical across s (checked on the losses). Returns the Markdown section."""
    import functools

    sys.path.insert(0, os.path.join(REPO, "projects", "CBNStatistics"))
    import cbn_statistics as diag
    from smallbn_d2.layers import cbn_grad

    exact = diag.stat_grads_closed_form
    runs = {}
    try:
        for s in args.subsamples:
            diag.stat_grads_closed_form = functools.partial(cbn_grad.stat_grads_closed_form, subsample=s)
            runs[s] = diag.run(iters=args.acc_iters, probe_every=args.acc_probe_every, max_window=args.window, seed=0)
            print(f"subsample {s}: done", file=sys.stderr, flush=True)
    finally:
        diag.stat_grads_closed_form = exact
    ref = runs[args.subsamples[0]]
    same = all(r["losses"] == ref["losses"] for r in runs.values())
    k = args.window
    rows = []
    for layer in ref["layers"]:
        errs = ref["errors"][layer]
        row = [layer, f"{errs['BN']['var'][k - 1]:.4f}", f"{errs['Naive']['var'][k - 1]:.4f}"]
        row += [f"{runs[s]['errors'][layer]['CBN']['var'][k - 1]:.4f}" for s in args.subsamples]
        row += [f"{errs['Own-conv']['var'][k - 1]:.4f}"]
        rows.append(row)
    header = (["layer", "BN (1 batch)", "NaiveCBN"] + [f"CBN s={s}" + (" (exact)" if s == 1 else "")
                                                       for s in args.subsamples] + ["own-conv bound"])
    return "\n".join([
        f"### Effect of `MODEL.CBN.GRAD_SUBSAMPLE` (s) on CBN's window variance, k = {k}",
        "",
        f"Command: `{command_line()}`",
        "",
        "Relative error ||estimate - truth|| / ||truth|| of the window variance (per channel, over the "
        f"channels), averaged over the probes at iterations {ref['probes']} of a {args.acc_iters}-iteration SGD run of "
        "the tiny Mask R-CNN (configs/test/tiny-mask_rcnn.yaml) on the shared COCO subset, 2 images per "
        "iteration, measured by projects/CBNStatistics/cbn_statistics.py with d nu / d theta taken on every "
        "s-th RoI (box head: N >= 4s) or every s-th output row (backbone, FPN). The window mean is unaffected "
        "(d mu / d theta stays exact). 'own-conv bound': the previous batches re-run through the current conv, "
        "the best a compensation in the layer's own conv can do. "
        + ("Training identical across s (same losses)." if same else "WARNING: the runs' losses differ."),
        "",
        markdown_table(header, rows),
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=14)
    ap.add_argument("--depth", type=int, default=4, help="blocks in the stack")
    ap.add_argument("--window", type=int, default=4, help="CBN/NaiveCBN window size k")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per norm before the first round (>= k-1)")
    ap.add_argument("--iters", type=int, default=3, help="measured steps per norm per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (norms alternate round by round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter (the reported default); cpu: CPU seconds of this process "
                         "(time.process_time), less sensitive to other load, best with --threads 1")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/BENCHMARKS.md")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--subsample-accuracy", action="store_true",
                    help="instead of timing: measure the effect of grad_subsample on the statistics "
                         "(runs projects/CBNStatistics/cbn_statistics.py once per s; section "
                         f"{ACCURACY_SECTION!r} of docs/BENCHMARKS.md)")
    ap.add_argument("--subsamples", type=int, nargs="+", default=[1, 2, 4], help="s values (first: the reference run)")
    ap.add_argument("--acc-iters", type=int, default=41, help="SGD iterations of the accuracy run")
    ap.add_argument("--acc-probe-every", type=int, default=10)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < args.window - 1:
        ap.error(f"--warmup {args.warmup} is too small; allowed: >= window - 1 = {args.window - 1} (fills CBN's window)")

    if args.subsample_accuracy:
        body = subsample_accuracy(args)
        print(body)
        if not args.no_write:
            write_doc_section(args.out, ACCURACY_SECTION, body)
            print(f"\nwrote section {ACCURACY_SECTION!r} of {args.out}", file=sys.stderr)
        return

    if args.memory_child:
        if not memory_env_active():
            raise SystemExit("--memory-child must run with MALLOC_MMAP_THRESHOLD_=65536 (see tools/bench_utils.py)")
        print(json.dumps(measure_memory(args.memory_child, args)))
        return

    load_before = load_average()
    benches = {n: Bench(n, args) for n in args.norms}
    for n, b in benches.items():  # warm-up (fills CBN's window)
        for _ in range(args.warmup):
            b.zero_grad()
            b.step()
    times = {n: [] for n in args.norms}
    for r in range(args.rounds):
        for n, b in benches.items():
            b.zero_grad()
            b.step()  # one unmeasured step: caches and allocator state of this norm
            for _ in range(args.iters):
                b.zero_grad()
                with Timer(args.clock) as tm:
                    b.step()
                times[n].append(tm.s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {median(times[n]):.3f}s" for n in args.norms),
              file=sys.stderr, flush=True)
    del benches
    load_after = load_average()

    mem = {}
    if not args.no_memory:
        child = [os.path.abspath(__file__)] + [a for a in (argv if argv is not None else sys.argv[1:])]
        for n in args.norms:
            res = run_json_subprocess(child + ["--memory-child", n, "--no-write"], timeout=1800)
            mem[n] = res["peak_bytes"]
            print(f"memory {n}: {mem[n] / 2**20:.1f} MiB", file=sys.stderr, flush=True)

    t = {n: median(v) for n, v in times.items()}
    base_t = t.get("BN", float("nan"))
    base_m = mem.get("BN", float("nan"))
    rows = []
    for n in args.norms:
        rows.append([n, DESCRIPTIONS[n], f"{t[n]:.3f}", fmt_ratio(t[n], base_t),
                     f"{mem[n] / 2**20:.0f}" if n in mem else "n/a",
                     fmt_ratio(mem[n], base_m) if n in mem else "n/a",
                     f"{state_bytes(n, args) / 2**20:.1f}"])
    table = markdown_table(["norm", "layer", "fwd+bwd s/step (median)", "time vs BN", "peak step memory MiB",
                            "memory vs BN", "parameters + buffers MiB"], rows)

    lines = []
    if {"BN", "CBN"} <= set(t):
        r = t["CBN"] / base_t
        lines.append(f"- CBN (closed form) / BN time: **{r:.2f}x** (target <= 1.45x: {'met' if r <= 1.45 else 'NOT met'}).")
    if {"BN", "CBN", "CBN-autograd"} <= set(t):
        over_c, over_a = t["CBN"] - base_t, t["CBN-autograd"] - base_t
        q = over_c / over_a if over_a > 0 else float("nan")
        lines.append(f"- Overhead over BN: closed form {over_c:+.3f}s, autograd path {over_a:+.3f}s; ratio "
                     f"**{q:.2f}** (target <= 0.33: {'met' if q <= 1 / 3 else 'NOT met'}).")
    if {"BN", "floor"} <= set(t):
        lines.append(f"- Floor (BN + one weight-gradient conv per block, the arithmetic an exact CBN adds): "
                     f"{t['floor'] / base_t:.2f}x BN.")
    if {"BN", "MABN"} <= set(t):
        lines.append(f"- MABN / BN time: {t['MABN'] / base_t:.2f}x.")

    body = "\n".join([
        "### Block level: 4 x (3x3 conv 256 -> 256, norm, ReLU), input "
        f"{args.batch} x {args.channels} x {args.size} x {args.size}, forward + backward",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_description()}; load average (1/5/15 min) {load_before} before, {load_after} after the timings.",
        "",
        f"Timing ({args.clock} clock): median of {args.rounds} interleaved rounds x {args.iters} steps per norm (after {args.warmup} "
        f"warm-up steps, and one unmeasured step per round). Memory: peak resident memory of one step above "
        "its start (activations, gradients, temporaries), fresh subprocess per norm (see the method above); "
        "the persistent parameters and buffers (CBN's window of k-1 statistics gradients) in the last column.",
        "",
        table,
        "",
        *lines,
    ])
    print(body)
    if not args.no_write:
        write_doc_section(args.out, SECTION, body)
        print(f"\nwrote section {SECTION!r} of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
