"""Weight centralization (WC) of the conv that feeds an MABN layer.

Source: Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization" (MABN), ICLR 2020, Sec. 4.2 "Centralizing weights of convolution kernel";
``docs/METHODS.md``, MABN item 2. For every output channel c of a conv with weight theta of
shape (C_out, C_in / groups, kh, kw)::

    theta[c] <- theta[c] - mean(theta[c])        (mean over C_in / groups, kh, kw)

applied in the conv's forward: the trained parameter stays unconstrained, the conv always *uses*
its centralized value.

Implementation: ``torch.nn.utils.parametrize``. After :func:`centralize_conv_weight`,
``conv.weight`` *is* the centralized weight wherever it is read (Detectron2's ``Conv2d.forward``,
export, BN folding); the trained parameter lives at ``conv.parametrizations.weight.original``
(the same ``nn.Parameter`` object that was ``conv.weight`` before, so an optimizer built earlier
keeps working). Two hooks keep the *state-dict keys* those of a plain conv:

* saving: ``prefix + "parametrizations.weight.original"`` is renamed ``prefix + "weight"``; the
  saved tensor is the raw (un-centralized) parameter, so a checkpoint round-trips exactly;
* loading: ``prefix + "weight"`` is renamed back, so Detectron2 checkpoints and non-centralized
  ImageNet weights load with ``strict=True`` and are centralized in use.

Caveat: in-place initialization of ``conv.weight`` (e.g. ``nn.init.kaiming_normal_(conv.weight)``)
*after* centralization writes into a temporary and is lost; initialize before centralizing, or
initialize ``conv.parametrizations.weight.original``. Assigning ``conv.weight = tensor`` stores
the tensor as the raw parameter (``right_inverse`` is the identity), so reading ``conv.weight``
returns its centralized value. Whole-module pickling (``torch.save(model)``) of parametrized
modules is not supported by PyTorch; use ``state_dict()`` (as Detectron2 does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compat import register_state_dict_hook

__all__ = [
    "WeightCentralization",
    "CentralizedConv",
    "centralization_report",
    "centralize_conv_weight",
    "is_weight_centralized",
    "remove_weight_centralization",
]

_ORIGINAL = "parametrizations.weight.original"
_PLAIN = "weight"


class WeightCentralization(nn.Module):
    """Parametrization ``w -> w - mean(w[c])`` per output channel (MABN Sec. 4.2; METHODS.md MABN 2).

    ``forward(w)``: ``w`` of shape (C_out, C_in / groups, kh, kw) (any tensor with ndim >= 2
    works: the mean is taken over all dimensions but the first); returns a tensor of the same
    shape and dtype whose every ``[c]`` slice has zero mean.

    ``right_inverse(w)`` is the identity: assigning ``conv.weight = w`` stores ``w`` as the raw
    parameter (centralization is a projection, so any raw value is a valid preimage of its
    centralized value).

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
    register_state_dict_hook(conv, _save_weight_under_plain_name)  # public post hook where torch has it
    if hasattr(conv, "register_load_state_dict_pre_hook"):
        conv.register_load_state_dict_pre_hook(_load_weight_from_plain_name)
    else:
        conv._register_load_state_dict_pre_hook(_load_weight_from_plain_name, with_module=True)


def _is_our_hook(hook, fn) -> bool:
    return hook is fn or getattr(hook, "hook", None) is fn  # the load pre-hook is wrapped


def _remove_hooks(conv: nn.Module) -> None:
    for hooks, fn in ((conv._state_dict_hooks, _save_weight_under_plain_name),
                      (conv._load_state_dict_pre_hooks, _load_weight_from_plain_name)):
        for key in [k for k, h in hooks.items() if _is_our_hook(h, fn)]:
            del hooks[key]


def is_weight_centralized(conv: nn.Module) -> bool:
    """True if ``conv.weight`` is parametrized by :class:`WeightCentralization` (METHODS.md MABN 2).

    Args:
        conv: any ``nn.Module``. Raises nothing.
    """
    if not parametrize.is_parametrized(conv, "weight"):
        return False
    return any(isinstance(p, WeightCentralization) for p in conv.parametrizations.weight)


def centralize_conv_weight(conv: nn.Conv2d) -> nn.Conv2d:
    """Make ``conv`` use its weight centralized per output channel (MABN Sec. 4.2; METHODS.md MABN 2).

    In place and idempotent (a second call does nothing). ``conv.weight`` then returns the
    centralized (C_out, C_in / groups, kh, kw) tensor; the trained parameter is
    ``conv.parametrizations.weight.original`` (the former ``conv.weight`` object); state-dict
    keys stay ``prefix + "weight"`` (see the module docstring).

    Args:
        conv: an ``nn.Conv2d`` (Detectron2's ``Conv2d`` included); other ``nn.Module`` with a
            ``weight`` parameter of ndim >= 2 work too.
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
        conv: the module.
        bake: True: the centralized values become the plain ``conv.weight`` parameter (use this
            before exporting or folding, the result computes the same function); False: the raw,
            un-centralized parameter becomes ``conv.weight`` again.
    Returns:
        ``conv`` (its original class restored), without the key-renaming hooks.
    Raises:
        Nothing beyond what ``torch.nn.utils.parametrize.remove_parametrizations`` raises.
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
        relative_norm: ||W - center(W)||_F / ||W||_F for the stored (raw) weight W, i.e. the
            norm of the removed per-output-channel means relative to the weight's norm; 0 for a
            zero weight. 0 means the conv computes the same function centralized or not.
        random_level: 1 / sqrt(D), D = C_in / groups * kh * kw: the expected value of
            ``relative_norm`` for i.i.d. zero-mean weights (a fresh initialization, and the raw
            weights of a conv trained with centralization from one, whose per-channel means no
            gradient changes). A ``relative_norm`` well above it means the weights have
            per-channel means that training gave them, i.e. they were trained without
            centralization.
    """

    name: str
    shape: Tuple[int, ...]
    relative_norm: float
    random_level: float


@torch.no_grad()
def centralization_report(model: nn.Module) -> List[CentralizedConv]:
    """For every weight-centralized module of ``model``, the relative norm of what centralization
    removes from its stored weight (MABN Sec. 4.2; METHODS.md MABN 2).

    Per conv with raw weight W = ``conv.parametrizations.weight.original`` of shape
    (C_out, C_in / groups, kh, kw) and D = C_in / groups * kh * kw, in float64:
    ``relative_norm = sqrt(D * sum_c mean(W[c])^2) / ||W||_F`` (the Frobenius norm of the removed
    per-channel means, broadcast over the kernel, relative to W's). A pure function: reads the
    weights, changes nothing, logs nothing.

    Args:
        model: any ``nn.Module``.
    Returns:
        one :class:`CentralizedConv` per centralized module, in ``named_modules`` order (empty if
        none is centralized).
    Raises:
        nothing.
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
        report.append(CentralizedConv(
            name=name,
            shape=tuple(w.shape),
            relative_norm=removed / total if total > 0 else 0.0,
            random_level=1.0 / math.sqrt(d) if d else 0.0,
        ))
    return report
