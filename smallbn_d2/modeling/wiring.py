"""Build Detectron2 models with configured CBN/MABN layers and wire them to their producing convs.

:func:`build_model` is ``detectron2.modeling.build_model`` with the config's norm
hyperparameters in force (:func:`~smallbn_d2.modeling.norms.norm_hyperparameters`), so every
CBN / NaiveCBN / MABN layer is constructed configured, where Detectron2 asks ``get_norm`` for it;
then :func:`~smallbn_d2.modeling.norms.place_norms` decides what depends on where a layer sits
(head arguments, RetinaNet's per-level layers). Detectron2 builds a norm before the conv that
feeds it, so one step remains, :func:`prepare_norms`: each layer is attached to its producing conv (``attach_conv``;
CBN then allocates its window of statistics gradients, MABN centralizes the conv's weight). A
producing conv is the ``Conv2d`` that holds the layer as ``Conv2d.norm`` (Detectron2's
``Conv2d(..., norm=...)``) or the ``nn.Conv2d`` right before it in an ``nn.Sequential``
(RetinaNet's head, also for its per-level ``CycleBatchNormList``). A layer without one raises
:class:`NormNotWiredError` at build time.

Building reads no data: a CBN burn-in given in epochs stays unknown (``burn_in=None``) until the
trainer converts it with the training set size (:func:`smallbn_d2.config.resolve_burn_in`).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model as d2_build_model
from torch import nn

from ..layers import IterationNormBase
from ..layers.base import NormNotWiredError
from ..families import NORM_FAMILIES
from .norms import norm_hyperparameters, place_norms
from .parity import FROZEN_FROM

__all__ = ["build_model", "prepare_norms", "iteration_norms", "set_norm_iteration"]

logger = logging.getLogger(__name__)


def iteration_norms(model: nn.Module) -> Iterator[Tuple[str, IterationNormBase]]:
    """Yield ``(qualified name, layer)`` for every CBN/MABN layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, IterationNormBase):
            yield name, module


def set_norm_iteration(model: nn.Module, iteration: int) -> None:
    """Tell every CBN/MABN layer of ``model`` the trainer iteration about to run (0-based).

    Call it before every training step (``smallbn_d2.engine.NormIterationHook`` does it for
    Detectron2's trainers).

    Raises:
        ValueError: ``iteration`` is not an integer >= 0.
    """
    for _, layer in iteration_norms(model):
        layer.set_iteration(iteration)


def _norm_layers(module: Optional[nn.Module]) -> List[IterationNormBase]:
    if isinstance(module, IterationNormBase):
        return [module]
    if isinstance(module, CycleBatchNormList):
        return [m for m in module if isinstance(m, IterationNormBase)]
    return []


def _attach_producers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            for layer in _norm_layers(getattr(module, "norm", None)):
                layer.attach_conv(module)
        if isinstance(module, nn.Sequential):
            children = list(module)
            for prev, cur in zip(children[:-1], children[1:]):
                if isinstance(prev, nn.Conv2d):
                    for layer in _norm_layers(cur):
                        layer.attach_conv(prev)


def _needs_conv(layer: IterationNormBase) -> bool:
    family = next((f for f in NORM_FAMILIES.values() if f.layer_class is type(layer)), None)
    return True if family is None else family.needs_producing_conv


def prepare_norms(model: nn.Module, cfg: Optional[CfgNode] = None) -> nn.Module:
    """Attach every CBN/MABN layer of a freshly built model to its producing conv, in place.

    Args:
        model: e.g. from ``detectron2.modeling.build_model(cfg)`` (not yet trained or loaded).
        cfg: its config, only used to name ``MODEL.BACKBONE.FREEZE_AT`` in the log. Layers in
            frozen stages are ``FrozenBatchNorm2d`` already (Detectron2 freezes while it builds;
            :mod:`smallbn_d2.modeling.parity`); one info line counts them.
    Returns:
        ``model``.
    Raises:
        NormNotWiredError: a layer that needs a producing conv has none.
    """
    _attach_producers(model)
    layers = list(iteration_norms(model))
    for name, layer in layers:
        if layer.conv is None and _needs_conv(layer):
            raise NormNotWiredError(
                f"{type(layer).__name__} at {name!r} has no producing conv: CBN and MABN must directly "
                "follow an nn.Conv2d (as Conv2d(..., norm=...) or next in an nn.Sequential)."
            )
    if layers:
        counts = {}
        for _, layer in layers:
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
        logger.info(f"smallbn_d2: wired {counts}")
    frozen: Dict[str, int] = {}
    for module in model.modules():
        source = getattr(module, FROZEN_FROM, None) if isinstance(module, FrozenBatchNorm2d) else None
        if source is not None:
            frozen[source] = frozen.get(source, 0) + 1
    if frozen:
        at = f" (MODEL.BACKBONE.FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT})" if cfg is not None else ""
        logger.info(f"smallbn_d2: frozen stages{at} hold FrozenBatchNorm2d with the eval-mode affine of "
                    f"{frozen} layers, as Detectron2 does for BatchNorm")
    return model


def build_model(cfg: CfgNode) -> nn.Module:
    """``detectron2.modeling.build_model(cfg)`` with the config's norm hyperparameters in force,
    followed by :func:`~smallbn_d2.modeling.norms.place_norms` (head arguments, RetinaNet's
    per-level layers) and :func:`prepare_norms`.

    Args:
        cfg: a Detectron2 config with smallbn_d2's keys (``add_smallbn_config``).
    Returns:
        the model on ``cfg.MODEL.DEVICE``.
    Raises:
        MissingConfigError: ``cfg`` lacks smallbn_d2's keys.
        ConfigValueError: an invalid smallbn_d2 value.
        NormNotWiredError: as :func:`prepare_norms`.
    """
    with norm_hyperparameters(cfg):
        model = place_norms(d2_build_model(cfg))
    prepare_norms(model, cfg)
    return model.to(torch.device(cfg.MODEL.DEVICE))
