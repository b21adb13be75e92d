"""Checkpoints of CBN/MABN models: loading across norms, clear shape errors, atomic saving.

:class:`NormCheckpointer` is Detectron2's ``DetectionCheckpointer`` with these additions (the
Trainer's and the tools' checkpointer); :func:`convert_norm_state_dict` is its mapping of a state
dict; :func:`save_inference_checkpoint` and :func:`load_checkpoint_strict` are the checkpoint I/O
of :mod:`smallbn_d2.deploy`. See docs/RELIABILITY.md sections 6 and 7, and docs/DEPLOY.md.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import CycleBatchNormList
from detectron2.utils.file_io import PathManager
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .compat import (convert_ndarray_to_tensor, copy_state_dict_metadata, load_model_from_checkpoint,
                     register_state_dict_hook, route_load_model)
from .layers import IterationNormBase
from .pretrained import check_loaded_weight_centralization

__all__ = ["NormStateShapeError", "convert_norm_state_dict", "NormCheckpointer", "AtomicPathManager",
           "IncompatibleCheckpointError", "fill_absent_training_state", "save_inference_checkpoint",
           "load_checkpoint_strict", "read_conversion_metadata", "METADATA_KEY", "refuse_existing", "atomic_path"]

logger = logging.getLogger(__name__)

_BN_STATS = ("running_mean", "running_var")
#: Key of the conversion metadata in checkpoints written by :func:`save_inference_checkpoint`.
METADATA_KEY = "smallbn_d2_conversion"


class NormStateShapeError(ValueError):
    """A checkpoint entry of a CBN/MABN layer has another shape than the model's (the message names
    the key, both shapes and the hyperparameter that sets the shape)."""


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint's keys do not match the model it is loaded into (missing or unexpected keys)."""


def _fresh_value(local: str, like: torch.Tensor) -> torch.Tensor:
    """A freshly built layer's value of cross-iteration state ``local`` (tags -1 = empty slot)."""
    return torch.full_like(like, -1) if local.endswith("_iters") else torch.zeros_like(like)


def _own_entries(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of the module at ``prefix`` itself (not of its children), by local name."""
    n = len(prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[n:]}


def convert_norm_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map a checkpoint trained with BN, SyncBN, FrozenBN, CBN or MABN onto ``model``'s CBN/MABN layers.

    Per CBN/MABN layer: gamma and beta (C,) load under their own names; missing population
    statistics come from BN's through the layer's ``population_state(E[x], E[x^2])``, with
    E[x] = running_mean and E[x^2] = running_var + running_mean^2 in float64 (MABN's
    ``running_chi2`` is E[x^2], METHODS.md MABN items 1, 3, 6); a single norm where the model has
    per-level layers (RetinaNet's head) gives its statistics to every level; absent
    cross-iteration state is a fresh layer's (zeros, tags -1); another norm's entries are
    dropped. See docs/RELIABILITY.md section 6.

    ``state_dict`` (keys without a ``module.`` prefix) is not modified; ``model`` (DDP unwrapped)
    is built by :func:`smallbn_d2.build_model`, its producing convs attached (final window shapes).
    Returns ``(new_state_dict, notes)``: tensors shared where unchanged, one log line per kind of mapping.

    Raises:
        NormStateShapeError: an entry of a CBN/MABN layer has another shape than in the model
            (e.g. a CBN window of another k), which fvcore would skip with a warning.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    sd = collections.OrderedDict(state_dict)
    copy_state_dict_metadata(state_dict, sd)  # module versions, used by e.g. FrozenBatchNorm2d's loading
    modules = dict(model.named_modules())
    model_sd = model.state_dict()
    counts: Dict[str, int] = collections.Counter()
    for name, layer in modules.items():
        if not isinstance(layer, IterationNormBase):
            continue
        prefix, kind = name + ".", type(layer).__name__
        own = _own_entries(model_sd, prefix)
        for local, value in own.items():
            key = prefix + local
            if key in sd and tuple(sd[key].shape) != tuple(value.shape):
                shape = tuple(sd[key].shape)
                hint = layer.state_shape_hint(local, shape) or (
                    "the layer's channel count or producing conv differs: the checkpoint is from another "
                    "architecture (check MODEL.RESNETS/FPN/ROI_*_HEAD channel settings)")
                raise NormStateShapeError(f"Checkpoint entry {key!r} has shape {shape} but the model's {kind} has "
                                          f"shape {tuple(value.shape)}: {hint}.")
        owner, _, last = name.rpartition(".")  # a per-level layer reads a single norm's entries of its list
        parent = owner + "." if last.isdigit() and isinstance(modules.get(owner), CycleBatchNormList) else None
        sources = [p for p in (prefix, parent) if p is not None]
        mean, var = (next((sd[p + s] for p in sources if p + s in sd), None) for s in _BN_STATS)
        present = any(k.startswith(prefix) for k in sd) or (
            parent is not None and any(parent + s in sd for s in ("weight", "bias") + _BN_STATS))
        if not present:
            continue  # the checkpoint lacks this layer: fvcore reports its keys as missing
        population = layer.population_state_keys()
        if not any(prefix + k in sd for k in population):
            if mean is not None and var is not None:
                m = mean.double()
                for k, v in layer.population_state(m, var.double() + m * m).items():
                    sd[prefix + k] = v
                counts[f"{kind} {'/'.join(population)} from BN statistics (running_mean, running_var)"] += 1
            else:
                logger.warning(f"{name}: the checkpoint has neither {'/'.join(population)} nor BN's "
                               f"running_mean/var; the population statistics keep their initial values")
        for local in _own_entries(sd, prefix):
            if local not in own:
                del sd[prefix + local]  # another norm's state (BN's statistics, CBN's window, MABN's buffers)
        fresh = [local for local in own if prefix + local not in sd and local in layer.cross_iteration_state_keys()]
        for local in fresh:
            sd[prefix + local] = _fresh_value(local, own[local])
        if fresh:
            counts[f"{kind} cross-iteration state absent from the checkpoint, initialised afresh"] += 1
    return sd, [f"{kind}: {n} layers" for kind, n in counts.items()]


def _mismatch(incompatible) -> str:
    """fvcore's incompatible keys of a load as one line, or "" if everything matched."""
    keys = {"missing": list(getattr(incompatible, "missing_keys", [])),
            "unexpected": list(getattr(incompatible, "unexpected_keys", [])),
            "of another shape": [k for k, *_ in getattr(incompatible, "incorrect_shapes", [])]}
    if not any(keys.values()):
        return ""
    return ", ".join(f"{kind} keys {k[:8]}{' ...' if len(k) > 8 else ''}" for kind, k in keys.items())


def _peek(path: str) -> Dict:
    """The entries of a checkpoint file, memory-mapped where possible; {} if unreadable."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip-format file: no mmap
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a file that is no torch checkpoint has nothing to offer
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _without_cross_iteration_state(model: nn.Module) -> Iterator[None]:
    """While active, ``model.state_dict()`` omits every layer's cross-iteration state."""
    def drop(module, state_dict, prefix, local_metadata):
        for key in module.cross_iteration_state_keys():
            state_dict.pop(prefix + key, None)

    handles = [register_state_dict_hook(m, drop) for m in model.modules() if isinstance(m, IterationNormBase)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@route_load_model
class NormCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` for CBN/MABN models, with the same constructor.

    Loading: Detectron2's name matching of model-zoo files (MABN layers expose virtual
    ``running_mean``/``running_var`` keys to it), :func:`convert_norm_state_dict`, fvcore's
    loading. A converted checkpoint (:func:`save_inference_checkpoint`) loads strictly; a folded
    one only into the FrozenBN model of its config, folded first when there are no
    checkpointables (evaluation). Resuming from ``<prefix>_final.pth`` takes the periodic
    checkpoint of the same iteration if there is one (it keeps the cross-iteration state).
    Saving: atomic (:class:`AtomicPathManager`); ``*_final`` checkpoints leave out the layers'
    ``cross_iteration_state_keys()``. See docs/RELIABILITY.md section 7 and docs/DEPLOY.md.

    Raises (from ``load``/``resume_or_load``):
        NormStateShapeError: as :func:`convert_norm_state_dict`.
        IncompatibleCheckpointError: a converted checkpoint that does not match the model (the
            model may be partly loaded then).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = AtomicPathManager(self.path_manager)
        self._loading = ""  # path of the load in progress, for messages
        self._resuming = False

    def load(self, path: str, *args, **kwargs):
        """Detectron2's ``load``, with the class docstring's additions."""
        self._loading = path
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        """Detectron2's ``resume_or_load``; a ``*_final.pth`` gives way to its periodic twin (class docstring)."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        self._resuming = True
        try:
            return self.load(self._full_state_twin(last) or last)
        finally:
            self._resuming = False

    def _full_state_twin(self, final: str) -> Optional[str]:
        """The periodic checkpoint written in the same step as ``final`` (a ``*_final.pth``), or None."""
        name = os.path.basename(final)
        iteration = _peek(final).get("iteration") if name.endswith("_final.pth") else None
        if not isinstance(iteration, int):
            return None
        twin = os.path.join(os.path.dirname(final), f"{name[:-len('_final.pth')]}_{iteration:07d}.pth")
        if not os.path.isfile(twin) or _peek(twin).get("iteration") != iteration:
            return None
        self.logger.info(f"Resuming from {twin}: the checkpoint of iteration {iteration}, written in the same step as "
                         f"{name} but with the norms' cross-iteration state (CBN windows, MABN moving averages)")
        return twin

    def save(self, name: str, **kwargs) -> None:
        """Detectron2's ``save``, atomic; ``*_final`` without cross-iteration state."""
        context = _without_cross_iteration_state(self.model) if name.endswith("_final") else contextlib.nullcontext()
        with context:
            super().save(name, **kwargs)

    def load_model_state(self, checkpoint: Dict) -> "object":
        """Load a read checkpoint (fvcore's private ``_load_model``, routed here by
        :func:`smallbn_d2.compat.route_load_model`); returns fvcore's incompatible keys."""
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
            self._fold_model()
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
        mismatch = _mismatch(incompatible) if converted is not None else ""
        if mismatch:
            path = self._loading
            config = os.path.splitext(path)[0] + ".yaml"
            where = (f"tools/train_net.py --eval-only --config-file {config}" if os.path.isfile(config)
                     else "tools/train_net.py --eval-only with the .yaml written next to it")
            kind = "folded (--fold)" if converted.get("fold") else "unfolded"
            raise IncompatibleCheckpointError(
                f"{path!r} is a checkpoint converted for inference, {kind}, by tools/convert_for_inference.py, and "
                f"does not match this model ({mismatch}): evaluate it with {where}, or load it with "
                f"smallbn_d2.deploy.load_inference_model(training cfg, {path!r}).")
        # MABN centralizes its convs' weights: say so if loaded weights were not trained that way
        check_loaded_weight_centralization(self.model, loaded_keys=state.keys())
        return incompatible

    def _fold_model(self) -> None:
        """Fold a FrozenBN model for a folded checkpoint; a training model is left to the strict check."""
        from .deploy.to_frozen_bn import CONVERTED, fold_frozen_bn  # deploy imports this module

        if any(isinstance(m, CONVERTED) for m in self.model.modules()):
            return
        folded = [r for r in fold_frozen_bn(self.model) if r.action.startswith("folded")]
        if folded:
            self.logger.info(f"{self._loading} is folded (tools/convert_for_inference.py --fold): {len(folded)} "
                             "FrozenBatchNorm2d layers of the model folded into their convs before loading")


# ------------------------------------------------------------------------------ writing files
def refuse_existing(path: str, overwrite: bool) -> None:
    """smallbn_d2's output guard (:func:`smallbn_d2.engine.check_output_dir`) for one file to write.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if "://" in path:
        if PathManager.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} exists; refusing to overwrite it; allowed: a new path, or overwrite=True")
        return
    from .engine.defaults import check_output_dir  # the engine imports this module

    check_output_dir(os.path.dirname(path) or ".", files=[os.path.basename(path)], allow_existing=overwrite,
                     way_out="overwrite=True")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A new empty file next to local ``path`` to write, renamed over ``path`` when the block exits cleanly.

    The file gets the mode a plain ``open`` gives (0o666 minus the umask). An exception removes
    it and leaves ``path`` as it was; a killed process leaves it as ``.<name>.<hex>.partial``,
    which nothing loads.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.partial")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _atomic_open(path: str, mode: str):
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename


class AtomicPathManager:
    """A PathManager whose ``open`` of a local path for writing ("w", "wb") writes through
    :func:`atomic_path` (flushed to disk before the rename); everything else is the wrapped one's."""

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def open(self, path: str, mode: str = "r", **kwargs):
        if "://" not in path and mode in ("w", "wb") and not kwargs:
            return _atomic_open(path, mode)
        return self._wrapped.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


# ------------------------------------------------------------------------------ converted checkpoints
def save_inference_checkpoint(model: nn.Module, path: str, fold: bool, overwrite: bool = False) -> None:
    """Write ``model`` as a Detectron2 checkpoint ``{"model": state_dict, METADATA_KEY: {"fold": fold}}``.

    Unlike ``DetectionCheckpointer.save`` it writes no ``last_checkpoint``, so converting into a
    training folder cannot redirect a later ``--resume``. A local file is written atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (:func:`refuse_existing`).
    """
    refuse_existing(path, overwrite)
    data = {"model": model.state_dict(), METADATA_KEY: {"fold": bool(fold)}}
    with AtomicPathManager(PathManager).open(path, "wb") as f:
        torch.save(data, f)


def read_conversion_metadata(path: str) -> Optional[Dict]:
    """The ``{"fold": bool}`` metadata of a checkpoint written by :func:`save_inference_checkpoint`,
    or None for any other checkpoint (model-zoo ``.pkl`` files included). Memory-mapped where possible."""
    if path.endswith((".pkl", ".pyth")):  # Detectron2's pickled model-zoo formats: never converted
        return None
    meta = _peek(PathManager.get_local_path(path)).get(METADATA_KEY)
    return meta if isinstance(meta, dict) else None


def fill_absent_training_state(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> List[str]:
    """Give each CBN/MABN layer whose cross-iteration state is wholly absent from ``state_dict``
    (as in ``model_final.pth``) a fresh layer's values, in place; returns the layers' names.

    That state (``cross_iteration_state_keys()``) is training-only: eval outputs do not depend on
    it. A layer with part of it, or missing any of its other entries (weight, bias, population
    statistics), is left alone, so that a strict load still reports it. ``state_dict``'s keys
    are without a ``module.`` prefix.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model_sd = model.state_dict()
    filled = []
    for name, layer in model.named_modules():
        if not isinstance(layer, IterationNormBase):
            continue
        prefix = name + "."
        own = _own_entries(model_sd, prefix)
        cross = [k for k in layer.cross_iteration_state_keys() if k in own]
        others = [prefix + k for k in own if k not in cross]
        if any(prefix + k in state_dict for k in cross) or not others or not all(k in state_dict for k in others):
            continue
        for k in cross:
            state_dict[prefix + k] = _fresh_value(k, own[k])
        filled.append(name)
    return filled


@route_load_model
class _RecordingCheckpointer(DetectionCheckpointer):
    """Keeps its last load's incompatible keys; fills absent state (:func:`fill_absent_training_state`)."""

    incompatible = None
    filled: List[str] = []

    def load_model_state(self, checkpoint: Dict) -> "object":
        state = checkpoint.get("model")
        if isinstance(state, dict) and not checkpoint.get("matching_heuristics", False):
            if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
                consume_prefix_in_state_dict_if_present(state, "module.")
            self.filled = fill_absent_training_state(state, self.model)
        self.incompatible = load_model_from_checkpoint(self, checkpoint)
        return self.incompatible


def load_checkpoint_strict(model: nn.Module, path: str) -> Dict:
    """Load a checkpoint (``.pth``/``.pkl``, any PathManager path) into ``model`` for inference, strictly.

    Every weight and population statistic must be there; a layer's training-only state may be
    wholly absent (:func:`fill_absent_training_state`). Returns the checkpoint's other entries
    (e.g. ``"iteration"``, the conversion metadata).

    Raises:
        IncompatibleCheckpointError: missing or unexpected keys, or entries of another shape
            (Detectron2 only logs these).
    """
    checkpointer = _RecordingCheckpointer(model)
    checkpoint = checkpointer.load(path, checkpointables=[])
    mismatch = _mismatch(checkpointer.incompatible)
    if mismatch:
        raise IncompatibleCheckpointError(
            f"{path!r} does not match the model: {mismatch}. Is it a checkpoint of a model of this "
            "config (for a converted checkpoint: with the fold setting it was converted with)?")
    if checkpointer.filled:
        logger.info(f"{path}: no cross-iteration state (training-only: CBN windows, MABN moving averages) for "
                    f"{len(checkpointer.filled)} layers, as in model_final.pth; inference does not use it")
    checkpoint.pop("model", None)
    return checkpoint
