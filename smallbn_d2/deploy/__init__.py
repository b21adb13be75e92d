"""Deploy CBN / MABN models at BN speed: conversion to FrozenBN, folding, and the inference model.

* :mod:`.to_frozen_bn`: :func:`convert_for_inference` / :func:`convert_to_frozen_bn` (every CBN,
  NaiveCBN, MABN and BN layer to Detectron2's ``FrozenBatchNorm2d`` with the same eval output)
  and :func:`fold_frozen_bn` (into the preceding convs).
* :mod:`.inference_model`: the model a converted checkpoint loads into
  (:func:`build_inference_model`, :func:`load_inference_model`), for YAML configs and
  LazyConfigs (:func:`load_training_config`, :func:`build_training_model`).
* Checkpoint I/O lives in :mod:`smallbn_d2.checkpoint` (:func:`save_inference_checkpoint`,
  :func:`load_checkpoint_strict`), re-exported here.

See ``docs/DEPLOY.md`` for the commands.
"""
from ..checkpoint import IncompatibleCheckpointError, load_checkpoint_strict, save_inference_checkpoint
from .to_frozen_bn import FROZEN_EPS, ConvertedLayer, convert_for_inference, convert_to_frozen_bn, fold_frozen_bn
from .inference_model import (build_inference_model, build_training_model, frozen_bn_config, is_lazy_config,
                              load_inference_model, load_training_config)

__all__ = [
    "FROZEN_EPS",
    "ConvertedLayer",
    "convert_for_inference",
    "convert_to_frozen_bn",
    "fold_frozen_bn",
    "frozen_bn_config",
    "build_inference_model",
    "load_inference_model",
    "load_training_config",
    "build_training_model",
    "is_lazy_config",
    "save_inference_checkpoint",
    "load_checkpoint_strict",
    "IncompatibleCheckpointError",
]
