"""Config keys of smallbn_d2: :func:`add_smallbn_config` and their validation.

All keys live under ``cfg.MODEL.CBN`` (Cross-Iteration BN, Yao et al., CVPR 2021) and
``cfg.MODEL.MABN`` (Moving Average BN, Yan et al., ICLR 2020), plus ``cfg.MODEL.SMALLBN`` for
keys common to all norms (freezing of statistics, "Rethinking Batch in BatchNorm"). Units:
iterations are trainer iterations (one optimizer step, ``SOLVER.IMS_PER_BATCH`` images over all
processes); epochs are passes over the training set.
"""
from __future__ import annotations

import inspect
import logging
import math
from numbers import Real
from typing import Optional

from detectron2.config import CfgNode as CN

from . import modeling  # noqa: F401  (extends Detectron2's get_norm before any model is built)
from .layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from .layers.hyperparameters import BOOLEAN, INT_AT_LEAST_0, Range, optional

__all__ = ["add_smallbn_config", "validate_smallbn_config", "scale_norm_iterations", "ConfigValueError",
           "MissingConfigError", "require_smallbn_config", "norm_keys", "cbn_burn_in_iters", "resolve_burn_in"]

logger = logging.getLogger(__name__)


class ConfigValueError(ValueError):
    """A config value is outside its allowed range; the message names the key, value and range."""


class MissingConfigError(KeyError):
    """A config lacks smallbn_d2's keys: ``add_smallbn_config(cfg)`` was not called."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def _default(layer_class: type, argument: str):
    """The default of a layer constructor's argument: the one place each default is written."""
    return inspect.signature(layer_class).parameters[argument].default


def add_smallbn_config(cfg: CN) -> CN:
    """Add smallbn_d2's keys (with the papers' defaults) to a Detectron2 config, in place.

    Args:
        cfg: a Detectron2 ``CfgNode`` (e.g. ``detectron2.config.get_cfg()``).
    Returns:
        the same ``cfg``, for chaining.
    """
    _C = cfg

    # ---------------------------------------------------------------- CBN (Yao et al. 2021)
    _C.MODEL.CBN = CN()
    # Window size k: statistics of the current and the k-1 previous iterations (METHODS.md
    # CBN 6). Paper: k such that k x images per GPU >= 16 (k=4 at 4 images/GPU).
    _C.MODEL.CBN.WINDOW_SIZE = _default(CrossIterationBatchNorm2d, "window_size")
    # Burn-in: k = 1 (plain BN) for this many iterations, then k. Give at most one of
    # BURN_IN_ITERS / BURN_IN_EPOCHS / BURN_IN_UNTIL_LR_STEP; with none, 3 epochs (the paper's
    # COCO setting). Epochs are converted with the training set size and SOLVER.IMS_PER_BATCH.
    _C.MODEL.CBN.BURN_IN_ITERS = None
    _C.MODEL.CBN.BURN_IN_EPOCHS = None
    # True: the burn-in lasts until the first learning-rate step, SOLVER.STEPS[0] (after
    # Detectron2's rescaling of the schedule for the number of GPUs), as in the authors' released
    # COCO configs (burnin=8 of 12 epochs, LR steps at epochs 8 and 11).
    _C.MODEL.CBN.BURN_IN_UNTIL_LR_STEP = False
    # Population statistics for inference: PyTorch-style momentum (weight of the new batch) and
    # the unbiased batch variance, as the released code (METHODS.md CBN 7).
    _C.MODEL.CBN.MOMENTUM = _default(CrossIterationBatchNorm2d, "momentum")
    _C.MODEL.CBN.EPS = _default(CrossIterationBatchNorm2d, "eps")
    # "paper": average max(nu, mu^2) over the whole window (paper, eq. 9-10).
    # "drop_invalid": the released code's rule: drop window entries whose compensated variance is
    # negative and average over the entries kept.
    _C.MODEL.CBN.AGGREGATION = _default(CrossIterationBatchNorm2d, "aggregation")
    # "full" (paper): the window is full when first used after the burn-in; "grow" (released
    # code): it starts empty at the end of the burn-in and grows from 1 to k.
    _C.MODEL.CBN.WINDOW_AFTER_BURN_IN = _default(CrossIterationBatchNorm2d, "window_after_burn_in")
    # True (paper: theta includes the conv bias, compensated exactly); False (released code:
    # the bias is ignored in the compensation).
    _C.MODEL.CBN.COMPENSATE_BIAS = _default(CrossIterationBatchNorm2d, "compensate_bias")
    # d nu / d theta from every s-th output position (an approximation, not in the paper; 1 =
    # exact): divides the cost of CBN's extra weight-gradient conv by about s. See
    # docs/BENCHMARKS.md for its measured effect on speed and on the statistics.
    _C.MODEL.CBN.GRAD_SUBSAMPLE = _default(CrossIterationBatchNorm2d, "grad_subsample")

    # --------------------------------------------------------------- MABN (Yan et al. 2020)
    _C.MODEL.MABN = CN()
    # Buffer size m of the simple moving averages (SMA) of E[x^2] (forward) and psi (backward).
    _C.MODEL.MABN.BUFFER_SIZE = _default(MovingAverageBatchNorm2d, "buffer_size")
    # EMA of the population statistic chi^2: ema <- MOMENTUM * ema + (1 - MOMENTUM) * sma.
    # NOTE: the weight of the *old* value (paper convention), unlike torch's BN momentum.
    _C.MODEL.MABN.MOMENTUM = _default(MovingAverageBatchNorm2d, "momentum")
    _C.MODEL.MABN.EPS = _default(MovingAverageBatchNorm2d, "eps")
    # Moving averages start after WARMUP_ITERS iterations (and after m iterations).
    _C.MODEL.MABN.WARMUP_ITERS = _default(MovingAverageBatchNorm2d, "warmup_iters")
    # Renormalization r = 1 until max(RENORM_WARMUP_ITERS, WARMUP_ITERS), then clipped to
    # [1/R_MAX, R_MAX].
    _C.MODEL.MABN.RENORM_WARMUP_ITERS = _default(MovingAverageBatchNorm2d, "renorm_warmup_iters")
    _C.MODEL.MABN.R_MAX = _default(MovingAverageBatchNorm2d, "r_max")
    # Box, mask and RetinaNet heads use the current batch statistics until this iteration (the
    # paper's COCO setting: 10k).
    _C.MODEL.MABN.HEAD_WARMUP_ITERS = 10000

    # --------------------------------------- keys common to all norms ("Rethinking Batch in BN")
    if "SMALLBN" not in _C.MODEL:
        _C.MODEL.SMALLBN = CN()
    # From this trainer iteration (0-based) on, CBN, NaiveCBN, MABN and BN layers normalize with
    # their population statistics and stop updating them (gamma/beta and convs keep training):
    # FrozenBN for the last part of training (smallbn_d2.engine.freeze). -1: never.
    _C.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER = -1
    return cfg


_BURN_IN_EPOCHS = optional(Range("a number >= 0 (epochs)", lambda v: isinstance(v, Real) and not isinstance(v, bool)
                                  and math.isfinite(v) and v >= 0, float), "not set")
_FREEZE_ITER = Range("-1 (never) or an integer >= 0 (trainer iteration)",
                     lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1)
#: Keys that are not constructor arguments one to one, with their ranges.
_OTHER_KEYS = {
    "MODEL.CBN.BURN_IN_ITERS": optional(INT_AT_LEAST_0, "not set"),
    "MODEL.CBN.BURN_IN_EPOCHS": _BURN_IN_EPOCHS,
    "MODEL.CBN.BURN_IN_UNTIL_LR_STEP": BOOLEAN,
    "MODEL.MABN.HEAD_WARMUP_ITERS": MovingAverageBatchNorm2d.HYPERPARAMETERS["warmup_iters"],
    "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER": _FREEZE_ITER,
}


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def norm_keys(cfg: CN) -> dict:
    """Every config key that names a norm: ``{dotted key: value}`` for each key called ``NORM``
    holding a string (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``, ...,
    whatever the config has), in the config's order."""
    found = {}

    def walk(node: CN, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, CN):
                walk(value, f"{prefix}{key}.")
            elif key == "NORM" and isinstance(value, str):
                found[prefix + key] = value

    walk(cfg, "")
    return found


def require_smallbn_config(cfg: CN) -> None:
    """Raise :class:`MissingConfigError` if ``cfg`` lacks smallbn_d2's keys.

    Raises:
        MissingConfigError: naming ``add_smallbn_config`` and the missing section.
    """
    for section in ("CBN", "MABN", "SMALLBN"):
        if "MODEL" not in cfg or section not in cfg.MODEL:
            raise MissingConfigError(
                f"the config has no MODEL.{section} section: call smallbn_d2.add_smallbn_config(cfg) on "
                "Detectron2's get_cfg() before merging a config file that uses smallbn_d2's norms or keys"
            )


def validate_smallbn_config(cfg: CN) -> None:
    """Check every smallbn_d2 key of ``cfg``.

    The ranges of the keys that feed a layer's constructor argument are that layer's
    (``HYPERPARAMETERS``); the others are listed here.

    Raises:
        ConfigValueError: the first invalid value, naming the key, the value and the allowed range.
        MissingConfigError: ``cfg`` lacks the keys (``add_smallbn_config`` was not called).
    """
    from .families import NORM_FAMILIES

    require_smallbn_config(cfg)
    checks = {}
    for family in NORM_FAMILIES.values():
        for key, arg in family.config_keys.items():
            checks[f"MODEL.{family.config_section}.{key}"] = family.layer_class.HYPERPARAMETERS[arg]
    checks.update(_OTHER_KEYS)
    for key, allowed in checks.items():
        try:
            allowed.check(_get(cfg, key), key)
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
    c = cfg.MODEL.CBN
    if c.BURN_IN_ITERS is not None and c.BURN_IN_EPOCHS is not None:
        raise ConfigValueError(
            f"MODEL.CBN.BURN_IN_ITERS = {c.BURN_IN_ITERS!r} and MODEL.CBN.BURN_IN_EPOCHS = "
            f"{c.BURN_IN_EPOCHS!r} are both set; allowed: at most one of them (the other None)"
        )
    if c.BURN_IN_UNTIL_LR_STEP and (c.BURN_IN_ITERS is not None or c.BURN_IN_EPOCHS is not None):
        other = "BURN_IN_ITERS" if c.BURN_IN_ITERS is not None else "BURN_IN_EPOCHS"
        raise ConfigValueError(
            f"MODEL.CBN.BURN_IN_UNTIL_LR_STEP = True and MODEL.CBN.{other} = {c[other]!r} are both set; "
            "allowed: one way of giving the burn-in (BURN_IN_ITERS and BURN_IN_EPOCHS None with "
            "BURN_IN_UNTIL_LR_STEP True)"
        )


def _first_lr_step(cfg: CN) -> int:
    """``SOLVER.STEPS[0]``, for ``MODEL.CBN.BURN_IN_UNTIL_LR_STEP``; a clear error without steps."""
    steps = tuple(cfg.SOLVER.STEPS)
    if not steps:
        raise ConfigValueError(
            "MODEL.CBN.BURN_IN_UNTIL_LR_STEP = True needs a learning-rate step, but SOLVER.STEPS = () is "
            "empty; allowed: SOLVER.STEPS with at least one iteration, or the burn-in given by "
            "MODEL.CBN.BURN_IN_ITERS or BURN_IN_EPOCHS instead")
    return int(min(steps))


def cbn_burn_in_iters(cfg: CN, dataset_size: Optional[int] = None) -> Optional[int]:
    """CBN burn-in in iterations from ``MODEL.CBN.BURN_IN_ITERS``, ``BURN_IN_EPOCHS`` or
    ``BURN_IN_UNTIL_LR_STEP``.

    With none set, 3 epochs (the paper's COCO setting). Epochs are converted as
    ``round(epochs * dataset_size / SOLVER.IMS_PER_BATCH)``. ``BURN_IN_UNTIL_LR_STEP`` gives the
    first learning-rate step, ``min(SOLVER.STEPS)``, read from ``cfg`` as it is: in smallbn_d2's
    Trainer that is after Detectron2's ``auto_scale_workers`` has rescaled ``SOLVER.STEPS`` for the
    number of GPUs (``SOLVER.REFERENCE_WORLD_SIZE``), so the window starts at the step the
    learning rate actually drops (source: the CBN authors' released COCO configs, ``burnin=8`` of
    12 epochs with steps at epochs 8 and 11).

    Args:
        cfg: a config with smallbn_d2's keys.
        dataset_size: training images (after Detectron2's filtering), or None if unknown.
    Returns:
        iterations, or None when the burn-in is given in epochs and ``dataset_size`` is None.
    Raises:
        ConfigValueError: invalid smallbn_d2 keys; ``dataset_size`` not an integer >= 0;
            ``BURN_IN_UNTIL_LR_STEP`` with an empty ``SOLVER.STEPS``.
    """
    validate_smallbn_config(cfg)
    c = cfg.MODEL.CBN
    if c.BURN_IN_ITERS is not None:
        return int(c.BURN_IN_ITERS)
    if c.BURN_IN_UNTIL_LR_STEP:
        return _first_lr_step(cfg)
    epochs = 3.0 if c.BURN_IN_EPOCHS is None else float(c.BURN_IN_EPOCHS)
    if epochs == 0:
        return 0
    if dataset_size is None:
        return None
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 0:
        raise ConfigValueError(f"dataset_size = {dataset_size!r} is invalid; allowed: an integer >= 0 (images)")
    return int(round(epochs * dataset_size / cfg.SOLVER.IMS_PER_BATCH))


def resolve_burn_in(cfg: CN, dataset_size: Optional[int] = None) -> CN:
    """A copy of ``cfg`` whose CBN burn-in is given in iterations (``MODEL.CBN.BURN_IN_ITERS``).

    Burn-in in epochs needs the training set size, which the model builder does not read: the
    trainer (or a custom training script) converts it here, where the size is known. A burn-in
    until the first learning-rate step (``BURN_IN_UNTIL_LR_STEP``) becomes ``min(SOLVER.STEPS)`` of
    ``cfg`` as given: call this after Detectron2's ``auto_scale_workers`` (the Trainer does), so
    that the steps are those of the actual number of GPUs.

    Args:
        cfg: a config with smallbn_d2's keys (not modified).
        dataset_size: training images after Detectron2's filtering, integer >= 0; needed only for
            a burn-in in epochs (None otherwise).
    Returns:
        ``cfg`` itself if the burn-in is already in iterations, else a converted clone (frozen if
        ``cfg`` was).
    Raises:
        ConfigValueError: invalid keys or ``dataset_size`` (None for a burn-in in epochs); an empty
            ``SOLVER.STEPS`` with ``BURN_IN_UNTIL_LR_STEP``.
    """
    if cfg.MODEL.CBN.BURN_IN_ITERS is not None:
        validate_smallbn_config(cfg)
        return cfg
    iters = cbn_burn_in_iters(cfg, dataset_size)
    if cfg.MODEL.CBN.BURN_IN_UNTIL_LR_STEP:
        logger.info(f"CBN burn-in: until the first learning-rate step, SOLVER.STEPS = "
                    f"{tuple(cfg.SOLVER.STEPS)} -> {iters} iterations")
    elif iters is None:
        raise ConfigValueError(f"dataset_size = {dataset_size!r} is invalid for a CBN burn-in in epochs; "
                               "allowed: an integer >= 0 (images)")
    else:
        epochs = 3.0 if cfg.MODEL.CBN.BURN_IN_EPOCHS is None else cfg.MODEL.CBN.BURN_IN_EPOCHS
        logger.info(f"CBN burn-in: {epochs} epochs x {dataset_size} images / {cfg.SOLVER.IMS_PER_BATCH} "
                    f"images per iteration = {iters} iterations")
    frozen = cfg.is_frozen()
    out = cfg.clone()
    out.defrost()
    out.MODEL.CBN.BURN_IN_ITERS = iters
    out.MODEL.CBN.BURN_IN_EPOCHS = None
    out.MODEL.CBN.BURN_IN_UNTIL_LR_STEP = False
    if frozen:
        out.freeze()
    return out


#: Keys counted in trainer iterations, rescaled with Detectron2's linear scaling rule.
_ITERATION_KEYS = ("MODEL.CBN.BURN_IN_ITERS", "MODEL.MABN.WARMUP_ITERS", "MODEL.MABN.RENORM_WARMUP_ITERS",
                   "MODEL.MABN.HEAD_WARMUP_ITERS", "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER")


def scale_norm_iterations(cfg: CN, num_workers: int) -> CN:
    """Rescale smallbn_d2's iteration counts as ``DefaultTrainer.auto_scale_workers`` rescales
    ``SOLVER.MAX_ITER``.

    With ``SOLVER.REFERENCE_WORLD_SIZE`` = R > 0 and ``num_workers`` = W != R, Detectron2 keeps
    the images per GPU, so an iteration holds W/R times the images and schedules are divided by
    W/R. The same holds for the burn-in and warm-ups, which the papers give in iterations at their
    batch size: each key of ``_ITERATION_KEYS`` that is set (not None, not -1) becomes
    ``round(value * R / W)``. (``BURN_IN_EPOCHS`` needs no scaling.) Call it before Detectron2's
    ``auto_scale_workers``, which then updates ``REFERENCE_WORLD_SIZE``.

    Args:
        cfg: a config with smallbn_d2's keys; not modified.
        num_workers: the number of training processes (GPUs).
    Returns:
        ``cfg`` itself when no scaling applies, else a scaled clone (frozen if ``cfg`` was).
    """
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if ref == 0 or ref == num_workers:
        return cfg
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    for key in _ITERATION_KEYS:
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        value = node[leaf]
        if value is not None and value >= 0:
            node[leaf] = int(round(value * ref / num_workers))
    if frozen:
        cfg.freeze()
    return cfg
