"""Norm names for Detectron2's ``get_norm``: smallbn_d2's families next to Detectron2's own names.

The one mechanism by which smallbn_d2 extends Detectron2
---------------------------------------------------------
Detectron2 builds every normalization layer (ResNet stem and blocks, FPN, box/mask heads,
RetinaNet head, ...) through ``detectron2.layers.get_norm(norm, out_channels)``, whose table of
names is a literal inside the function, and the model modules hold their own reference to that
function (``from detectron2.layers import get_norm``). So the only way to add names that all of
them see is to change that one function object: :func:`install` (run by ``import smallbn_d2``)
replaces the *code* of ``detectron2.layers.batch_norm.get_norm`` with a call to :func:`get_norm`
below. It serves the names of :data:`~smallbn_d2.modeling.families.NORM_FAMILIES` and hands every
other name to an unchanged copy of the original function, so Detectron2's names (whatever the
installed version accepts: v0.6's, main's "LN", ...) keep working exactly as before. By the same
mechanism, the two places where Detectron2 recognizes norms by class and which decide how a
detector trains give the families' layers BN's treatment (:mod:`smallbn_d2.modeling.parity`):
``detectron2.solver.build.get_default_optimizer_params`` (``SOLVER.WEIGHT_DECAY_NORM``) and
``FrozenBatchNorm2d.convert_frozen_batchnorm`` (frozen stages, ``MODEL.BACKBONE.FREEZE_AT``).
Nothing else of Detectron2 is changed (docs/NORM_PARITY.md lists every norm-aware place).

Configured layers
-----------------
A family's layer is built with the hyperparameters in force (:func:`norm_hyperparameters`,
which :func:`smallbn_d2.build_model` puts in force from the config while Detectron2 builds the
model), so each layer is constructed once, configured. Where the layer sits decides two things,
read from the modules being constructed (the ``__init__`` frames on the call stack):

* inside a box, mask or RetinaNet head (:func:`head_types`) the family's head arguments apply
  (MABN: ``MODEL.MABN.HEAD_WARMUP_ITERS``);
* inside ``RetinaNetHead`` a family with ``per_level_in_retinanet`` is built as Detectron2's
  ``CycleBatchNormList`` of one layer per FPN level with a shared affine, as Detectron2 does for
  "BN". Detectron2 v0.6 also calls ``get_norm(norm, 1)`` there only to log the layer's type,
  which fails for "GN" (32 groups, 1 channel); such a call is answered with 32 channels, as later
  Detectron2 versions probe.

Unknown names raise ``KeyError`` listing every accepted name: Detectron2's, read from the
installed Detectron2's ``get_norm`` (:func:`detectron2_norm_names`), and smallbn_d2's.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import textwrap
import types
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from torch import nn

from .families import NORM_FAMILIES, NormFamily

__all__ = [
    "supported_norms",
    "detectron2_norm_names",
    "get_norm",
    "register_norm",
    "install",
    "norm_hyperparameters",
    "head_types",
    "per_level_retinanet_norms",
    "frozen_convertible_norms",
    "cuda_only_norms",
]

logger = logging.getLogger(__name__)

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


@functools.lru_cache(maxsize=None)
def detectron2_norm_names() -> Tuple[str, ...]:
    """The names the installed Detectron2's ``get_norm`` accepts, read from its source.

    Detectron2 keeps them as the keys of a dict literal inside ``get_norm``; they are read with
    ``ast`` from the installed function (v0.6: BN, SyncBN, FrozenBN, GN, nnSyncBN, naiveSyncBN,
    naiveSyncBN_N; main adds LN). Returns () if the source cannot be read (then unknown names
    are left to Detectron2's own ``KeyError``).
    """
    try:
        source = textwrap.dedent(inspect.getsource(_original_get_norm()))
    except (OSError, TypeError):
        return ()
    names: List[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict) and node.keys and all(
                isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            names += [k.value for k in node.keys if k.value not in names]
    return tuple(names)


def supported_norms() -> List[str]:
    """Every norm name ``get_norm`` accepts: the installed Detectron2's, then smallbn_d2's."""
    return list(detectron2_norm_names()) + [n for n in NORM_FAMILIES if n not in detectron2_norm_names()]


# ----------------------------------------------------------------------------- hyperparameters
@contextlib.contextmanager
def norm_hyperparameters(source: Union[Mapping[str, Any], Any, None]) -> Iterator[None]:
    """Build smallbn_d2's layers with these hyperparameters while the ``with`` block runs.

    Args:
        source: a Detectron2 ``CfgNode`` with smallbn_d2's keys (``add_smallbn_config``; validated
            here), or a mapping ``{family name: {constructor argument: value}}`` (e.g.
            ``{"CBN": {"window_size": 8, "burn_in": 120}}``, as a LazyConfig gives it; families
            not named get their defaults), or None (every layer with its defaults).
    Raises:
        ConfigValueError: an invalid value in a config (the message names the key).
        KeyError: a config without smallbn_d2's keys (the message names ``add_smallbn_config``),
            or an unknown family name in the mapping.
    """
    in_force = None if source is None else _resolve(source)
    token = _IN_FORCE.set(in_force)
    try:
        yield
    finally:
        _IN_FORCE.reset(token)


def _resolve(source) -> Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]]:
    from detectron2.config import CfgNode

    if isinstance(source, CfgNode):
        from ..config import validate_smallbn_config

        validate_smallbn_config(source)
        out = {}
        for name, family in NORM_FAMILIES.items():
            section = source.MODEL[family.config_section] if family.config_section else None
            out[name] = (family.layer_kwargs(section, in_head=False), family.layer_kwargs(section, in_head=True))
        return out
    unknown = sorted(set(source) - set(NORM_FAMILIES))
    if unknown:
        raise KeyError(f"norm_hyperparameters: unknown norm families {unknown}; allowed: {sorted(NORM_FAMILIES)}")
    return {name: (dict(kwargs), dict(kwargs)) for name, kwargs in source.items()}


def _modules_under_construction() -> List[nn.Module]:
    """The ``nn.Module`` instances whose ``__init__`` is on the call stack, innermost first."""
    found = []
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and (not found or found[-1] is not obj):
                found.append(obj)
        frame = frame.f_back
    return found


def _build(family: NormFamily, out_channels: int) -> nn.Module:
    from detectron2.layers import CycleBatchNormList
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    building = _modules_under_construction()
    in_head = any(isinstance(m, head_types()) for m in building)
    in_force = _IN_FORCE.get()
    kwargs = {} if in_force is None or family.name not in in_force else in_force[family.name][int(in_head)]
    retina = next((m for m in building if isinstance(m, RetinaNetHead)), None)
    if family.per_level_in_retinanet and retina is not None and hasattr(retina, "_num_features"):
        return CycleBatchNormList(length=retina._num_features, num_features=out_channels,
                                  bn_class=functools.partial(family.layer_class, **kwargs))
    return family.layer_class(out_channels, **kwargs)


# ----------------------------------------------------------------------------- get_norm
def get_norm(norm: Union[str, Callable, None], out_channels: int):
    """Detectron2's ``get_norm`` extended with smallbn_d2's norm families.

    Args:
        norm: a name (``supported_norms()``), "" or None (no norm), or a callable
            ``(out_channels) -> nn.Module``.
        out_channels: C of the (N, C, H, W) tensor to normalize.
    Returns:
        ``nn.Module`` or None. A family's layer is built with the hyperparameters in force
        (:func:`norm_hyperparameters`; the layer's defaults outside one).
    Raises:
        KeyError: unknown name; the message lists every accepted name.
        ValueError: an invalid hyperparameter in force (raised by the layer's constructor).
    """
    if isinstance(norm, str) and norm in NORM_FAMILIES:
        return _build(NORM_FAMILIES[norm], out_channels)
    if isinstance(norm, str) and norm:
        known = detectron2_norm_names()
        if known and norm not in known:
            raise KeyError(f"Unknown norm {norm!r}; supported norms: {', '.join(supported_norms())}")
        if out_channels == 1:
            from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

            if any(isinstance(m, RetinaNetHead) for m in _modules_under_construction()):
                out_channels = 32  # Detectron2 v0.6's type probe in RetinaNetHead (see the module docstring)
    return _original_get_norm()(norm, out_channels)


def _trampoline(norm, out_channels):  # its code becomes Detectron2's get_norm's code
    return _smallbn_get_norm(norm, out_channels)  # noqa: F821 (a global of Detectron2's module)


def install() -> None:
    """Route ``detectron2.layers.get_norm`` (every reference to it) through :func:`get_norm`, and
    give the families' layers BN's treatment where Detectron2 recognizes norms by class
    (``get_default_optimizer_params``, ``FrozenBatchNorm2d.convert_frozen_batchnorm``:
    :mod:`smallbn_d2.modeling.parity`).

    Idempotent. Raises nothing.
    """
    global _d2_get_norm
    from detectron2.layers import batch_norm

    from . import parity

    parity.install()
    target = batch_norm.get_norm
    existing = batch_norm.__dict__.get("_smallbn_get_norm")
    if existing is not None:
        _d2_get_norm = _d2_get_norm or existing.__globals__.get("_d2_get_norm")
        return
    _d2_get_norm = types.FunctionType(target.__code__, target.__globals__, "detectron2_get_norm",
                                      target.__defaults__, target.__closure__)
    batch_norm.__dict__["_smallbn_get_norm"] = get_norm
    target.__code__ = _trampoline.__code__


def register_norm(family: NormFamily) -> None:
    """Add a norm family (served by ``get_norm`` under ``family.name``).

    Args:
        family: a :class:`~smallbn_d2.modeling.families.NormFamily` whose ``layer_class``
            subclasses ``smallbn_d2.layers.IterationNormBase``.
    Raises:
        TypeError: ``family`` is not a ``NormFamily``.
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


@functools.lru_cache(maxsize=None)
def _detectron2_probe_layers() -> Dict[str, nn.Module]:
    """One layer of 32 channels per Detectron2 name, built by the installed Detectron2."""
    layers = {}
    for name in detectron2_norm_names():
        try:
            layers[name] = _original_get_norm()(name, 32)
        except Exception:  # a name whose layer cannot be built here: not classified
            continue
    return layers


def _detectron2_bn_names() -> Tuple[str, ...]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return tuple(n for n, m in _detectron2_probe_layers().items()
                 if isinstance(m, _BatchNorm) and m.track_running_stats)


def cuda_only_norms() -> Tuple[str, ...]:
    """Detectron2's names that build ``torch.nn.SyncBatchNorm``, which trains only on CUDA with
    several processes (v0.6 and main: "SyncBN", "nnSyncBN")."""
    return tuple(n for n, m in _detectron2_probe_layers().items() if isinstance(m, nn.SyncBatchNorm))


def frozen_convertible_norms() -> Tuple[str, ...]:
    """Names whose layers become ``FrozenBatchNorm2d`` in a converted model: Detectron2's names
    that build a BatchNorm with running statistics (asked of the installed Detectron2) and every
    smallbn_d2 family."""
    return _detectron2_bn_names() + tuple(n for n in NORM_FAMILIES if n not in _detectron2_bn_names())
