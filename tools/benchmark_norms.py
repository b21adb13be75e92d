#!/usr/bin/env python
"""Detector-level benchmark of the normalization layers (issues: CBN item 9, MABN item 8,
deployment item 4).

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
  buffers (CBN's window) and the step's activations and temporaries (see tools/bench_utils.py);
* inference s/image in eval mode and after ``smallbn_d2.deploy.convert_to_frozen_bn`` (CBN/MABN/BN
  layers become Detectron2's FrozenBatchNorm2d; GN has no such form): one process per setting
  holds all the models and runs them in rotating order on the same images, so that the
  comparison is paired (the drift between processes on a shared machine is several percent,
  more than the 2% target); the ratio to BN is the median of the per-image ratios.

Default detector: Mask R-CNN R50-FPN with the 4conv1fc box head (``configs/Base-RCNN-FPN.yaml``,
``RESNETS.DEPTH 50``, ``ROI_BOX_HEAD.NUM_CONV 4``, ``NUM_FC 1``), 2 images per iteration, random
initialization (no pretrained weights offline; in ``1x`` the FrozenBN statistics of the random
backbone are set to its activation statistics on the first batch, so that activations keep a
sane scale), SGD at ``BASE_LR 0.0025`` (0.02 x 2/16). Images: the shared COCO subset
(coco_2017_train for training, the first val images for inference) resized to a shorter side of
512 (``--min-size``, longest side <= 853) instead of Detectron2's 800, to keep CPU runs short.
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
``benchmark_norms_scratch_3x``: a run of one setting keeps the other's table), to
docs/BENCHMARKS.md (``--no-write`` to skip) with the command and the machine.

Run from the repository root: ``python tools/benchmark_norms.py`` (see docs/BENCHMARKS.md for
the expected runtime).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_utils import (  # noqa: E402
    MEMORY_ENV,
    PeakRSS,
    Timer,
    command_line,
    fmt_ratio,
    load_average,
    machine_description,
    markdown_table,
    median,
    memory_env_active,
    write_doc_section,
)

NORMS = ("BN", "SyncBN", "GN", "CBN", "NaiveCBN", "MABN", "floor", "CBN-sub2")
#: rows that are a norm name plus config overrides
VARIANTS = {"floor": ("BNFloor", []), "CBN-sub2": ("CBN", ["MODEL.CBN.GRAD_SUBSAMPLE", 2])}
SETTINGS = ("1x", "scratch_3x")
SECTION = "benchmark_norms"
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Base-RCNN-FPN.yaml")
HEAD_NORM_KEYS = ("MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RETINANET.NORM")
FLOOR_NORM = "BNFloor"  # registered in the child process for the ``floor`` row
TARGETS = {  # (setting, norm) -> (max time ratio, max memory ratio); None = reported only
    ("1x", "CBN"): (1.20, 1.10),
    ("1x", "MABN"): (1.10, 1.05),
}
CONVERTED_TOLERANCE = 0.02  # converted CBN/MABN inference within 2% of BN
#: rows whose inference is, by construction, that of another row (same layers in eval mode)
INFERENCE_SAME_AS = {"floor": "BN", "CBN-sub2": "CBN"}


# ------------------------------------------------------------------------------ child side
def _register_floor_norm():
    """Register ``BNFloor``: BatchNorm plus, in training, CBN's d nu / d theta weight-gradient conv
    (without using it): the arithmetic an exact CBN adds to BN."""
    import torch
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_weight

    import smallbn_d2
    from smallbn_d2.layers.base import IterationNormBase
    from smallbn_d2.layers.conv_input import capture_conv_input, pop_conv_input

    class BatchNormWithStatGradCost(IterationNormBase):
        """BN (batch statistics in training, running statistics in eval) + one conv2d_weight."""

        def __init__(self, num_features: int):
            super().__init__(num_features)
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def _conv_attached(self, conv):
            capture_conv_input(conv)

        def configure(self, **kw):
            pass

        def forward(self, x):
            if self.training:
                u = pop_conv_input(self.conv)
                if u is not None and x.numel() > 0:
                    with torch.no_grad():
                        c = self.conv
                        conv2d_weight(u.detach(), c.weight.shape, x.detach(), c.stride, c.padding, c.dilation, c.groups)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)

    if FLOOR_NORM not in smallbn_d2.modeling.norms.NORM_REGISTRY:
        smallbn_d2.register_norm(FLOOR_NORM, BatchNormWithStatGradCost)


def make_cfg(args, setting: str, norm: str):
    """The detector config of ``setting`` with ``norm`` (see the module docstring)."""
    from smallbn_d2.engine import load_config

    name, opts = VARIANTS.get(norm, (norm, []))
    opts = list(opts)
    if args.config_file is None:
        opts += ["MODEL.RESNETS.DEPTH", 50, "MODEL.MASK_ON", True, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4,
                 "MODEL.ROI_BOX_HEAD.NUM_FC", 1]
    opts += ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", args.images,
             "SOLVER.BASE_LR", 0.0025, "INPUT.MIN_SIZE_TRAIN", (args.min_size,), "INPUT.MAX_SIZE_TRAIN", args.max_size,
             "INPUT.MIN_SIZE_TEST", args.min_size, "INPUT.MAX_SIZE_TEST", args.max_size,
             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "DATALOADER.NUM_WORKERS", 0,
             "MODEL.CBN.BURN_IN_ITERS", 0, "MODEL.CBN.BURN_IN_EPOCHS", None]
    for key in HEAD_NORM_KEYS:
        opts += [key, name]
    if setting == "1x":
        opts += ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2]
    elif setting == "scratch_3x":
        opts += ["MODEL.RESNETS.NORM", name, "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.STRIDE_IN_1X1", False]
    else:
        raise ValueError(f"setting = {setting!r} is invalid; allowed: {SETTINGS}")
    cfg = load_config(args.config_file or DEFAULT_CONFIG, opts + list(args.opts))
    return cfg


def load_batches(cfg, n: int, is_train: bool, seed: int = 0):
    """``n`` batches of ``SOLVER.IMS_PER_BATCH`` mapped dataset dicts (training) or ``n`` single
    mapped images (inference) from the config's first train / test dataset, deterministic."""
    import torch
    from detectron2.data import DatasetCatalog, DatasetMapper

    name = cfg.DATASETS.TRAIN[0] if is_train else cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(name)
    if is_train:
        dicts = [d for d in dicts if any(not a.get("iscrowd", 0) for a in d.get("annotations", []))]
    if not dicts:
        raise RuntimeError(f"dataset {name!r} has no usable images")
    torch.manual_seed(seed)
    mapper = DatasetMapper(cfg, is_train=is_train)
    if not is_train:
        return [mapper(copy.deepcopy(dicts[i % len(dicts)])) for i in range(n)]
    bs = cfg.SOLVER.IMS_PER_BATCH
    return [[mapper(copy.deepcopy(dicts[(i * bs + j) % len(dicts)])) for j in range(bs)] for i in range(n)]


def calibrate_frozen_bn(model, batch) -> int:
    """Set the statistics of every FrozenBatchNorm2d of the backbone's bottom-up network (the
    ResNet; the whole backbone if it has no ``bottom_up``) to those of its input on
    ``batch`` (layer by layer, in one forward pass), so that a randomly initialized frozen-BN
    backbone keeps unit-scale activations. Returns the number of layers set."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    handles = []

    def set_stats(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)
    for m in bottom_up.modules():
        if isinstance(m, FrozenBatchNorm2d):
            handles.append(m.register_forward_pre_hook(set_stats))
    with torch.no_grad():
        bottom_up(model.preprocess_image(batch).tensor)
    for h in handles:
        h.remove()
    return len(handles)


def _build_model(cfg, setting: str, first_batch):
    """The detector of ``cfg`` in training mode, built with seed 0 so that every norm gets the
    same conv weights. In ``1x`` the random frozen-BN backbone is calibrated on ``first_batch``."""
    import torch
    import smallbn_d2

    torch.manual_seed(0)
    model = smallbn_d2.build_model(cfg)
    if setting == "1x":
        calibrate_frozen_bn(model, first_batch)
    model.train()
    return model


def _build_trainable(cfg, setting: str, first_batch):
    """:func:`_build_model` and its SGD optimizer."""
    from detectron2.solver import build_optimizer

    model = _build_model(cfg, setting, first_batch)
    return model, build_optimizer(cfg, model)


def _rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k`` (mod its length): the k-th round's order, so that no item
    always runs first."""
    k %= len(items)
    return items[k:] + items[:k]


def _train_step(model, optimizer, batch, iteration: int) -> bool:
    """One training step (forward, backward, SGD step) at trainer iteration ``iteration``
    (set on the norm layers, as NormIterationHook does). Returns whether the loss was finite."""
    import torch
    import smallbn_d2
    from detectron2.utils.events import get_event_storage

    get_event_storage().iter = iteration
    smallbn_d2.set_norm_iteration(model, iteration)
    loss_dict = model(batch)
    losses = sum(loss_dict.values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()
    return bool(torch.isfinite(losses))


def _setup_child(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _register_floor_norm()


def child_train(args) -> dict:
    """Train every norm's detector of one setting in ONE process, interleaved step by step.

    Each model has its own optimizer and norm state and sees the same batches and, reseeded before
    every step, the same random draws (RPN anchor and RoI sampling: the mask head's cost follows
    the number of sampled foreground RoIs); step i runs every model once, in rotating order (no
    model always first), so that a change of the machine's speed hits all norms alike: the ratio
    to BN is then taken per step (paired). Warm-up steps
    (>= CBN's k - 1, so the window is full) are not timed. Returns the measured step times (s)
    and the number of non-finite losses of each norm."""
    import torch
    from detectron2.utils.events import EventStorage

    _setup_child(args)
    setting = args.child_setting
    cfgs = {norm: make_cfg(args, setting, norm) for norm in args.norms}
    batches = load_batches(next(iter(cfgs.values())), args.warmup + args.iters, is_train=True)
    times = {norm: [] for norm in args.norms}
    nonfinite = {norm: 0 for norm in args.norms}
    with EventStorage(args.start_iter):
        trainables = {norm: _build_trainable(cfg, setting, batches[0]) for norm, cfg in cfgs.items()}
        norms = list(trainables)
        for i, batch in enumerate(batches):
            for norm in _rotated(norms, i):
                torch.manual_seed(args.start_iter + i)  # same anchor/RoI sampling draws for every model
                with Timer(args.clock) as tm:
                    finite = _train_step(*trainables[norm], batch, args.start_iter + i)
                nonfinite[norm] += not finite
                if i >= args.warmup:
                    times[norm].append(tm.s)
    return {"setting": setting, "train_times": times, "nonfinite_losses": nonfinite}


def child_memory(args) -> dict:
    """Peak resident memory of training one (setting, norm) detector, in a fresh process run
    with ``MALLOC_MMAP_THRESHOLD_=65536`` (see tools/bench_utils.py): the maximum over the
    ``--memory-iters`` steps after the warm-up of the step's peak above the process's memory
    before the model was built (bytes)."""
    import torch
    from bench_utils import _status_bytes
    from detectron2.utils.events import EventStorage

    if not memory_env_active():
        raise SystemExit("memory children must run with MALLOC_MMAP_THRESHOLD_=65536 (see tools/bench_utils.py)")
    _setup_child(args)
    setting, norm = args.child_setting, args.child_norm
    cfg = make_cfg(args, setting, norm)
    batches = load_batches(cfg, args.warmup + args.memory_iters, is_train=True)
    rss0 = _status_bytes("VmRSS")  # after imports and data, before the model
    peaks, nonfinite = [], 0
    with EventStorage(args.start_iter):
        model, optimizer = _build_trainable(cfg, setting, batches[0])
        for i, batch in enumerate(batches):
            torch.manual_seed(args.start_iter + i)  # the draws of the training children
            with (PeakRSS() if i >= args.warmup else _Null()) as pk:
                nonfinite += not _train_step(model, optimizer, batch, args.start_iter + i)
            if i >= args.warmup:
                peaks.append(pk.start - rss0 + pk.peak)
    return {"setting": setting, "norm": norm, "peak_bytes": max(peaks), "nonfinite_losses": nonfinite}


def child_inference(args) -> dict:
    """Time inference of every norm of one setting in ONE process, interleaved image by image.

    Inference cost does not depend on the values of the weights or statistics, only on the
    layers; so the models are built with the same seed (identical conv weights: the norms' own
    parameters are constant at initialization), not trained, and compared on the same images in
    rotating order (each (image, repeat) runs every model once), which cancels the drift of a
    shared machine between separate processes (several percent, larger than the 2% target).
    Per model: eval mode, and (except GN, which has no FrozenBN form) after
    ``convert_to_frozen_bn``. The cost does depend on the number of detections (the mask head
    runs on each), so the population statistics are first computed from two batches (as
    PreciseBN does) and the number of detections on the first image is returned for each model.
    Returns the per-(image, repeat) times (s) and those detection counts of each model."""
    import torch
    from smallbn_d2.deploy import convert_to_frozen_bn
    from smallbn_d2.engine import update_norm_stats

    _setup_child(args)
    setting = args.child_setting
    models = {}
    images = stats_batches = None
    for norm in [n for n in args.norms if n not in INFERENCE_SAME_AS]:
        cfg = make_cfg(args, setting, norm)
        if images is None:
            images = load_batches(cfg, args.infer_images, is_train=False)
        if stats_batches is None:
            stats_batches = load_batches(cfg, 2, is_train=True)
        model = _build_model(cfg, setting, stats_batches[0])
        # population statistics from data (PreciseBN), as a trained model has them: with the
        # initial ones (mean 0, variance 1) a random model's activations overflow, its boxes are
        # not finite, Detectron2 drops them and the mask head runs on nothing
        update_norm_stats(model, stats_batches, num_iters=len(stats_batches))
        model.eval()
        models[(norm, "eval")] = model
        if norm != "GN":
            models[(norm, "converted")] = convert_to_frozen_bn(copy.deepcopy(model), fold=False).eval()
    keys = list(models)
    times = {k: [] for k in keys}
    detections = {}
    with torch.no_grad():
        for k in keys:  # one untimed image per model
            detections[k] = len(models[k]([images[0]])[0]["instances"])
        step = 0
        for _ in range(args.infer_repeats):
            for img in images:
                order = _rotated(keys, step)
                step += 1
                for k in order:
                    with Timer(args.clock) as tm:
                        models[k]([img])
                    times[k].append(tm.s)
    return {"setting": setting, "times": {f"{n}|{kind}": ts for (n, kind), ts in times.items()},
            "detections": {f"{n}|{kind}": d for (n, kind), d in detections.items()}}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------ parent side
def run_child(args, setting: str, norm: str, mode: str) -> dict:
    # the child arguments come first: --opts (in the pass-through) takes the rest of the line
    argv = [sys.executable, os.path.abspath(__file__), "--child-setting", setting, "--child-norm", norm,
            "--child-mode", mode] + _passthrough(args)
    env = dict(os.environ)
    if mode == "memory":
        env.update(MEMORY_ENV)
    t0 = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}/{norm}/{mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = time.time() - t0
    return res


def _run_or_record(args, setting: str, norm: str, mode: str, label: str, errors: dict):
    """:func:`run_child`, or None after recording its failure under ``(setting, label)`` in
    ``errors`` (listed under the setting's table) and printing it."""
    try:
        return run_child(args, setting, norm, mode)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        errors[(setting, label)] = str(e).strip().splitlines()[-1][:200]
        print(f"[{label}] {setting:10s} FAILED: {e}", file=sys.stderr, flush=True)
        return None


def _passthrough(args):
    out = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--memory-iters", str(args.memory_iters),
           "--min-size", str(args.min_size), "--max-size", str(args.max_size), "--images", str(args.images),
           "--infer-images", str(args.infer_images), "--infer-repeats", str(args.infer_repeats),
           "--start-iter", str(args.start_iter), "--clock", args.clock]
    if args.threads:
        out += ["--threads", str(args.threads)]
    out += ["--norms"] + list(args.norms)
    if args.config_file:
        out += ["--config-file", args.config_file]
    if args.opts:
        out += ["--opts"] + [str(o) for o in args.opts]
    return out


def _fmt_s(v):
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _paired_ratio(rounds, bn_rounds):
    """Median over (round, step) of a norm's step time over BN's time of the same step; None
    without BN."""
    ratios = [t / b for ts, bs in zip(rounds, bn_rounds) for t, b in zip(ts, bs)]
    return median(ratios) if ratios else None


def _inference_summary(times, norm):
    """Median s/image of ``norm`` in eval mode and converted, and the median over (image, repeat)
    of its time divided by BN's eval-mode time on the same image and repeat (paired ratios)."""
    out = {"eval": None, "conv": None, "eval_ratio": None, "conv_ratio": None}
    if not times:
        return out
    bn = times.get("BN|eval")
    for kind, key in (("eval", "eval"), ("converted", "conv")):
        ts = times.get(f"{norm}|{kind}")
        if ts:
            out[key] = median(ts)
            if bn:
                out[key + "_ratio"] = median([t / b for t, b in zip(ts, bn)])
    return out


def build_report(args, setting, results, mem, infer, load_before, load_after, started, finished) -> str:
    """The Markdown report of one setting: header (command, machine, method), table, summary."""
    title = {"1x": "`1x`: frozen-BN backbone, norm in FPN, box and mask heads",
             "scratch_3x": "`scratch_3x`: norm everywhere (backbone, FPN, heads)"}.get(setting, setting)
    parts = [
        f"### Detector level, {title}. "
        f"{'Mask R-CNN R50-FPN, 4conv1fc box head' if args.config_file is None else args.config_file}, "
        f"{args.images} images per iteration, CPU",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_description()}; load average (1/5/15 min) {load_before} at the start, {load_after} at the end; "
        f"run took {(finished - started) / 60:.0f} min.",
        "",
        f"Images: shorter side {args.min_size} (longest <= {args.max_size}). Training ({args.clock} clock): one process "
        "per setting holds every model and steps them in rotating order on the same batches; s/iter is the median of "
        f"{args.iters} steps x {args.rounds} round(s) after {args.warmup} warm-up steps, starting at iteration "
        f"{args.start_iter}, and 'vs BN' the median of the paired per-step ratios to BN. Inference ({args.clock} clock): one process per setting holds every model, in eval "
        "mode and after `convert_to_frozen_bn`, built with the same seed, and runs them in rotating order on each of "
        f"{args.infer_images} val images x {args.infer_repeats} repeats; s/img is the median, 'vs BN eval' the median of "
        "the paired per-image ratios to BN in eval mode. Memory: peak resident memory during a training step "
        "above the process before the model was built (model, gradients, optimizer state, buffers, activations), "
        f"max over {args.memory_iters} steps after the warm-up, fresh subprocess per row.",
    ]
    summary = []
    rows = []
    agg = {}
    for norm in args.norms:
        rs = results.get((setting, norm), [])
        if not rs and (setting, norm) not in mem and setting not in infer:
            continue
        a = {
            "train": median([t for r in rs for t in r["train_times"]]) if rs else None,
            "train_ratio": _paired_ratio([r["train_times"] for r in rs],
                                         [r["train_times"] for r in results.get((setting, "BN"), [])]),
            "mem": mem.get((setting, norm)),
            "nonfinite": sum(r["nonfinite_losses"] for r in rs),
        }
        a.update(_inference_summary((infer.get(setting) or {}).get("times"), INFERENCE_SAME_AS.get(norm, norm)))
        agg[norm] = a
    base = agg.get("BN", {})
    for norm, a in agg.items():
        same = INFERENCE_SAME_AS.get(norm)
        rows.append([
            norm,
            _fmt_s(a["train"]), "n/a" if a["train_ratio"] is None else f"{a['train_ratio']:.2f}x",
            "n/a" if a["mem"] is None else f"{a['mem'] / 2**20:.0f}",
            "n/a" if a["mem"] is None or base.get("mem") is None else fmt_ratio(a["mem"], base["mem"]),
            _fmt_s(a["eval"]) + (f" (= {same})" if same and a["eval"] is not None else ""),
            "n/a" if a["eval_ratio"] is None else f"{a['eval_ratio']:.3f}x",
            (_fmt_s(a["conv"]) + (f" (= {same})" if same else "")) if a["conv"] is not None else "n/a (GN has no FrozenBN form)" if norm == "GN" else "n/a",
            "n/a" if a["conv_ratio"] is None else f"{a['conv_ratio']:.3f}x",
        ])
        if a["nonfinite"]:
            summary.append(f"- WARNING {setting}/{norm}: {a['nonfinite']} step(s) with non-finite loss.")
    parts += ["", markdown_table(
        ["norm", "train s/iter", "vs BN", "peak memory MiB", "vs BN", "inference s/img (eval)", "vs BN eval",
         "converted s/img", "vs BN eval"], rows)]
    if "BN" in agg:
        for norm in ("CBN", "CBN-sub2", "MABN"):
            if norm not in agg:
                continue
            t_r = agg[norm]["train_ratio"]
            tgt = TARGETS.get((setting, norm))
            items = []
            if t_r is not None:  # timed
                item = f"training {t_r:.2f}x BN"
                if tgt:
                    item += f" (target <= {tgt[0]:.2f}x: {'met' if t_r <= tgt[0] else 'NOT met'})"
                if "floor" in agg and norm == "CBN" and agg["floor"]["train_ratio"]:
                    item += f"; floor (BN + d nu/d theta conv) {agg['floor']['train_ratio']:.2f}x"
                items.append(item)
            if agg[norm]["mem"] is not None and base.get("mem"):
                m_r = agg[norm]["mem"] / base["mem"]
                item = f"memory {m_r:.2f}x"
                if tgt:
                    item += f" (target <= {tgt[1]:.2f}x: {'met' if m_r <= tgt[1] else 'NOT met'})"
                items.append(item)
            if agg[norm]["conv_ratio"] is not None and norm not in INFERENCE_SAME_AS:
                c_r = agg[norm]["conv_ratio"]
                items.append(f"converted inference {c_r:.3f}x BN eval (target within {CONVERTED_TOLERANCE:.0%}: "
                             f"{'met' if abs(c_r - 1) <= CONVERTED_TOLERANCE else 'NOT met'}; converted BN "
                             f"{agg['BN']['conv_ratio']:.3f}x)")
            line = f"- {setting} {norm}: " + ", ".join(items)
            summary.append(line + ".")
        if "GN" in agg and agg["GN"]["eval_ratio"] is not None:
            summary.append(f"- {setting} GN: inference {agg['GN']['eval_ratio']:.2f}x BN eval "
                           "(the papers: about 1.7x on GPUs).")
    counts = (infer.get(setting) or {}).get("detections") or {}
    if len(set(counts.values())) > 1:
        summary.append("- WARNING: the models returned different numbers of detections on the first image "
                       f"({counts}); their inference times are not comparable.")
    elif counts:
        summary.append(f"- Every model returned {next(iter(counts.values()))} detections on the first image "
                       "(inference cost grows with the detections: the mask head runs on each).")
    parts += [""] + summary
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=None, help="detector config (default: Mask R-CNN R50-FPN 4conv1fc)")
    ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
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
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="memory subprocesses only")
    ap.add_argument("--child-timeout", type=float, default=7200)
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/BENCHMARKS.md")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    ap.add_argument("--child-setting", help=argparse.SUPPRESS)
    ap.add_argument("--child-norm", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", choices=("train", "memory", "infer"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child_mode:
        run = {"train": child_train, "memory": child_memory, "infer": child_inference}[args.child_mode]
        print(json.dumps(run(args)))
        return

    started = time.time()
    load_before = load_average()
    results, mem, errors = {}, {}, {}
    for r in range(0 if args.no_timing else args.rounds):
        for setting in args.settings:
            res = _run_or_record(args, setting, "all", "train", f"round {r + 1} training", errors)
            if res is None:
                continue
            for norm in args.norms:
                results.setdefault((setting, norm), []).append(
                    {"train_times": res["train_times"][norm], "nonfinite_losses": res["nonfinite_losses"][norm]})
            print(f"[round {r + 1}] {setting:10s} train " + ", ".join(
                f"{n} {median(t):.2f}" for n, t in res["train_times"].items()) + f" s/iter ({res['wall']:.0f}s)",
                file=sys.stderr, flush=True)
    infer = {}
    if not (args.no_inference or args.no_timing):
        for setting in args.settings:
            res = _run_or_record(args, setting, "all", "infer", "inference", errors)
            if res is None:
                continue
            infer[setting] = res
            print(f"[inference] {setting:10s} " + ", ".join(
                f"{k} {median(v):.2f}" for k, v in res["times"].items()) + f" s/img ({res['wall']:.0f}s)",
                file=sys.stderr, flush=True)
    if not args.no_memory:
        for setting in args.settings:
            for norm in args.norms:
                res = _run_or_record(args, setting, norm, "memory", f"memory {norm}", errors)
                if res is None:
                    continue
                mem[(setting, norm)] = res["peak_bytes"]
                print(f"[memory] {setting:10s} {norm:9s} {res['peak_bytes'] / 2**20:.0f} MiB ({res['wall']:.0f}s)",
                      file=sys.stderr, flush=True)
    finished, load_after = time.time(), load_average()
    for setting in args.settings:
        report = build_report(args, setting, results, mem, infer, load_before, load_after, started, finished)
        failed = {k: e for k, e in errors.items() if k[0] == setting}
        if failed:
            report += "\n\nFailed: " + "; ".join(f"{s}/{n}: {e}" for (s, n), e in failed.items())
        print(report + "\n")
        if not args.no_write:
            write_doc_section(args.out, f"{SECTION}_{setting}", report)
            print(f"wrote section '{SECTION}_{setting}' of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
