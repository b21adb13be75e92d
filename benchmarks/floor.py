"""The ``BNFloor`` norm of the detector-level ``floor`` row: BN plus CBN's weight-gradient conv.

An exact CBN computes d nu / d theta of its producing conv, one weight-gradient conv per
normalized conv next to the conv's forward, input-gradient and weight-gradient (CBN paper,
Appendix B). :class:`BatchNormWithStatGradCost` is BatchNorm that, in training, also runs that
conv and discards the result: its time is the arithmetic floor of an exact CBN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from smallbn_d2.layers.base import IterationNormBase
from smallbn_d2.layers.conv_input import capture_conv_input, pop_conv_input
from .settings import FLOOR_NORM

__all__ = ["BatchNormWithStatGradCost", "register_floor_norm"]


class BatchNormWithStatGradCost(IterationNormBase):
    """BN (batch statistics in training, running statistics with momentum 0.1 in eval) plus, in
    training, one ``conv2d_weight`` of the producing conv with the layer's input as grad_output.

    Args:
        num_features: C of the (N, C, H, W) input.
    Input/output: (N, C, H, W). The producing conv is attached by smallbn_d2's wiring
    (``prepare_norms``); without one (or without a captured input) the layer is plain BN.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _conv_attached(self, conv):
        capture_conv_input(conv)

    def configure(self, **hyperparameters) -> None:
        """Accept and ignore hyperparameters: the layer has none (BN's eps and momentum are fixed).

        Harmless for wiring code that still passes the config's hyperparameters to every
        smallbn_d2 layer after construction; the layer works the same whether or not it is called."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            u = pop_conv_input(self.conv) if self.conv is not None else None
            if u is not None and x.numel() > 0:
                with torch.no_grad():
                    c = self.conv
                    conv2d_weight(u.detach(), c.weight.shape, x.detach(), c.stride, c.padding, c.dilation, c.groups)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
                            self.eps)


def register_floor_norm() -> None:
    """Register :class:`BatchNormWithStatGradCost` as the norm family :data:`~.settings.FLOOR_NORM`
    (no config section; wired to its producing conv like CBN). Idempotent."""
    from smallbn_d2.modeling import NormFamily, register_norm, supported_norms

    if FLOOR_NORM not in supported_norms():
        register_norm(NormFamily(FLOOR_NORM, BatchNormWithStatGradCost))
