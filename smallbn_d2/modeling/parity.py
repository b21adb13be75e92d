"""BN's treatment by Detectron2, given to CBN / NaiveCBN / MABN: optimizer hyperparameters, frozen stages.

Detectron2 recognizes norms by fixed tuples of classes in two places that decide how a detector
trains (docs/NORM_PARITY.md): ``detectron2.solver.build.get_default_optimizer_params``
(``SOLVER.WEIGHT_DECAY_NORM``; ``build_optimizer``, the LazyConfig zoo's ``common/optim.py``) and
``FrozenBatchNorm2d.convert_frozen_batchnorm`` (``CNNBlockBase.freeze``, ``MODEL.BACKBONE.FREEZE_AT``).
:func:`install` redirects both here with :func:`redirect_function`, the mechanism of the ``get_norm``
extension (:mod:`smallbn_d2.modeling.norms`), and Detectron2's unchanged functions do the rest.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .. import compat
from ..layers import IterationNormBase, is_weight_centralized, remove_weight_centralization

__all__ = ["bn_view", "get_default_optimizer_params", "convert_frozen_batchnorm", "redirect_function", "install",
           "FROZEN_FROM"]

#: Attribute set on each FrozenBatchNorm2d made from a CBN/MABN layer: the layer's class name.
FROZEN_FROM = "smallbn_d2_frozen_from"

_d2_get_default_optimizer_params: Optional[Callable] = None  # unchanged copies, set by install()
_d2_convert_frozen_batchnorm: Optional[Callable] = None


# ----------------------------------------------------------------------------- redirection
#: How a forwarding call passes each kind of parameter (positional ones by position).
_PASS = {inspect.Parameter.VAR_POSITIONAL: "*{}", inspect.Parameter.KEYWORD_ONLY: "{0}={0}",
         inspect.Parameter.VAR_KEYWORD: "**{}"}


def _forwarding_code(target: Callable, handler_global: str) -> types.CodeType:
    """Code with ``target``'s parameter list that returns ``handler_global(<the same arguments>)``."""
    sig = inspect.signature(target)
    bare = sig.replace(parameters=[p.replace(default=p.empty, annotation=p.empty) for p in sig.parameters.values()],
                       return_annotation=sig.empty)  # the defaults stay target's own __defaults__
    call = ", ".join(_PASS.get(p.kind, "{}").format(p.name) for p in sig.parameters.values())
    namespace: Dict[str, Any] = {}
    exec(compile(f"def {target.__name__}{bare}:\n    return {handler_global}({call})\n", __file__, "exec"), namespace)
    return namespace[target.__name__].__code__


def redirect_function(module: types.ModuleType, target: Callable, handler: Callable) -> Callable:
    """Make Detectron2's function ``target`` (a function of ``module``) call ``handler``, once.

    ``handler`` goes into ``module``'s globals as ``_smallbn_<handler name>``, and ``target``'s code
    is replaced by a call to it with the same arguments, so every reference to ``target`` (taken
    before or after) runs it and ``target`` keeps its name, module, docstring and signature. An
    unchanged copy of ``target`` is kept in ``module``'s globals as ``_smallbn_original_<name>``; a
    second call (e.g. after a reload of smallbn_d2) only points the global at the new ``handler``.

    Returns:
        the unchanged copy of ``target`` (named ``detectron2_<name>``). Raises nothing.
    """
    original_key = f"_smallbn_original_{target.__name__}"
    handler_global = f"_smallbn_{handler.__name__}"
    module.__dict__[handler_global] = handler
    if original_key not in module.__dict__:
        copy = types.FunctionType(target.__code__, target.__globals__, f"detectron2_{target.__name__}",
                                  target.__defaults__, target.__closure__)
        copy.__kwdefaults__ = target.__kwdefaults__
        copy.__qualname__ = target.__qualname__
        module.__dict__[original_key] = copy
        target.__code__ = _forwarding_code(target, handler_global)
    return module.__dict__[original_key]


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
    """``model`` as Detectron2 would see it with ``nn.BatchNorm2d`` in place of every CBN/MABN layer:
    the same module names and order and the very same ``nn.Parameter`` objects, for reading
    parameters only (no forward pass). ``model`` itself if it holds no CBN/MABN layer."""
    return _mirror(model, {})


def get_default_optimizer_params(model: nn.Module, *args: Any, **kwargs: Any):
    """Detectron2's ``get_default_optimizer_params`` run unchanged on :func:`bn_view` ``(model)``.

    A CBN/NaiveCBN/MABN layer's gamma/beta get what a ``BatchNorm2d`` at the same place would
    (``weight_decay_norm``, lr, bias rules, ``overrides``, ``lr_factor_func``). Arguments, return
    value (param-group dicts holding ``model``'s parameters) and errors are Detectron2's.
    """
    return _d2_get_default_optimizer_params(bn_view(model), *args, **kwargs)


# ----------------------------------------------------------------------------- frozen stages
def _frozen_layer(layer: IterationNormBase) -> nn.Module:
    from ..deploy.to_frozen_bn import frozen_bn_from_affine

    frozen = frozen_bn_from_affine(*layer.eval_affine())
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
    """``FrozenBatchNorm2d.convert_frozen_batchnorm`` (``cls``: its class) that also converts CBN/MABN.

    A CBN/NaiveCBN/MABN layer of C channels becomes a new ``FrozenBatchNorm2d`` of C channels with
    the layer's eval-mode output (``eval_affine()``); its producing conv is released and MABN's
    weight centralization baked into the conv's weight. Anything else goes to Detectron2's
    unchanged classmethod (BatchNorm/SyncBatchNorm; it recurses into children through this
    function). Returns, as Detectron2's, a new module for a norm layer, else ``module`` converted
    in place.
    """
    global _depth
    _depth += 1
    try:
        if isinstance(module, IterationNormBase):
            return _frozen_layer(module)
        return _d2_convert_frozen_batchnorm(cls, module)
    finally:
        _depth -= 1
        if _depth == 0:
            for conv in _to_bake:
                if is_weight_centralized(conv):
                    remove_weight_centralization(conv, bake=True)
            _to_bake.clear()


def install() -> None:
    """Redirect Detectron2's ``get_default_optimizer_params`` and
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` to this module (module docstring). Idempotent;
    called by :func:`smallbn_d2.modeling.norms.install`. Raises nothing."""
    global _d2_get_default_optimizer_params, _d2_convert_frozen_batchnorm
    from detectron2.layers import batch_norm
    from detectron2.solver import build

    _d2_get_default_optimizer_params = redirect_function(build, build.get_default_optimizer_params,
                                                         get_default_optimizer_params)
    _d2_convert_frozen_batchnorm = redirect_function(
        batch_norm, batch_norm.FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"].__func__,
        convert_frozen_batchnorm)
