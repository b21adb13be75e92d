"""BN's treatment by Detectron2, given to CBN / NaiveCBN / MABN: optimizer hyperparameters, frozen stages.

Detectron2 treats normalization layers specially in two places that decide how a detector
trains, and both recognize norms by a fixed list of classes that cannot know smallbn_d2's layers
(every family's layer subclasses :class:`~smallbn_d2.layers.IterationNormBase`, an ``nn.Module``):

* **Optimizer hyperparameters.** ``detectron2.solver.build.get_default_optimizer_params`` gives
  the parameters of a module in its local tuple of norm classes (``torch.nn.BatchNorm2d``,
  ``GroupNorm``, ...) ``weight_decay_norm`` (``SOLVER.WEIGHT_DECAY_NORM``, 0.0 in the LazyConfig
  model zoo's ``common/optim.py``); every caller uses it: ``build_optimizer`` (so
  ``DefaultTrainer`` and smallbn_d2's ``Trainer``), the model zoo's ``L(get_default_optimizer_params)``
  and user code. Without this module, CBN/MABN gamma and beta would get ``weight_decay``.
  :func:`get_default_optimizer_params` below runs Detectron2's unchanged function on a *BN view*
  of the model (:func:`bn_view`): the same module tree, the same module names and the very same
  ``nn.Parameter`` objects, where each CBN/MABN layer is stood in for by a genuine
  ``torch.nn.BatchNorm2d`` holding that layer's parameters. So every rule of the installed
  Detectron2 (``weight_decay_norm``, ``base_lr``, the bias rules, ``overrides``, main's name-based
  ``lr_factor_func``, the first-holder-wins rule for shared parameters) applies to a CBN/MABN
  parameter exactly as to a BN parameter at the same place, and nothing of Detectron2's rules is
  re-implemented here.
* **Frozen stages.** ``MODEL.BACKBONE.FREEZE_AT`` (and ``freeze_at`` of LazyConfig backbones)
  freezes ResNet/RegNet stages with ``CNNBlockBase.freeze()``, which sets ``requires_grad=False``
  and calls ``FrozenBatchNorm2d.convert_frozen_batchnorm`` (it converts only
  ``BatchNorm2d``/``SyncBatchNorm``). :func:`convert_frozen_batchnorm` below extends that
  classmethod: a CBN/NaiveCBN/MABN layer becomes a ``FrozenBatchNorm2d`` with the layer's
  eval-mode affine (``eval_affine()``, converted by :mod:`smallbn_d2.deploy.to_frozen_bn`, the
  function of ``smallbn_d2.convert_to_frozen_bn``); its producing conv is released (CBN stops
  capturing the conv's input; MABN's weight centralization is baked into a plain weight), so a
  frozen stage is plain convs and FrozenBN, as with BN. Detectron2 freezes while it builds the
  backbone, before the wiring step attaches convs, so there the convs were never touched.
  Everything else is handed to Detectron2's unchanged classmethod.

Both are installed by :func:`smallbn_d2.modeling.norms.install` (when ``smallbn_d2.modeling`` is
first imported), by the
mechanism it uses for ``get_norm``: the *code* of Detectron2's function is replaced by a call
into this module, so every reference to it (taken before or after the install; the
LazyConfig ``_target_`` ``detectron2.solver.build.get_default_optimizer_params``) behaves the
same, and its name, module, docstring, signature and defaults stay Detectron2's.
"""
from __future__ import annotations

import inspect
import logging
import types
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .. import compat
from ..layers import IterationNormBase, is_weight_centralized, remove_weight_centralization

__all__ = ["bn_view", "get_default_optimizer_params", "convert_frozen_batchnorm", "redirect_function", "install",
           "FROZEN_FROM"]

logger = logging.getLogger(__name__)

#: Attribute set on each FrozenBatchNorm2d made from a CBN/MABN layer: the layer's class name.
FROZEN_FROM = "smallbn_d2_frozen_from"

_d2_get_default_optimizer_params: Optional[Callable] = None  # unchanged copies, set by install()
_d2_convert_frozen_batchnorm: Optional[Callable] = None


# ----------------------------------------------------------------------------- optimizer parameters
def _stand_in(layer: IterationNormBase, children: Dict[str, Optional[nn.Module]]) -> nn.BatchNorm2d:
    """A genuine ``nn.BatchNorm2d`` holding ``layer``'s own parameter objects and ``children``."""
    bn = nn.BatchNorm2d(layer.num_features, affine=False, track_running_stats=False)
    compat.own_parameters(bn).clear()
    compat.own_parameters(bn).update(compat.own_parameters(layer))
    compat.own_children(bn).update(children)
    return bn


def _mirror(module: nn.Module, memo: Dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a module held at two places stays one module (named_modules dedup)
        return memo[id(module)]
    children = {name: (None if child is None else _mirror(child, memo))
                for name, child in compat.own_children(module).items()}
    if isinstance(module, IterationNormBase):
        node: nn.Module = _stand_in(module, children)
    elif all(children[name] is child for name, child in compat.own_children(module).items()):
        node = module  # no CBN/MABN below: the module itself
    else:  # an ancestor of a CBN/MABN layer: its own parameters, mirrored children, same order
        node = nn.Module()
        compat.own_parameters(node).update(compat.own_parameters(module))
        compat.own_children(node).update(children)
    memo[id(module)] = node
    return node


def bn_view(model: nn.Module) -> nn.Module:
    """``model`` as Detectron2 would see it with BatchNorm2d in place of every CBN/MABN layer.

    A module tree with ``model``'s module names and order, holding ``model``'s own
    ``nn.Parameter`` objects (not copies), in which each :class:`IterationNormBase` layer is a
    ``torch.nn.BatchNorm2d`` whose parameters are that layer's; subtrees without such a layer
    are ``model``'s own modules, and the ancestors of such layers are plain ``nn.Module``
    containers holding the ancestors' own parameters. Only for reading parameters (the view
    cannot run a forward pass). Returns ``model`` itself if it holds no CBN/MABN layer.
    """
    return _mirror(model, {})


def get_default_optimizer_params(model: nn.Module, *args: Any, **kwargs: Any):
    """Detectron2's ``get_default_optimizer_params`` with BN's treatment for CBN/MABN parameters.

    Runs the installed Detectron2's unchanged function on :func:`bn_view` ``(model)`` with all
    other arguments passed through, so a CBN/NaiveCBN/MABN layer's gamma/beta get exactly what a
    ``BatchNorm2d`` at the same place would get (``weight_decay_norm``, lr, bias rules,
    ``overrides``, ``lr_factor_func`` by the same names). Installed as the code of Detectron2's
    function (module docstring); its arguments, return value (a list of param-group dicts
    holding ``model``'s parameters) and errors are Detectron2's.
    """
    return _d2_get_default_optimizer_params(bn_view(model), *args, **kwargs)


def _forwarding_code(target: Callable, handler_global: str) -> types.CodeType:
    """Code with ``target``'s exact parameter list that returns ``handler_global(<the same
    arguments>)`` (positional-or-keyword ones positionally), looked up in ``target``'s globals."""
    params, call, star = [], [], False
    for p in inspect.signature(target).parameters.values():
        if p.kind is p.POSITIONAL_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
            params.append(p.name)
            call.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
        elif p.kind is p.KEYWORD_ONLY:
            if not star:
                params.append("*")
                star = True
            params.append(p.name)
            call.append(f"{p.name}={p.name}")
        else:
            params.append(f"**{p.name}")
            call.append(f"**{p.name}")
    source = f"def {target.__name__}({', '.join(params)}):\n    return {handler_global}({', '.join(call)})\n"
    namespace: Dict[str, Any] = {}
    exec(compile(source, __file__, "exec"), namespace)
    return namespace[target.__name__].__code__


def _unchanged_copy(target: Callable, name: str) -> Callable:
    copy = types.FunctionType(target.__code__, target.__globals__, name, target.__defaults__, target.__closure__)
    copy.__kwdefaults__ = target.__kwdefaults__
    copy.__qualname__ = target.__qualname__
    return copy


def redirect_function(module: types.ModuleType, target: Callable, handler: Callable,
                      make_code: Callable[[], types.CodeType]) -> Callable:
    """Make Detectron2's function ``target`` (a function of ``module``) call ``handler``, once.

    ``handler`` is put in ``module``'s globals as ``_smallbn_<handler name>``, which the code from
    ``make_code()`` calls; that code replaces ``target``'s, so every reference to ``target`` (taken
    before or after) runs it, and ``target`` keeps its name, module, docstring and signature. An
    unchanged copy of ``target`` is kept in ``module``'s globals as
    ``_smallbn_original_<target name>``. A second call (e.g. after a reload of smallbn_d2's
    modules) only points the global at the new ``handler``.

    Returns:
        the unchanged copy of ``target`` (named ``detectron2_<name>``). Raises nothing.
    """
    original_key = f"_smallbn_original_{target.__name__}"
    module.__dict__[f"_smallbn_{handler.__name__}"] = handler
    if original_key not in module.__dict__:
        module.__dict__[original_key] = _unchanged_copy(target, f"detectron2_{target.__name__}")
        target.__code__ = make_code()
    return module.__dict__[original_key]


def _install_optimizer_params() -> None:
    global _d2_get_default_optimizer_params
    from detectron2.solver import build

    target = build.get_default_optimizer_params
    _d2_get_default_optimizer_params = redirect_function(
        build, target, get_default_optimizer_params,
        lambda: _forwarding_code(target, "_smallbn_get_default_optimizer_params"))


# ----------------------------------------------------------------------------- frozen stages
def _frozen_layer(cls: type, layer: IterationNormBase) -> nn.Module:
    from ..deploy.to_frozen_bn import frozen_bn_from_affine as _frozen

    frozen = _frozen(*layer.eval_affine())
    # Detectron2 main's FrozenBN registers BN's counter as a buffer (None until set; named_buffers
    # skips None buffers, hence hasattr); v0.6's has none
    if hasattr(frozen, "num_batches_tracked"):
        counter = getattr(layer, "num_batches_tracked", None)
        frozen.num_batches_tracked = (counter.detach().clone() if counter is not None
                                      else frozen.running_mean.new_zeros((), dtype=torch.long))
    conv = layer.conv
    layer.release_conv()
    if conv is not None and is_weight_centralized(conv):
        _to_bake.append(conv)  # after the traversal: baking changes the conv's children
    setattr(frozen, FROZEN_FROM, type(layer).__name__)
    return frozen


_to_bake: List[nn.Module] = []  # convs of converted MABN layers, baked when the outermost call ends
_depth = 0


def convert_frozen_batchnorm(cls: type, module: nn.Module) -> nn.Module:
    """``FrozenBatchNorm2d.convert_frozen_batchnorm`` that also converts CBN/NaiveCBN/MABN.

    Args:
        cls: ``FrozenBatchNorm2d`` (the classmethod's class).
        module: any ``nn.Module``; a CBN/MABN layer (shape (C,) statistics) returns a new
            ``FrozenBatchNorm2d`` of C channels computing the layer's eval-mode output (its
            producing conv released, MABN's weight centralization baked into it); anything else
            goes to Detectron2's unchanged classmethod, which converts BatchNorm/SyncBatchNorm
            and recurses into children (back through this function).
    Returns:
        as Detectron2's: a new module for a norm layer, else ``module`` converted in place.
    """
    global _depth
    _depth += 1
    try:
        if isinstance(module, IterationNormBase):
            return _frozen_layer(cls, module)
        return _d2_convert_frozen_batchnorm(cls, module)
    finally:
        _depth -= 1
        if _depth == 0:
            for conv in _to_bake:
                if is_weight_centralized(conv):
                    remove_weight_centralization(conv, bake=True)
            _to_bake.clear()


def _frozen_trampoline(cls, module):  # its code becomes Detectron2's classmethod's code
    return _smallbn_convert_frozen_batchnorm(cls, module)  # noqa: F821 (a global of Detectron2's module)


def _install_frozen_conversion() -> None:
    global _d2_convert_frozen_batchnorm
    from detectron2.layers import batch_norm

    target = batch_norm.FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"].__func__
    _d2_convert_frozen_batchnorm = redirect_function(batch_norm, target, convert_frozen_batchnorm,
                                                     lambda: _frozen_trampoline.__code__)


def install() -> None:
    """Give CBN/MABN BN's treatment in Detectron2's optimizer parameters and frozen stages
    (module docstring). Idempotent; called by :func:`smallbn_d2.modeling.norms.install`.
    Raises nothing."""
    _install_optimizer_params()
    _install_frozen_conversion()
