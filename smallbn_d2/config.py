"""Config keys of smallbn_d2: :func:`add_smallbn_config` and their validation.

All keys live under ``cfg.MODEL.CBN`` (Cross-Iteration BN, Yao et al., CVPR 2021) and
``cfg.MODEL.MABN`` (Moving Average BN, Yan et al., ICLR 2020), plus ``cfg.MODEL.SMALLBN`` for
keys common to all norms (freezing of statistics, "Rethinking Batch in BatchNorm"). Units:
iterations are trainer iterations (one optimizer step, ``SOLVER.IMS_PER_BATCH`` images over all
processes); epochs are passes over the training set.
"""
from __future__ import annotations

import math
from numbers import Real

from detectron2.config import CfgNode as CN

__all__ = ["add_smallbn_config", "validate_smallbn_config", "scale_norm_iterations", "ConfigValueError"]


class ConfigValueError(ValueError):
    """A config value is outside its allowed range; the message names the key, value and range."""


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
    _C.MODEL.CBN.WINDOW_SIZE = 4
    # Burn-in: k = 1 (plain BN) for this many iterations, then k. Give at most one of
    # BURN_IN_ITERS / BURN_IN_EPOCHS; with neither, 3 epochs (the paper's COCO setting). Epochs
    # are converted with the training set size and SOLVER.IMS_PER_BATCH.
    _C.MODEL.CBN.BURN_IN_ITERS = None
    _C.MODEL.CBN.BURN_IN_EPOCHS = None
    # Population statistics for inference: PyTorch-style momentum (weight of the new batch) and
    # the unbiased batch variance, as the released code (METHODS.md CBN 7).
    _C.MODEL.CBN.MOMENTUM = 0.1
    _C.MODEL.CBN.EPS = 1e-5
    # "paper": average max(nu, mu^2) over the whole window (paper, eq. 8-9).
    # "drop_invalid": the released code's rule: drop window entries whose compensated variance is
    # negative and average over the entries kept.
    _C.MODEL.CBN.AGGREGATION = "paper"
    # d nu / d theta from every s-th output position (an approximation, not in the paper; 1 =
    # exact): divides the cost of CBN's extra weight-gradient conv by about s. See
    # docs/BENCHMARKS.md for its measured effect on speed and on the statistics.
    _C.MODEL.CBN.GRAD_SUBSAMPLE = 1

    # --------------------------------------------------------------- MABN (Yan et al. 2020)
    _C.MODEL.MABN = CN()
    # Buffer size m of the simple moving averages (SMA) of E[x^2] (forward) and psi (backward).
    _C.MODEL.MABN.BUFFER_SIZE = 16
    # EMA of the population statistic chi^2: ema <- MOMENTUM * ema + (1 - MOMENTUM) * sma.
    # NOTE: the weight of the *old* value (paper convention), unlike torch's BN momentum.
    _C.MODEL.MABN.MOMENTUM = 0.98
    _C.MODEL.MABN.EPS = 1e-5
    # Moving averages start after WARMUP_ITERS iterations (and after m iterations).
    _C.MODEL.MABN.WARMUP_ITERS = 0
    # Renormalization r = 1 until max(RENORM_WARMUP_ITERS, WARMUP_ITERS), then clipped to
    # [1/R_MAX, R_MAX].
    _C.MODEL.MABN.RENORM_WARMUP_ITERS = 1000
    _C.MODEL.MABN.R_MAX = 5.0
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


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigValueError(f"{key} = {value!r} is invalid; allowed: {allowed}")


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_smallbn_config(cfg: CN) -> None:
    """Check every smallbn_d2 key of ``cfg``.

    Raises:
        ConfigValueError: the first invalid value, naming the key, the value and the allowed range.
        KeyError: ``cfg`` lacks the keys (``add_smallbn_config`` was not called).
    """
    c = cfg.MODEL.CBN
    _check(_is_int(c.WINDOW_SIZE) and c.WINDOW_SIZE >= 1, "MODEL.CBN.WINDOW_SIZE", c.WINDOW_SIZE, "an integer >= 1")
    _check(c.BURN_IN_ITERS is None or (_is_int(c.BURN_IN_ITERS) and c.BURN_IN_ITERS >= 0),
           "MODEL.CBN.BURN_IN_ITERS", c.BURN_IN_ITERS, "None or an integer >= 0 (iterations)")
    _check(c.BURN_IN_EPOCHS is None or (_is_number(c.BURN_IN_EPOCHS) and c.BURN_IN_EPOCHS >= 0),
           "MODEL.CBN.BURN_IN_EPOCHS", c.BURN_IN_EPOCHS, "None or a number >= 0 (epochs)")
    if c.BURN_IN_ITERS is not None and c.BURN_IN_EPOCHS is not None:
        raise ConfigValueError(
            f"MODEL.CBN.BURN_IN_ITERS = {c.BURN_IN_ITERS!r} and MODEL.CBN.BURN_IN_EPOCHS = "
            f"{c.BURN_IN_EPOCHS!r} are both set; allowed: at most one of them (the other None)"
        )
    _check(_is_number(c.MOMENTUM) and 0 < c.MOMENTUM <= 1, "MODEL.CBN.MOMENTUM", c.MOMENTUM, "a number in (0, 1]")
    _check(_is_number(c.EPS) and c.EPS > 0, "MODEL.CBN.EPS", c.EPS, "a number > 0")
    _check(c.AGGREGATION in ("paper", "drop_invalid"), "MODEL.CBN.AGGREGATION", c.AGGREGATION,
           "'paper' or 'drop_invalid'")
    _check(_is_int(c.GRAD_SUBSAMPLE) and c.GRAD_SUBSAMPLE >= 1, "MODEL.CBN.GRAD_SUBSAMPLE", c.GRAD_SUBSAMPLE,
           "an integer >= 1 (1 = exact)")

    m = cfg.MODEL.MABN
    _check(_is_int(m.BUFFER_SIZE) and m.BUFFER_SIZE >= 1, "MODEL.MABN.BUFFER_SIZE", m.BUFFER_SIZE, "an integer >= 1")
    _check(_is_number(m.MOMENTUM) and 0 < m.MOMENTUM <= 1, "MODEL.MABN.MOMENTUM", m.MOMENTUM, "a number in (0, 1]")
    _check(_is_number(m.EPS) and m.EPS > 0, "MODEL.MABN.EPS", m.EPS, "a number > 0")
    for key in ("WARMUP_ITERS", "RENORM_WARMUP_ITERS", "HEAD_WARMUP_ITERS"):
        v = m[key]
        _check(_is_int(v) and v >= 0, f"MODEL.MABN.{key}", v, "an integer >= 0 (iterations)")
    _check(_is_number(m.R_MAX) and m.R_MAX >= 1, "MODEL.MABN.R_MAX", m.R_MAX, "a number >= 1")
    f = cfg.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER
    _check(_is_int(f) and f >= -1, "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER", f,
           "-1 (never) or an integer >= 0 (trainer iteration)")


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
