"""The model a converted checkpoint loads into: the training config with its norms as FrozenBN.

A checkpoint converted by :func:`smallbn_d2.deploy.convert_for_inference` (unfolded) loads
strictly into the model built from the training config with every convertible ``NORM`` set to
``"FrozenBN"`` (:func:`frozen_bn_config`). :func:`build_inference_model` builds that model and
adds what a config cannot express: the per-level FrozenBN lists of RetinaNet's head and, for
folded checkpoints, the folded structure; :func:`load_inference_model` builds and loads strictly
in one call. See ``docs/DEPLOY.md``.
"""
from __future__ import annotations

from typing import Optional

from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ..checkpoint import load_checkpoint_strict, read_conversion_metadata
from ..modeling.norms import frozen_convertible_norms, per_level_retinanet_norms
from .convert import fold_frozen_bn

__all__ = ["frozen_bn_config", "build_inference_model", "load_inference_model"]


def frozen_bn_config(cfg: CfgNode) -> CfgNode:
    """A copy of ``cfg`` with every ``NORM`` key whose value converts to FrozenBN
    (:func:`~smallbn_d2.modeling.norms.frozen_convertible_norms`) set to ``"FrozenBN"`` (e.g.
    ``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``,
    ``MODEL.ROI_MASK_HEAD.NORM``, ``MODEL.RETINANET.NORM``). Other norms (GN, LN, "") are kept.

    Args:
        cfg: a Detectron2 config (not modified).
    Returns:
        a new, unfrozen ``CfgNode``.
    """
    convertible = frozen_convertible_norms()
    out = cfg.clone()
    out.defrost()

    def walk(node: CfgNode) -> None:
        for key, value in node.items():
            if isinstance(value, CfgNode):
                walk(value)
            elif key == "NORM" and value in convertible:
                node[key] = "FrozenBN"

    walk(out)
    return out


def _per_level_frozen_retinanet(model: nn.Module) -> None:
    for head in model.modules():
        if not isinstance(head, RetinaNetHead):
            continue
        for subnet in (head.cls_subnet, head.bbox_subnet):
            for i, module in enumerate(subnet):
                if isinstance(module, FrozenBatchNorm2d):
                    C = module.num_features
                    cycle = CycleBatchNormList(length=head._num_features, num_features=C, affine=False,
                                               bn_class=lambda num_features, affine: FrozenBatchNorm2d(num_features))
                    subnet[i] = cycle.to(module.running_mean.device)


def build_inference_model(cfg: CfgNode, fold: bool = False) -> nn.Module:
    """Build the model that a checkpoint converted from a model of ``cfg`` loads into, strictly.

    The model of :func:`frozen_bn_config` (``cfg``'s norms as FrozenBN); if
    ``cfg.MODEL.RETINANET.NORM`` gives per-level norms, the FrozenBN layers of RetinaNet's head
    become per-level lists, as conversion makes them; with ``fold=True`` the folded structure of
    :func:`~smallbn_d2.deploy.fold_frozen_bn` (parameter values are placeholders until the
    checkpoint is loaded). Weights are not loaded; no data is read; the model is in eval mode on
    ``cfg.MODEL.DEVICE``.

    Args:
        cfg: the training config of the converted model (with smallbn_d2's keys).
        fold: whether the checkpoint was converted with ``fold=True``.
    Returns:
        the model.
    """
    from ..modeling import build_model

    per_level = (cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
                 and cfg.MODEL.RETINANET.NORM in per_level_retinanet_norms())
    model = build_model(frozen_bn_config(cfg))
    if per_level:
        _per_level_frozen_retinanet(model)
    if fold:
        fold_frozen_bn(model)
    return model.eval()


def load_inference_model(cfg: CfgNode, weights: str, fold: Optional[bool] = None) -> nn.Module:
    """Build :func:`build_inference_model` and load a converted checkpoint into it, strictly.

    Args:
        cfg: the training config of the converted model.
        weights: path of the converted checkpoint.
        fold: whether it is folded; None reads it from the checkpoint's metadata (written by
            :func:`smallbn_d2.checkpoint.save_inference_checkpoint`).
    Returns:
        the model in eval mode.
    Raises:
        ValueError: ``fold`` is None and the checkpoint has no conversion metadata.
        IncompatibleCheckpointError: missing or unexpected keys.
    """
    if fold is None:
        meta = read_conversion_metadata(weights)
        if meta is None:
            raise ValueError(f"{weights!r} has no conversion metadata; pass fold=True or fold=False")
        fold = bool(meta["fold"])
    model = build_inference_model(cfg, fold=fold)
    load_checkpoint_strict(model, weights)
    return model.eval()
