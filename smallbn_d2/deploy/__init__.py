"""Deploy CBN / MABN models at BN speed (docs/DEPLOY.md).

:mod:`.to_frozen_bn` converts every CBN, NaiveCBN, MABN and BN layer to Detectron2's
``FrozenBatchNorm2d`` and folds it into the preceding conv; :mod:`.inference_model` builds the model
a converted checkpoint loads into; the checkpoint I/O of :mod:`smallbn_d2.checkpoint` is re-exported.
"""
from ..checkpoint import IncompatibleCheckpointError, load_checkpoint_strict, save_inference_checkpoint
from .to_frozen_bn import FROZEN_EPS, ConvertedLayer, convert_for_inference, convert_to_frozen_bn, fold_frozen_bn
from .inference_model import (build_inference_model, build_training_model, frozen_bn_config, is_lazy_config,
                              load_inference_model, load_training_config)

__all__ = ["FROZEN_EPS", "ConvertedLayer", "convert_for_inference", "convert_to_frozen_bn", "fold_frozen_bn",
           "frozen_bn_config", "build_inference_model", "load_inference_model", "load_training_config",
           "build_training_model", "is_lazy_config", "save_inference_checkpoint", "load_checkpoint_strict",
           "IncompatibleCheckpointError"]
