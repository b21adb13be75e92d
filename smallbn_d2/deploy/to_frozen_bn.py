"""Deploy CBN / MABN models at BN speed: conversion to ``FrozenBatchNorm2d`` and folding into convs.

Source: CBN paper (Yao et al., CVPR 2021) Sec. 3.2 and METHODS.md CBN item 7 ("inference is
exactly BN with population statistics"); MABN paper (Yan et al., ICLR 2020) Sec. 4.2 and
METHODS.md MABN items 2 and 6 (inference ``y = gamma * x / sqrt(running_chi2 + eps) + beta``,
weight centralization); "Rethinking Batch in BatchNorm" Sec. 5.2 (domain-specific, per-FPN-level
statistics in RetinaNet's head). See ``docs/DEPLOY.md`` for the commands.

In eval mode every normalization layer this module converts is a per-channel affine map
``y = x * scale + shift`` of its (N, C, H, W) input, so it is replaced by Detectron2's
``FrozenBatchNorm2d`` with the same eval-mode output:

=============================================  ================================================
layer (eval mode)                              FrozenBatchNorm2d (weight, bias, running_mean,
                                               running_var)
=============================================  ================================================
``CrossIterationBatchNorm2d`` / ``Naive...``   gamma, beta, running_mean, running_var
``MovingAverageBatchNorm2d``                   gamma, beta, 0, running_chi2
``nn.BatchNorm2d`` / ``nn.SyncBatchNorm``      gamma, beta (1, 0 without affine), running_mean,
(Detectron2's BatchNorm2d, NaiveSyncBN too)    running_var
``CycleBatchNormList`` of the above            the same list structure (cycling over FPN levels)
                                               of FrozenBatchNorm2d, the list's shared affine
                                               multiplied into each level's weight/bias; the
                                               list itself loses its affine
=============================================  ================================================

Every FrozenBatchNorm2d made here has Detectron2's default eps (:data:`FROZEN_EPS`, 1e-5, what
``get_norm("FrozenBN", C)`` builds; eps is not saved in checkpoints); a layer with another eps
gets ``running_var + (eps - FROZEN_EPS)`` instead, the same function.

MABN's weight centralization is baked into the conv weights (the centralized values become the
plain ``conv.weight``), and CBN's input-capturing hook is removed from its producing conv.

With ``fold=True`` every ``FrozenBatchNorm2d`` that directly follows a conv (Detectron2's
``Conv2d(..., norm=...)``, whose norm runs before its activation, or an ``nn.Conv2d`` followed by
the norm in an ``nn.Sequential``) is folded into it: ``W'[c] = W[c] * scale[c]``,
``b'[c] = b[c] * scale[c] + shift[c]`` (the conv gets a bias if it had none); the norm becomes
``None`` (``Conv2d.norm``) or ``nn.Identity`` (``nn.Sequential``). Per-level norms
(``CycleBatchNormList``) follow a conv shared by all FPN levels with per-level statistics, so
no single conv can absorb them: they stay as FrozenBatchNorm2d (reported as kept).

Loading converted checkpoints: :mod:`smallbn_d2.deploy.inference_model` (the model they load
into) and :mod:`smallbn_d2.checkpoint` (strict loading, writing with conversion metadata).
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

_TORCH_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)
_SOURCES = (IterationNormBase,) + _TORCH_BN + (FrozenBatchNorm2d,)

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
    if isinstance(layer, FrozenBatchNorm2d):
        return layer.running_mean, layer.running_var, layer.eps, layer.weight, layer.bias
    if isinstance(layer, _TORCH_BN):
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(
                f"{name or 'model'}: {type(layer).__name__} has track_running_stats=False, so its eval mode "
                "normalizes with batch statistics, which no FrozenBatchNorm2d reproduces; allowed: BN layers "
                "with running statistics"
            )
        return layer.running_mean, layer.running_var, layer.eps, layer.weight, layer.bias
    raise TypeError(f"{name}: cannot convert {type(layer).__name__}; allowed: {[c.__name__ for c in _SOURCES]}")


def frozen_bn_from_affine(mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: Optional[torch.Tensor],
                          beta: Optional[torch.Tensor], outer_gamma: Optional[torch.Tensor] = None,
                          outer_beta: Optional[torch.Tensor] = None) -> FrozenBatchNorm2d:
    """The ``FrozenBatchNorm2d`` computing ``outer_gamma * ((x - mean) / sqrt(var + eps) * gamma + beta)
    + outer_beta`` on an (N, C, H, W) input, with Detectron2's default eps (:data:`FROZEN_EPS`; the
    difference ``eps - FROZEN_EPS`` is moved into ``running_var``).

    Args:
        mean, var: (C,) statistics; eps: the source layer's eps.
        gamma, beta: (C,) affine parameters, or None (1 and 0).
        outer_gamma, outer_beta: (C,) a second affine applied after (a ``CycleBatchNormList``'s
            shared affine), or None.
    Returns:
        a new FrozenBatchNorm2d on ``mean``'s device, in ``mean``'s dtype promoted to at least float32.
    Raises nothing of its own. Source: the eval-mode identities in this module's table.
    """
    with torch.no_grad():
        dt = torch.promote_types(mean.dtype, torch.float32)
        g = torch.ones_like(mean, dtype=dt) if gamma is None else gamma.detach().to(dt)
        b = torch.zeros_like(mean, dtype=dt) if beta is None else beta.detach().to(dt)
        if outer_gamma is not None:
            b = b * outer_gamma.detach().to(dt)
            g = g * outer_gamma.detach().to(dt)
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
    """Undo what a CBN/MABN layer did to its producing conv that inference does not need."""
    if isinstance(layer, IterationNormBase):
        layer.release_conv()


def _convert_cycle(cycle: CycleBatchNormList, name: str) -> Optional[CycleBatchNormList]:
    inner = list(cycle)
    if not inner or not all(isinstance(m, _SOURCES) for m in inner):
        return None
    outer_g = cycle.weight if cycle_has_affine(cycle) else None
    outer_b = cycle.bias if cycle_has_affine(cycle) else None
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


def _describe_cycle(cycle: CycleBatchNormList) -> str:
    kinds = sorted({type(m).__name__ for m in cycle})
    return f"CycleBatchNormList[{len(cycle)} x {'/'.join(kinds)}]"


def _convert_module(module: nn.Module, name: str, records: List[ConvertedLayer]) -> nn.Module:
    """Return the replacement of ``module`` (itself, converted in place, if it is no norm)."""
    if isinstance(module, CycleBatchNormList):
        new = _convert_cycle(module, name)
        if new is None:
            records.append(ConvertedLayer(name, _describe_cycle(module), -1, "kept: holds non-BN layers"))
            return module
        records.append(ConvertedLayer(name, _describe_cycle(module), new[0].num_features,
                                      "per-level FrozenBatchNorm2d"))
        return new
    if isinstance(module, _SOURCES) and not isinstance(module, FrozenBatchNorm2d):
        frozen = frozen_bn_from_affine(*_eval_affine(module, name))
        _release_conv(module)
        records.append(ConvertedLayer(name, type(module).__name__, frozen.num_features, "FrozenBatchNorm2d"))
        return frozen
    for child_name, child in list(module.named_children()):
        new = _convert_module(child, f"{name}.{child_name}" if name else child_name, records)
        if new is not child:
            setattr(module, child_name, new)  # nn.Module.__setattr__: replaces the child
    return module


def convert_for_inference(model: nn.Module, fold: bool = False) -> Tuple[nn.Module, List[ConvertedLayer]]:
    """Convert, in place, every CBN, NaiveCBN, MABN and BN layer of ``model`` to FrozenBatchNorm2d.

    See the module docstring for the exact mapping. Eval-mode outputs are unchanged (up to float
    rounding: the conversion itself is exact, ``FrozenBatchNorm2d`` computes the same affine
    map with other roundings; folding changes the order of operations too).

    Args:
        model: any ``nn.Module`` (a Detectron2 model built by ``smallbn_d2.build_model``, loaded
            with its trained weights). Its train/eval mode is kept.
        fold: also fold the FrozenBatchNorm2d layers into their preceding convs
            (:func:`fold_frozen_bn`).
    Returns:
        (the converted model, the list of :class:`ConvertedLayer` records). The model is
        ``model`` itself unless ``model`` is a norm layer (then a new module).
    Raises:
        ValueError: a BN layer without running statistics (``track_running_stats=False``), or
            (``fold=True``) a conv weight with a parametrization other than weight centralization.
    """
    if not isinstance(fold, bool):
        raise TypeError(f"fold = {fold!r} is invalid; allowed: True or False")
    records: List[ConvertedLayer] = []
    # CBN layers must release their convs before the layers disappear from the model
    model = _convert_module(model, "", records)
    for name, module in list(model.named_modules()):
        if is_weight_centralized(module):
            remove_weight_centralization(module, bake=True)
            records.append(ConvertedLayer(name, type(module).__name__, module.out_channels
                                          if hasattr(module, "out_channels") else module.weight.shape[0],
                                          "weight centralization baked"))
    if fold:
        records += fold_frozen_bn(model)
    n = sum(r.action.endswith("FrozenBatchNorm2d") for r in records)
    logger.info(f"smallbn_d2.deploy: {n} norm layers converted to FrozenBatchNorm2d"
                + (f", {sum(r.action.startswith('folded') for r in records)} folded" if fold else ""))
    return model, records


def convert_to_frozen_bn(model: nn.Module, fold: bool = False) -> nn.Module:
    """Convert CBN / NaiveCBN / MABN / BN layers to FrozenBatchNorm2d (and fold them if asked).

    In place; same as :func:`convert_for_inference` but returns only the model.

    Args:
        model: the trained model (see :func:`convert_for_inference`).
        fold: fold the frozen norms into their preceding convs.
    Returns:
        the converted model (``model`` itself unless ``model`` is a norm layer).
    Raises:
        as :func:`convert_for_inference`.
    """
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
    w = conv.weight
    dt = torch.float64
    scale = norm.weight.to(dt) * torch.rsqrt(norm.running_var.to(dt) + norm.eps)
    shift = norm.bias.to(dt) - norm.running_mean.to(dt) * scale
    old_bias = conv.bias.to(dt) if conv.bias is not None else torch.zeros_like(shift)
    new_w = (w.to(dt) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    new_b = (old_bias * scale + shift).to(w.dtype)
    conv.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def fold_frozen_bn(model: nn.Module) -> List[ConvertedLayer]:
    """Fold, in place, every FrozenBatchNorm2d that directly follows a conv into that conv.

    Foldable: ``conv.norm`` of Detectron2's ``Conv2d`` (the norm runs before the activation),
    and a FrozenBatchNorm2d right after an ``nn.Conv2d`` without own norm or activation in an
    ``nn.Sequential``. The conv gets ``W * scale`` and a bias ``b * scale + shift`` (computed in
    float64, stored in the conv's dtype); the norm becomes ``None`` / ``nn.Identity()``.
    A weight-centralized conv is baked first. Every other FrozenBatchNorm2d, notably the
    per-level ones of a ``CycleBatchNormList`` (one shared conv, several statistics), stays.

    Args:
        model: any ``nn.Module``.
    Returns:
        records (:class:`ConvertedLayer`) of the folded and of the kept FrozenBatchNorm2d layers.
    Raises:
        ValueError: a conv with another weight parametrization, or a channel mismatch.
    """
    records: List[ConvertedLayer] = []
    folded = set()
    modules = list(model.named_modules())
    for name, module in modules:
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), FrozenBatchNorm2d):
            norm = module.norm
            _fold_into(module, norm, name)
            module.norm = None
            folded.add(id(norm))
            records.append(ConvertedLayer(f"{name}.norm", "FrozenBatchNorm2d", norm.num_features,
                                          f"folded into {name}"))
        if isinstance(module, nn.Sequential):
            for i in range(1, len(module)):
                prev, cur = module[i - 1], module[i]
                if (isinstance(prev, nn.Conv2d) and isinstance(cur, FrozenBatchNorm2d)
                        and getattr(prev, "norm", None) is None and getattr(prev, "activation", None) is None):
                    conv_name = f"{name}.{i - 1}" if name else str(i - 1)
                    _fold_into(prev, cur, conv_name)
                    module[i] = nn.Identity()
                    folded.add(id(cur))
                    records.append(ConvertedLayer(f"{name}.{i}" if name else str(i), "FrozenBatchNorm2d",
                                                  cur.num_features, f"folded into {conv_name}"))
    cycles = {id(m) for _, c in modules if isinstance(c, CycleBatchNormList) for m in c}
    for name, module in modules:
        if isinstance(module, FrozenBatchNorm2d) and id(module) not in folded:
            why = ("kept: per-level statistics (CycleBatchNormList) after a conv shared by all levels"
                   if id(module) in cycles else "kept: no directly preceding conv")
            records.append(ConvertedLayer(name, "FrozenBatchNorm2d", module.num_features, why))
    return records
