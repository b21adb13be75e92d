"""Build Detectron2 models with configured CBN/MABN layers and wire them to their producing convs.

Detectron2 builds a norm before the conv that feeds it, so after the build :func:`prepare_norms`
attaches each layer to its producing conv: the ``Conv2d`` holding it as ``Conv2d.norm``, or the
``nn.Conv2d`` right before it in an ``nn.Sequential`` (RetinaNet's head, also inside a
``CycleBatchNormList``). Building reads no data. See docs/ARCHITECTURE.md ("Layers built configured").
"""
from __future__ import annotations

import collections
import logging
from typing import Iterator, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model as d2_build_model
from torch import nn

from ..families import family_of
from ..layers import IterationNormBase
from ..layers.base import NormNotWiredError
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
    """Tell every CBN/MABN layer of ``model`` the trainer iteration about to run (0-based); call it
    before every training step (``smallbn_d2.engine.NormIterationHook`` does).

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


def prepare_norms(model: nn.Module, cfg: Optional[CfgNode] = None) -> nn.Module:
    """Attach every CBN/MABN layer of a freshly built (not trained or loaded) model to its producing
    conv, in place (CBN allocates its window of statistics gradients, MABN centralizes the conv).

    ``cfg`` only names ``MODEL.BACKBONE.FREEZE_AT`` in the info line that counts the layers already
    frozen by Detectron2 while it built (:mod:`smallbn_d2.modeling.parity`). Returns ``model``.

    Raises:
        NormNotWiredError: a layer that needs a producing conv has none.
    """
    _attach_producers(model)
    layers = list(iteration_norms(model))
    for name, layer in layers:
        family = family_of(type(layer))
        if layer.conv is None and (family is None or family.needs_producing_conv):
            raise NormNotWiredError(
                f"{type(layer).__name__} at {name!r} has no producing conv: CBN and MABN must directly "
                "follow an nn.Conv2d (as Conv2d(..., norm=...) or next in an nn.Sequential)."
            )
    if layers:
        logger.info(f"smallbn_d2: wired {dict(collections.Counter(type(layer).__name__ for _, layer in layers))}")
    frozen = dict(collections.Counter(getattr(m, FROZEN_FROM) for m in model.modules()
                                      if isinstance(m, FrozenBatchNorm2d) and getattr(m, FROZEN_FROM, None)))
    if frozen:
        at = f" (MODEL.BACKBONE.FREEZE_AT = {cfg.MODEL.BACKBONE.FREEZE_AT})" if cfg is not None else ""
        logger.info(f"smallbn_d2: frozen stages{at} hold FrozenBatchNorm2d with the eval-mode affine of "
                    f"{frozen} layers, as Detectron2 does for BatchNorm")
    return model


def build_model(cfg: CfgNode) -> nn.Module:
    """``detectron2.modeling.build_model(cfg)`` with the config's norm hyperparameters in force
    (:func:`~smallbn_d2.modeling.norms.norm_hyperparameters`), then
    :func:`~smallbn_d2.modeling.norms.place_norms` and :func:`prepare_norms`.

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
