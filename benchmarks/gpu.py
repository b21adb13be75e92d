"""The measurements of ``tools/gpu_check.py`` on CUDA, each run as its own child process.

``python -m benchmarks.gpu MODE --result FILE [options]`` writes one JSON object to
FILE (the raw numbers; :mod:`.gpu_report` turns them into tables). Modes:

* ``block``: the block-level benchmark of :mod:`.layer` (the same :class:`~.layer.Bench` stacks,
  moved to the device): forward + backward time per step, rows interleaved round by round, each
  round's time per step the median of ``torch.utils.benchmark.Timer.timeit`` (which synchronizes
  CUDA around its runs) over ``--iters`` steps; peak step memory = the
  largest ``torch.cuda.max_memory_allocated`` during a step above ``memory_allocated`` at its
  start. Result: ``{"device", "shape", "depth", "window", "norms", "times": {row: [s]},
  "peak_bytes": {row: bytes}, "state_bytes": {row: bytes}, "rounds", "iters", "warmup"}``.
* ``detector``: the detector-level benchmark of :mod:`.children` for one setting (``1x`` or
  ``scratch_3x``, :func:`.settings.make_cfg`) on the COCO 2017 sample shipped with the package
  (``coco_2017_sample_train``/``_val``, upscaled to ``--min-size``), all rows in ONE process:

  1. memory: the rows' models are built one after the other (seed 0, same conv weights); each
     runs ``--warmup`` steps, then ``--memory-iters`` steps whose peak
     ``max_memory_allocated`` above the memory allocated *before the model was built* (model,
     gradients, optimizer state, buffers such as CBN's window, and the step's activations and
     temporaries: the CUDA counterpart of the CPU benchmark's peak RSS) is recorded; the models
     built earlier stay idle meanwhile, so they do not change the difference;
  2. training time: ``--iters`` steps in which every model runs once, in rotating order, on
     the same batch with the same random draws (reseeded), synchronized before and after;
     the ratio to BN is taken per step (paired);
  3. inference: every model (rows whose layers are another row's in eval mode aside) gets
     population statistics from two batches (:func:`smallbn_d2.engine.update_norm_stats`), then
     runs in eval mode and after ``convert_to_frozen_bn`` on ``--infer-images`` val images x
     ``--infer-repeats``, models in rotating order, synchronized around every image.

  Result: ``{"setting", "device", "norms", "images", "min_size", "max_size", "warmup",
  "memory_iters", "iters", "start_iter", "train_times": {row: [s]}, "nonfinite_losses": {row: n},
  "peak_bytes": {row: bytes}, "infer_times": {"<row>|eval"|"<row>|converted": [s]},
  "detections": {same keys: n}, "infer_images", "infer_repeats", "tf32": {...}}``.
* ``train``: a short ``tools/train_net.py`` run of the sample Mask R-CNN
  (``configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml`` with every norm key set to
  ``--norm``), ``SOLVER.AMP.ENABLED`` as ``--amp`` (Detectron2's AMPTrainer: fp16 autocast and
  a gradient scaler on CUDA), ``--iters`` iterations, ``--num-gpus`` processes (NCCL on CUDA),
  then the final COCO evaluation; CBN's burn-in and MABN's warm-ups are shortened to a third of
  the run so that the full layers train. The run's files are read back with
  ``load_run`` of ``tools/run_report/run_metrics.py``. Result: ``{"norm", "device", "amp",
  "num_gpus", "max_iter", "images_per_iter", "returncode", "iterations", "losses": [[it,
  total_loss]], "all_finite", "s_per_iter", "peak_memory_mb", "peak_memory_kind", "test_set",
  "results": {task: {metric: AP}}, "inference_s_per_image", "command"}``; exit status 3 when
  the run left no loss or a non-finite one.

``--device cpu`` runs every mode on the CPU (no memory figures): a rehearsal of the code paths
on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

__all__ = ["block_benchmark", "detector_benchmark", "detector_rows", "train_run", "train_opts", "SAMPLE_CONFIG",
           "SAMPLE_NORM_KEYS", "main"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the sample Mask R-CNN of the ``train`` mode
SAMPLE_CONFIG = os.path.join(_REPO, "configs", "quick", "mask_rcnn_R_18_FPN_CBN_small_cpu.yaml")
#: the norm keys of :data:`SAMPLE_CONFIG`, all set to ``--norm``
SAMPLE_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
#: the COCO 2017 sample shipped with the package (:func:`smallbn_d2.data.register_coco_sample`)
SAMPLE_DATASET_OPTS = ["DATASETS.TRAIN", ("coco_2017_sample_train",), "DATASETS.TEST", ("coco_2017_sample_val",)]


def _sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device):
    """A wall-clock :class:`~.measure.Timer` that waits for the device's queued work at both ends."""
    from .measure import Timer

    return Timer("wall", sync=lambda: _sync(device))


def _tf32() -> Dict[str, bool]:
    """TF32 switches in force (torch's defaults unless changed): cuDNN convs, cuBLAS matmuls."""
    import torch

    return {"cudnn_conv": bool(torch.backends.cudnn.allow_tf32), "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


# ------------------------------------------------------------------------------------ block level
def block_benchmark(args) -> Dict:
    """The block-level rows of ``args.norms`` on ``args.device`` (see the module docstring).

    Args:
        args: ``device``, ``norms`` (rows of :data:`.settings.LAYER_NORMS`), ``channels``,
            ``window``, ``depth``, ``batch``, ``size`` (as :class:`.layer.Bench`), ``warmup``
            (steps per row first, >= k - 1), ``rounds``, ``iters`` (timed steps per row and round).
    Returns:
        ``times``: per row, one median s/step per round.
        the result dict (times in seconds, memory in bytes; ``peak_bytes`` empty on the CPU).
    """
    import torch

    from .layer import Bench, state_bytes
    from .settings import LAYER_DESCRIPTIONS

    device = torch.device(args.device)
    benches = {}
    for n in args.norms:
        b = Bench(n, args)
        b.model.to(device)
        b.x = b.x.detach().to(device).requires_grad_(True)
        b.gy = b.gy.to(device)
        benches[n] = b
    for b in benches.values():
        for _ in range(args.warmup):
            b.zero_grad()
            b.step()
    peaks = {}
    if device.type == "cuda":
        for n, b in benches.items():
            ps = []
            for _ in range(2):
                b.zero_grad()
                _sync(device)
                start = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                b.step()
                _sync(device)
                ps.append(torch.cuda.max_memory_allocated(device) - start)
            peaks[n] = max(ps)
    from torch.utils.benchmark import Timer

    times: Dict[str, List[float]] = {n: [] for n in args.norms}
    for _ in range(args.rounds):  # rows interleaved round by round
        for n, b in benches.items():
            timer = Timer("b.zero_grad(); b.step()", globals={"b": b}, num_threads=torch.get_num_threads())
            times[n].append(timer.timeit(args.iters).median)
    return {"device": str(device), "shape": [args.batch, args.channels, args.size, args.size], "depth": args.depth,
            "window": args.window, "norms": list(args.norms), "times": times, "peak_bytes": peaks,
            "state_bytes": {n: state_bytes(n, args) for n in args.norms}, "rounds": args.rounds, "iters": args.iters,
            "warmup": args.warmup, "tf32": _tf32(), "descriptions": {n: LAYER_DESCRIPTIONS[n] for n in args.norms}}


# ------------------------------------------------------------------------------------ detector level
def detector_rows(result: Dict) -> Dict[str, Dict]:
    """Per row of a ``detector`` result, the figures of its table line, with the CPU detector
    benchmark's own aggregation (:func:`.report.paired_ratio`, :func:`.report.inference_summary`).

    Returns:
        ``{row: {"train": median s/iter, "train_ratio": median of the per-step ratios to BN,
        "mem": bytes, "mem_ratio": to BN, "nonfinite": steps, "eval", "conv" (median s/image),
        "eval_ratio", "conv_ratio" (medians of the per-image ratios to BN in eval mode),
        "inference_of": the row whose layers it has in eval mode or None, "no_frozen_form"}}``;
        None where not measured (no BN row: no ratios).
    """
    from .measure import median
    from .report import inference_summary, paired_ratio
    from .settings import INFERENCE_SAME_AS, NO_FROZEN_FORM

    times = result.get("train_times") or {}
    mem = result.get("peak_bytes") or {}
    out = {}
    for norm in result.get("norms", list(times)):
        ts = times.get(norm) or []
        row = {"train": median(ts) if ts else None,
               "train_ratio": paired_ratio([ts], [times["BN"]]) if ts and times.get("BN") else None,
               "mem": mem.get(norm), "mem_ratio": mem[norm] / mem["BN"] if norm in mem and mem.get("BN") else None,
               "nonfinite": (result.get("nonfinite_losses") or {}).get(norm, 0),
               "inference_of": INFERENCE_SAME_AS.get(norm), "no_frozen_form": norm in NO_FROZEN_FORM}
        row.update(inference_summary(result.get("infer_times"), INFERENCE_SAME_AS.get(norm, norm)))
        out[norm] = row
    return out


def detector_benchmark(args, emit: Optional[Callable[[Dict], None]] = None) -> Dict:
    """The detector-level rows of ``args.norms`` in setting ``args.setting`` on ``args.device``
    (see the module docstring for the three phases).

    Args:
        args: ``device``, ``setting``, ``norms`` (rows of :data:`.settings.NORMS`), ``images``
            (per training step), ``min_size``/``max_size`` (pixels), ``warmup``,
            ``memory_iters``, ``iters``, ``start_iter``, ``infer_images``, ``infer_repeats``,
            ``config_file`` (None: R50-FPN Mask R-CNN 4conv1fc), ``opts``.
        emit: called with the result so far (no inference yet) after the training phases, so
            that a run stopped during inference keeps them.
    Returns:
        the result dict (times in seconds, memory in bytes; ``peak_bytes`` empty on the CPU).
    """
    import torch
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from smallbn_d2.data import register_coco_sample
    from .children import build_benchmark_model, inference_models, load_batches, rotated, time_inference, train_step
    from .floor import register_floor_norm
    from .settings import INFERENCE_SAME_AS, make_cfg

    register_coco_sample()
    register_floor_norm()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg_args = copy.copy(args)
    cfg_args.opts = ["MODEL.DEVICE", str(device)] + SAMPLE_DATASET_OPTS + list(args.opts)
    cfgs = {norm: make_cfg(cfg_args, args.setting, norm) for norm in args.norms}
    first = cfgs[args.norms[0]]
    n_train = args.warmup + args.memory_iters + args.iters
    batches = load_batches(first, n_train, is_train=True)
    trainables, peaks = {}, {}
    nonfinite = {n: 0 for n in args.norms}
    times: Dict[str, List[float]] = {n: [] for n in args.norms}
    with EventStorage(args.start_iter):
        for norm, cfg in cfgs.items():  # 1. memory, one model after the other
            _sync(device)
            base = torch.cuda.memory_allocated(device) if cuda else 0
            model = build_benchmark_model(cfg, args.setting, batches[0])
            optimizer = build_optimizer(cfg, model)
            trainables[norm] = (model, optimizer)
            ps = []
            for i in range(args.warmup + args.memory_iters):
                measured = cuda and i >= args.warmup
                if measured:
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                torch.manual_seed(args.start_iter + i)
                nonfinite[norm] += not train_step(model, optimizer, batches[i], args.start_iter + i)
                if measured:
                    _sync(device)
                    ps.append(torch.cuda.max_memory_allocated(device) - base)
            if ps:
                peaks[norm] = max(ps)
            print(f"[detector {args.setting}] built and warmed up {norm}", file=sys.stderr, flush=True)
        norms = list(trainables)
        for j in range(args.iters):  # 2. training time, interleaved
            i = args.warmup + args.memory_iters + j
            for norm in rotated(norms, j):
                model, optimizer = trainables[norm]
                torch.manual_seed(args.start_iter + i)  # same anchor/RoI sampling draws for every model
                with _timer(device) as tm:
                    finite = train_step(model, optimizer, batches[i], args.start_iter + i)
                times[norm].append(tm.s)
                nonfinite[norm] += not finite
    print(f"[detector {args.setting}] training timed", file=sys.stderr, flush=True)
    result = {"setting": args.setting, "device": str(device), "norms": list(args.norms), "images": args.images,
              "min_size": args.min_size, "max_size": args.max_size, "warmup": args.warmup,
              "memory_iters": args.memory_iters, "iters": args.iters, "start_iter": args.start_iter,
              "train_times": times, "nonfinite_losses": nonfinite, "peak_bytes": peaks, "infer_times": {},
              "detections": {}, "infer_images": args.infer_images, "infer_repeats": args.infer_repeats,
              "tf32": _tf32()}
    result["rows"] = detector_rows(result)
    if emit is not None:
        emit(result)

    images = load_batches(first, args.infer_images, is_train=False)  # 3. inference
    for _, optimizer in trainables.values():
        optimizer.state.clear()
    models = inference_models({n: m for n, (m, _) in trainables.items() if n not in INFERENCE_SAME_AS}, batches[:2])
    infer_times, detections = time_inference(models, images, args.infer_repeats,
                                             lambda: _timer(device))
    result.update(infer_times=infer_times, detections=detections)
    result["rows"] = detector_rows(result)
    return result


# ------------------------------------------------------------------------------------ training run
def train_opts(norm: str, device: str, amp: bool, iters: int, num_gpus: int, output_dir: str) -> List[str]:
    """The ``KEY VALUE`` overrides of :data:`SAMPLE_CONFIG` for the ``train`` mode.

    2 images per process per iteration; warm-up of the learning rate min(10, iters) iterations,
    no LR steps; CBN/NaiveCBN burn-in and MABN's warm-ups (SMA, renormalization, heads) end after
    ``iters // 3`` iterations, so the full layers train for the rest of the run.

    Raises:
        ValueError: ``iters`` < 3 or ``num_gpus`` < 1.
    """
    if iters < 3 or num_gpus < 1:
        raise ValueError(f"iters = {iters!r}, num_gpus = {num_gpus!r} are invalid; allowed: iters >= 3, num_gpus >= 1")
    third = iters // 3
    opts = ["MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", str(bool(amp)), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", str(min(10, iters)), "SOLVER.IMS_PER_BATCH", str(2 * num_gpus),
            "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir,
            "MODEL.CBN.BURN_IN_EPOCHS", "None", "MODEL.CBN.BURN_IN_ITERS", str(third),
            "MODEL.MABN.RENORM_WARMUP_ITERS", str(third), "MODEL.MABN.HEAD_WARMUP_ITERS", str(third)]
    for key in SAMPLE_NORM_KEYS:
        opts += [key, norm]
    return opts


def train_run(args) -> Dict:
    """Run ``tools/train_net.py`` as described in the module docstring and read its results.

    Args:
        args: ``norm``, ``device``, ``amp``, ``iters``, ``num_gpus``, ``output_dir`` (new).
    Returns:
        the result dict (``returncode`` is train_net.py's exit status).
    """
    sys.path.insert(0, os.path.join(_REPO, "tools"))  # run_report/ (beside the tools, not installed)
    from run_report.run_metrics import RunNotFoundError, load_run

    cmd = [sys.executable, os.path.join(_REPO, "tools", "train_net.py"), "--config-file", SAMPLE_CONFIG,
           "--num-gpus", str(args.num_gpus)]
    cmd += train_opts(args.norm, args.device, args.amp, args.iters, args.num_gpus, args.output_dir)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, cwd=_REPO).returncode
    out = {"norm": args.norm, "device": args.device, "amp": bool(args.amp), "num_gpus": args.num_gpus,
           "max_iter": args.iters, "images_per_iter": 2 * args.num_gpus, "returncode": rc,
           "command": " ".join(["python", "tools/train_net.py"] + cmd[2:])}
    try:
        run = load_run(args.output_dir)
    except RunNotFoundError as e:
        out["error"] = str(e)
        return out
    losses = [[it, v] for it, v in run.loss_curves().get("total_loss", [])]
    out.update({"iterations": run.iterations, "losses": losses,
                "all_finite": bool(losses) and all(math.isfinite(v) for _, v in losses),
                "s_per_iter": run.train_s_per_iter, "peak_memory_mb": run.peak_memory_mb,
                "peak_memory_kind": run.peak_memory_kind, "results": run.results,
                "test_set": (run.config.get("DATASETS", {}).get("TEST") or [None])[0],
                "inference_s_per_image": run.inference_s_per_image})
    return out


# ------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    """The child's command line (``--help``)."""
    from .settings import LAYER_NORMS, NORMS, SETTINGS, VARIANTS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--result", required=True, help="JSON file to write the result to")
    common.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal; no memory figures)")
    b = sub.add_parser("block", parents=[common], help="block-level benchmark")
    b.add_argument("--norms", nargs="+", default=list(LAYER_NORMS), choices=LAYER_NORMS)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--channels", type=int, default=256)
    b.add_argument("--size", type=int, default=14)
    b.add_argument("--depth", type=int, default=4)
    b.add_argument("--window", type=int, default=4)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--iters", type=int, default=10)
    d = sub.add_parser("detector", parents=[common], help="detector-level benchmark of one setting")
    d.add_argument("--setting", choices=SETTINGS, default="1x")
    d.add_argument("--norms", nargs="+", default=[n for n in NORMS if n not in VARIANTS], choices=NORMS,
                   help="rows (default: the norms themselves, without the CPU benchmark's variant rows)")
    d.add_argument("--images", type=int, default=4, help="images per training step (the CBN paper's 4 per GPU)")
    d.add_argument("--min-size", type=int, default=800)
    d.add_argument("--max-size", type=int, default=1333)
    d.add_argument("--warmup", type=int, default=3, help=">= CBN's k - 1 (window full)")
    d.add_argument("--memory-iters", type=int, default=2)
    d.add_argument("--iters", type=int, default=15)
    d.add_argument("--start-iter", type=int, default=20000, help="past MABN's warm-ups")
    d.add_argument("--infer-images", type=int, default=4)
    d.add_argument("--infer-repeats", type=int, default=3)
    d.add_argument("--config-file", default=None)
    d.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    t = sub.add_parser("train", parents=[common], help="short tools/train_net.py run and its results")
    t.add_argument("--norm", required=True)
    t.add_argument("--amp", action="store_true")
    t.add_argument("--iters", type=int, default=60)
    t.add_argument("--num-gpus", type=int, default=1)
    t.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    if getattr(args, "warmup", 3) < getattr(args, "window", 4) - 1:
        ap.error(f"--warmup {args.warmup} is too small; allowed: >= window - 1 = {args.window - 1}")
    return args


def main(argv=None) -> int:
    """Run one mode and write its result (see the module docstring); returns the exit status."""
    args = parse_args(argv)

    def write(result: Dict) -> None:
        tmp = args.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, args.result)

    if args.mode == "detector":
        result = detector_benchmark(args, emit=write)
    else:
        result = {"block": block_benchmark, "train": train_run}[args.mode](args)
    write(result)
    if args.mode == "train":
        if result["returncode"] != 0:
            return result["returncode"]
        if not result.get("all_finite"):
            print(f"train: the run left no loss or a non-finite one: {result.get('losses')}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
