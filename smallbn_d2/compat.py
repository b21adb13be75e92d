"""What smallbn_d2 needs to know at run time about the Detectron2 it runs with.

The environment, not this package, makes a Detectron2 without its C++ extension usable:
``tools/install_detectron2.py`` installs Detectron2 v0.6 from the ``pb1-detectron2`` sdist
together with the start-up module ``smallbn_d2_detectron2_compat`` (source in the repository's
``tools/detectron2_compat/``). When ``detectron2`` is first imported, that module serves a stub
``detectron2._C`` if and only if no compiled one exists, and restores the NumPy and Pillow
aliases v0.6 uses. Importing this module has no side effects.

* :func:`has_compiled_ops` tells whether ``detectron2._C`` is a compiled extension. When it is
  not, the start-up module also makes every ``COCOEvaluator`` evaluate with pycocotools' COCOeval
  (same AP) instead of the fast path that needs ``_C``.
* :class:`MissingExtensionError` is what the stub's ops raise.

Workarounds for Detectron2 itself (any install of the version named) live here too, each with
the versions it was checked against:

* :func:`get_norm_channels`: Detectron2 v0.6's ``RetinaNetHead`` probes ``get_norm(norm, 1)``,
  which fails for "GN".

Private names: every use of a private Detectron2 or torch name outside ``modeling/`` and
``layers/`` goes through one function of the last section (:func:`inner_trainer`,
:func:`load_model_from_checkpoint`, :func:`set_local_process_group`, :func:`cycle_position`,
:func:`register_state_dict_hook`, ...), each with the versions it was checked against.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

__all__ = ["MissingExtensionError", "has_compiled_ops", "get_norm_channels"]

try:  # the class the stub raises, when the start-up module is installed
    from smallbn_d2_detectron2_compat import MissingExtensionError
except ImportError:  # a Detectron2 installed otherwise: no stub, so nothing raises it

    class MissingExtensionError(RuntimeError):
        """Raised when an op of Detectron2's C++ extension is used but no compiled ``_C`` exists."""


def has_compiled_ops() -> bool:
    """True if ``detectron2._C`` is a compiled extension; False if it is the stub of
    ``smallbn_d2_detectron2_compat`` (marker ``__smallbn_stub__``) or cannot be imported.

    Imports ``detectron2``; raises nothing else.
    """
    try:
        import detectron2._C as ext
    except ImportError:
        return False
    return not getattr(ext, "__smallbn_stub__", False)


def get_norm_channels(norm: str, out_channels: int) -> int:
    """The channel count to hand Detectron2's own ``get_norm(norm, out_channels)``.

    Detectron2 v0.6's ``RetinaNetHead`` calls ``get_norm(norm, 1)`` only to log the type of the
    layer a norm name builds, which fails for "GN" (``GroupNorm(32, 1)``: 1 channel in 32
    groups), so a v0.6 RetinaNet with ``MODEL.RETINANET.NORM: "GN"`` could not be built. A GN
    layer of 1 channel can never be built, so such a request is answered with 32 channels, the
    probe of later Detectron2 versions. Every other request is unchanged.
    Checked against Detectron2 v0.6 (needed) and main 02b5c4e2 (probes with 32; never asks this).

    Args:
        norm: a name of Detectron2's ``get_norm``.
        out_channels: the channels asked for.
    Returns:
        ``32`` for ``("GN", 1)``, else ``out_channels``.
    """
    return 32 if norm == "GN" and out_channels == 1 else out_channels


# ----------------------------------------------------------------------------- private names
# Every private Detectron2 / torch name smallbn_d2 uses outside modeling/ and layers/ goes
# through one function below, with the versions it was checked against: Detectron2 v0.6 and
# main 02b5c4e2, torch 2.13. Nothing here imports Detectron2 at import time.


def inner_trainer(trainer: Any) -> Any:
    """The ``SimpleTrainer``/``AMPTrainer`` a Detectron2 ``DefaultTrainer`` runs the steps with
    (its private ``_trainer``: model, optimizer, grad scaler). Checked against Detectron2 v0.6 and
    main 02b5c4e2 (same attribute). Raises AttributeError if ``trainer`` has none."""
    return trainer._trainer


def registered_hooks(trainer: Any) -> List[Any]:
    """The hooks registered on a Detectron2 trainer (``TrainerBase._hooks``, in order; the list
    itself). Checked against Detectron2 v0.6 and main 02b5c4e2."""
    return trainer._hooks


def load_model_from_checkpoint(checkpointer: Any, checkpoint: Dict[str, Any]) -> Any:
    """``DetectionCheckpointer._load_model(checkpoint)`` of Detectron2's own class: load
    ``checkpoint["model"]`` (Caffe2/pycls/model-zoo name matching included) into the
    checkpointer's model, non-strictly; returns fvcore's ``_IncompatibleKeys``. A subclass that
    overrides ``_load_model`` (the only hook Detectron2 offers between reading a checkpoint and
    loading it) calls this for Detectron2's behaviour. Checked against Detectron2 v0.6 and main
    02b5c4e2 (same method and signature)."""
    from detectron2.checkpoint import DetectionCheckpointer

    return DetectionCheckpointer._load_model(checkpointer, checkpoint)


def route_load_model(cls: type) -> type:
    """Class decorator for a ``DetectionCheckpointer`` subclass: fvcore's ``Checkpointer.load``
    calls the private ``_load_model(checkpoint)`` between reading a checkpoint and loading it
    (the only hook there is); the decorated class receives that call as its public method
    ``load_model_state(checkpoint)``, which calls :func:`load_model_from_checkpoint` for
    Detectron2's loading. Checked against Detectron2 v0.6 and main 02b5c4e2 with fvcore 0.1.5."""
    cls._load_model = lambda self, checkpoint: self.load_model_state(checkpoint)
    return cls


def convert_ndarray_to_tensor(checkpointer: Any, state_dict: Dict[str, Any]) -> None:
    """fvcore's private ``Checkpointer._convert_ndarray_to_tensor``: the numpy arrays of a
    (pickled model-zoo) state dict replaced by tensors, in place. Checked against fvcore 0.1.5
    (Detectron2 v0.6 and main 02b5c4e2 use it the same way)."""
    checkpointer._convert_ndarray_to_tensor(state_dict)


def set_local_process_group(group: Any) -> None:
    """Make ``group`` the per-machine process group of ``detectron2.utils.comm`` (what
    ``get_local_rank``/``get_local_size`` read: the private ``_LOCAL_PROCESS_GROUP``), as
    Detectron2's own ``launch`` does for GPU workers. Checked against Detectron2 v0.6 and main
    02b5c4e2 (main also has ``create_local_process_group``, which v0.6 lacks)."""
    from detectron2.utils import comm

    comm._LOCAL_PROCESS_GROUP = group


def gradient_clipping_optimizer_class(optimizer_type: type, global_clipper: Callable) -> type:
    """Detectron2's private ``_generate_optimizer_class_with_gradient_clipping``: a subclass of
    ``optimizer_type`` whose ``step`` first calls ``global_clipper(all parameters)``. Checked
    against Detectron2 v0.6 and main 02b5c4e2 (same name and keywords)."""
    from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping

    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=global_clipper)


def cycle_position(cycle: Any) -> int:
    """Which level a Detectron2 ``CycleBatchNormList`` applies next (its private ``_pos``,
    0-based, advanced by every call). Checked against Detectron2 v0.6 and main 02b5c4e2."""
    return cycle._pos


def set_cycle_position(cycle: Any, position: int) -> None:
    """Set :func:`cycle_position` (e.g. on a converted copy of the list). Checked against
    Detectron2 v0.6 and main 02b5c4e2."""
    cycle._pos = position


def cycle_has_affine(cycle: Any) -> bool:
    """Whether a ``CycleBatchNormList`` has its own shared affine (``weight``/``bias`` applied after
    every level; its private ``_affine``). Checked against Detectron2 v0.6 and main 02b5c4e2."""
    return bool(getattr(cycle, "_affine", False))


def retinanet_head_levels(head: Any) -> int:
    """The number of feature levels a Detectron2 ``RetinaNetHead`` was built for (its private
    ``_num_features``, ``len(input_shape)``; the length of its per-level norm lists). Checked
    against Detectron2 v0.6 and main 02b5c4e2."""
    return head._num_features


def torch_batch_norm_base() -> type:
    """torch's private base class of every BatchNorm (``torch.nn.modules.batchnorm._BatchNorm``:
    BatchNorm1d/2d/3d, SyncBatchNorm, Detectron2's BatchNorm2d and NaiveSyncBatchNorm). Checked
    against torch 2.13."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


def tensor_version(tensor: Any) -> int:
    """A tensor's version counter (torch's private ``Tensor._version``: incremented by every
    in-place change). Checked against torch 2.13."""
    return tensor._version


def copy_state_dict_metadata(source: Any, target: Any) -> None:
    """Give the state dict ``target`` the module-version metadata of ``source`` (torch's private
    ``state_dict._metadata``, which e.g. FrozenBatchNorm2d's loading reads), if it has any.
    Checked against torch 2.13."""
    if hasattr(source, "_metadata"):
        target._metadata = source._metadata


def register_state_dict_hook(module: Any, hook: Callable) -> Any:
    """Register ``hook(module, state_dict, prefix, local_metadata)`` to run after
    ``module.state_dict()`` fills in its entries (it may change them in place); returns the
    removable handle. The public ``register_state_dict_post_hook`` where torch has it (torch 2.13:
    yes), else the private ``_register_state_dict_hook`` of older torch (same hook signature).
    Checked against torch 2.13."""
    public = getattr(module, "register_state_dict_post_hook", None)
    return public(hook) if public is not None else module._register_state_dict_hook(hook)


def argument_parser_actions(parser: Any) -> List[Any]:
    """The actions of an ``argparse.ArgumentParser`` (its private ``_actions``), e.g. to reword
    the help of an argument Detectron2's ``default_argument_parser`` added. Checked against
    Python 3.8-3.13."""
    return parser._actions


__all__ += ["inner_trainer", "registered_hooks", "route_load_model", "load_model_from_checkpoint",
            "convert_ndarray_to_tensor", "set_local_process_group", "gradient_clipping_optimizer_class",
            "cycle_position", "set_cycle_position", "cycle_has_affine", "retinanet_head_levels",
            "torch_batch_norm_base", "tensor_version", "copy_state_dict_metadata", "register_state_dict_hook",
            "argument_parser_actions"]


def own_parameters(module: Any) -> Dict[str, Any]:
    """A module's own parameter table, the dict itself (torch's private ``Module._parameters``:
    name -> ``nn.Parameter`` or None, in registration order, what ``named_parameters`` walks);
    changing it changes the module. ``smallbn_d2.modeling.parity`` builds Detectron2's BN view of a
    model with it (the same parameter objects under the same names). Checked against torch 2.13."""
    return module._parameters


def own_children(module: Any) -> Dict[str, Any]:
    """A module's own child table, the dict itself (torch's private ``Module._modules``: name ->
    child or None, a child held under two names listed twice, which ``named_children`` skips);
    changing it changes the module. Used with :func:`own_parameters`. Checked against torch 2.13."""
    return module._modules


__all__ += ["own_parameters", "own_children"]
