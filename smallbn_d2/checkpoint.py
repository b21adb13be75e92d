"""Loading checkpoints into models with CBN/MABN layers, across norms, with clear shape errors.

Two things Detectron2's ``DetectionCheckpointer`` does not do for the cross-iteration norms:

1. **Loading across norms**. A checkpoint trained with ``BN``, ``SyncBN``,
   ``FrozenBN`` (or ``CBN``) loads into a model of the same architecture whose norms are CBN or
   MABN. Per CBN/MABN layer at ``prefix``:

   * affine parameters ``prefix.weight``/``prefix.bias`` (gamma, beta, shape (C,)) load under
     their own names (BN, SyncBN, FrozenBN and CBN/MABN use the same names);
   * population statistics: each layer says how BN statistics map onto its own
     (``IterationNormBase.population_state`` with E[x] = running_mean and E[x^2] = running_var +
     running_mean^2, in float64): CBN's ``running_mean``/``running_var`` (C,) are BN's, loaded as
     they are; MABN's ``running_chi2`` (C,), its population estimate of E[x^2] (METHODS.md MABN
     items 1, 3, 6), becomes ``running_var + running_mean ** 2``;
   * RetinaNet's head keeps one CBN/MABN per FPN level (``prefix = head...N.<level>``, inside
     Detectron2's ``CycleBatchNormList``); a checkpoint with a single norm there (FrozenBN, which
     Detectron2 does not make per level) gives its statistics to every level;
   * the cross-iteration state the checkpoint cannot have (the layer's
     ``cross_iteration_state_keys``: CBN's ``window_*`` buffers and ``num_batches_tracked``;
     MABN's ``chi2_buffer``, ``psi_buffer``, ``chi2_iters``, ``psi_iters``) is set to the values of a freshly built layer (zeros; tags -1 = empty
     slot), so the layer starts its window / moving averages afresh;
   * entries of the source norm that the target does not have (BN's ``running_mean``/
     ``running_var``/``num_batches_tracked`` in an MABN model, CBN's window in an MABN model,
     MABN's buffers in a CBN model) are consumed or dropped, not reported as unexpected.

   The reverse (CBN/MABN -> BN/FrozenBN for deployment) is the conversion of the inference
   tools, not this module.

2. **Clear shape errors**. Detectron2 (fvcore) skips a checkpoint entry whose
   shape differs from the model's with a log warning, which for a CBN window trained with
   another window size k, or an MABN buffer of another buffer size m, would silently restart
   the cross-iteration state. Here every entry of a CBN/MABN layer whose shape differs raises
   :class:`NormStateShapeError` naming the key, the checkpoint shape, the model shape and the
   config key that sets it.

:func:`convert_norm_state_dict` does both on a state dict; :class:`NormCheckpointer` is
``DetectionCheckpointer`` applying it on every load (used by :class:`smallbn_d2.engine.Trainer`
and ``tools/train_net.py``). Saving is Detectron2's, made atomic, with the files' mode set by
the user's umask (as a plain ``open`` gives).

3. **Converted checkpoints** (inference models, :mod:`smallbn_d2.deploy`):
   :func:`save_inference_checkpoint` writes one with its conversion metadata and no
   ``last_checkpoint``; :func:`load_checkpoint_strict` loads any checkpoint and raises
   :class:`IncompatibleCheckpointError` on missing, unexpected or mis-shaped keys, except the
   training-only cross-iteration state that ``model_final.pth`` leaves out
   (:func:`fill_absent_training_state`). :class:`NormCheckpointer` loads a converted checkpoint
   strictly too, and a folded one only into the FrozenBN model of its config, which it folds
   first: a folded checkpoint is never loaded into an unfolded model.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import CycleBatchNormList
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .compat import (convert_ndarray_to_tensor, copy_state_dict_metadata, load_model_from_checkpoint,
                     register_state_dict_hook, route_load_model)
from .layers import IterationNormBase
from .pretrained import check_loaded_weight_centralization

__all__ = ["NormStateShapeError", "convert_norm_state_dict", "NormCheckpointer", "AtomicPathManager",
           "IncompatibleCheckpointError", "fill_absent_training_state",
           "save_inference_checkpoint", "load_checkpoint_strict", "read_conversion_metadata", "METADATA_KEY"]

logger = logging.getLogger(__name__)

_BN_STATS = ("running_mean", "running_var")
#: Key of the conversion metadata in checkpoints written by :func:`save_inference_checkpoint`.
METADATA_KEY = "smallbn_d2_conversion"


class NormStateShapeError(ValueError):
    """A checkpoint entry of a CBN/MABN layer has another shape than the model's.

    The message names the key, both shapes and the hyperparameter that sets the shape.
    """


def _shape_hint(layer: IterationNormBase, local: str, ckpt_shape: Tuple[int, ...]) -> str:
    hint = layer.state_shape_hint(local, ckpt_shape)
    if hint is not None:
        return hint
    return ("the layer's channel count or producing conv differs: the checkpoint is from another "
            "architecture (check MODEL.RESNETS/FPN/ROI_*_HEAD channel settings)")


def _fresh_value(local: str, like: torch.Tensor) -> torch.Tensor:
    """The value a freshly built layer has for cross-iteration state ``local``."""
    if local.endswith("_iters"):  # window/slot tags: -1 marks an empty slot
        return torch.full_like(like, -1)
    return torch.zeros_like(like)


def _parent_prefix(name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """``parent.`` if ``name`` is a per-level layer inside a ``CycleBatchNormList``, else None."""
    if "." not in name:
        return None
    parent, _, last = name.rpartition(".")
    if last.isdigit() and isinstance(modules.get(parent), CycleBatchNormList):
        return parent + "."
    return None


def convert_norm_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map a checkpoint's norm entries onto ``model``'s CBN/MABN layers (see the module docstring).

    Args:
        state_dict: a model state dict (key -> tensor), e.g. ``torch.load(f)["model"]``, keys
            without a ``module.`` (DDP) prefix. Not modified.
        model: the model to load into (a DDP wrapper is unwrapped), built with
            :func:`smallbn_d2.build_model` (producing convs attached, so window shapes are final).
    Returns:
        ``(new_state_dict, notes)``: a new dict (tensors shared with the input where unchanged),
        and one line per kind of mapping made, for the log.
    Raises:
        NormStateShapeError: an entry of a CBN/MABN layer has another shape in the checkpoint
            than in the model (the message names key, both shapes and the config key).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    sd = OrderedDict(state_dict)
    copy_state_dict_metadata(state_dict, sd)  # module versions, used by e.g. FrozenBatchNorm2d's loading
    modules = dict(model.named_modules())
    model_sd = model.state_dict()
    counts: Dict[str, int] = {}

    def note(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    for name, layer in modules.items():
        if not isinstance(layer, IterationNormBase):
            continue
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        for local, value in own.items():
            key = prefix + local
            if key in sd and tuple(sd[key].shape) != tuple(value.shape):
                raise NormStateShapeError(
                    f"Checkpoint entry {key!r} has shape {tuple(sd[key].shape)} but the model's "
                    f"{type(layer).__name__} has shape {tuple(value.shape)}: {_shape_hint(layer, local, tuple(sd[key].shape))}."
                )
        parent = _parent_prefix(name, modules)
        sources = [p for p in (prefix, parent) if p is not None]

        def stat(local: str) -> Optional[torch.Tensor]:
            for p in sources:
                if p + local in sd:
                    return sd[p + local]
            return None

        mean, var = stat("running_mean"), stat("running_var")
        present = any(k.startswith(prefix) for k in sd) or any(
            parent is not None and parent + s in sd for s in ("weight", "bias") + _BN_STATS)
        if not present:
            continue  # the checkpoint lacks this layer: fvcore reports its keys as missing
        population = layer.population_state_keys()
        if not any(prefix + k in sd for k in population):
            if mean is not None and var is not None:
                m = mean.double()
                for k, v in layer.population_state(m, var.double() + m * m).items():
                    sd[prefix + k] = v
                note(f"{type(layer).__name__} {'/'.join(population)} from BN statistics "
                     "(running_mean, running_var)")
            else:
                logger.warning(f"{name}: the checkpoint has neither {'/'.join(population)} nor BN's "
                               f"running_mean/var; the population statistics keep their initial values")
        for k in [k for k in sd if k.startswith(prefix) and "." not in k[len(prefix):]
                  and k[len(prefix):] not in own]:
            del sd[k]  # another norm's state (BN's statistics, CBN's window, MABN's buffers): consumed
        cross = layer.cross_iteration_state_keys()
        fresh = [local for local in own if prefix + local not in sd and local in cross]
        for local in fresh:
            sd[prefix + local] = _fresh_value(local, own[local])
        if fresh:
            note(f"{type(layer).__name__} cross-iteration state absent from the checkpoint, initialised afresh")
    notes = [f"{kind}: {n} layers" for kind, n in counts.items()]
    return sd, notes


@route_load_model
class NormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads across norms into CBN/MABN models and raises
    :class:`NormStateShapeError` on mis-shaped CBN/MABN entries (see the module docstring).

    Same constructor and ``resume_or_load`` as Detectron2's. Loading applies, in order:
    Detectron2's name-matching heuristics for ``.pkl``/``.pyth`` model-zoo files (with MABN
    layers exposing virtual ``running_mean``/``running_var`` keys, so that ImageNet BN
    statistics find them), then :func:`convert_norm_state_dict`, then fvcore's loading.

    Saving is Detectron2's with two differences:

    * **Atomic files.** Every checkpoint and ``last_checkpoint`` is written to a temporary file in
      the same directory, flushed to disk and renamed over the target (:class:`AtomicPathManager`).
      A process killed at any moment leaves either the old or the new file complete, and
      ``last_checkpoint`` always names a complete checkpoint; ``--resume`` continues from it.
    * **Small final models.** A checkpoint whose name ends in ``_final`` (``model_final.pth``)
      leaves out the layers' cross-iteration state (CBN's window of statistics gradients, MABN's
      moving-average buffers: ``cross_iteration_state_keys``), which inference and fine-tuning do
      not need (loading it starts them afresh); periodic checkpoints keep it for exact resume.

    Loading differs from Detectron2's in three more ways:

    * **Resuming a finished run** (``resume_or_load(..., resume=True)`` when ``last_checkpoint``
      names ``<prefix>_final.pth``): if the periodic checkpoint ``<prefix>_<iteration:07d>.pth``
      of the same iteration is there (written in the same step, so the same weights, optimizer
      and schedule), the run resumes from it, with the cross-iteration state; otherwise from
      ``model_final.pth`` with a warning that every CBN window and MABN moving average restarts
      empty if training continues.
    * **Converted checkpoints** (written by :func:`save_inference_checkpoint`, e.g. by
      ``tools/convert_for_inference.py``) load strictly: a missing, unexpected or mis-shaped key
      raises :class:`IncompatibleCheckpointError` with a one-line message that says how to load it
      (Detectron2 would only log warnings and evaluate a mis-loaded model).
    * **Folded checkpoints** (``--fold``) load into the FrozenBN model of their config (the
      ``.yaml`` the conversion writes; the model holds no CBN/MABN/BN layer): when the
      checkpointer has no checkpointables (evaluation), it first folds the model's
      ``FrozenBatchNorm2d`` layers into their convs (:func:`smallbn_d2.deploy.fold_frozen_bn`,
      in place), so that the structures match, then loads strictly. Into any other model a folded
      checkpoint is refused.

    Raises (from ``load``/``resume_or_load``):
        NormStateShapeError: as :func:`convert_norm_state_dict`.
        IncompatibleCheckpointError: a converted checkpoint that does not match the model (the
            model may be partly loaded when it is raised).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = AtomicPathManager(self.path_manager)
        self._loading = ""  # path of the load in progress, for messages
        self._resuming = False

    def load(self, path: str, *args, **kwargs):
        """Detectron2's ``load`` (see the class docstring for what loading adds)."""
        self._loading = path
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        """Detectron2's ``resume_or_load``; resuming from ``<prefix>_final.pth`` takes the periodic
        checkpoint of the same iteration instead when there is one (class docstring)."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        path = self._full_state_twin(last) or last
        self._resuming = True
        try:
            return self.load(path)
        finally:
            self._resuming = False

    def _full_state_twin(self, final: str) -> Optional[str]:
        """The periodic checkpoint written in the same step as ``final`` (a ``*_final.pth``), or None."""
        name = os.path.basename(final)
        if not name.endswith("_final.pth"):
            return None
        iteration = _peek(final).get("iteration")
        if not isinstance(iteration, int):
            return None
        twin = os.path.join(os.path.dirname(final), f"{name[:-len('_final.pth')]}_{iteration:07d}.pth")
        if not os.path.isfile(twin) or _peek(twin).get("iteration") != iteration:
            return None
        self.logger.info(f"Resuming from {twin}: the checkpoint of iteration {iteration}, written in the same step as "
                         f"{name} but with the norms' cross-iteration state (CBN windows, MABN moving averages)")
        return twin

    def save(self, name: str, **kwargs) -> None:
        """Detectron2's ``save`` (atomic); ``*_final`` without cross-iteration state."""
        context = _without_cross_iteration_state(self.model) if name.endswith("_final") else contextlib.nullcontext()
        with context:
            super().save(name, **kwargs)

    def load_model_state(self, checkpoint: Dict) -> "object":
        """What ``load`` does with a read checkpoint (fvcore's private ``_load_model``, routed here
        by :func:`smallbn_d2.compat.route_load_model`): the class docstring's conversions, then
        Detectron2's loading; returns fvcore's incompatible keys."""
        state = checkpoint["model"]
        convert_ndarray_to_tensor(self, state)
        if checkpoint.get("matching_heuristics", False):
            targets = dict(self.model.state_dict())
            for name, layer in self.model.named_modules():
                if isinstance(layer, IterationNormBase) and "running_mean" not in layer.population_state_keys():
                    for s in _BN_STATS:  # let BN statistics of a model-zoo file find MABN layers
                        targets.setdefault(f"{name}.{s}", getattr(layer, layer.population_state_keys()[0]))
            state = align_and_update_state_dicts(
                targets, state, c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
            checkpoint["matching_heuristics"] = False
        if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
            consume_prefix_in_state_dict_if_present(state, "module.")
        converted = checkpoint.get(METADATA_KEY) if isinstance(checkpoint.get(METADATA_KEY), dict) else None
        if converted is not None and converted.get("fold") and not self.checkpointables:
            self._fold_for(converted)
        state, notes = convert_norm_state_dict(state, self.model)
        for line in notes:
            if self._resuming and "cross-iteration state absent" in line:
                self.logger.warning(
                    f"Resuming from {self._loading}, which holds no cross-iteration state (a *_final.pth checkpoint "
                    f"leaves it out) and no periodic checkpoint of the same iteration is in its folder ({line}): "
                    "if training continues, every CBN window and MABN moving average restarts empty. For an exact "
                    "resume, let the checkpoint period divide the number of iterations (SOLVER.CHECKPOINT_PERIOD and "
                    "SOLVER.MAX_ITER; train.checkpointer.period and train.max_iter in a LazyConfig).")
            else:
                self.logger.info(f"Loading across norms: {line}")
        checkpoint["model"] = state
        incompatible = load_model_from_checkpoint(self, checkpoint)
        if converted is not None:
            self._check_converted(incompatible, converted)
        # MABN centralizes its convs' weights: say so if loaded weights were not trained that way
        check_loaded_weight_centralization(self.model, loaded_keys=state.keys())
        return incompatible

    def _inference_structure(self) -> bool:
        """True if the model has no layer that conversion would replace (CBN, MABN, BN)."""
        from .deploy.to_frozen_bn import _SOURCES  # deploy imports this module

        from detectron2.layers import FrozenBatchNorm2d

        return not any(isinstance(m, _SOURCES) and not isinstance(m, FrozenBatchNorm2d) for m in self.model.modules())

    def _fold_for(self, converted: Dict) -> None:
        """Give the (FrozenBN) model the folded structure of a folded checkpoint."""
        from .deploy.to_frozen_bn import fold_frozen_bn

        if not self._inference_structure():
            return  # a training model: the strict check refuses the folded checkpoint
        folded = [r for r in fold_frozen_bn(self.model) if r.action.startswith("folded")]
        if folded:
            self.logger.info(f"{self._loading} is folded (tools/convert_for_inference.py --fold): {len(folded)} "
                             "FrozenBatchNorm2d layers of the model folded into their convs before loading")

    def _check_converted(self, incompatible, converted: Dict) -> None:
        """Raise :class:`IncompatibleCheckpointError` if a converted checkpoint did not match exactly."""
        keys = _incompatible_keys(incompatible)
        if not any(keys.values()):
            return
        path = self._loading
        kind = "folded (--fold)" if converted.get("fold") else "unfolded"
        config = os.path.splitext(path)[0] + ".yaml"
        where = (f"tools/train_net.py --eval-only --config-file {config}" if os.path.isfile(config)
                 else "tools/train_net.py --eval-only with the .yaml written next to it")
        raise IncompatibleCheckpointError(
            f"{path!r} is a checkpoint converted for inference, {kind}, by tools/convert_for_inference.py, and does "
            f"not match this model ({_show_keys(keys)}): evaluate it with {where}, or load it with "
            f"smallbn_d2.deploy.load_inference_model(training cfg, {path!r}).")


# ------------------------------------------------------------------------------ saving
def _current_umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux >= 4.7: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666`` minus the process's umask
    (e.g. ``0o644`` with the usual umask 022). Files written through a temporary file (atomic
    checkpoints, exported models) are given this mode, as Detectron2's own files have."""
    return 0o666 & ~_current_umask()


def _peek(path: str) -> Dict:
    """The entries of a checkpoint file, read lazily (memory-mapped where possible); {} if unreadable."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip-format file: no mmap
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a file that is no torch checkpoint has nothing to offer
        return {}
    return data if isinstance(data, dict) else {}


class _AtomicFile:
    """Context manager: a file object on a temporary path, renamed to ``path`` on a clean exit."""

    def __init__(self, path: str, mode: str):
        self.path, self.mode = path, mode

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".partial", dir=directory)
        os.fchmod(fd, new_file_mode())  # mkstemp makes it 0600; the renamed file gets what open() would give
        self.file = os.fdopen(fd, self.mode)
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


class AtomicPathManager:
    """A PathManager whose ``open`` for writing on a local path writes atomically (temporary file in
    the same directory + ``os.replace``); everything else is delegated to the wrapped one.

    A kill during the write leaves the target as it was and a hidden ``.<name>.*.partial`` file,
    which nothing loads.
    """

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def open(self, path: str, mode: str = "r", **kwargs):
        """Atomic for local write modes ("w", "wb"); otherwise the wrapped manager's ``open``."""
        if "://" not in path and mode in ("w", "wb") and not kwargs:
            return _AtomicFile(path, mode)
        return self._wrapped.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


@contextlib.contextmanager
def _without_cross_iteration_state(model: nn.Module) -> Iterator[None]:
    """While active, ``model.state_dict()`` omits every layer's cross-iteration state."""
    handles = []

    def drop(module, state_dict, prefix, local_metadata):
        for key in module.cross_iteration_state_keys():
            state_dict.pop(prefix + key, None)

    for module in model.modules():
        if isinstance(module, IterationNormBase):
            handles.append(register_state_dict_hook(module, drop))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ converted checkpoints
class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint's keys do not match the model it is loaded into (missing or unexpected keys)."""


def save_inference_checkpoint(model: nn.Module, path: str, fold: bool, overwrite: bool = False) -> None:
    """Write ``model`` as a Detectron2 checkpoint (``{"model": state_dict, ...}``, loadable by
    ``DetectionCheckpointer``) with the conversion metadata ``{"fold": fold}``.

    Unlike ``DetectionCheckpointer.save`` it writes no ``last_checkpoint`` file, so converting
    into a training output directory cannot redirect a later ``--resume``. A local file is
    written atomically (temporary file, then renamed) with the mode of :func:`new_file_mode`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (a local path: smallbn_d2's
            output guard, :func:`smallbn_d2.engine.check_output_dir`).
    """
    from detectron2.utils.file_io import PathManager

    if "://" not in path:
        from .engine.defaults import check_output_dir  # the engine imports this module

        check_output_dir(os.path.dirname(path) or ".", files=[os.path.basename(path)], allow_existing=overwrite,
                         way_out="overwrite=True")
    elif PathManager.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; refusing to overwrite it; allowed: a new path, or overwrite=True")
    data = {"model": model.state_dict(), METADATA_KEY: {"fold": bool(fold)}}
    with AtomicPathManager(PathManager).open(path, "wb") as f:
        torch.save(data, f)


def read_conversion_metadata(path: str) -> Optional[Dict]:
    """The conversion metadata of a checkpoint written by :func:`save_inference_checkpoint`
    (``{"fold": bool}``), or None if it has none (any other checkpoint, including Detectron2's
    ``.pkl`` model-zoo files). The file is memory-mapped where possible, not read whole."""
    from detectron2.utils.file_io import PathManager

    if path.endswith((".pkl", ".pyth")):  # Detectron2's pickled model-zoo formats: never converted
        return None
    meta = _peek(PathManager.get_local_path(path)).get(METADATA_KEY)
    return meta if isinstance(meta, dict) else None


def fill_absent_training_state(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> List[str]:
    """Give each CBN/MABN layer of ``model`` whose cross-iteration state is wholly absent from
    ``state_dict`` the values of a freshly built layer, in place.

    The cross-iteration state (each layer's ``cross_iteration_state_keys()``: CBN's ``window_*``
    buffers and ``num_batches_tracked``, MABN's ``chi2_buffer``, ``psi_buffer``, ``chi2_iters``,
    ``psi_iters``) is training-only: the eval-mode output depends on the affine parameters and
    the population statistics alone, and ``model_final.pth`` leaves it out
    (:class:`NormCheckpointer`). A layer that has part of it, or none of its other entries
    (weight, bias, population statistics), is left alone, so a strict load still reports it.

    Args:
        state_dict: model state dict (key -> tensor), keys without a ``module.`` prefix.
        model: the model it is loaded into.
    Returns:
        the names of the layers filled.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model_sd = model.state_dict()
    filled = []
    for name, layer in model.named_modules():
        if not isinstance(layer, IterationNormBase):
            continue
        prefix = name + "."
        cross = [k for k in layer.cross_iteration_state_keys() if prefix + k in model_sd]
        if any(prefix + k in state_dict for k in cross):
            continue
        others = [k for k in model_sd if k.startswith(prefix) and "." not in k[len(prefix):]
                  and k[len(prefix):] not in cross]
        if not others or not all(k in state_dict for k in others):
            continue
        for k in cross:
            state_dict[prefix + k] = _fresh_value(k, model_sd[prefix + k])
        filled.append(name)
    return filled


def _incompatible_keys(incompatible) -> Dict[str, List[str]]:
    return {"missing": list(getattr(incompatible, "missing_keys", [])),
            "unexpected": list(getattr(incompatible, "unexpected_keys", [])),
            "of another shape": [k for k, *_ in getattr(incompatible, "incorrect_shapes", [])]}


def _show_keys(keys: Dict[str, List[str]]) -> str:
    def show(k):
        return f"{k[:8]}{' ...' if len(k) > 8 else ''}"

    return ", ".join(f"{kind} keys {show(k)}" for kind, k in keys.items())


@route_load_model
class _RecordingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys of its last load, and fills the
    training-only state a checkpoint leaves out (:func:`fill_absent_training_state`)."""

    incompatible = None
    filled: List[str] = []

    def load_model_state(self, checkpoint: Dict) -> "object":
        """Detectron2's loading of a read checkpoint, recording the incompatible keys."""
        state = checkpoint.get("model")
        if isinstance(state, dict) and not checkpoint.get("matching_heuristics", False):
            if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
                consume_prefix_in_state_dict_if_present(state, "module.")
            self.filled = fill_absent_training_state(state, self.model)
        self.incompatible = load_model_from_checkpoint(self, checkpoint)
        return self.incompatible


def load_checkpoint_strict(model: nn.Module, path: str) -> Dict:
    """Load a Detectron2 checkpoint into ``model`` with ``DetectionCheckpointer.load``, strictly,
    for inference: every weight and population statistic must be there.

    The training-only cross-iteration state of CBN/MABN layers may be absent as a whole (a
    ``model_final.pth``, which leaves it out): such layers get a fresh, empty state
    (:func:`fill_absent_training_state`), which changes no eval-mode output, and one info line is
    logged instead of Detectron2's warnings.

    Args:
        model: the model.
        path: a ``.pth``/``.pkl`` checkpoint (or any path Detectron2's PathManager resolves).
    Returns:
        the checkpoint's other entries (e.g. ``"iteration"``, the conversion metadata).
    Raises:
        IncompatibleCheckpointError: missing or unexpected keys, or entries of another shape
            (Detectron2 only logs these).
    """
    checkpointer = _RecordingCheckpointer(model)
    checkpoint = checkpointer.load(path, checkpointables=[])
    keys = _incompatible_keys(checkpointer.incompatible)
    if any(keys.values()):
        raise IncompatibleCheckpointError(
            f"{path!r} does not match the model: {_show_keys(keys)}. Is it a checkpoint of a model of this "
            "config (for a converted checkpoint: with the fold setting it was converted with)?"
        )
    if checkpointer.filled:
        logger.info(f"{path}: no cross-iteration state (training-only: CBN windows, MABN moving averages) for "
                    f"{len(checkpointer.filled)} layers, as in model_final.pth; inference does not use it")
    checkpoint.pop("model", None)
    return checkpoint
