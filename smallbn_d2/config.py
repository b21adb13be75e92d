"""Config keys of smallbn_d2: :func:`add_smallbn_config` and their validation.

All keys live under ``cfg.MODEL.CBN`` (Cross-Iteration BN, Yao et al., CVPR 2021) and
``cfg.MODEL.MABN`` (Moving Average BN, Yan et al., ICLR 2020). Units: iterations are trainer
iterations (one optimizer step, ``SOLVER.IMS_PER_BATCH`` images over all processes); epochs are
passes over the training set.
"""
from __future__ import annotations

import math
from numbers import Real

from detectron2.config import CfgNode as CN

__all__ = ["add_smallbn_config", "validate_smallbn_config", "ConfigValueError"]


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

    m = cfg.MODEL.MABN
    _check(_is_int(m.BUFFER_SIZE) and m.BUFFER_SIZE >= 1, "MODEL.MABN.BUFFER_SIZE", m.BUFFER_SIZE, "an integer >= 1")
    _check(_is_number(m.MOMENTUM) and 0 < m.MOMENTUM <= 1, "MODEL.MABN.MOMENTUM", m.MOMENTUM, "a number in (0, 1]")
    _check(_is_number(m.EPS) and m.EPS > 0, "MODEL.MABN.EPS", m.EPS, "a number > 0")
    for key in ("WARMUP_ITERS", "RENORM_WARMUP_ITERS", "HEAD_WARMUP_ITERS"):
        v = m[key]
        _check(_is_int(v) and v >= 0, f"MODEL.MABN.{key}", v, "an integer >= 0 (iterations)")
    _check(_is_number(m.R_MAX) and m.R_MAX >= 1, "MODEL.MABN.R_MAX", m.R_MAX, "a number >= 1")
