"""Norm names for Detectron2's ``get_norm``: smallbn_d2's families next to Detectron2's own names.

The one extension of Detectron2: its ``get_norm`` keeps its table of names inside the function and
each model module holds its own reference to it, so :func:`install` replaces the function's *code*
with a call to :func:`get_norm`, which builds the families' layers with the hyperparameters in force
(:func:`norm_hyperparameters`) and hands every other name to Detectron2's unchanged function.
:func:`place_norms` decides after the build what depends on where a layer sits. See
docs/ARCHITECTURE.md ("One extension point", "Layers built configured") and docs/NORM_PARITY.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from torch import nn

from .. import compat
from ..families import NORM_FAMILIES, NormFamily, family_of
from ..layers import IterationNormBase

__all__ = ["supported_norms", "detectron2_norm_names", "DETECTRON2_NORM_NAMES", "get_norm", "register_norm", "install",
           "norm_hyperparameters", "head_types", "place_norms", "retinanet_heads", "per_level_retinanet_norms",
           "frozen_convertible_norms", "cuda_only_norms"]

_d2_get_norm: Optional[Callable] = None  # an unchanged copy of Detectron2's function, set by install()

#: Hyperparameters in force: family name -> (kwargs anywhere, kwargs inside heads); None: defaults.
_IN_FORCE: contextvars.ContextVar[Optional[Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]]]] = \
    contextvars.ContextVar("smallbn_d2_norm_hyperparameters", default=None)


def head_types() -> Tuple[type, ...]:
    """Modules whose layers count as "heads" (``MODEL.MABN.HEAD_WARMUP_ITERS``): Detectron2's
    ``FastRCNNConvFCHead``, ``BaseMaskRCNNHead`` and ``RetinaNetHead`` (subclasses included)."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
    from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead

    return (FastRCNNConvFCHead, BaseMaskRCNNHead, RetinaNetHead)


# ----------------------------------------------------------------------------- Detectron2's names
def _original_get_norm() -> Callable:
    if _d2_get_norm is not None:
        return _d2_get_norm
    from detectron2.layers import batch_norm

    return batch_norm.get_norm


#: Every name Detectron2's ``get_norm`` has accepted (v0.6: the first seven; main adds "LN");
#: tests/test_norm_registry.py checks that the installed Detectron2 accepts no other name.
DETECTRON2_NORM_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


@functools.lru_cache(maxsize=None)
def _detectron2_probe() -> Dict[str, Optional[nn.Module]]:
    """Each name of :data:`DETECTRON2_NORM_NAMES` the installed ``get_norm`` accepts (it answers the
    others with ``KeyError``) -> its layer of 32 channels, None if that cannot be built here."""
    layers: Dict[str, Optional[nn.Module]] = {}
    for name in DETECTRON2_NORM_NAMES:
        try:
            layers[name] = _original_get_norm()(name, 32)
        except KeyError:
            continue
        except Exception:  # known, but its layer cannot be built here: still Detectron2's name
            layers[name] = None
    return layers


def detectron2_norm_names() -> Tuple[str, ...]:
    """The names of :data:`DETECTRON2_NORM_NAMES` that the installed ``get_norm`` accepts, asked of
    it (v0.6: no "LN"). Raises nothing."""
    return tuple(_detectron2_probe())


def supported_norms() -> List[str]:
    """Every norm name ``get_norm`` accepts: the installed Detectron2's, then smallbn_d2's."""
    return list(detectron2_norm_names()) + [n for n in NORM_FAMILIES if n not in detectron2_norm_names()]


# ----------------------------------------------------------------------------- hyperparameters
@contextlib.contextmanager
def norm_hyperparameters(source: Union[Mapping[str, Any], Any, None],
                         head: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Iterator[None]:
    """Build smallbn_d2's layers with these hyperparameters while the ``with`` block runs.

    Args:
        source: a ``CfgNode`` with smallbn_d2's keys (validated here), or, as a LazyConfig gives it,
            ``{family name: {constructor argument: value}}`` (other families: defaults), or None.
        head: with a mapping ``source``: the arguments that differ inside the heads, merged over
            ``source`` (a LazyConfig's ``smallbn.head_norms``); applied by :func:`place_norms`.
    Raises:
        ConfigValueError: an invalid value in a config (the message names the key).
        KeyError: a config without smallbn_d2's keys (the message names ``add_smallbn_config``),
            or an unknown family name in the mapping.
        TypeError: ``head`` given with a ``CfgNode``.
    """
    in_force = None if source is None and head is None else _resolve(source, head)
    token = _IN_FORCE.set(in_force)
    try:
        yield
    finally:
        _IN_FORCE.reset(token)


def _resolve(source, head) -> Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]]:
    from detectron2.config import CfgNode

    if isinstance(source, CfgNode):
        if head is not None:
            raise TypeError("norm_hyperparameters: head arguments come from the config itself; pass head=None "
                            "with a CfgNode")
        from ..config import validate_smallbn_config

        validate_smallbn_config(source)
        out = {}
        for name, family in NORM_FAMILIES.items():
            section = source.MODEL[family.config_section] if family.config_section else None
            out[name] = (family.layer_kwargs(section, in_head=False), family.layer_kwargs(section, in_head=True))
        return out
    source, head = dict(source or {}), dict(head or {})
    unknown = sorted((set(source) | set(head)) - set(NORM_FAMILIES))
    if unknown:
        raise KeyError(f"norm_hyperparameters: unknown norm families {unknown}; allowed: {sorted(NORM_FAMILIES)}")
    return {name: (dict(source.get(name) or {}), {**(source.get(name) or {}), **(head.get(name) or {})})
            for name in set(source) | set(head)}


def _kwargs(family: NormFamily, in_head: bool) -> Dict[str, Any]:
    in_force = _IN_FORCE.get()
    return {} if in_force is None or family.name not in in_force else dict(in_force[family.name][int(in_head)])


# ----------------------------------------------------------------------------- placement
def retinanet_heads(model: nn.Module) -> Iterator[Tuple[nn.Module, int]]:
    """Yield ``(head, number of FPN levels)`` for the ``RetinaNetHead`` of every Detectron2
    ``RetinaNet`` in ``model`` (itself included); levels: ``len(retinanet.head_in_features)``."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead

    for module in model.modules():
        if isinstance(module, RetinaNet) and isinstance(getattr(module, "head", None), RetinaNetHead):
            yield module.head, len(module.head_in_features)


def place_norms(model: nn.Module) -> nn.Module:
    """Decide, from the built model, what depends on where a layer sits; in place, returns ``model``.

    Run right after Detectron2 (or ``instantiate`` of a LazyConfig) built ``model``, inside the same
    :func:`norm_hyperparameters` block, before :func:`~smallbn_d2.modeling.wiring.prepare_norms`.
    Layers in the heads (:func:`head_types`) whose head arguments differ are rebuilt with them; in
    the head of a ``RetinaNet`` a family with ``per_level_in_retinanet`` becomes Detectron2's
    ``CycleBatchNormList`` of one layer per FPN level with a shared affine, as Detectron2 does for
    "BN". Rebuilt layers start fresh, so the model must not be trained or loaded yet.

    Raises:
        ValueError: an invalid head argument (raised by the layer's constructor).
    """
    from detectron2.layers import CycleBatchNormList

    levels = {id(head): n for head, n in retinanet_heads(model)}
    for head in [m for m in model.modules() if isinstance(m, head_types())]:
        layers = [(parent, name, child) for parent in head.modules() for name, child in parent.named_children()
                  if isinstance(child, IterationNormBase)]
        for parent, name, layer in layers:
            family = family_of(type(layer))
            if family is None or isinstance(parent, CycleBatchNormList):
                continue
            kwargs = _kwargs(family, in_head=True)
            if family.per_level_in_retinanet and id(head) in levels:
                new = CycleBatchNormList(length=levels[id(head)], num_features=layer.num_features,
                                         bn_class=functools.partial(family.layer_class, **kwargs))
            elif kwargs != _kwargs(family, in_head=False):
                new = family.layer_class(layer.num_features, **kwargs)
            else:
                continue
            state = next(iter(layer.state_dict().values()), None)
            setattr(parent, name, new if state is None else new.to(state.device))
    return model


# ----------------------------------------------------------------------------- get_norm
def get_norm(norm: Union[str, Callable, None], out_channels: int):
    """Detectron2's ``get_norm`` extended with smallbn_d2's norm families.

    Args:
        norm: a name (``supported_norms()``), "" or None (no norm), or a callable
            ``(out_channels) -> nn.Module``.
        out_channels: C of the (N, C, H, W) tensor to normalize.
    Returns:
        ``nn.Module`` or None; a family's layer built with the hyperparameters in force. Other
        names go to Detectron2's function (:func:`smallbn_d2.compat.get_norm_channels`).
    Raises:
        KeyError: unknown name; the message lists every accepted name.
        ValueError: an invalid hyperparameter in force (raised by the layer's constructor).
    """
    if isinstance(norm, str) and norm in NORM_FAMILIES:
        family = NORM_FAMILIES[norm]
        return family.layer_class(out_channels, **_kwargs(family, in_head=False))
    if isinstance(norm, str) and norm:
        known = detectron2_norm_names()
        if known and norm not in known:
            raise KeyError(f"Unknown norm {norm!r}; supported norms: {', '.join(supported_norms())}")
        out_channels = compat.get_norm_channels(norm, out_channels)
    return _original_get_norm()(norm, out_channels)


def install() -> None:
    """Route ``detectron2.layers.get_norm`` (every reference to it) through :func:`get_norm`, and give
    the families' layers BN's treatment (:func:`smallbn_d2.modeling.parity.install`). Idempotent.
    Raises nothing."""
    global _d2_get_norm
    from detectron2.layers import batch_norm

    from . import parity

    parity.install()
    _d2_get_norm = parity.redirect_function(batch_norm, batch_norm.get_norm, get_norm)


def register_norm(family: NormFamily) -> None:
    """Add a norm family, served by ``get_norm`` under ``family.name``.

    Raises:
        TypeError: ``family`` is not a :class:`~smallbn_d2.families.NormFamily`.
        ValueError: ``family.name`` is one of Detectron2's names or already registered.
    """
    if not isinstance(family, NormFamily):
        raise TypeError(f"register_norm needs a NormFamily, got {type(family).__name__}")
    if family.name in detectron2_norm_names() or family.name in NORM_FAMILIES:
        raise ValueError(f"norm name {family.name!r} is taken; taken names: {', '.join(supported_norms())}")
    NORM_FAMILIES[family.name] = family


# ----------------------------------------------------------------------------- questions about names
#: Names for which Detectron2's own ``RetinaNetHead`` builds per-level norms (its rule, v0.6 and main).
DETECTRON2_PER_LEVEL_RETINANET_NORMS = ("BN", "SyncBN")


def per_level_retinanet_norms() -> Tuple[str, ...]:
    """``MODEL.RETINANET.NORM`` names that give RetinaNet's head one norm per FPN level:
    Detectron2's "BN"/"SyncBN" and the families with ``per_level_in_retinanet``."""
    return DETECTRON2_PER_LEVEL_RETINANET_NORMS + tuple(
        n for n, f in NORM_FAMILIES.items() if f.per_level_in_retinanet)


def _detectron2_bn_names() -> Tuple[str, ...]:
    return tuple(n for n, m in _detectron2_probe().items()
                 if isinstance(m, compat.torch_batch_norm_base()) and m.track_running_stats)


def cuda_only_norms() -> Tuple[str, ...]:
    """Detectron2's names that build ``torch.nn.SyncBatchNorm``, which trains only on CUDA with
    several processes (v0.6 and main: "SyncBN", "nnSyncBN")."""
    return tuple(n for n, m in _detectron2_probe().items() if isinstance(m, nn.SyncBatchNorm))


def frozen_convertible_norms() -> Tuple[str, ...]:
    """Names whose layers become ``FrozenBatchNorm2d`` in a converted model: Detectron2's names that
    build a BatchNorm with running statistics (asked of the installed Detectron2), then every family."""
    return _detectron2_bn_names() + tuple(n for n in NORM_FAMILIES if n not in _detectron2_bn_names())
