"""Normalization layers: CBN (Cross-Iteration BN) and MABN (Moving Average BN); torch only."""
from .base import IterationNormBase, NormNotWiredError
from .cbn import CrossIterationBatchNorm2d, NaiveCrossIterationBatchNorm2d
from .cbn_grad import StatGrads, stat_grads_autograd, stat_grads_closed_form
from .conv_input import capture_conv_input, has_conv_input, pop_conv_input, release_conv_input
from .mabn import MovingAverageBatchNorm2d
from .weight_centralization import (WeightCentralization, centralize_conv_weight, is_weight_centralized,
                                    remove_weight_centralization)

__all__ = [
    "IterationNormBase", "NormNotWiredError",
    "CrossIterationBatchNorm2d", "NaiveCrossIterationBatchNorm2d", "MovingAverageBatchNorm2d",
    "StatGrads", "stat_grads_autograd", "stat_grads_closed_form",
    "capture_conv_input", "has_conv_input", "pop_conv_input", "release_conv_input",
    "WeightCentralization", "centralize_conv_weight", "is_weight_centralized", "remove_weight_centralization",
]
