"""Norm names for Detectron2's ``get_norm``: "CBN", "NaiveCBN", "MABN" next to its own names.

Detectron2 v0.6 builds every normalization layer (ResNet stem and blocks, FPN, box/mask heads,
RetinaNet head, semantic-segmentation head) through ``detectron2.layers.get_norm(norm,
out_channels)``, whose table of names is a literal inside the function, and the model modules
hold their own reference to that function (``from detectron2.layers import get_norm``). So the
only way to add names that all of them see is to change that one function object:
:func:`install` replaces the *code* of ``detectron2.layers.batch_norm.get_norm`` with a call to
:func:`get_norm` below, which serves the names of :data:`NORM_REGISTRY` and hands every other
name to a copy of the original function. ``import smallbn_d2`` calls :func:`install`.

Detectron2's names keep working unchanged; an unknown name raises ``KeyError`` listing every
supported name.
"""
from __future__ import annotations

import types
from typing import Callable, Dict, List, Union

from torch import nn

__all__ = ["NORM_REGISTRY", "DETECTRON2_NORMS", "supported_norms", "get_norm", "register_norm", "install"]

#: Norm names added by smallbn_d2 -> callable ``(out_channels: int) -> nn.Module`` constructing
#: the layer with default hyperparameters (``smallbn_d2.prepare_norms`` then applies the config's).
#: A plain dict: fvcore's Registry names entries after the object, not after the norm name.
NORM_REGISTRY: Dict[str, Callable[[int], nn.Module]] = {}

# The names Detectron2 v0.6's get_norm knows (its table is not inspectable).
DETECTRON2_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")

_d2_get_norm: Callable = None  # a copy of the original function, set by install()


def supported_norms() -> List[str]:
    """All norm names ``get_norm`` accepts: Detectron2's, then smallbn_d2's."""
    return list(DETECTRON2_NORMS) + sorted(NORM_REGISTRY)


def get_norm(norm: Union[str, Callable, None], out_channels: int):
    """Detectron2's ``get_norm`` extended with :data:`NORM_REGISTRY`.

    Args:
        norm: a name (``supported_norms()``), "" or None (no norm), or a callable
            ``(out_channels) -> nn.Module``.
        out_channels: C of the (N, C, H, W) tensor to normalize.
    Returns:
        ``nn.Module`` or None.
    Raises:
        KeyError: unknown name; the message lists every supported name.
    """
    if isinstance(norm, str) and norm:
        if norm in NORM_REGISTRY:
            return NORM_REGISTRY[norm](out_channels)
        if norm not in DETECTRON2_NORMS:
            raise KeyError(f"Unknown norm {norm!r}; supported norms: {', '.join(supported_norms())}")
    return _d2_get_norm(norm, out_channels)


def _trampoline(norm, out_channels):  # its code becomes detectron2's get_norm's code
    return _smallbn_get_norm(norm, out_channels)  # noqa: F821 (a global of detectron2's module)


def install() -> None:
    """Route ``detectron2.layers.get_norm`` (every reference to it) through :func:`get_norm`.

    Idempotent. Raises nothing.
    """
    global _d2_get_norm
    from detectron2.layers import batch_norm

    target = batch_norm.get_norm
    if batch_norm.__dict__.get("_smallbn_get_norm") is not None:
        return
    _d2_get_norm = types.FunctionType(target.__code__, target.__globals__, "detectron2_get_norm",
                                      target.__defaults__, target.__closure__)
    batch_norm.__dict__["_smallbn_get_norm"] = get_norm
    target.__code__ = _trampoline.__code__


def register_norm(name: str, factory: Callable[[int], nn.Module]) -> None:
    """Register ``factory`` under ``name`` (see :data:`NORM_REGISTRY`).

    Raises:
        ValueError: ``name`` is one of Detectron2's own names or already registered.
    """
    if name in DETECTRON2_NORMS or name in NORM_REGISTRY:
        raise ValueError(f"norm name {name!r} is taken; taken names: {', '.join(supported_norms())}")
    NORM_REGISTRY[name] = factory
