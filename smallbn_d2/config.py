"""Config keys of smallbn_d2 (``MODEL.CBN``, ``MODEL.MABN``, ``MODEL.SMALLBN``), their validation and the
conversions of the CBN burn-in and of iteration counts. Units: an iteration is one optimizer step
(``SOLVER.IMS_PER_BATCH`` images over all processes). Keys and papers' settings: docs/METHODS.md
(#cbn-hyperparameters, #mabn-hyperparameters, #rethinking-batch-in-batchnorm).
"""
from __future__ import annotations

import inspect
import logging
import math
from numbers import Real
from typing import Any, Iterator, Mapping, Optional, Tuple

from detectron2.config import CfgNode as CN

from . import modeling  # noqa: F401  (extends Detectron2's get_norm before any model is built)
from .layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from .layers.hyperparameters import BOOLEAN, INT_AT_LEAST_0, Range, optional

__all__ = ["add_smallbn_config", "validate_smallbn_config", "scale_norm_iterations", "ConfigValueError",
           "MissingConfigError", "norm_keys", "walk_config", "config_with", "cbn_burn_in_iters", "resolve_burn_in",
           "EPOCHS", "IMAGES", "FREEZE_ITER"]

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
    """Add smallbn_d2's keys, with the layers' defaults, to a Detectron2 ``CfgNode`` in place; returns it.

    Meaning and papers' settings of every key: docs/METHODS.md.
    """
    cbn, mabn = CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
    cfg.MODEL.CBN = CN()
    cfg.MODEL.CBN.WINDOW_SIZE = _default(cbn, "window_size")
    # Burn-in (k = 1 before it): at most one of the next three; with none, 3 epochs (the paper's COCO setting).
    cfg.MODEL.CBN.BURN_IN_ITERS = None
    cfg.MODEL.CBN.BURN_IN_EPOCHS = None
    # True: until the first LR step, SOLVER.STEPS[0] after Detectron2 rescales the schedule for the
    # number of GPUs (the CBN authors' released configs; docs/REPRODUCE.md).
    cfg.MODEL.CBN.BURN_IN_UNTIL_LR_STEP = False
    cfg.MODEL.CBN.MOMENTUM = _default(cbn, "momentum")  # torch's convention: weight of the new batch
    cfg.MODEL.CBN.EPS = _default(cbn, "eps")
    cfg.MODEL.CBN.AGGREGATION = _default(cbn, "aggregation")
    cfg.MODEL.CBN.WINDOW_AFTER_BURN_IN = _default(cbn, "window_after_burn_in")
    cfg.MODEL.CBN.COMPENSATE_BIAS = _default(cbn, "compensate_bias")
    cfg.MODEL.CBN.GRAD_SUBSAMPLE = _default(cbn, "grad_subsample")
    cfg.MODEL.MABN = CN()
    cfg.MODEL.MABN.BUFFER_SIZE = _default(mabn, "buffer_size")
    cfg.MODEL.MABN.MOMENTUM = _default(mabn, "momentum")  # the paper's convention: weight of the *old* value
    cfg.MODEL.MABN.EPS = _default(mabn, "eps")
    cfg.MODEL.MABN.WARMUP_ITERS = _default(mabn, "warmup_iters")
    cfg.MODEL.MABN.RENORM_WARMUP_ITERS = _default(mabn, "renorm_warmup_iters")
    cfg.MODEL.MABN.R_MAX = _default(mabn, "r_max")
    cfg.MODEL.MABN.HEAD_WARMUP_ITERS = 10000  # box, mask and RetinaNet heads (the paper's COCO setting)
    if "SMALLBN" not in cfg.MODEL:
        cfg.MODEL.SMALLBN = CN()
    # From this trainer iteration (0-based) on every BN-family norm uses and keeps its population
    # statistics ("Rethinking Batch in BatchNorm", Sec. 4; smallbn_d2.engine.freeze). -1: never.
    cfg.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER = -1
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Ranges of the values in epochs, in images and of the first iteration with frozen statistics, shared
#: by the YAML keys and the LazyConfig helpers (:mod:`smallbn_d2.lazy`).
EPOCHS = Range("a finite number >= 0 (epochs)", lambda v: isinstance(v, Real) and not isinstance(v, bool)
               and math.isfinite(v) and v >= 0, float)
IMAGES = Range("an integer >= 0 (images)", lambda v: _is_int(v) and v >= 0)
FREEZE_ITER = Range("-1 (never) or an integer >= 0 (trainer iteration)", lambda v: _is_int(v) and v >= -1)
#: Keys that are not constructor arguments one to one, with their ranges.
_OTHER_KEYS = {
    "MODEL.CBN.BURN_IN_ITERS": optional(INT_AT_LEAST_0, "not set"),
    "MODEL.CBN.BURN_IN_EPOCHS": optional(EPOCHS, "not set"),
    "MODEL.CBN.BURN_IN_UNTIL_LR_STEP": BOOLEAN,
    "MODEL.MABN.HEAD_WARMUP_ITERS": MovingAverageBatchNorm2d.HYPERPARAMETERS["warmup_iters"],
    "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER": FREEZE_ITER,
}
#: Keys counted in trainer iterations, rescaled with Detectron2's linear scaling rule.
_ITERATION_KEYS = ("MODEL.CBN.BURN_IN_ITERS", "MODEL.MABN.WARMUP_ITERS", "MODEL.MABN.RENORM_WARMUP_ITERS",
                   "MODEL.MABN.HEAD_WARMUP_ITERS", "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER")


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def walk_config(node: Any, path: str = "") -> Iterator[Tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every entry of a nested config: a ``CfgNode``, or a
    LazyConfig as plain dicts and lists (list items are entered, not yielded), parents first."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub, str(key), value
            yield from walk_config(value, sub)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from walk_config(value, f"{path}.{i}")


def norm_keys(cfg: CN) -> dict:
    """``{dotted key: value}`` of every key called ``NORM`` holding a string (``MODEL.RESNETS.NORM``,
    ``MODEL.FPN.NORM``, ...), in the config's order."""
    return {path: value for path, key, value in walk_config(cfg) if key == "NORM" and isinstance(value, str)}


def config_with(cfg: CN, values: Mapping[str, Any]) -> CN:
    """A clone of ``cfg`` with the dotted keys of ``values`` set; frozen if ``cfg`` was."""
    out = cfg.clone()
    out.defrost()
    for key, value in values.items():
        parent, _, leaf = key.rpartition(".")
        _get(out, parent)[leaf] = value
    if cfg.is_frozen():
        out.freeze()
    return out


def validate_smallbn_config(cfg: CN) -> None:
    """Check every smallbn_d2 key of ``cfg``: those that feed a constructor argument with the layer's
    ``HYPERPARAMETERS`` range, the others with ``_OTHER_KEYS``; at most one way of giving the burn-in.

    Raises:
        ConfigValueError: the first invalid value, naming the key, the value and the allowed range.
        MissingConfigError: ``cfg`` lacks the keys (``add_smallbn_config`` was not called).
    """
    from .families import NORM_FAMILIES

    for section in ("CBN", "MABN", "SMALLBN"):
        if "MODEL" not in cfg or section not in cfg.MODEL:
            raise MissingConfigError(
                f"the config has no MODEL.{section} section: call smallbn_d2.add_smallbn_config(cfg) on "
                "Detectron2's get_cfg() before merging a config file that uses smallbn_d2's norms or keys")
    checks = {f"MODEL.{family.config_section}.{key}": family.layer_class.HYPERPARAMETERS[arg]
              for family in NORM_FAMILIES.values() for key, arg in family.config_keys.items()}
    checks.update(_OTHER_KEYS)
    for key, allowed in checks.items():
        try:
            allowed.check(_get(cfg, key), key)
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
    c = cfg.MODEL.CBN
    ways = ("BURN_IN_UNTIL_LR_STEP", "BURN_IN_ITERS", "BURN_IN_EPOCHS")
    given = [f"MODEL.CBN.{k} = {c[k]!r}" for k in ways if c[k] is not None and c[k] is not False]
    if len(given) > 1:
        raise ConfigValueError(f"{' and '.join(given)} are set; allowed: at most one way of giving the burn-in "
                               "(the others None, BURN_IN_UNTIL_LR_STEP False)")


def cbn_burn_in_iters(cfg: CN, dataset_size: Optional[int] = None) -> Optional[int]:
    """CBN burn-in in iterations from ``MODEL.CBN.BURN_IN_ITERS``, ``BURN_IN_EPOCHS`` (none set: 3
    epochs, the paper's COCO setting; ``round(epochs * dataset_size / SOLVER.IMS_PER_BATCH)``) or
    ``BURN_IN_UNTIL_LR_STEP`` (``min(SOLVER.STEPS)`` of ``cfg`` as it is: call it after Detectron2's
    ``auto_scale_workers``, as the Trainer does; the CBN authors' released COCO configs).

    Args:
        dataset_size: training images after Detectron2's filtering, or None if unknown.
    Returns:
        iterations, or None when the burn-in is in epochs and ``dataset_size`` is None.
    Raises:
        ConfigValueError: invalid smallbn_d2 keys or ``dataset_size``; ``BURN_IN_UNTIL_LR_STEP`` with
            an empty ``SOLVER.STEPS``.
    """
    validate_smallbn_config(cfg)
    c = cfg.MODEL.CBN
    if c.BURN_IN_ITERS is not None:
        return int(c.BURN_IN_ITERS)
    if c.BURN_IN_UNTIL_LR_STEP:
        if not cfg.SOLVER.STEPS:
            raise ConfigValueError(
                "MODEL.CBN.BURN_IN_UNTIL_LR_STEP = True needs a learning-rate step, but SOLVER.STEPS = () is "
                "empty; allowed: SOLVER.STEPS with at least one iteration, or the burn-in given by "
                "MODEL.CBN.BURN_IN_ITERS or BURN_IN_EPOCHS instead")
        return int(min(cfg.SOLVER.STEPS))
    epochs = 3.0 if c.BURN_IN_EPOCHS is None else float(c.BURN_IN_EPOCHS)
    if epochs == 0:
        return 0
    if dataset_size is None:
        return None
    try:
        IMAGES.check(dataset_size, "dataset_size")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None
    return int(round(epochs * dataset_size / cfg.SOLVER.IMS_PER_BATCH))


def resolve_burn_in(cfg: CN, dataset_size: Optional[int] = None) -> CN:
    """``cfg`` with its CBN burn-in in iterations (:func:`cbn_burn_in_iters`): ``BURN_IN_ITERS`` set,
    ``BURN_IN_EPOCHS`` None, ``BURN_IN_UNTIL_LR_STEP`` False. The model builder reads no data, so the
    trainer (or a custom training script) converts here, where the training set size is known.

    Args:
        cfg: not modified.
        dataset_size: training images after Detectron2's filtering; needed only for a burn-in in epochs.
    Returns:
        ``cfg`` itself if ``BURN_IN_ITERS`` is set, else a converted clone (frozen if ``cfg`` was).
    Raises:
        ConfigValueError: as :func:`cbn_burn_in_iters`; ``dataset_size`` None for a burn-in in epochs.
    """
    c = cfg.MODEL.CBN
    if c.BURN_IN_ITERS is not None:
        validate_smallbn_config(cfg)
        return cfg
    iters = cbn_burn_in_iters(cfg, dataset_size)
    if iters is None:
        raise ConfigValueError(f"dataset_size = {dataset_size!r} is invalid for a CBN burn-in in epochs; "
                               "allowed: an integer >= 0 (images)")
    if c.BURN_IN_UNTIL_LR_STEP:
        how = f"until the first learning-rate step, SOLVER.STEPS = {tuple(cfg.SOLVER.STEPS)}"
    else:
        epochs = 3.0 if c.BURN_IN_EPOCHS is None else c.BURN_IN_EPOCHS
        how = f"{epochs} epochs x {dataset_size} images / {cfg.SOLVER.IMS_PER_BATCH} images per iteration"
    logger.info(f"CBN burn-in: {how} -> {iters} iterations")
    return config_with(cfg, {"MODEL.CBN.BURN_IN_ITERS": iters, "MODEL.CBN.BURN_IN_EPOCHS": None,
                             "MODEL.CBN.BURN_IN_UNTIL_LR_STEP": False})


def scale_norm_iterations(cfg: CN, num_workers: int) -> CN:
    """Rescale smallbn_d2's iteration counts as ``DefaultTrainer.auto_scale_workers`` rescales
    ``SOLVER.MAX_ITER``: with ``SOLVER.REFERENCE_WORLD_SIZE`` = R > 0 and ``num_workers`` = W != R,
    each key of ``_ITERATION_KEYS`` that is set (not None, not -1) becomes ``round(value * R / W)``
    (``BURN_IN_EPOCHS`` needs none). Call it before ``auto_scale_workers``, which then updates R.

    Returns:
        ``cfg`` itself when no scaling applies, else a scaled clone (frozen if ``cfg`` was).
    """
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if ref == 0 or ref == num_workers:
        return cfg
    values = {key: _get(cfg, key) for key in _ITERATION_KEYS}
    return config_with(cfg, {key: int(round(v * ref / num_workers)) for key, v in values.items()
                             if v is not None and v >= 0})
