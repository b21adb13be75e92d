"""Turn a Detectron2 model with CBN/MABN layers into a trainable one.

Detectron2 builds norm layers through ``get_norm(name, channels)`` before the conv that feeds
them and without the config, so after ``detectron2.modeling.build_model(cfg)`` the CBN/MABN
layers know neither their producing conv nor the config's hyperparameters.
:func:`prepare_norms` supplies both:

1. Domain-specific statistics in RetinaNet's head (shared across FPN levels): each CBN/MABN in
   ``cls_subnet``/``bbox_subnet`` becomes Detectron2's ``CycleBatchNormList`` of one layer per
   level with a shared affine, exactly as Detectron2 does for "BN" ("Rethinking Batch in
   BatchNorm", Sec. 5.2).
2. Producing convs: a norm held as ``Conv2d.norm`` (Detectron2's ``Conv2d(..., norm=...)``) or
   directly following an ``nn.Conv2d`` in an ``nn.Sequential`` (RetinaNet's head) is attached
   to it (``attach_conv``); MABN then centralizes that conv's weight.
3. Hyperparameters from ``cfg.MODEL.CBN`` / ``cfg.MODEL.MABN``; MABN layers inside the box,
   mask and RetinaNet heads get ``HEAD_WARMUP_ITERS`` as their warm-up.

Any CBN/MABN left without a conv raises :class:`NormNotWiredError` here, at build time.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList
from detectron2.modeling import build_model as d2_build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from torch import nn

from ..config import validate_smallbn_config
from ..layers import CrossIterationBatchNorm2d, IterationNormBase, MovingAverageBatchNorm2d
from ..layers.base import NormNotWiredError

__all__ = ["build_model", "prepare_norms", "iteration_norms", "set_norm_iteration", "cbn_burn_in_iters",
           "HEAD_TYPES"]

logger = logging.getLogger(__name__)

#: Modules whose MABN layers count as "heads" for MODEL.MABN.HEAD_WARMUP_ITERS.
HEAD_TYPES = (FastRCNNConvFCHead, BaseMaskRCNNHead, RetinaNetHead)


def iteration_norms(model: nn.Module) -> Iterator[Tuple[str, IterationNormBase]]:
    """Yield ``(qualified name, layer)`` for every CBN/MABN layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, IterationNormBase):
            yield name, module


def set_norm_iteration(model: nn.Module, iteration: int) -> None:
    """Tell every CBN/MABN layer of ``model`` the trainer iteration about to run (0-based).

    Raises:
        ValueError: ``iteration`` is not an integer >= 0.
    """
    for _, layer in iteration_norms(model):
        layer.set_iteration(iteration)


def _dataset_size(cfg: CfgNode) -> int:
    from detectron2.data import get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return len(dicts)


def cbn_burn_in_iters(cfg: CfgNode, dataset_size: Optional[int] = None) -> int:
    """CBN burn-in in iterations from ``MODEL.CBN.BURN_IN_ITERS`` or ``BURN_IN_EPOCHS``.

    With neither set, 3 epochs (the paper's COCO setting). Epochs are converted as
    ``round(epochs * dataset_size / SOLVER.IMS_PER_BATCH)``, ``dataset_size`` being the number
    of training images after Detectron2's filtering (loaded from ``cfg.DATASETS.TRAIN`` if not
    given).

    Raises:
        ConfigValueError: invalid CBN keys (see :func:`validate_smallbn_config`).
    """
    validate_smallbn_config(cfg)
    c = cfg.MODEL.CBN
    if c.BURN_IN_ITERS is not None:
        return int(c.BURN_IN_ITERS)
    epochs = 3.0 if c.BURN_IN_EPOCHS is None else float(c.BURN_IN_EPOCHS)
    if epochs == 0:
        return 0
    if dataset_size is None:
        dataset_size = _dataset_size(cfg)
    iters = int(round(epochs * dataset_size / cfg.SOLVER.IMS_PER_BATCH))
    logger.info(f"CBN burn-in: {epochs} epochs x {dataset_size} images / {cfg.SOLVER.IMS_PER_BATCH} "
                f"images per iteration = {iters} iterations")
    return iters


def _make_per_level(layer: IterationNormBase, num_levels: int) -> CycleBatchNormList:
    device = next(layer.buffers()).device
    cycle = CycleBatchNormList(length=num_levels, bn_class=type(layer), num_features=layer.num_features)
    return cycle.to(device)


def _per_level_retinanet(model: nn.Module) -> None:
    for head in model.modules():
        if not isinstance(head, RetinaNetHead):
            continue
        num_levels = head._num_features if hasattr(head, "_num_features") else None
        for subnet in (head.cls_subnet, head.bbox_subnet):
            for i, module in enumerate(subnet):
                if isinstance(module, IterationNormBase):
                    if num_levels is None:
                        raise NormNotWiredError("RetinaNetHead has no _num_features; cannot build per-level norms")
                    subnet[i] = _make_per_level(module, num_levels)


def _norm_layers(module: Optional[nn.Module]) -> List[IterationNormBase]:
    if isinstance(module, IterationNormBase):
        return [module]
    if isinstance(module, CycleBatchNormList):
        return [m for m in module if isinstance(m, IterationNormBase)]
    return []


def _attach_producers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            for layer in _norm_layers(getattr(module, "norm", None)):
                layer.attach_conv(module)
        if isinstance(module, nn.Sequential):
            children = list(module)
            for prev, cur in zip(children[:-1], children[1:]):
                if isinstance(prev, nn.Conv2d):
                    for layer in _norm_layers(cur):
                        layer.attach_conv(prev)


def _head_layers(model: nn.Module) -> set:
    ids = set()
    for module in model.modules():
        if isinstance(module, HEAD_TYPES):
            ids.update(id(m) for m in module.modules() if isinstance(m, IterationNormBase))
    return ids


def prepare_norms(model: nn.Module, cfg: CfgNode, burn_in_iters: Optional[int] = None) -> nn.Module:
    """Wire and configure the CBN/MABN layers of a freshly built Detectron2 model, in place.

    Args:
        model: from ``detectron2.modeling.build_model(cfg)`` (not yet trained or loaded).
        cfg: the config it was built from, with :func:`add_smallbn_config` keys.
        burn_in_iters: CBN burn-in in iterations; default :func:`cbn_burn_in_iters` (computed
            only if the model has CBN layers).
    Returns:
        ``model``.
    Raises:
        ConfigValueError: invalid smallbn_d2 config values.
        NormNotWiredError: a CBN/MABN layer has no producing conv.
    """
    validate_smallbn_config(cfg)
    _per_level_retinanet(model)
    _attach_producers(model)
    heads = _head_layers(model)
    c, m = cfg.MODEL.CBN, cfg.MODEL.MABN
    layers = list(iteration_norms(model))
    if burn_in_iters is None and any(isinstance(l, CrossIterationBatchNorm2d) for _, l in layers):
        burn_in_iters = cbn_burn_in_iters(cfg)
    for name, layer in layers:
        if layer.conv is None:
            raise NormNotWiredError(
                f"{type(layer).__name__} at {name!r} has no producing conv: CBN and MABN must directly "
                "follow an nn.Conv2d (as Conv2d(..., norm=...) or next in an nn.Sequential)."
            )
        if isinstance(layer, CrossIterationBatchNorm2d):
            layer.configure(window_size=c.WINDOW_SIZE, burn_in=burn_in_iters, momentum=c.MOMENTUM, eps=c.EPS,
                            aggregation=c.AGGREGATION, grad_subsample=c.GRAD_SUBSAMPLE)
        elif isinstance(layer, MovingAverageBatchNorm2d):
            warmup = max(m.WARMUP_ITERS, m.HEAD_WARMUP_ITERS) if id(layer) in heads else m.WARMUP_ITERS
            layer.configure(buffer_size=m.BUFFER_SIZE, momentum=m.MOMENTUM, eps=m.EPS, warmup_iters=warmup,
                            renorm_warmup_iters=m.RENORM_WARMUP_ITERS, r_max=m.R_MAX)
    if layers:
        counts = {}
        for _, layer in layers:
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
        logger.info(f"smallbn_d2: prepared {counts} (heads: {len(heads)} layers)")
        frozen = [name for name, layer in layers if layer.affine and not layer.weight.requires_grad]
        if frozen:
            # Detectron2's ResNet.freeze() (MODEL.BACKBONE.FREEZE_AT) turns only BatchNorm into
            # FrozenBatchNorm2d; CBN/MABN in frozen stages keep updating their statistics.
            logger.warning(
                f"{len(frozen)} CBN/MABN layers sit in frozen stages (MODEL.BACKBONE.FREEZE_AT = "
                f"{cfg.MODEL.BACKBONE.FREEZE_AT}), e.g. {frozen[0]!r}: their affine parameters are frozen but "
                "their statistics still adapt in training. Use FREEZE_AT 0 with CBN/MABN in the backbone, "
                "or MODEL.RESNETS.NORM FrozenBN for a frozen pretrained backbone."
            )
    return model


def build_model(cfg: CfgNode) -> nn.Module:
    """``detectron2.modeling.build_model(cfg)`` followed by :func:`prepare_norms`.

    Returns:
        the model on ``cfg.MODEL.DEVICE``.
    Raises:
        as :func:`prepare_norms`.
    """
    validate_smallbn_config(cfg)
    model = d2_build_model(cfg)
    prepare_norms(model, cfg)
    return model.to(torch.device(cfg.MODEL.DEVICE))
