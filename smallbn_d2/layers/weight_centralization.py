"""Weight centralization (WC) of the conv that feeds an MABN layer (MABN paper, Yan et al., ICLR
2020, Sec. 4.2; docs/METHODS.md MABN 2): theta[c] <- theta[c] - mean(theta[c]) per output channel,
applied in the conv's forward by ``torch.nn.utils.parametrize``. ``conv.weight`` then *is* the
centralized weight wherever it is read; the trained parameter stays unconstrained at
``conv.parametrizations.weight.original`` (the former ``conv.weight`` object, so an optimizer built
earlier keeps working), saved and loaded under the plain key ``prefix + "weight"`` (state-dict hooks),
so Detectron2 checkpoints and non-centralized ImageNet weights load with ``strict=True``.

Caveats: initializing ``conv.weight`` in place after centralizing writes into a temporary and is
lost (initialize ``conv.parametrizations.weight.original``); assigning ``conv.weight = w`` stores w
as the raw parameter; PyTorch cannot pickle whole parametrized modules (use ``state_dict()``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compat import register_load_state_dict_pre_hook, register_state_dict_hook, remove_state_dict_hooks

__all__ = ["WeightCentralization", "CentralizedConv", "centralization_report", "centralize_conv_weight",
           "is_weight_centralized", "remove_weight_centralization"]

_ORIGINAL = "parametrizations.weight.original"
_PLAIN = "weight"


class WeightCentralization(nn.Module):
    """Parametrization ``w -> w - mean(w[c])`` per output channel (MABN Sec. 4.2; METHODS.md MABN 2).

    ``forward(w)``: w of shape (C_out, C_in / groups, kh, kw) (any ndim >= 2: the mean is over all
    dimensions but the first) -> the same shape and dtype, every ``[c]`` slice with zero mean.
    ``right_inverse`` is the identity: centralization is a projection, any raw value a preimage.

    Raises:
        ValueError: ``w`` has fewer than 2 dimensions.
    """

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() < 2:
            raise ValueError(f"weight centralization needs a weight with >= 2 dims, got shape {tuple(w.shape)}")
        return w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


# Module-level functions (not closures): deepcopy treats them as atomic, and removal can find
# them by identity without storing hook handles on the conv.
def _save_weight_under_plain_name(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + _ORIGINAL
    if key in state_dict:
        state_dict[prefix + _PLAIN] = state_dict.pop(key)


def _load_weight_from_plain_name(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                 unexpected_keys, error_msgs) -> None:
    key = prefix + _PLAIN
    if key in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(key)


def _register_hooks(conv: nn.Module) -> None:
    register_state_dict_hook(conv, _save_weight_under_plain_name)
    register_load_state_dict_pre_hook(conv, _load_weight_from_plain_name)


def _remove_hooks(conv: nn.Module) -> None:
    remove_state_dict_hooks(conv, _save_weight_under_plain_name, _load_weight_from_plain_name)


def is_weight_centralized(conv: nn.Module) -> bool:
    """True if the ``nn.Module`` ``conv`` has its weight parametrized by :class:`WeightCentralization`."""
    if not parametrize.is_parametrized(conv, "weight"):
        return False
    return any(isinstance(p, WeightCentralization) for p in conv.parametrizations.weight)


def centralize_conv_weight(conv: nn.Conv2d) -> nn.Conv2d:
    """Make ``conv`` use its weight centralized per output channel (MABN Sec. 4.2; METHODS.md MABN 2).

    In place and idempotent. ``conv.weight`` then returns the centralized (C_out, C_in / groups,
    kh, kw) tensor; state-dict keys stay those of a plain conv (see the module docstring).

    Args:
        conv: an ``nn.Conv2d`` (Detectron2's included) or any module with a ``weight`` parameter
            of ndim >= 2.
    Returns:
        ``conv`` (whose class becomes PyTorch's ``Parametrized<Class>`` subclass).
    Raises:
        TypeError: ``conv`` has no ``weight`` parameter.
        ValueError: ``conv.weight`` is already parametrized by something else (combining
            parametrizations would break the key renaming), or has fewer than 2 dims.
    """
    if is_weight_centralized(conv):
        return conv
    if parametrize.is_parametrized(conv, "weight"):
        raise ValueError(
            f"{type(conv).__name__}.weight already carries another parametrization "
            f"({list(conv.parametrizations.weight)}); weight centralization cannot be combined with it"
        )
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise TypeError(f"weight centralization needs a module with a `weight` parameter, got {type(conv).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight centralization needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    parametrize.register_parametrization(conv, "weight", WeightCentralization())
    _register_hooks(conv)
    return conv


def remove_weight_centralization(conv: nn.Module, bake: bool = True) -> nn.Module:
    """Undo :func:`centralize_conv_weight` in place; a no-op on a non-centralized module.

    Args:
        bake: True: the centralized values become the plain ``conv.weight`` parameter (before
            exporting or folding: the same function); False: the raw parameter becomes it again.
    Returns:
        ``conv`` (its original class restored), without the key-renaming hooks.
    """
    if not is_weight_centralized(conv):
        return conv
    # ``copy.deepcopy`` of a parametrized module shares PyTorch's injected class, from which
    # ``remove_parametrizations`` deletes the ``weight`` property: give this module a private
    # copy of that class first, so that removing it here cannot break a copy (or the original).
    cls = type(conv)
    private = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    conv.__class__ = type(cls.__name__, cls.__bases__, private)
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=bake)
    _remove_hooks(conv)
    return conv


@dataclass(frozen=True)
class CentralizedConv:
    """How much weight centralization changes one conv's weight (an entry of
    :func:`centralization_report`).

    Attributes:
        name: qualified module name of the conv in the model.
        shape: shape of its weight, (C_out, C_in / groups, kh, kw).
        relative_norm: ||W - center(W)||_F / ||W||_F for the raw weight W: the norm of the removed
            per-output-channel means relative to W's (0 for a zero weight, or when centralizing
            changes nothing).
        random_level: 1 / sqrt(D), D = C_in / groups * kh * kw: ``relative_norm``'s expected value
            for i.i.d. zero-mean weights (a fresh initialization, or one trained centralized,
            whose means no gradient changes); far above it, W was trained without centralization.
    """

    name: str
    shape: Tuple[int, ...]
    relative_norm: float
    random_level: float


@torch.no_grad()
def centralization_report(model: nn.Module) -> List[CentralizedConv]:
    """One :class:`CentralizedConv` per weight-centralized module of ``model``, in
    ``named_modules`` order: how much centralization removes from its raw weight (METHODS.md MABN 2).

    For raw weight W (C_out, C_in / groups, kh, kw), D = C_in / groups * kh * kw, in float64:
    ``relative_norm = sqrt(D * sum_c mean(W[c])^2) / ||W||_F``. Reads the weights, changes nothing.
    """
    report = []
    for name, module in model.named_modules():
        if not is_weight_centralized(module):
            continue
        w = module.parametrizations.weight.original.detach().to(torch.float64)
        d = w[0].numel() if w.shape[0] else 0
        flat = w.reshape(w.shape[0], -1)
        removed = math.sqrt(d * float(flat.mean(dim=1).square().sum())) if d else 0.0
        total = float(torch.linalg.vector_norm(flat))
        report.append(CentralizedConv(name, tuple(w.shape), relative_norm=removed / total if total > 0 else 0.0,
                                      random_level=1.0 / math.sqrt(d) if d else 0.0))
    return report
