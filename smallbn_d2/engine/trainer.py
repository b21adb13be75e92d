"""The Detectron2 trainer of smallbn_d2."""
from __future__ import annotations

import logging
import os

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from ..compat import has_compiled_ops
from ..modeling import build_model
from .hooks import NormIterationHook

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with smallbn_d2's model building, hooks and COCO evaluation.

    * :meth:`build_model`: ``detectron2.modeling.build_model`` + ``prepare_norms`` (producing
      convs, hyperparameters from ``cfg.MODEL.CBN``/``cfg.MODEL.MABN``, per-level RetinaNet norms).
    * :meth:`build_hooks`: :class:`NormIterationHook` first, then Detectron2's default hooks.
    * :meth:`build_evaluator`: ``COCOEvaluator`` (box AP, and mask AP when ``MODEL.MASK_ON``),
      writing ``inference/coco_instances_results.json``; it uses pycocotools' COCOeval when
      Detectron2's compiled ``_C`` is absent (same numbers, slower).
    """

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops())

    def build_hooks(self):
        return [NormIterationHook()] + super().build_hooks()
