"""The Detectron2 trainer of smallbn_d2 (docs/TRAINING.md)."""
from __future__ import annotations

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn.precise_bn import get_bn_modules

from ..checkpoint import NormCheckpointer
from ..compat import inner_trainer, registered_hooks
from ..config import cbn_burn_in_iters, config_with, norm_keys, resolve_burn_in, scale_norm_iterations
from ..modeling import NORM_FAMILIES, build_model
from .grad_clip import build_optimizer_with_clipping
from .hooks import AveragePopulationStatistics, FreezeNormStatsHook, NormIterationHook, PeakMemoryHook, PreciseNorm
from .precise_norm import precise_norm_layers
from .resources import InferenceTimer, append_inference_time
from .syncbn import warn_single_process_syncbn

__all__ = ["Trainer", "training_set_size", "uses_cbn"]

logger = logging.getLogger(__name__)


def uses_cbn(cfg) -> bool:
    """True if a norm key of ``cfg`` names a family configured by ``MODEL.CBN`` (CBN, NaiveCBN)."""
    return any(NORM_FAMILIES[v].config_section == "CBN" for v in norm_keys(cfg).values() if v in NORM_FAMILIES)


def training_set_size(cfg) -> int:
    """Number of training images of ``cfg.DATASETS.TRAIN`` after Detectron2's filtering (the dicts its
    training loader uses), for a burn-in given in epochs."""
    from detectron2.data import get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return len(dicts)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with smallbn_d2's model, hooks, checkpointer and COCO evaluation
    (docs/TRAINING.md). The norms' iteration counts follow Detectron2's rescaling for the number of
    GPUs, and a CBN burn-in in epochs (with :func:`training_set_size`) or until the first LR step
    becomes iterations (:func:`~smallbn_d2.config.resolve_burn_in`). ``self.checkpointer`` is a
    :class:`~smallbn_d2.checkpoint.NormCheckpointer`; :meth:`state_dict` holds the optimizer state.
    """

    def __init__(self, cfg):
        # Detectron2 rescales its own schedule for the number of GPUs; the norms' counts follow.
        cfg = scale_norm_iterations(cfg, comm.get_world_size())
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())  # what super() does; idempotent
        if uses_cbn(cfg) and cfg.MODEL.CBN.BURN_IN_ITERS is None:  # epochs, or until the first LR step
            cfg = resolve_burn_in(cfg, training_set_size(cfg) if cbn_burn_in_iters(cfg) is None else None)
        super().__init__(cfg)
        self.checkpointer = NormCheckpointer(inner_trainer(self).model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        for hook in registered_hooks(self):
            if isinstance(hook, d2_hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    # Detectron2 v0.6's DefaultTrainer checkpoints only the iteration and the hooks: the optimizer
    # state (SGD momentum; AMP's grad scaler) was lost on --resume. Saved under "_trainer", as later
    # Detectron2 versions do.
    def state_dict(self):
        """Detectron2's trainer state plus ``"_trainer"``: the optimizer (and grad scaler) state."""
        ret = super().state_dict()
        ret["_trainer"] = inner_trainer(self).state_dict()
        return ret

    def load_state_dict(self, state_dict):
        """Inverse of :meth:`state_dict`; without ``"_trainer"`` (plain Detectron2 v0.6) the optimizer
        starts afresh, with a warning."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            inner_trainer(self).load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state (written by Detectron2 v0.6's DefaultTrainer): "
                           "the optimizer (SGD momentum) starts afresh.")

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer, and ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`` (:mod:`.grad_clip`)."""
        return build_optimizer_with_clipping(cfg, model, super().build_optimizer)

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info("Model:\n{}".format(model))
        warn_single_process_syncbn(model, comm.get_world_size(), cfg.SOLVER.IMS_PER_BATCH)
        return model

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``, appending s/image of the model's forward calls to
        ``OUTPUT_DIR/inference/inference_time.json`` (:class:`~smallbn_d2.engine.resources.InferenceTimer`)."""
        with InferenceTimer(model) as timer:
            results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            try:
                iteration = get_event_storage().iter
            except AssertionError:  # no EventStorage: --eval-only
                iteration = None
            append_inference_time(cfg.OUTPUT_DIR, timer, cfg.DATASETS.TEST, cfg.MODEL.DEVICE,
                                  comm.get_world_size(), iteration)
        return results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """``COCOEvaluator`` writing to ``output_folder``, by default ``OUTPUT_DIR/inference``, and
        ``OUTPUT_DIR/inference/<dataset_name>`` when ``DATASETS.TEST`` has several datasets."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:
                output_folder = os.path.join(output_folder, dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        """:class:`NormIterationHook`, :class:`PeakMemoryHook` and :class:`FreezeNormStatsHook` (when
        ``MODEL.SMALLBN.FREEZE_NORM_STATS_ITER >= 0``) first, then Detectron2's hooks with its PreciseBN
        replaced by :class:`PreciseNorm` at the same place (same keys), and
        :class:`AveragePopulationStatistics` before the checkpointer and the evaluation."""
        cfg = self.cfg
        precise = cfg.TEST.PRECISE_BN.ENABLED
        self.cfg = config_with(cfg, {"TEST.PRECISE_BN.ENABLED": False})  # Detectron2's hooks without PreciseBN
        try:
            ret = super().build_hooks()
        finally:
            self.cfg = cfg
        if precise and (get_bn_modules(self.model) or precise_norm_layers(self.model)):
            loader = self.build_train_loader(config_with(cfg, {"DATALOADER.NUM_WORKERS": 0}))  # as Detectron2's
            hook = PreciseNorm(cfg.TEST.EVAL_PERIOD, self.model, loader, cfg.TEST.PRECISE_BN.NUM_ITER)
            after = [i for i, h in enumerate(ret) if isinstance(h, d2_hooks.LRScheduler)]
            ret.insert(after[0] + 1 if after else 0, hook)  # before checkpointer and evaluation
        at = [i for i, h in enumerate(ret) if isinstance(h, (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook))]
        ret.insert(at[0] if at else len(ret),  # every process: the checkpointer is the main process's only
                   AveragePopulationStatistics((cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD)))
        first = [NormIterationHook(), PeakMemoryHook(cfg.MODEL.DEVICE)]  # memory: before the writers
        if cfg.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER >= 0:
            first.append(FreezeNormStatsHook(cfg.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER))
        return first + ret
