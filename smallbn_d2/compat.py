"""What smallbn_d2 knows at run time of the Detectron2 it runs with; imported, it changes nothing.

Detectron2 v0.6 without its C++ extension is made usable by the environment's start-up module
``smallbn_d2_detectron2_compat`` (``tools/detectron2_compat/``; docs/INSTALL.md). Here: whether
``detectron2._C`` is compiled, a workaround for Detectron2 v0.6 itself, and every use of a private
Detectron2 or torch name in the package (tests/test_package_layout.py checks), each with the versions it was
checked against (Detectron2 v0.6 and main 02b5c4e2, fvcore 0.1.5, torch 2.13).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

__all__ = ["MissingExtensionError", "has_compiled_ops", "get_norm_channels", "inner_trainer", "registered_hooks",
           "route_load_model", "load_model_from_checkpoint", "convert_ndarray_to_tensor", "set_local_process_group",
           "gradient_clipping_optimizer_class", "cycle_position", "set_cycle_position", "cycle_has_affine",
           "retinanet_head_levels", "torch_batch_norm_base", "tensor_version", "copy_state_dict_metadata",
           "register_state_dict_hook", "register_load_state_dict_pre_hook", "remove_state_dict_hooks",
           "argument_parser_actions", "own_parameters", "own_children"]

try:  # the class the stub raises, when the start-up module is installed
    from smallbn_d2_detectron2_compat import MissingExtensionError
except ImportError:  # a Detectron2 installed otherwise: no stub, so nothing raises it

    class MissingExtensionError(RuntimeError):
        """Raised when an op of Detectron2's C++ extension is used but no compiled ``_C`` exists."""


def has_compiled_ops() -> bool:
    """True if ``detectron2._C`` is compiled; False if it is the start-up module's stub (marker
    ``__smallbn_stub__``; ``COCOEvaluator`` then uses pycocotools, same AP) or cannot be imported."""
    try:
        import detectron2._C as ext
    except ImportError:
        return False
    return not getattr(ext, "__smallbn_stub__", False)


def get_norm_channels(norm: str, out_channels: int) -> int:
    """The channel count to hand Detectron2's own ``get_norm(norm, out_channels)``: 32 for
    ``("GN", 1)``, else ``out_channels``.

    Detectron2 v0.6's ``RetinaNetHead`` calls ``get_norm(norm, 1)`` only to log the layer type,
    which fails for "GN" (``GroupNorm(32, 1)``), so ``MODEL.RETINANET.NORM: "GN"`` could not be
    built; later versions probe with 32. Checked against Detectron2 v0.6 (needed) and main
    02b5c4e2 (never asks this).
    """
    return 32 if norm == "GN" and out_channels == 1 else out_channels


# ----------------------------------------------------------------------------- private names
# Nothing below imports Detectron2 at import time.
def inner_trainer(trainer: Any) -> Any:
    """The ``SimpleTrainer``/``AMPTrainer`` a ``DefaultTrainer`` runs the steps with (private ``_trainer``;
    AttributeError if none). Checked: Detectron2 v0.6, main 02b5c4e2."""
    return trainer._trainer


def registered_hooks(trainer: Any) -> List[Any]:
    """The hooks of a Detectron2 trainer, in order, the list itself (private ``TrainerBase._hooks``).
    Checked: Detectron2 v0.6, main 02b5c4e2."""
    return trainer._hooks


def load_model_from_checkpoint(checkpointer: Any, checkpoint: Dict[str, Any]) -> Any:
    """Detectron2's own ``DetectionCheckpointer._load_model(checkpoint)`` (non-strict, model-zoo name
    matching; returns fvcore's ``_IncompatibleKeys``), for a subclass that overrides it. Checked:
    Detectron2 v0.6, main 02b5c4e2."""
    from detectron2.checkpoint import DetectionCheckpointer

    return DetectionCheckpointer._load_model(checkpointer, checkpoint)


def route_load_model(cls: type) -> type:
    """Class decorator for a ``DetectionCheckpointer`` subclass: fvcore's ``Checkpointer.load`` calls
    the private ``_load_model(checkpoint)`` (the only hook between reading and loading), which the
    class receives as its public ``load_model_state(checkpoint)``. Checked: Detectron2 v0.6, main
    02b5c4e2, fvcore 0.1.5."""
    cls._load_model = lambda self, checkpoint: self.load_model_state(checkpoint)
    return cls


def convert_ndarray_to_tensor(checkpointer: Any, state_dict: Dict[str, Any]) -> None:
    """fvcore's private ``Checkpointer._convert_ndarray_to_tensor``: the numpy arrays of a (model-zoo)
    state dict replaced by tensors, in place. Checked: fvcore 0.1.5."""
    checkpointer._convert_ndarray_to_tensor(state_dict)


def set_local_process_group(group: Any) -> None:
    """Make ``group`` the per-machine process group of ``detectron2.utils.comm`` (private
    ``_LOCAL_PROCESS_GROUP``, read by ``get_local_rank``/``get_local_size``), as Detectron2's
    ``launch`` does for GPU workers. Checked: Detectron2 v0.6, main 02b5c4e2."""
    from detectron2.utils import comm

    comm._LOCAL_PROCESS_GROUP = group


def gradient_clipping_optimizer_class(optimizer_type: type, global_clipper: Callable) -> type:
    """Detectron2's private ``_generate_optimizer_class_with_gradient_clipping``: ``optimizer_type`` whose
    ``step`` first calls ``global_clipper(all parameters)``. Checked: Detectron2 v0.6, main 02b5c4e2."""
    from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping

    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=global_clipper)


def cycle_position(cycle: Any) -> int:
    """The level (0-based) a ``CycleBatchNormList`` applies next (private ``_pos``). Checked:
    Detectron2 v0.6, main 02b5c4e2."""
    return cycle._pos


def set_cycle_position(cycle: Any, position: int) -> None:
    """Set :func:`cycle_position`. Checked: Detectron2 v0.6, main 02b5c4e2."""
    cycle._pos = position


def cycle_has_affine(cycle: Any) -> bool:
    """Whether a ``CycleBatchNormList`` has its shared affine (private ``_affine``). Checked:
    Detectron2 v0.6, main 02b5c4e2."""
    return bool(getattr(cycle, "_affine", False))


def retinanet_head_levels(head: Any) -> int:
    """The number of feature levels a ``RetinaNetHead`` was built for (private ``_num_features``).
    Checked: Detectron2 v0.6, main 02b5c4e2."""
    return head._num_features


def torch_batch_norm_base() -> type:
    """torch's private ``torch.nn.modules.batchnorm._BatchNorm``, base class of every BatchNorm
    (Detectron2's included). Checked: torch 2.13."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


def tensor_version(tensor: Any) -> int:
    """A tensor's version counter, incremented by every in-place change (private ``Tensor._version``).
    Checked: torch 2.13."""
    return tensor._version


def copy_state_dict_metadata(source: Any, target: Any) -> None:
    """Give the state dict ``target`` the module-version metadata of ``source`` if it has any
    (private ``state_dict._metadata``, read e.g. by FrozenBatchNorm2d's loading). Checked: torch 2.13."""
    if hasattr(source, "_metadata"):
        target._metadata = source._metadata


def register_state_dict_hook(module: Any, hook: Callable) -> Any:
    """Register ``hook(module, state_dict, prefix, local_metadata)`` to run after ``module.state_dict()``
    fills its entries; returns the removable handle. The public ``register_state_dict_post_hook``
    where torch has it (2.13: yes), else older torch's private ``_register_state_dict_hook``."""
    public = getattr(module, "register_state_dict_post_hook", None)
    return public(hook) if public is not None else module._register_state_dict_hook(hook)


def register_load_state_dict_pre_hook(module: Any, hook: Callable) -> Any:
    """Register ``hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
    error_msgs)`` to run before ``module.load_state_dict`` reads its entries; returns the removable
    handle. The public ``register_load_state_dict_pre_hook`` where torch has it (2.13: yes), else
    older torch's private ``_register_load_state_dict_pre_hook(hook, with_module=True)``."""
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    return public(hook) if public is not None else module._register_load_state_dict_pre_hook(hook, with_module=True)


def remove_state_dict_hooks(module: Any, save_hook: Callable, load_pre_hook: Callable) -> None:
    """Remove the hooks registered by :func:`register_state_dict_hook` and
    :func:`register_load_state_dict_pre_hook` with these functions, found by identity (no handle is
    kept: handles do not survive ``deepcopy``/pickling of the module). Reads the private
    ``_state_dict_hooks`` and ``_load_state_dict_pre_hooks`` dicts; the load pre-hook is stored
    wrapped, its function as ``.hook``. Checked: torch 2.1-2.13."""
    for hooks, fn in ((module._state_dict_hooks, save_hook), (module._load_state_dict_pre_hooks, load_pre_hook)):
        for key in [k for k, h in hooks.items() if h is fn or getattr(h, "hook", None) is fn]:
            del hooks[key]


def argument_parser_actions(parser: Any) -> List[Any]:
    """The actions of an ``argparse.ArgumentParser`` (private ``_actions``). Checked: Python 3.8-3.13."""
    return parser._actions


def own_parameters(module: Any) -> Dict[str, Any]:
    """A module's own parameter table, the dict itself (private ``Module._parameters``: name ->
    ``nn.Parameter`` or None, in registration order). Checked: torch 2.13."""
    return module._parameters


def own_children(module: Any) -> Dict[str, Any]:
    """A module's own child table, the dict itself (private ``Module._modules``: name -> child or
    None; a child held under two names is listed twice). Checked: torch 2.13."""
    return module._modules
