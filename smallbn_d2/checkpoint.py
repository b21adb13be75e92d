"""Loading checkpoints into models with CBN/MABN layers, across norms, with clear shape errors.

Two things Detectron2's ``DetectionCheckpointer`` does not do for the cross-iteration norms:

1. **Loading across norms** (issue 7, item 6). A checkpoint trained with ``BN``, ``SyncBN``,
   ``FrozenBN`` (or ``CBN``) loads into a model of the same architecture whose norms are CBN or
   MABN. Per CBN/MABN layer at ``prefix``:

   * affine parameters ``prefix.weight``/``prefix.bias`` (gamma, beta, shape (C,)) load under
     their own names (BN, SyncBN, FrozenBN and CBN/MABN use the same names);
   * population statistics: CBN's ``running_mean``/``running_var`` (C,) are BN's, loaded as
     they are; MABN's ``running_chi2`` (C,), its population estimate of E[x^2] (METHODS.md MABN
     items 1, 3, 6), is set to ``running_var + running_mean ** 2`` (E[x^2] = Var[x] + E[x]^2,
     computed in float64);
   * RetinaNet's head keeps one CBN/MABN per FPN level (``prefix = head...N.<level>``, inside
     Detectron2's ``CycleBatchNormList``); a checkpoint with a single norm there (FrozenBN, which
     Detectron2 does not make per level) gives its statistics to every level;
   * the cross-iteration state the checkpoint cannot have (CBN's ``window_*`` buffers and
     ``num_batches_tracked``; MABN's ``chi2_buffer``, ``psi_buffer``, ``chi2_iters``,
     ``psi_iters``) is set to the values of a freshly built layer (zeros; tags -1 = empty
     slot), so the layer starts its window / moving averages afresh;
   * entries of the source norm that the target does not have (BN's ``running_mean``/
     ``running_var``/``num_batches_tracked`` in an MABN model, CBN's window in an MABN model,
     MABN's buffers in a CBN model) are consumed or dropped, not reported as unexpected.

   The reverse (CBN/MABN -> BN/FrozenBN for deployment) is the conversion of the inference
   tools, not this module.

2. **Clear shape errors** (issue 7, item 2). Detectron2 (fvcore) skips a checkpoint entry whose
   shape differs from the model's with a log warning, which for a CBN window trained with
   another window size k, or an MABN buffer of another buffer size m, would silently restart
   the cross-iteration state. Here every entry of a CBN/MABN layer whose shape differs raises
   :class:`NormStateShapeError` naming the key, the checkpoint shape, the model shape and the
   config key that sets it.

:func:`convert_norm_state_dict` does both on a state dict; :class:`NormCheckpointer` is
``DetectionCheckpointer`` applying it on every load (used by :class:`smallbn_d2.engine.Trainer`
and ``tools/train_net.py``). Saving is Detectron2's, unchanged.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import CycleBatchNormList
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .layers import CrossIterationBatchNorm2d, IterationNormBase, MovingAverageBatchNorm2d

__all__ = ["NormStateShapeError", "convert_norm_state_dict", "NormCheckpointer"]

logger = logging.getLogger(__name__)

_BN_STATS = ("running_mean", "running_var")
_CBN_STATE = ("window_", "num_batches_tracked")  # prefixes / names of CBN-only state
_MABN_STATE = ("running_chi2", "chi2_buffer", "chi2_iters", "psi_buffer", "psi_iters")


class NormStateShapeError(ValueError):
    """A checkpoint entry of a CBN/MABN layer has another shape than the model's.

    The message names the key, both shapes and the hyperparameter that sets the shape.
    """


def _shape_hint(layer: IterationNormBase, local: str, ckpt_shape: Tuple[int, ...]) -> str:
    if isinstance(layer, CrossIterationBatchNorm2d) and local.startswith("window_") and ckpt_shape:
        return (f"the checkpoint was trained with window size k = {ckpt_shape[0] + 1}, the model has "
                f"k = {layer.window_size} (MODEL.CBN.WINDOW_SIZE); set MODEL.CBN.WINDOW_SIZE {ckpt_shape[0] + 1} "
                "to resume it, or delete its window_* entries to start with an empty window")
    if isinstance(layer, MovingAverageBatchNorm2d) and local in _MABN_STATE[1:] and ckpt_shape:
        return (f"the checkpoint was trained with buffer size m = {ckpt_shape[0]}, the model has "
                f"m = {layer.buffer_size} (MODEL.MABN.BUFFER_SIZE); set MODEL.MABN.BUFFER_SIZE {ckpt_shape[0]} "
                "to resume it, or delete its chi2_*/psi_* entries to start the moving averages afresh")
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
    if hasattr(state_dict, "_metadata"):  # module versions, used by e.g. FrozenBatchNorm2d's loading
        sd._metadata = state_dict._metadata
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
        if isinstance(layer, MovingAverageBatchNorm2d):
            if prefix + "running_chi2" not in sd and mean is not None and var is not None:
                chi2 = var.double() + mean.double() ** 2
                sd[prefix + "running_chi2"] = chi2.to(own["running_chi2"].dtype)
                note("MABN running_chi2 = running_var + running_mean^2 from a BN-style checkpoint")
            elif prefix + "running_chi2" not in sd:
                logger.warning(f"{name}: the checkpoint has no running_chi2 nor running_mean/var; "
                               "running_chi2 keeps its initial value (ones)")
            for k in [k for k in sd if k.startswith(prefix) and k[len(prefix):] not in own]:
                del sd[k]  # BN's running_mean/var/num_batches_tracked, CBN's window: consumed
        else:  # CBN / Naive CBN
            for s, v in (("running_mean", mean), ("running_var", var)):
                if prefix + s not in sd and v is not None:
                    sd[prefix + s] = v.clone()
                    note("CBN population statistics copied from a single (not per-level) norm")
            if mean is None and prefix + "running_chi2" in sd:
                logger.warning(f"{name}: the checkpoint is MABN (running_chi2, no running_mean/var); "
                               "the CBN population statistics keep their initial values")
            for k in [k for k in sd if k.startswith(prefix) and k[len(prefix):] in _MABN_STATE]:
                del sd[k]
        fresh = [local for local in own if prefix + local not in sd
                 and (local.startswith(_CBN_STATE) or local in _MABN_STATE[1:])]
        for local in fresh:
            sd[prefix + local] = _fresh_value(local, own[local])
        if fresh:
            note(f"{type(layer).__name__} cross-iteration state absent from the checkpoint, initialised afresh")
    notes = [f"{kind}: {n} layers" for kind, n in counts.items()]
    return sd, notes


class NormCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads across norms into CBN/MABN models and raises
    :class:`NormStateShapeError` on mis-shaped CBN/MABN entries (see the module docstring).

    Same constructor, saving and ``resume_or_load`` as Detectron2's. Loading applies, in order:
    Detectron2's name-matching heuristics for ``.pkl``/``.pyth`` model-zoo files (with MABN
    layers exposing virtual ``running_mean``/``running_var`` keys, so that ImageNet BN
    statistics find them), then :func:`convert_norm_state_dict`, then fvcore's loading.

    Raises (from ``load``/``resume_or_load``):
        NormStateShapeError: as :func:`convert_norm_state_dict`.
    """

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        self._convert_ndarray_to_tensor(state)
        if checkpoint.get("matching_heuristics", False):
            targets = dict(self.model.state_dict())
            for name, layer in self.model.named_modules():
                if isinstance(layer, MovingAverageBatchNorm2d):
                    for s in _BN_STATS:
                        targets.setdefault(f"{name}.{s}", layer.running_chi2)
            state = align_and_update_state_dicts(
                targets, state, c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
            checkpoint["matching_heuristics"] = False
        if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
            consume_prefix_in_state_dict_if_present(state, "module.")
        state, notes = convert_norm_state_dict(state, self.model)
        for line in notes:
            self.logger.info(f"Loading across norms: {line}")
        checkpoint["model"] = state
        return super()._load_model(checkpoint)
