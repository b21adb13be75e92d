"""Block-level benchmark of the normalization layers (``tools/benchmark_cbn_layer.py``).

A stack of ``depth`` x (3x3 conv, C -> C channels, no bias, norm, ReLU) on an N x C x S x S input
(default 4 x 256 channels on 64 x 256 x 14 x 14: a Mask R-CNN mask head batch of 64 RoIs),
forward + backward (input, conv and norm parameters all need gradients; the upstream gradient
is a fixed random tensor), one :class:`Bench` per row of :data:`~.settings.LAYER_NORMS`.
Time: median over the measured steps of all rounds, rows interleaved round by round. Memory: a
fresh child process per row with :data:`~.measure.MEMORY_ENV` (:func:`measure_memory`); on CUDA
(``--device cuda``) steps are synchronized around the clock and memory is CUDA's peak, in process.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from smallbn_d2.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, NaiveCrossIterationBatchNorm2d
from .measure import (
    Timer,
    command_line,
    device_sync,
    fmt_ratio,
    load_average,
    machine_description,
    markdown_table,
    median,
    peak_memory,
    run_json_child,
)
from .settings import LAYER_DESCRIPTIONS, LAYER_NORMS, LAYER_START_ITER

__all__ = ["Block", "Bench", "measure_memory", "state_bytes", "time_norms", "run_layer_benchmark",
           "subsample_accuracy"]


class Block(nn.Module):
    """conv3x3 (no bias, padding 1) -> norm -> ReLU on (N, C, H, W); ``floor`` adds the
    weight-gradient conv of d nu / d theta (computed and discarded) in training.

    Args:
        channels: C (input and output).
        norm: a row of :data:`~.settings.LAYER_NORMS`.
        window: CBN / NaiveCBN window size k (iterations).
    Raises:
        ValueError: unknown ``norm`` (naming the allowed ones).
    """

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
            raise ValueError(f"unknown norm {norm!r}; allowed: {LAYER_NORMS}")
        if hasattr(self.norm, "attach_conv"):
            self.norm.attach_conv(self.conv)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.extra_wgrad and self.training:
            with torch.no_grad():
                conv2d_weight(x.detach(), self.conv.weight.shape, y.detach(), 1, 1)
        return self.act(self.norm(y))


class Bench:
    """One row's block stack with its input, upstream gradient and trainer iteration.

    Args:
        norm: a row of :data:`~.settings.LAYER_NORMS`.
        args: ``channels``, ``window``, ``depth`` (blocks), ``batch`` (N), ``size`` (H = W), ``device``.
    Built with seed 0 (same conv weights for every row); input and gradient from seed 1.
    """

    def __init__(self, norm: str, args):
        torch.manual_seed(0)
        blocks = [Block(args.channels, norm, args.window) for _ in range(args.depth)]
        self.model = nn.Sequential(*blocks).train().to(args.device)
        g = torch.Generator().manual_seed(1)
        shape = (args.batch, args.channels, args.size, args.size)
        self.x = torch.randn(shape, generator=g).to(args.device).requires_grad_(True)
        self.gy = torch.randn(shape, generator=g).to(args.device)
        self.t = LAYER_START_ITER.get(norm, 0)

    def step(self) -> None:
        """One forward + backward at the next trainer iteration (set on the norm layers)."""
        for m in self.model.modules():
            if hasattr(m, "set_iteration"):
                m.set_iteration(self.t)
        self.t += 1
        self.model(self.x).backward(self.gy)

    def zero_grad(self) -> None:
        """Drop the gradients of the parameters and of the input."""
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None


def measure_memory(norm: str, args) -> Dict:
    """Peak step memory above the step's start (bytes) of ``norm``'s stack, in this process:
    ``args.warmup`` steps, then the maximum over 2 steps. On the CPU meaningful only with
    :data:`~.measure.MEMORY_ENV`. Returns ``{"norm", "peak_bytes"}``."""
    b = Bench(norm, args)
    for _ in range(args.warmup):
        b.zero_grad()
        b.step()
    peaks = []
    for _ in range(2):
        b.zero_grad()
        with peak_memory(args.device) as p:
            b.step()
        peaks.append(p.peak)
    return {"norm": norm, "peak_bytes": max(peaks)}


def state_bytes(norm: str, args) -> int:
    """Bytes of the stack's parameters and buffers (CBN's window of statistics gradients included)."""
    model = Bench(norm, args).model
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def time_norms(args) -> Dict[str, List[float]]:
    """Step times (s, ``args.clock``) of every row of ``args.norms``: after ``args.warmup`` steps
    per row (fills CBN's window), ``args.rounds`` rounds in which each row runs one unmeasured
    and ``args.iters`` measured steps. Progress goes to stderr."""
    benches = {n: Bench(n, args) for n in args.norms}
    for b in benches.values():
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
                with Timer(args.clock, sync=device_sync(args.device)) as tm:
                    b.step()
                times[n].append(tm.s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {median(times[n]):.3f}s" for n in args.norms),
              file=sys.stderr, flush=True)
    return times


#: the memory column's method per device
_MEMORY_METHOD = {
    "cpu": "peak resident memory of one step above its start (activations, gradients, temporaries), fresh "
           "subprocess per norm (see the method above)",
    "cuda": "peak CUDA tensor memory (torch.cuda.max_memory_allocated) of one step above its start "
            "(activations, gradients, temporaries)",
}


def _summary(t: Dict[str, float]) -> List[str]:
    """The lines under the table: CBN and MABN against BN, the overhead ratio, the floor."""
    base_t = t.get("BN", float("nan"))
    lines = []
    if {"BN", "CBN"} <= set(t):
        r = t["CBN"] / base_t
        verdict = "met" if r <= 1.45 else "NOT met"
        lines.append(f"- CBN (closed form) / BN time: **{r:.2f}x** (target <= 1.45x: {verdict}).")
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
    return lines


def run_layer_benchmark(script: str, args, child_argv: Sequence[str]) -> str:
    """Time every row of ``args.norms`` here, measure its memory (unless ``args.no_memory``) in a child
    process (CPU) or here (CUDA) and return the Markdown section (header, table, summary).

    Args:
        script: the benchmark script; memory children run it as ``script *child_argv
            --memory-child ROW --no-write`` with :data:`~.measure.MEMORY_ENV`.
        args: its parsed options.
        child_argv: the command-line arguments of this run (passed on to the memory children).
    Raises:
        RuntimeError: a memory child failed.
    """
    load_before = load_average()
    times = time_norms(args)
    load_after = load_average()
    mem = {}
    if not args.no_memory:
        for n in args.norms:
            if args.device == "cuda":
                mem[n] = measure_memory(n, args)["peak_bytes"]
            else:
                res = run_json_child(script, list(child_argv) + ["--memory-child", n, "--no-write"], timeout=1800,
                                     memory=True, label=f"memory child {n}")
                mem[n] = res["peak_bytes"]
            print(f"memory {n}: {mem[n] / 2**20:.1f} MiB", file=sys.stderr, flush=True)

    t = {n: median(v) for n, v in times.items()}
    base_t = t.get("BN", float("nan"))
    base_m = mem.get("BN", float("nan"))
    rows = [[n, LAYER_DESCRIPTIONS[n], f"{t[n]:.3f}", fmt_ratio(t[n], base_t),
             f"{mem[n] / 2**20:.0f}" if n in mem else "n/a", fmt_ratio(mem[n], base_m) if n in mem else "n/a",
             f"{state_bytes(n, args) / 2**20:.1f}"] for n in args.norms]
    table = markdown_table(["norm", "layer", "fwd+bwd s/step (median)", "time vs BN", "peak step memory MiB",
                            "memory vs BN", "parameters + buffers MiB"], rows)
    return "\n".join([
        "### Block level: 4 x (3x3 conv 256 -> 256, norm, ReLU), input "
        f"{args.batch} x {args.channels} x {args.size} x {args.size}, forward + backward",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_description(args.device)}; load average (1/5/15 min) {load_before} before, "
        f"{load_after} after the timings.",
        "",
        f"Timing ({args.clock} clock): median of {args.rounds} interleaved rounds x {args.iters} steps per norm "
        f"(after {args.warmup} warm-up steps, and one unmeasured step per round). "
        f"Memory: {_MEMORY_METHOD[args.device]}; "
        "the persistent parameters and buffers (CBN's window of k-1 statistics gradients) in the last column.",
        "",
        table,
        "",
        *_summary(t),
    ])


def subsample_accuracy(args, diagnostic_run: Callable[..., Dict]) -> str:
    """Effect of ``grad_subsample`` s on the compensated statistics, measured with the CBN
    statistics diagnostic (projects/CBNStatistics): the same SGD run on the detector's training
    data (tiny Mask R-CNN, BN-trained, seed 0) is probed once per s of ``args.subsamples``, with
    the diagnostic's d nu / d theta replaced by the subsampled estimate; all other estimators,
    the training and the truth are identical across s (checked on the losses).

    Args:
        args: ``subsamples`` (the first is the reference run), ``acc_iters``, ``acc_probe_every``,
            ``window`` (k).
        diagnostic_run: the diagnostic's ``run`` (``iters``, ``probe_every``, ``max_window``,
            ``seed``, ``grad_subsample`` keywords; returns its result dict).
    Returns:
        the Markdown section (header, method, table of the window variance's relative errors).
    """
    runs = {}
    for s in args.subsamples:
        runs[s] = diagnostic_run(iters=args.acc_iters, probe_every=args.acc_probe_every, max_window=args.window,
                                 seed=0, grad_subsample=s)
        print(f"subsample {s}: done", file=sys.stderr, flush=True)
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
        "the tiny Mask R-CNN (configs/test/tiny-mask_rcnn.yaml) on the diagnostic's default training set (the "
        "COCO 2017 sample shipped with smallbn_d2, coco_2017_sample_train, 24 images), 2 images per "
        "iteration, measured by projects/CBNStatistics/cbn_statistics.py with d nu / d theta taken on every "
        "s-th RoI (box head: N >= 4s) or every s-th output row (backbone, FPN). The window mean is unaffected "
        "(d mu / d theta stays exact). 'own-conv bound': the previous batches re-run through the current conv, "
        "the best a compensation in the layer's own conv can do. "
        + ("Training identical across s (same losses)." if same else "WARNING: the runs' losses differ."),
        "",
        markdown_table(header, rows),
    ])
