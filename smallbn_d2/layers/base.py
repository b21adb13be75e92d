"""Shared machinery of the cross-iteration normalization layers (CBN, MABN).

Both layers carry state across *trainer iterations* and both need the conv that produces their
input (CBN differentiates its statistics with respect to that conv's weight; MABN centralizes
that weight). This module holds what they share:

* the trainer iteration, set from outside by :meth:`IterationNormBase.set_iteration` (the
  Detectron2 hook :class:`smallbn_d2.engine.NormIterationHook` does it before every step), never
  counted from forward calls;
* the link to the producing conv, :meth:`IterationNormBase.attach_conv`, kept outside
  ``_modules`` so that it appears neither in ``state_dict`` nor twice in ``named_modules``;
* the learnable affine parameters ``weight`` (gamma) and ``bias`` (beta), shape (C,), and
  :meth:`IterationNormBase.configure` to set hyperparameters after construction (Detectron2's
  ``get_norm(name, channels)`` can only pass the channel count).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["IterationNormBase", "NormNotWiredError"]


class NormNotWiredError(RuntimeError):
    """A CBN/MABN layer is used in training without a producing conv or an iteration."""


class IterationNormBase(nn.Module):
    """Base class of :class:`CrossIterationBatchNorm2d` and :class:`MovingAverageBatchNorm2d`.

    Args:
        num_features: C, the number of channels of the (N, C, H, W) input.
        eps: added to the variance (or E[x^2]) inside the square root, > 0.
        affine: learn gamma (``weight``, ones) and beta (``bias``, zeros), each of shape (C,).

    Raises:
        ValueError: ``num_features`` < 1 or ``eps`` <= 0.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features = {num_features!r} is invalid; allowed: an integer >= 1")
        self.num_features = num_features
        self.eps = _positive(eps, "eps")
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.iteration: Optional[int] = None
        self.__dict__["_producer_conv"] = None

    # ------------------------------------------------------------------ iteration
    def set_iteration(self, iteration: int) -> None:
        """Set the current trainer iteration (0-based; the iteration about to run).

        Raises:
            ValueError: ``iteration`` is not an integer >= 0.
        """
        if isinstance(iteration, torch.Tensor):
            iteration = int(iteration)
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ValueError(f"iteration = {iteration!r} is invalid; allowed: an integer >= 0")
        self.iteration = iteration

    def _require_iteration(self) -> int:
        if self.iteration is None:
            raise NormNotWiredError(
                f"{type(self).__name__} is training but no trainer iteration was set: train with "
                "smallbn_d2's Trainer (its NormIterationHook sets it before every step) or call "
                "smallbn_d2.set_norm_iteration(model, iteration) yourself before each step."
            )
        return self.iteration

    # ------------------------------------------------------------------ producing conv
    @property
    def conv(self) -> Optional[nn.Conv2d]:
        """The conv whose output this layer normalizes (None until :meth:`attach_conv`)."""
        return self.__dict__["_producer_conv"]

    def attach_conv(self, conv: nn.Conv2d) -> None:
        """Link the conv that produces this layer's input.

        Args:
            conv: an ``nn.Conv2d`` (Detectron2's ``Conv2d`` included) with ``out_channels`` ==
                ``num_features``.
        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: its ``out_channels`` differ from ``num_features``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{type(self).__name__} needs an nn.Conv2d as producing layer, got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) cannot follow a conv with "
                f"out_channels = {conv.out_channels}; allowed: out_channels == {self.num_features}"
            )
        self.__dict__["_producer_conv"] = conv
        self._conv_attached(conv)

    def _conv_attached(self, conv: nn.Conv2d) -> None:
        """Subclass hook: allocate state that depends on the conv's shape."""

    def _require_conv(self) -> nn.Conv2d:
        if self.conv is None:
            raise NormNotWiredError(
                f"{type(self).__name__} has no producing conv. Build the model with "
                "smallbn_d2.build_model(cfg) or call smallbn_d2.prepare_norms(model, cfg); a "
                "standalone layer needs layer.attach_conv(conv)."
            )
        return self.conv

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if not self.affine:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.weight.reshape(shape).to(y.dtype) + self.bias.reshape(shape).to(y.dtype)

    def configure(self, **hyperparameters) -> None:  # pragma: no cover - abstract
        """Set hyperparameters (subclasses list theirs) and reset the cross-iteration state."""
        raise NotImplementedError


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} = {value!r} is invalid; allowed: a number > 0")
    return float(value)
