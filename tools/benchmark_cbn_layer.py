#!/usr/bin/env python
"""Block-level benchmark of the normalization layers: time and memory of one conv + norm stack.

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
``benchmarks.measure``), after 3 warm-up steps; the maximum over 2 measured steps.

The result is printed as a Markdown table and written to the ``benchmark_cbn_layer`` section of
``--out`` (default ``output/benchmarks/BENCHMARKS.md``; ``--out docs/BENCHMARKS.md`` updates the
repository's page; ``--no-write`` to skip), with the command and the machine.

``--subsample-accuracy`` instead measures the effect of ``MODEL.CBN.GRAD_SUBSAMPLE`` on CBN's
window statistics with projects/CBNStatistics/cbn_statistics.py (section
``cbn_subsample_accuracy``).

``--device cuda`` runs the stacks on the GPU: each step synchronized before and after the clock,
memory = CUDA's peak tensor memory of a step (``torch.cuda.max_memory_allocated``), in process.

Run from the repository root: ``python tools/benchmark_cbn_layer.py`` (about 6-8 minutes on 2
quiet cores). The measurement lives in :mod:`benchmarks.layer`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package, also when it is not installed

import smallbn_d2  # noqa: E402,F401  (compat fixes, norm names)
from benchmarks.layer import measure_memory, run_layer_benchmark, subsample_accuracy  # noqa: E402
from benchmarks.measure import check_device, memory_env_active, write_doc_section  # noqa: E402
from benchmarks.settings import ACCURACY_SECTION, LAYER_NORMS, LAYER_SECTION  # noqa: E402


#: where the result goes unless ``--out`` says otherwise: an output folder, never a tracked page
DEFAULT_OUT = os.path.join("output", "benchmarks", "BENCHMARKS.md")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``); the hidden ``--memory-child ROW`` runs one memory child.

    Exits (argparse error) if ``--warmup`` is below ``--window`` - 1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--norms", nargs="+", default=list(LAYER_NORMS), choices=LAYER_NORMS, metavar="NORM",
                    help=f"rows of the table (default: all of {', '.join(LAYER_NORMS)})")
    ap.add_argument("--batch", type=int, default=64, help="N of the (N, C, H, W) input (RoIs, default 64)")
    ap.add_argument("--channels", type=int, default=256, help="C: channels of every conv (default 256)")
    ap.add_argument("--size", type=int, default=14, help="H = W of the input in pixels (default 14)")
    ap.add_argument("--depth", type=int, default=4, help="blocks in the stack")
    ap.add_argument("--window", type=int, default=4, help="CBN/NaiveCBN window size k")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per norm before the first round (>= k-1)")
    ap.add_argument("--iters", type=int, default=3, help="measured steps per norm per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (norms alternate round by round)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the stacks run (default cpu); cuda needs a CUDA device")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter (the reported default); cpu: CPU seconds of this process "
                         "(time.process_time), less sensitive to other load, best with --threads 1")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="Markdown file whose section of this benchmark is replaced by the result (created if missing; "
                         f"the rest of the file is kept). Default: {DEFAULT_OUT}, under the working directory; "
                         "--out docs/BENCHMARKS.md updates the repository's page")
    ap.add_argument("--no-write", action="store_true", help="print only; write no --out file")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--subsample-accuracy", action="store_true",
                    help="instead of timing: measure the effect of grad_subsample on the statistics "
                         "(runs projects/CBNStatistics/cbn_statistics.py once per s; section "
                         f"{ACCURACY_SECTION!r} of --out)")
    ap.add_argument("--subsamples", type=int, nargs="+", default=[1, 2, 4], help="s values (first: the reference run)")
    ap.add_argument("--acc-iters", type=int, default=41, help="SGD iterations of the accuracy run")
    ap.add_argument("--acc-probe-every", type=int, default=10, help="probe every this many iterations in the "
                    "accuracy run (default 10)")
    args = ap.parse_args(argv)
    if args.warmup < args.window - 1:
        ap.error(f"--warmup {args.warmup} is too small; allowed: >= window - 1 = {args.window - 1} "
                 "(fills CBN's window)")
    return args


def main(argv=None):
    """Run the block-level benchmark, the ``--subsample-accuracy`` run or one ``--memory-child``."""
    args = parse_args(argv)
    check_device(args.device, "benchmark_cbn_layer.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        if not memory_env_active():
            raise SystemExit("--memory-child must run with MALLOC_MMAP_THRESHOLD_=65536 (see benchmarks.measure)")
        print(json.dumps(measure_memory(args.memory_child, args)))
        return
    if args.subsample_accuracy:
        sys.path.insert(0, os.path.join(REPO, "projects", "CBNStatistics"))
        import cbn_statistics

        body, section = subsample_accuracy(args, cbn_statistics.run), ACCURACY_SECTION
    else:
        argv = sys.argv[1:] if argv is None else list(argv)
        body, section = run_layer_benchmark(os.path.abspath(__file__), args, argv), LAYER_SECTION
    print(body)
    if not args.no_write:
        write_doc_section(args.out, section, body)
        print(f"\nwrote section {section!r} of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
