"""Freezing of normalization statistics for the last part of training (``MODEL.SMALLBN.FREEZE_NORM_STATS_ITER``).

Source: Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), Sec. 4: population statistics
(FrozenBN) in the last iterations remove the train-test inconsistency; docs/METHODS.md, last section.
Freezing puts each layer holding population statistics in eval mode, which normalizes with them and
updates nothing, while gamma/beta and the convs keep training.
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
    """Put every layer of :func:`statistics_layers` (inner layers of ``CycleBatchNormList`` included)
    and CBN's producing convs (which would otherwise keep capturing their inputs for the window) in
    eval mode, non-recursively; returns the number of norm layers frozen.

    Idempotent. ``model.train()``, which Detectron2 calls after every evaluation, undoes it: hence
    :class:`~smallbn_d2.engine.hooks.FreezeNormStatsHook` re-applies it before every step, which also
    makes it survive ``--resume``.
    """
    layers = statistics_layers(model)
    for layer in layers:
        layer.training = False
        if isinstance(layer, IterationNormBase):
            for module in layer.mode_dependents():  # CBN's producing conv stops capturing its input
                module.training = False
    return len(layers)
