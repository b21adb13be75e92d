#!/usr/bin/env python
"""Detector-level benchmark of the normalization layers: training time, memory, inference time.

Builds the same detector with each norm -- ``BN``, ``SyncBN`` (Detectron2's name; one process,
so it computes BN's statistics), ``GN``, ``CBN``, ``NaiveCBN``, ``MABN``, and ``floor`` (BN plus
the one weight-gradient conv per normalized conv that an exact CBN adds: the arithmetic floor
of CBN) and ``CBN-sub2`` (CBN with ``MODEL.CBN.GRAD_SUBSAMPLE 2``, the approximation that goes
below the floor) -- in two settings:

* ``1x``: frozen-BN backbone (``RESNETS.NORM FrozenBN``, ``FREEZE_AT 2``), the norm in the FPN,
  the box head and the mask head (the CBN paper's default "normalizers in the heads");
* ``scratch_3x``: the norm everywhere (backbone too, ``FREEZE_AT 0``, ``STRIDE_IN_1X1 False``,
  as Detectron2's GN scratch configs);

and measures, on this machine (CPU):

* training s/iter: median over the measured steps after warm-up of one full step (forward,
  backward, SGD step; the data is preloaded: no data loading in the time);
* peak memory: for each (setting, norm) a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``
  records the peak resident memory during a training step (after warm-up) minus the resident
  memory of the process before the model was built: model, gradients, optimizer state,
  buffers (CBN's window) and the step's activations and temporaries (see ``benchmarks.measure``);
* inference s/image in eval mode and after ``smallbn_d2.deploy.convert_to_frozen_bn`` (CBN/MABN/BN
  layers become Detectron2's FrozenBatchNorm2d; GN has no such form): one process per setting
  holds all the models and runs them in rotating order on the same images, so that the
  comparison is paired (the drift between processes on a shared machine is several percent,
  more than the 2% target); the ratio to BN is the median of the per-image ratios.

Default detector: Mask R-CNN R50-FPN with the 4conv1fc box head (``configs/Base-RCNN-FPN.yaml``,
``RESNETS.DEPTH 50``, ``ROI_BOX_HEAD.NUM_CONV 4``, ``NUM_FC 1``), 2 images per iteration, random
initialization (no pretrained weights offline; in ``1x`` the FrozenBN statistics of the random
backbone are set to its activation statistics on the first batch, so that activations keep a
sane scale), SGD at ``BASE_LR 0.0025`` (0.02 x 2/16). Images: Detectron2's ``coco_2017_train``
for training and the first ``coco_2017_val`` images for inference (under
``$DETECTRON2_DATASETS``; ``--opts DATASETS.TRAIN "('coco_2017_sample_train',)" DATASETS.TEST
"('coco_2017_sample_val',)"`` uses the COCO 2017 sample shipped with smallbn_d2 instead), resized
to a shorter side of 512 (``--min-size``, longest side <= 853) instead of Detectron2's 800, to
keep CPU runs short.
For inference ``ROI_HEADS.SCORE_THRESH_TEST 0`` so that every model returns
``TEST.DETECTIONS_PER_IMAGE`` (100) detections and runs its mask head on as many boxes (a
random model scores below Detectron2's 0.05 threshold). CBN: ``WINDOW_SIZE 4`` (the config
default; the paper's k), burn-in 0, measured after k-1 warm-up steps (window full); every model
starts at iteration ``--start-iter`` (20000) so that MABN is past all its warm-ups (SMA,
renormalization, heads). ``--config-file``/``--opts`` replace the default detector; the
setting's ``NORM`` keys are applied on top.

Training is timed in one subprocess per setting that holds every norm's model (each with its own
optimizer and state) and steps them in rotating order on the same batches, so that the ratios to
BN are paired per step (``--rounds`` > 1 repeats this and pools the steps, for a noisy machine);
memory needs a fresh subprocess per (setting, norm). The result is printed as
Markdown tables and written, one section per setting (``benchmark_norms_1x``,
``benchmark_norms_scratch_3x``: a run of one setting keeps the other's table), to ``--out``
(default ``output/benchmarks/BENCHMARKS.md``; ``--out docs/BENCHMARKS.md`` updates the
repository's page; ``--no-write`` to skip) with the command and the machine.

``--device cuda`` runs the same children on the GPU: every timed step and inference call is
synchronized before and after the clock, and memory is CUDA's peak tensor memory
(``torch.cuda.max_memory_allocated``) instead of the resident memory.

Run from the repository root: ``python tools/benchmark_norms.py`` (see docs/BENCHMARKS.md for
the expected runtime). The measurement lives in :mod:`benchmarks` (settings and rows:
``settings``; child processes: ``children``; orchestration: ``runner``; report: ``report``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package, also when it is not installed

from benchmarks.children import CHILD_MODES, run_child_mode  # noqa: E402
from benchmarks.measure import check_device  # noqa: E402
from benchmarks.report import inference_summary as _inference_summary  # noqa: E402,F401 (tests)
from benchmarks.report import paired_ratio as _paired_ratio  # noqa: E402,F401 (tests)
from benchmarks.runner import run_benchmark  # noqa: E402
from benchmarks.settings import NORMS, SETTINGS  # noqa: E402


#: where the result goes unless ``--out`` says otherwise: an output folder, never a tracked page
DEFAULT_OUT = os.path.join("output", "benchmarks", "BENCHMARKS.md")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``); the hidden ``--child-*`` options select a child process."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=None, help="detector config (default: Mask R-CNN R50-FPN 4conv1fc)")
    ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS, metavar="NORM",
                    help=f"rows of the tables (default: all of {', '.join(NORMS)}; BN, the reference, is always run)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                    help="1x: norm in FPN and heads, FrozenBN backbone; scratch_3x: norm everywhere (default: both)")
    ap.add_argument("--images", type=int, default=2, help="images per training iteration")
    ap.add_argument("--min-size", type=int, default=512, help="shorter image side (train and test)")
    ap.add_argument("--max-size", type=int, default=853, help="longest image side (train and test)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (>= CBN window size - 1)")
    ap.add_argument("--iters", type=int, default=8, help="measured training steps per round")
    ap.add_argument("--memory-iters", type=int, default=1, help="measured steps in the memory subprocess")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all timings this many times (noisy machines)")
    ap.add_argument("--infer-images", type=int, default=4, help="val images for the inference timing")
    ap.add_argument("--infer-repeats", type=int, default=3, help="passes over the inference images")
    ap.add_argument("--start-iter", type=int, default=20000, help="trainer iteration of the first step")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter (the reported default); cpu: CPU seconds of the process")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the detectors run (default cpu); cuda needs a CUDA device")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference timings")
    ap.add_argument("--no-timing", action="store_true", help="memory subprocesses only")
    ap.add_argument("--child-timeout", type=float, default=7200,
                    help="seconds a child process (one norm, one measurement) may run before it is stopped and "
                         "recorded as failed (default 7200)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="Markdown file whose sections of this benchmark are replaced by the result (created if "
                         f"missing; the rest of the file is kept). Default: {DEFAULT_OUT}, under the working "
                         "directory; --out docs/BENCHMARKS.md updates the repository's page")
    ap.add_argument("--no-write", action="store_true", help="print only; write no --out file")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    ap.add_argument("--child-setting", help=argparse.SUPPRESS)
    ap.add_argument("--child-norm", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", choices=tuple(CHILD_MODES), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    """Run the benchmark (returns ``{setting: report}``), or, with ``--child-mode``, one child
    process of it (prints its result as JSON, returns None)."""
    args = parse_args(argv)
    check_device(args.device, "benchmark_norms.py")
    if args.child_mode:
        print(json.dumps(run_child_mode(args)))
        return None
    return run_benchmark(os.path.abspath(__file__), args)


if __name__ == "__main__":
    main()
