"""The model a converted checkpoint loads into: the training config with its norms as FrozenBN.

For Detectron2's YAML configs (``CfgNode``) and its LazyConfigs (Python files, or the YAML that
``LazyConfig.save`` writes; their norms are the values of keys named ``norm``/``*_norm`` under
``model``). See docs/DEPLOY.md, section "Load the converted model".
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

from ..checkpoint import load_checkpoint_strict, read_conversion_metadata
from ..config import config_with, norm_keys
from ..compat import retinanet_head_levels
from ..modeling.norms import frozen_convertible_norms, per_level_retinanet_norms
from .to_frozen_bn import fold_frozen_bn

__all__ = ["frozen_bn_config", "build_inference_model", "load_inference_model", "load_training_config",
           "is_lazy_config", "build_training_model"]


def is_lazy_config(cfg: Any) -> bool:
    """True for a LazyConfig (omegaconf ``DictConfig``), False for a YAML ``CfgNode``."""
    return not isinstance(cfg, CfgNode)


def _is_lazy_file(path: str) -> bool:
    if path.endswith(".py"):
        return True
    with open(path) as f:  # a LazyConfig saved as YAML has lowercase top-level fields (model:, train:)
        return re.search(r"^model:", f.read(), flags=re.MULTILINE) is not None


def load_training_config(config_file: str, opts: Sequence[str] = ()) -> Any:
    """The training config of a model: a YAML config (``smallbn_d2.engine.load_config``, overrides
    ``KEY VALUE ...``) or a LazyConfig (``.py``, or a ``.yaml`` written by ``LazyConfig.save``;
    ``LazyConfig.load`` + ``apply_overrides``, overrides ``key=value ...``).

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        as ``load_config`` / ``LazyConfig.apply_overrides`` for bad keys or values.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file {config_file!r} does not exist")
    if _is_lazy_file(config_file):
        from detectron2.config import LazyConfig

        return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
    from ..engine import load_config

    return load_config(config_file, opts)


def build_training_model(cfg: Any) -> nn.Module:
    """The model of a training config with its own norms (CBN, MABN, ...), not loaded:
    :func:`smallbn_d2.build_model` for a YAML config,
    :func:`smallbn_d2.lazy.build_model_from_lazy_config` for a LazyConfig. Reads no data."""
    if is_lazy_config(cfg):
        from ..lazy import build_model_from_lazy_config

        return build_model_from_lazy_config(cfg)
    from ..modeling import build_model

    return build_model(cfg)


def frozen_bn_config(cfg: Any) -> Any:
    """A copy of ``cfg`` (not modified) with every norm that converts to FrozenBN
    (:func:`~smallbn_d2.modeling.norms.frozen_convertible_norms`) set to ``"FrozenBN"``.

    YAML config: every ``NORM`` key (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``,
    ``MODEL.ROI_*_HEAD.NORM``, ``MODEL.RETINANET.NORM``); returns a new, unfrozen ``CfgNode``.
    LazyConfig: every string value of a key named ``norm`` or ``*_norm`` under ``model``; returns
    a deep copy. Other norms (GN, LN, "") are kept.
    """
    convertible = frozen_convertible_norms()
    if not is_lazy_config(cfg):
        out = config_with(cfg, {key: "FrozenBN" for key, value in norm_keys(cfg).items() if value in convertible})
        out.defrost()
        return out
    from omegaconf import OmegaConf

    from ..lazy import lazy_norm_fields  # on use: importing deploy does not load the LazyConfig flow

    out = copy.deepcopy(cfg)
    for path, value in lazy_norm_fields(cfg).items():
        if value in convertible:
            OmegaConf.update(out, path, "FrozenBN")
    return out


def _per_level_frozen_retinanet(model: nn.Module) -> None:
    for head in model.modules():
        if not isinstance(head, RetinaNetHead):
            continue
        for subnet in (head.cls_subnet, head.bbox_subnet):
            for i, module in enumerate(subnet):
                if isinstance(module, FrozenBatchNorm2d):
                    cycle = CycleBatchNormList(length=retinanet_head_levels(head), num_features=module.num_features,
                                               affine=False,
                                               bn_class=lambda num_features, affine: FrozenBatchNorm2d(num_features))
                    subnet[i] = cycle.to(module.running_mean.device)


def build_inference_model(cfg: Any, fold: bool = False) -> nn.Module:
    """The model, in eval mode and not loaded, that a checkpoint converted from a model of ``cfg`` loads into strictly.

    ``cfg`` is the training config (YAML, with smallbn_d2's keys, built on ``MODEL.DEVICE``; or a
    LazyConfig, built on ``train.device``). The model is that of :func:`frozen_bn_config`, with the
    per-level FrozenBN lists of RetinaNet's head where its norm is per level, and with ``fold=True``
    (the checkpoint was converted folded) the structure of :func:`~smallbn_d2.deploy.fold_frozen_bn`.
    Reads no data.
    """
    model = build_training_model(frozen_bn_config(cfg))
    if is_lazy_config(cfg):
        from ..lazy import lazy_norm_fields

        per_level = (any(isinstance(m, RetinaNetHead) for m in model.modules())
                     and lazy_norm_fields(cfg).get("model.head.norm") in per_level_retinanet_norms())
    else:
        per_level = (cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
                     and cfg.MODEL.RETINANET.NORM in per_level_retinanet_norms())
    if per_level:
        _per_level_frozen_retinanet(model)
    if fold:
        fold_frozen_bn(model)
    return model.eval()


def load_inference_model(cfg: Any, weights: str, fold: Optional[bool] = None) -> nn.Module:
    """:func:`build_inference_model` of the training config ``cfg``, with the converted checkpoint
    ``weights`` loaded strictly; in eval mode.

    ``fold`` None reads whether it is folded from the checkpoint's metadata
    (:func:`smallbn_d2.checkpoint.save_inference_checkpoint`).

    Raises:
        ValueError: ``fold`` is None and the checkpoint has no conversion metadata.
        IncompatibleCheckpointError: missing, unexpected or mis-shaped keys.
    """
    if fold is None:
        meta = read_conversion_metadata(weights)
        if meta is None:
            raise ValueError(f"{weights!r} has no conversion metadata; pass fold=True or fold=False")
        fold = bool(meta["fold"])
    model = build_inference_model(cfg, fold=fold)
    load_checkpoint_strict(model, weights)
    return model.eval()
