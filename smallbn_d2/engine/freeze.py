"""Freezing of normalization statistics for the last part of training.

Source: Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), Sec. 4 (train-test
inconsistency; using population statistics, i.e. FrozenBN, in the last iterations of training
removes it); METHODS.md, last section. Config: ``MODEL.SMALLBN.FREEZE_NORM_STATS_ITER`` (-1: off).

Mechanism. Every normalization layer that keeps population statistics already has a "frozen"
mode that normalizes with them and updates nothing: its eval mode. So freezing puts exactly
those layers in eval mode while the rest of the model trains:

* CBN / NaiveCBN (eval: BN with ``running_mean``/``running_var``), MABN (eval:
  ``gamma * x / sqrt(running_chi2 + eps) + beta``) and torch BN (``nn.BatchNorm1d/2d/3d``,
  ``nn.SyncBatchNorm``, Detectron2's ``BatchNorm2d``/``NaiveSyncBatchNorm``; eval: running
  statistics), inner layers of ``CycleBatchNormList`` included. gamma/beta stay parameters in
  the autograd graph and keep training, as do the convs; no statistic, window, SMA buffer or
  ``num_batches_tracked`` changes any more.
* The producing conv of a frozen CBN layer is put in eval mode too (a conv computes the same in
  both modes; in training mode it would keep capturing its input for the CBN window, holding
  that activation until the next step).

Flags are set on the modules themselves (``module.training = False``, not recursive), so
``model.train()``, which Detectron2 calls e.g. after every evaluation, unfreezes them:
:class:`smallbn_d2.engine.hooks.FreezeNormStatsHook` therefore re-applies the freeze before *every* step with
``trainer.iter >= N``, which also makes it survive ``--resume`` at an iteration > N.
"""
from __future__ import annotations

from typing import List

from fvcore.nn.precise_bn import BN_MODULE_TYPES
from torch import nn

from ..layers import IterationNormBase

__all__ = ["freeze_norm_statistics", "statistics_layers"]


def statistics_layers(model: nn.Module) -> List[nn.Module]:
    """The layers of ``model`` that keep population statistics: CBN, NaiveCBN, MABN and torch BN."""
    return [m for m in model.modules() if isinstance(m, (IterationNormBase,) + tuple(BN_MODULE_TYPES))]


def freeze_norm_statistics(model: nn.Module) -> int:
    """Make every CBN / NaiveCBN / MABN / BN layer of ``model`` use and keep its population
    statistics (eval-mode normalization) while the model trains; see the module docstring.

    Idempotent; ``model.train()`` undoes it.

    Args:
        model: any ``nn.Module`` (e.g. a Detectron2 model, possibly DDP-wrapped).
    Returns:
        the number of norm layers frozen (in eval mode after the call).
    """
    layers = statistics_layers(model)
    for layer in layers:
        layer.training = False
        if isinstance(layer, IterationNormBase):
            for module in layer.mode_dependents():  # CBN's producing conv stops capturing its input
                module.training = False
    return len(layers)
