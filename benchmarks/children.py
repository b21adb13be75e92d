"""What runs in a detector-level benchmark child process (``--child-mode train|memory|infer``).

Each child measures one setting (and, for memory, one row) and returns a JSON-serializable dict
that the parent (:mod:`.runner`) collects. Timings are interleaved inside one process: every
model of the setting runs on the same inputs in rotating order, so that a change of the shared
machine's speed hits all rows alike and the ratios to BN can be taken per step (paired). On
CUDA (``--device cuda``) every timed call is synchronized and memory is CUDA's peak tensor memory.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Tuple

from .measure import Timer, device_sync, memory_env_active, peak_memory, rss_bytes
from .settings import INFERENCE_SAME_AS, NO_FROZEN_FORM, make_cfg

__all__ = ["load_batches", "calibrate_frozen_bn", "build_benchmark_model", "rotated", "train_step",
           "inference_models", "time_inference", "child_train", "child_memory", "child_inference", "CHILD_MODES",
           "run_child_mode"]


def load_batches(cfg, n: int, is_train: bool, seed: int = 0) -> list:
    """``n`` batches of ``SOLVER.IMS_PER_BATCH`` mapped dataset dicts (training) or ``n`` single
    mapped images (inference) from the config's first train / test dataset, deterministic.

    Raises:
        RuntimeError: the dataset has no image with a non-crowd annotation (training) or no image.
    """
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


def build_benchmark_model(cfg, setting: str, first_batch):
    """The detector of ``cfg`` in training mode, built with seed 0 so that every norm gets the
    same conv weights. In ``1x`` the random frozen-BN backbone is calibrated on ``first_batch``."""
    import torch

    from smallbn_d2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    if setting == "1x":
        calibrate_frozen_bn(model, first_batch)
    model.train()
    return model


def _build_trainable(cfg, setting: str, first_batch):
    """:func:`build_benchmark_model` and its SGD optimizer (Detectron2's ``build_optimizer``)."""
    from detectron2.solver import build_optimizer

    model = build_benchmark_model(cfg, setting, first_batch)
    return model, build_optimizer(cfg, model)


def rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k`` (mod its length): the k-th round's order, so that no item
    always runs first."""
    k %= len(items)
    return items[k:] + items[:k]


def train_step(model, optimizer, batch, iteration: int) -> bool:
    """One training step (forward, backward, SGD step) at trainer iteration ``iteration``
    (set on the norm layers, as NormIterationHook does). Returns whether the loss was finite.
    Needs an active Detectron2 ``EventStorage``."""
    import torch
    from detectron2.utils.events import get_event_storage

    from smallbn_d2.modeling import set_norm_iteration

    get_event_storage().iter = iteration
    set_norm_iteration(model, iteration)
    loss_dict = model(batch)
    losses = sum(loss_dict.values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()
    return bool(torch.isfinite(losses))


def _setup_child(args) -> None:
    """Torch threads (``args.threads``), the ``floor`` row's norm and the COCO 2017 sample shipped
    with the package (``coco_2017_sample_train``/``_val``, usable as ``--opts`` datasets)."""
    import torch

    from smallbn_d2.data import register_coco_sample
    from .floor import register_floor_norm

    if args.threads:
        torch.set_num_threads(args.threads)
    register_floor_norm()
    register_coco_sample()


def child_train(args) -> Dict:
    """Train every norm's detector of one setting in ONE process, interleaved step by step.

    Each model has its own optimizer and norm state and sees the same batches and, reseeded before
    every step, the same random draws (RPN anchor and RoI sampling: the mask head's cost follows
    the number of sampled foreground RoIs); step i runs every model once, in rotating order (no
    model always first), so that a change of the machine's speed hits all norms alike: the ratio
    to BN is then taken per step (paired). Warm-up steps (``args.warmup`` >= CBN's k - 1, so the
    window is full) are not timed.

    Returns:
        ``{"setting", "train_times": {row: [s per measured step]}, "nonfinite_losses": {row: count}}``.
    """
    import torch
    from detectron2.utils.events import EventStorage

    _setup_child(args)
    setting = args.child_setting
    cfgs = {norm: make_cfg(args, setting, norm) for norm in args.norms}
    batches = load_batches(next(iter(cfgs.values())), args.warmup + args.iters, is_train=True)
    times: Dict[str, List[float]] = {norm: [] for norm in args.norms}
    nonfinite = {norm: 0 for norm in args.norms}
    with EventStorage(args.start_iter):
        trainables = {norm: _build_trainable(cfg, setting, batches[0]) for norm, cfg in cfgs.items()}
        norms = list(trainables)
        for i, batch in enumerate(batches):
            for norm in rotated(norms, i):
                torch.manual_seed(args.start_iter + i)  # same anchor/RoI sampling draws for every model
                with Timer(args.clock, sync=device_sync(args.device)) as tm:
                    finite = train_step(*trainables[norm], batch, args.start_iter + i)
                nonfinite[norm] += not finite
                if i >= args.warmup:
                    times[norm].append(tm.s)
    return {"setting": setting, "train_times": times, "nonfinite_losses": nonfinite}


def child_memory(args) -> Dict:
    """Peak resident memory (CUDA: tensor memory) of training one (setting, row) detector, in a fresh
    process run with ``MALLOC_MMAP_THRESHOLD_=65536`` (:data:`.measure.MEMORY_ENV`): the maximum over the
    ``args.memory_iters`` steps after the warm-up of the step's peak above the process's memory
    before the model was built.

    Returns:
        ``{"setting", "norm", "peak_bytes", "nonfinite_losses"}``.
    Raises:
        SystemExit: the process does not run with :data:`.measure.MEMORY_ENV`.
    """
    import torch
    from detectron2.utils.events import EventStorage

    if not memory_env_active():
        raise SystemExit("memory children must run with MALLOC_MMAP_THRESHOLD_=65536 "
                         "(see benchmarks.measure)")
    _setup_child(args)
    setting, norm = args.child_setting, args.child_norm
    cfg = make_cfg(args, setting, norm)
    batches = load_batches(cfg, args.warmup + args.memory_iters, is_train=True)
    # after imports and data, before the model
    base = torch.cuda.memory_allocated() if args.device == "cuda" else rss_bytes("VmRSS")
    peaks, nonfinite = [], 0
    with EventStorage(args.start_iter):
        model, optimizer = _build_trainable(cfg, setting, batches[0])
        for i, batch in enumerate(batches):
            torch.manual_seed(args.start_iter + i)  # the draws of the training children
            with (peak_memory(args.device) if i >= args.warmup else contextlib.nullcontext()) as pk:
                nonfinite += not train_step(model, optimizer, batch, args.start_iter + i)
            if i >= args.warmup:
                peaks.append(pk.start - base + pk.peak)
    return {"setting": setting, "norm": norm, "peak_bytes": max(peaks), "nonfinite_losses": nonfinite}


def inference_models(models_by_norm: Dict[str, object], stats_batches: list) -> Dict[str, object]:
    """The models whose inference is timed, keyed ``"<norm>|eval"`` and ``"<norm>|converted"``.

    Each model (a Detectron2 model in training mode, changed in place) first gets population
    statistics from ``stats_batches`` (training batches, as PreciseBN computes them: with the
    initial ones, mean 0 and variance 1, a random model's activations overflow, its boxes are not
    finite, Detectron2 drops them and the mask head runs on nothing), then goes to eval mode
    (``"|eval"``); norms with a FrozenBN form (all but those in ``NO_FROZEN_FORM``, e.g. GN) also
    get a ``convert_to_frozen_bn`` copy (``"|converted"``).
    """
    from smallbn_d2.deploy import convert_to_frozen_bn
    from smallbn_d2.engine import update_norm_stats

    out = {}
    for norm, model in models_by_norm.items():
        update_norm_stats(model, stats_batches, num_iters=len(stats_batches))
        model.eval()
        out[f"{norm}|eval"] = model
        if norm not in NO_FROZEN_FORM:
            out[f"{norm}|converted"] = convert_to_frozen_bn(copy.deepcopy(model), fold=False).eval()
    return out


def time_inference(models: Dict[str, Callable], images: list, repeats: int,
                   timer: Callable[[], Timer]) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """Time every model on the same images, interleaved: for each (repeat, image) every model runs
    once, in an order rotated by one per image (:func:`rotated`), so that a change of the shared
    machine's speed hits all models alike. One untimed image per model first.

    Args:
        models: key -> Detectron2 model in eval mode (called with ``[image dict]``).
        images: test dataset dicts (mapped); repeats: passes over them (>= 1).
        timer: makes the :class:`~.measure.Timer` of one call (its clock, and a device sync on GPUs).
    Returns:
        ``(times, detections)``: key -> seconds per (repeat, image) in run order, and key -> the
        number of detections on the first image (the mask head's cost depends on it).
    """
    import torch

    keys = list(models)
    times: Dict[str, List[float]] = {k: [] for k in keys}
    with torch.no_grad():
        detections = {k: len(models[k]([images[0]])[0]["instances"]) for k in keys}
        step = 0
        for _ in range(repeats):
            for img in images:
                for k in rotated(keys, step):
                    with timer() as tm:
                        models[k]([img])
                    times[k].append(tm.s)
                step += 1
    return times, detections


def child_inference(args) -> Dict:
    """Time inference of every norm of one setting in ONE process, interleaved image by image.

    Inference cost does not depend on the values of the weights or statistics, only on the
    layers; so the models are built with the same seed (identical conv weights: the norms' own
    parameters are constant at initialization), not trained, and compared on the same images in
    rotating order (:func:`time_inference`), which cancels the drift of a shared machine between
    separate processes (several percent, larger than the 2% target). Per model: eval mode, and
    (except norms without a FrozenBN form, GN) after ``convert_to_frozen_bn``, with population
    statistics from two batches (:func:`inference_models`); the number of detections on the first
    image is returned for each model.

    Returns:
        ``{"setting", "times": {"<row>|eval"|"<row>|converted": [s per (image, repeat)]},
        "detections": {same keys: detections on the first image}}``.
    """
    _setup_child(args)
    setting = args.child_setting
    built = {}
    images = stats_batches = None
    for norm in [n for n in args.norms if n not in INFERENCE_SAME_AS]:
        cfg = make_cfg(args, setting, norm)
        if images is None:
            images = load_batches(cfg, args.infer_images, is_train=False)
        if stats_batches is None:
            stats_batches = load_batches(cfg, 2, is_train=True)
        built[norm] = build_benchmark_model(cfg, setting, stats_batches[0])
    times, detections = time_inference(inference_models(built, stats_batches), images, args.infer_repeats,
                                       lambda: Timer(args.clock, sync=device_sync(args.device)))
    return {"setting": setting, "times": times, "detections": detections}


#: ``--child-mode`` value -> the function run in the child
CHILD_MODES: Dict[str, Callable] = {"train": child_train, "memory": child_memory, "infer": child_inference}


def run_child_mode(args) -> Dict:
    """Run the child mode ``args.child_mode`` (one of :data:`CHILD_MODES`) and return its result.

    Raises:
        ValueError: unknown mode (naming the allowed ones).
    """
    if args.child_mode not in CHILD_MODES:
        raise ValueError(f"child mode {args.child_mode!r} is invalid; allowed: {', '.join(CHILD_MODES)}")
    return CHILD_MODES[args.child_mode](args)
