"""Deploy CBN / MABN models at BN speed: conversion to ``FrozenBatchNorm2d`` and folding into convs.

In eval mode every layer converted here is a per-channel affine map of its (N, C, H, W) input, so
it becomes Detectron2's ``FrozenBatchNorm2d`` with the same output (the table, eps rule and
folding rule: docs/DEPLOY.md). Sources: CBN paper (Yao et al., CVPR 2021) Sec. 3.2, METHODS.md
CBN item 7; MABN paper (Yan et al., ICLR 2020) Sec. 4.2, METHODS.md MABN items 2 and 6;
"Rethinking Batch in BatchNorm" Sec. 5.2 (per-FPN-level statistics in RetinaNet's head).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from torch import nn
from torch.nn.utils import parametrize

from ..compat import cycle_has_affine, cycle_position, set_cycle_position
from ..layers import IterationNormBase, is_weight_centralized, remove_weight_centralization

__all__ = ["FROZEN_EPS", "ConvertedLayer", "convert_to_frozen_bn", "convert_for_inference", "fold_frozen_bn",
           "frozen_bn_from_affine"]

logger = logging.getLogger(__name__)

#: eps of every FrozenBatchNorm2d made here: Detectron2's default, the one ``get_norm("FrozenBN", C)``
#: gives; a layer's own eps is moved into ``running_var`` (``running_var + FROZEN_EPS = var + eps``).
FROZEN_EPS = 1e-5

#: The layers conversion replaces (Detectron2's BatchNorm2d and NaiveSyncBatchNorm included).
CONVERTED = (IterationNormBase, nn.BatchNorm2d, nn.SyncBatchNorm)
_SOURCES = CONVERTED + (FrozenBatchNorm2d,)


@dataclass
class ConvertedLayer:
    """One entry of the conversion summary.

    Attributes:
        name: qualified module name in the model ("" for the model itself).
        source: what was there, e.g. ``"CrossIterationBatchNorm2d"`` or
            ``"CycleBatchNormList[5 x MovingAverageBatchNorm2d]"``.
        channels: C.
        action: ``"FrozenBatchNorm2d"``, ``"per-level FrozenBatchNorm2d"``,
            ``"weight centralization baked"``, ``"folded into <conv name>"`` or ``"kept: <why>"``.
    """

    name: str
    source: str
    channels: int
    action: str


# ------------------------------------------------------------------------------ conversion
def _eval_affine(layer: nn.Module, name: str):
    """(mean, var, eps, gamma or None, beta or None) with eval(x) = (x - mean)/sqrt(var + eps)*gamma + beta."""
    if isinstance(layer, IterationNormBase):  # CBN, NaiveCBN, MABN: the layer knows its affine
        return layer.eval_affine()
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError(
            f"{name or 'model'}: {type(layer).__name__} has track_running_stats=False, so its eval mode "
            "normalizes with batch statistics, which no FrozenBatchNorm2d reproduces; allowed: BN layers "
            "with running statistics")
    return layer.running_mean, layer.running_var, layer.eps, layer.weight, layer.bias


def frozen_bn_from_affine(mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: Optional[torch.Tensor],
                          beta: Optional[torch.Tensor], outer_gamma: Optional[torch.Tensor] = None,
                          outer_beta: Optional[torch.Tensor] = None) -> FrozenBatchNorm2d:
    """A new ``FrozenBatchNorm2d`` computing ``outer_gamma * ((x - mean) / sqrt(var + eps) * gamma + beta)
    + outer_beta`` on an (N, C, H, W) input, with eps :data:`FROZEN_EPS` (``eps - FROZEN_EPS`` moved
    into ``running_var``), on ``mean``'s device, in its dtype promoted to at least float32.

    All tensors are (C,); gamma, beta None mean 1, 0; ``outer_*`` (a ``CycleBatchNormList``'s
    shared affine, applied after) None mean none.
    """
    with torch.no_grad():
        dt = torch.promote_types(mean.dtype, torch.float32)
        g = torch.ones_like(mean, dtype=dt) if gamma is None else gamma.detach().to(dt)
        b = torch.zeros_like(mean, dtype=dt) if beta is None else beta.detach().to(dt)
        if outer_gamma is not None:
            g, b = g * outer_gamma.detach().to(dt), b * outer_gamma.detach().to(dt)
        if outer_beta is not None:
            b = b + outer_beta.detach().to(dt)
        frozen = FrozenBatchNorm2d(mean.numel(), eps=FROZEN_EPS).to(device=mean.device, dtype=dt)
        frozen.weight.copy_(g)
        frozen.bias.copy_(b)
        frozen.running_mean.copy_(mean.detach())
        # eps is no buffer (not in checkpoints) and get_norm("FrozenBN") uses the default: move the
        # difference into running_var so that running_var + FROZEN_EPS == var + eps
        frozen.running_var.copy_((var.detach().double() + (float(eps) - FROZEN_EPS)).to(dt))
    return frozen


def _release_conv(layer: nn.Module) -> None:
    if isinstance(layer, IterationNormBase):
        layer.release_conv()  # CBN: stop capturing its producing conv's input


def _convert_cycle(cycle: CycleBatchNormList, name: str) -> Optional[CycleBatchNormList]:
    """Per-level FrozenBatchNorm2d with the list's shared affine multiplied in, or None if a level is no BN."""
    inner = list(cycle)
    if not inner or not all(isinstance(m, _SOURCES) for m in inner):
        return None
    outer_g, outer_b = (cycle.weight, cycle.bias) if cycle_has_affine(cycle) else (None, None)
    levels = [frozen_bn_from_affine(*_eval_affine(m, f"{name}.{i}"), outer_gamma=outer_g, outer_beta=outer_b)
              for i, m in enumerate(inner)]
    new = CycleBatchNormList(length=len(levels), bn_class=lambda num_features, affine: nn.Identity(),
                             num_features=levels[0].num_features, affine=False)
    for i, frozen in enumerate(levels):
        new[i] = frozen
    set_cycle_position(new, cycle_position(cycle))  # keep the cycling phase
    for m in inner:
        _release_conv(m)
    return new


def _convert_module(module: nn.Module, name: str, records: List[ConvertedLayer]) -> nn.Module:
    """The replacement of ``module`` (itself, its children converted in place, if it is no norm)."""
    if isinstance(module, CycleBatchNormList):
        source = f"CycleBatchNormList[{len(module)} x {'/'.join(sorted({type(m).__name__ for m in module}))}]"
        new = _convert_cycle(module, name)
        if new is None:
            records.append(ConvertedLayer(name, source, -1, "kept: holds non-BN layers"))
            return module
        records.append(ConvertedLayer(name, source, new[0].num_features, "per-level FrozenBatchNorm2d"))
        return new
    if isinstance(module, CONVERTED):
        frozen = frozen_bn_from_affine(*_eval_affine(module, name))
        _release_conv(module)
        records.append(ConvertedLayer(name, type(module).__name__, frozen.num_features, "FrozenBatchNorm2d"))
        return frozen
    for child_name, child in list(module.named_children()):
        new = _convert_module(child, f"{name}.{child_name}" if name else child_name, records)
        if new is not child:
            setattr(module, child_name, new)
    return module


def convert_for_inference(model: nn.Module, fold: bool = False) -> Tuple[nn.Module, List[ConvertedLayer]]:
    """Convert, in place, every CBN, NaiveCBN, MABN and BN layer of ``model`` to FrozenBatchNorm2d.

    Eval outputs are unchanged up to float rounding (docs/DEPLOY.md gives the mapping). MABN's
    weight centralization is baked into the conv weights; CBN's producing convs are released;
    ``fold=True`` then runs :func:`fold_frozen_bn`. The train/eval mode is kept. Returns (the
    converted model: ``model`` itself unless it is a norm layer, the :class:`ConvertedLayer` records).

    Raises:
        TypeError: ``fold`` is not a bool.
        ValueError: a BN layer without running statistics (``track_running_stats=False``), or
            (``fold=True``) a conv weight with a parametrization other than weight centralization.
    """
    if not isinstance(fold, bool):
        raise TypeError(f"fold = {fold!r} is invalid; allowed: True or False")
    records: List[ConvertedLayer] = []
    model = _convert_module(model, "", records)  # releases CBN's convs while the layers are still reachable
    for name, module in list(model.named_modules()):
        if is_weight_centralized(module):
            remove_weight_centralization(module, bake=True)
            channels = module.out_channels if hasattr(module, "out_channels") else module.weight.shape[0]
            records.append(ConvertedLayer(name, type(module).__name__, channels, "weight centralization baked"))
    if fold:
        records += fold_frozen_bn(model)
    n = sum(r.action.endswith("FrozenBatchNorm2d") for r in records)
    logger.info(f"smallbn_d2.deploy: {n} norm layers converted to FrozenBatchNorm2d"
                + (f", {sum(r.action.startswith('folded') for r in records)} folded" if fold else ""))
    return model, records


def convert_to_frozen_bn(model: nn.Module, fold: bool = False) -> nn.Module:
    """:func:`convert_for_inference` (in place, same arguments and errors) returning only the model."""
    return convert_for_inference(model, fold=fold)[0]


# ------------------------------------------------------------------------------ folding
@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: FrozenBatchNorm2d, name: str) -> None:
    if is_weight_centralized(conv):
        remove_weight_centralization(conv, bake=True)
    if parametrize.is_parametrized(conv):
        raise ValueError(f"{name}: cannot fold into a conv whose weight carries a parametrization "
                         f"({list(conv.parametrizations)}); allowed: plain or weight-centralized convs")
    if conv.out_channels != norm.num_features:
        raise ValueError(f"{name}: conv out_channels = {conv.out_channels} but the norm has "
                         f"{norm.num_features} channels; allowed: equal")
    w, dt = conv.weight, torch.float64
    scale = norm.weight.to(dt) * torch.rsqrt(norm.running_var.to(dt) + norm.eps)
    shift = norm.bias.to(dt) - norm.running_mean.to(dt) * scale
    old_bias = conv.bias.to(dt) if conv.bias is not None else torch.zeros_like(shift)
    new_w = (w.to(dt) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    conv.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
    conv.bias = nn.Parameter((old_bias * scale + shift).to(w.dtype), requires_grad=w.requires_grad)


def fold_frozen_bn(model: nn.Module) -> List[ConvertedLayer]:
    """Fold, in place, every FrozenBatchNorm2d that directly follows a conv into that conv.

    Foldable: ``conv.norm`` of Detectron2's ``Conv2d``, and a FrozenBatchNorm2d right after an
    ``nn.Conv2d`` without norm or activation in an ``nn.Sequential``. The conv gets
    ``W * scale`` and the bias ``b * scale + shift`` (float64, stored in the conv's dtype); the
    norm becomes ``None`` / ``nn.Identity()``; a weight-centralized conv is baked first. Others,
    notably the per-level layers of a ``CycleBatchNormList`` (one shared conv), stay. Returns
    the :class:`ConvertedLayer` records of the folded and of the kept FrozenBatchNorm2d layers.

    Raises:
        ValueError: a conv with another weight parametrization, or a channel mismatch.
    """
    records: List[ConvertedLayer] = []
    folded = set()
    modules = list(model.named_modules())

    def fold(conv, conv_name, norm, norm_name):
        _fold_into(conv, norm, conv_name)
        folded.add(id(norm))
        records.append(ConvertedLayer(norm_name, "FrozenBatchNorm2d", norm.num_features, f"folded into {conv_name}"))

    for name, module in modules:
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), FrozenBatchNorm2d):
            fold(module, name, module.norm, f"{name}.norm")
            module.norm = None
        if isinstance(module, nn.Sequential):
            for i in range(1, len(module)):
                prev, cur = module[i - 1], module[i]
                if (isinstance(prev, nn.Conv2d) and isinstance(cur, FrozenBatchNorm2d)
                        and getattr(prev, "norm", None) is None and getattr(prev, "activation", None) is None):
                    fold(prev, f"{name}.{i - 1}" if name else str(i - 1), cur, f"{name}.{i}" if name else str(i))
                    module[i] = nn.Identity()
    cycles = {id(m) for _, c in modules if isinstance(c, CycleBatchNormList) for m in c}
    for name, module in modules:
        if isinstance(module, FrozenBatchNorm2d) and id(module) not in folded:
            why = ("kept: per-level statistics (CycleBatchNormList) after a conv shared by all levels"
                   if id(module) in cycles else "kept: no directly preceding conv")
            records.append(ConvertedLayer(name, "FrozenBatchNorm2d", module.num_features, why))
    return records
