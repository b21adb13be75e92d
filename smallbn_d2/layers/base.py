"""What CBN, NaiveCBN and MABN share: the trainer iteration, the producing conv, the affine
parameters, and the interface through which PreciseBN, freezing, conversion to FrozenBN and
checkpoint mapping work with any of them. See docs/ARCHITECTURE.md, "The layers".
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compat import tensor_version
from .hyperparameters import INT_AT_LEAST_0, INT_AT_LEAST_1, POSITIVE, Range

__all__ = ["IterationNormBase", "NormNotWiredError"]


def _masked_write(buf: torch.Tensor, slot: int, value: torch.Tensor, ok: torch.Tensor) -> None:
    """buf[slot] <- value where the 0-dim bool ``ok`` holds, in place, with no host synchronization."""
    row = buf[slot]
    torch.where(ok, value.to(buf.dtype), row, out=row)


class NormNotWiredError(RuntimeError):
    """A CBN/MABN layer is used in training without a producing conv, an iteration or a burn-in."""


class IterationNormBase(nn.Module):
    """Base class of :class:`CrossIterationBatchNorm2d` and :class:`MovingAverageBatchNorm2d`.

    Hyperparameters are constructor arguments only, checked against the class's
    ``HYPERPARAMETERS`` table.

    Args:
        num_features: C, the number of channels of the (N, C, H, W) input.
        eps: > 0, added to the variance (or E[x^2]) inside the square root.
        affine: learn gamma (``weight``, ones) and beta (``bias``, zeros), each of shape (C,).

    Raises:
        ValueError: ``num_features`` < 1 or ``eps`` <= 0 (the message names the argument).
    """

    #: constructor argument -> allowed range, extended by each subclass.
    HYPERPARAMETERS: ClassVar[Dict[str, Range]] = {"eps": POSITIVE}

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = INT_AT_LEAST_1.check(num_features, "num_features")
        self.eps = self.HYPERPARAMETERS["eps"].check(eps, "eps")
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.iteration: Optional[int] = None
        # outside _modules: the conv appears neither in state_dict nor twice in named_modules
        self.__dict__["_producer_conv"] = None
        # watch for training steps without an advancing iteration (see _watch_iteration)
        self._seen_iteration: Optional[int] = None
        self._seen_weight_version: Optional[int] = None
        self._stale_steps = 0

    def _check(self, name: str, value):
        return self.HYPERPARAMETERS[name].check(value, name)

    def set_iteration(self, iteration: int) -> None:
        """Set the current trainer iteration (0-based; the iteration about to run).

        Raises:
            ValueError: ``iteration`` is not an integer >= 0.
        """
        if isinstance(iteration, torch.Tensor):
            iteration = int(iteration)
        self.iteration = INT_AT_LEAST_0.check(iteration, "iteration")

    #: Training steps (producing-conv weight updates) at one unchanged iteration before an error.
    STALE_STEPS_ALLOWED: ClassVar[int] = 1

    def _require_iteration(self) -> int:
        """The iteration of a training forward; raises if none is set or it stopped advancing."""
        if self.iteration is None:
            raise NormNotWiredError(
                f"{type(self).__name__} is training but no trainer iteration was set: train with "
                "smallbn_d2's Trainer (its NormIterationHook sets it before every step) or call "
                "smallbn_d2.set_norm_iteration(model, iteration) yourself before each step."
            )
        if not torch.compiler.is_compiling():
            self._watch_iteration()
        return self.iteration

    def _watch_iteration(self) -> None:
        """Raise if the producing conv's weight was updated (its version counter, a Python int: no
        host sync) more than STALE_STEPS_ALLOWED times at one iteration (one: loading a checkpoint
        writes it too); else CBN's window would never fill, MABN's warm-ups never end."""
        conv = self.conv
        if conv is None:
            return
        weight = conv.parametrizations.weight.original if parametrize.is_parametrized(conv, "weight") else conv.weight
        version = tensor_version(weight)
        if self.iteration == self._seen_iteration and version != self._seen_weight_version:
            self._stale_steps += 1
            if self._stale_steps > self.STALE_STEPS_ALLOWED:
                raise NormNotWiredError(
                    f"{type(self).__name__}: the trainer iteration stayed at {self.iteration} while the "
                    f"producing conv's weight was updated {self._stale_steps} times: the iteration must "
                    "advance with training. Call smallbn_d2.set_norm_iteration(model, iteration) before "
                    "every training step (smallbn_d2's Trainer and NormIterationHook do it), not once."
                )
        elif self.iteration != self._seen_iteration:
            self._stale_steps = 0
        self._seen_iteration, self._seen_weight_version = self.iteration, version

    @property
    def conv(self) -> Optional[nn.Conv2d]:
        """The conv whose output this layer normalizes (None until :meth:`attach_conv`)."""
        return self.__dict__["_producer_conv"]

    def attach_conv(self, conv: nn.Conv2d) -> None:
        """Link the conv that produces this layer's input (once; the wiring step does it).

        Args:
            conv: an ``nn.Conv2d`` (Detectron2's ``Conv2d`` included) with ``out_channels`` ==
                ``num_features``.
        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: its ``out_channels`` differ from ``num_features``, or another conv is
                attached already.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{type(self).__name__} needs an nn.Conv2d as producing layer, got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) cannot follow a conv with "
                f"out_channels = {conv.out_channels}; allowed: out_channels == {self.num_features}"
            )
        if self.conv is conv:
            return
        if self.conv is not None:
            raise ValueError(f"{type(self).__name__} is attached to {self.conv} already; allowed: one producing conv")
        self.__dict__["_producer_conv"] = conv
        self._conv_attached(conv)

    def _conv_attached(self, conv: nn.Conv2d) -> None:
        """Subclass hook: allocate state that depends on the conv's shape."""

    def release_conv(self) -> None:
        """Undo what attaching did that eval mode does not need (CBN: the capture of the conv's
        input). Called when the layer is converted for inference."""

    def _require_conv(self) -> nn.Conv2d:
        if self.conv is None:
            raise NormNotWiredError(
                f"{type(self).__name__} has no producing conv. Build the model with "
                "smallbn_d2.build_model(cfg) or call smallbn_d2.prepare_norms(model); a "
                "standalone layer needs layer.attach_conv(conv)."
            )
        return self.conv

    def mode_dependents(self) -> List[nn.Module]:
        """Modules whose training flag must follow this layer's when its statistics are frozen or
        recomputed in eval mode (CBN: its producing conv, which captures its input in training)."""
        return []

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if not self.affine:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.weight.reshape(shape).to(y.dtype) + self.bias.reshape(shape).to(y.dtype)

    def eval_affine(self) -> Tuple[torch.Tensor, torch.Tensor, float, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(mean, var, eps, gamma, beta)`` with eval(x) = (x - mean) / sqrt(var + eps) * gamma + beta.

        mean, var: (C,) (MABN: mean = 0, var = running E[x^2]); gamma, beta: (C,), None without
        affine. What :func:`smallbn_d2.deploy.convert_to_frozen_bn` gives FrozenBN.
        """
        raise NotImplementedError

    def statistics_from_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(center, var)`` that this layer normalizes with, given the first and second moments
        E[x], E[x^2] (C,) of its input: (mean, E[x^2] - mean^2) for CBN, (0, E[x^2]) for MABN."""
        raise NotImplementedError

    def population_state(self, mean: torch.Tensor, sq_mean: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Population-statistics buffers (name -> (C,) tensor, in the buffers' dtype) for an
        input with moments E[x] = ``mean`` and E[x^2] = ``sq_mean``, each (C,)."""
        raise NotImplementedError

    @torch.no_grad()
    def set_population_statistics(self, mean: torch.Tensor, sq_mean: torch.Tensor) -> None:
        """Write :meth:`population_state` into the layer's buffers (PreciseBN)."""
        for name, value in self.population_state(mean, sq_mean).items():
            getattr(self, name).copy_(value)

    def population_state_keys(self) -> Tuple[str, ...]:
        """Names of the population-statistics buffers (those :meth:`population_state` returns)."""
        raise NotImplementedError

    def cross_iteration_state_keys(self) -> Tuple[str, ...]:
        """Names of the buffers that hold state across iterations (windows, moving averages,
        their iteration tags); a checkpoint of another norm cannot hold them."""
        raise NotImplementedError

    def state_shape_hint(self, key: str, checkpoint_shape: Tuple[int, ...]) -> Optional[str]:
        """Why a checkpoint's buffer ``key`` of shape ``checkpoint_shape`` may differ from this
        layer's (the hyperparameter that sets the shape and how to match it), or None."""
        return None
