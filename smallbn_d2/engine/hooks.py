"""smallbn_d2's Detectron2 hooks, in one module as Detectron2 keeps its own: they drive the norm layers
(:class:`NormIterationHook`, :class:`FreezeNormStatsHook`, :class:`PreciseNorm`), keep one model across
processes (:class:`AveragePopulationStatistics`) and record the peak memory (:class:`PeakMemoryHook`).
The functions they call live in :mod:`.freeze`, :mod:`.precise_norm` and :mod:`.resources`."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..compat import torch_batch_norm_base
from ..layers import IterationNormBase
from ..layers.hyperparameters import INT_AT_LEAST_0, INT_AT_LEAST_1
from ..modeling.wiring import set_norm_iteration
from .freeze import freeze_norm_statistics
from .precise_norm import update_norm_stats
from .resources import peak_memory_mb

__all__ = ["NormIterationHook", "FreezeNormStatsHook", "PreciseNorm", "PeakMemoryHook", "AveragePopulationStatistics",
           "average_population_statistics", "population_statistics_layers", "population_moments"]

logger = logging.getLogger(__name__)


class NormIterationHook(HookBase):
    """Before every step, give each CBN/MABN layer the trainer's iteration (``trainer.iter``, restored
    by ``--resume``): burn-in, warm-ups and windows follow it, never a count of forward calls. Put it
    first among the hooks."""

    def before_step(self):
        set_norm_iteration(self.trainer.model, self.trainer.iter)


class FreezeNormStatsHook(HookBase):
    """Before every step with ``trainer.iter >= start_iter`` (0-based, integer >= 0), call
    :func:`freeze_norm_statistics` on the trainer's model; register it after :class:`NormIterationHook`.

    Raises:
        ValueError: ``start_iter`` is not an integer >= 0.
    """

    def __init__(self, start_iter: int):
        INT_AT_LEAST_0.check(start_iter, "start_iter")
        self.start_iter = start_iter
        self._announced = False

    def before_step(self):
        if self.trainer.iter < self.start_iter:
            return
        n = freeze_norm_statistics(self.trainer.model)
        if not self._announced:
            logger.info(f"Iteration {self.trainer.iter}: normalization statistics frozen in {n} layers "
                        f"(MODEL.SMALLBN.FREEZE_NORM_STATS_ITER = {self.start_iter})")
            self._announced = True


class PreciseNorm(HookBase):
    """Detectron2's ``hooks.PreciseBN`` (same arguments and schedule: after the step whose ``iter + 1``
    is a multiple of ``period``, and after the last) running :func:`update_norm_stats`, which covers
    CBN, NaiveCBN and MABN besides BN.

    Args:
        period: iterations between runs; 0: only after the last iteration.
        data_loader: a separate training loader.
        num_iter: forward passes per run, integer >= 1.
    Raises:
        ValueError: ``period`` < 0 or ``num_iter`` < 1.
    """

    def __init__(self, period: int, model: nn.Module, data_loader: Iterable[Any], num_iter: int):
        INT_AT_LEAST_0.check(period, "period")
        INT_AT_LEAST_1.check(num_iter, "TEST.PRECISE_BN.NUM_ITER")
        self._model = model
        self._data_loader = data_loader
        self._num_iter = num_iter
        self._period = period
        self._data_iter = None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0):
            self.update_stats()

    def update_stats(self) -> Dict[str, int]:
        """Run :func:`update_norm_stats` now (the data iterator persists across runs)."""
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        return update_norm_stats(self._model, self._data_iter, self._num_iter)


class PeakMemoryHook(HookBase):
    """After every step, put :func:`peak_memory_mb` of ``device`` (``cfg.MODEL.DEVICE``) in the event
    storage, unsmoothed, for ``metrics.json`` (register it before Detectron2's ``PeriodicWriter``)."""

    def __init__(self, device: torch.device | str):
        self._device = torch.device(device)

    def after_step(self):
        key, mb = peak_memory_mb(self._device)
        self.trainer.storage.put_scalar(key, mb, smoothing_hint=False)


def population_statistics_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every norm layer of ``model`` holding population statistics: torch BN with
    running statistics (BN, SyncBN, NaiveSyncBatchNorm, RetinaNet's per-level BNs) and every
    :class:`~smallbn_d2.layers.IterationNormBase` (CBN, NaiveCBN, MABN). FrozenBN and GN hold none."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, IterationNormBase)
            or (isinstance(m, torch_batch_norm_base()) and m.running_mean is not None and m.running_var is not None)]


def population_moments(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(E[x], E[x^2])``, each (C,) float64, of ``layer``'s eval-mode ``(center, var)`` (torch BN:
    running statistics; CBN/MABN: ``eval_affine()``); ``_write_moments`` is the inverse.

    Raises:
        TypeError: ``layer`` is neither torch BN nor an ``IterationNormBase``.
    """
    if isinstance(layer, IterationNormBase):
        center, var = layer.eval_affine()[:2]
    elif isinstance(layer, torch_batch_norm_base()):
        center, var = layer.running_mean, layer.running_var
    else:
        raise TypeError(f"population_moments needs a torch BatchNorm or a CBN/MABN layer, got {type(layer).__name__}")
    center = center.detach().to(torch.float64)
    return center, var.detach().to(torch.float64) + center * center


@torch.no_grad()
def _write_moments(layer: nn.Module, mean: torch.Tensor, sq_mean: torch.Tensor) -> None:
    """Set ``layer``'s population statistics to those of moments ``mean``, ``sq_mean`` (C,)."""
    if isinstance(layer, IterationNormBase):
        state = layer.population_state(mean, sq_mean)
        if set(state) != set(layer.population_state_keys()):
            raise RuntimeError(f"{type(layer).__name__}.population_state gives {sorted(state)}, but "
                               f"population_state_keys() names {sorted(layer.population_state_keys())}")
        for name, value in state.items():
            getattr(layer, name).copy_(value)
    else:
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_((sq_mean - mean * mean).clamp_min(0).to(layer.running_var.dtype))


@torch.no_grad()
def average_population_statistics(model: nn.Module) -> int:
    """Average the population statistics of :func:`population_statistics_layers` of ``model`` (DDP-wrapped
    or not) over the processes as moments: E[x] and E[x^2] (:func:`population_moments`; the pooled
    inputs' statistics for equal images per process), so that every process holds the same model;
    returns the number of layers averaged (0 in a single process). Windows, SMA buffers and
    ``num_batches_tracked`` stay per process. One ``all_reduce``: every process must call it at the
    same point. docs/RELIABILITY.md, section 5; Detectron2 issue 5398 reports the per-process statistics.
    """
    world_size = comm.get_world_size()
    layers = [m for _, m in population_statistics_layers(model)] if world_size > 1 else []
    if not layers:
        return 0
    moments = [population_moments(m) for m in layers]
    device = moments[0][0].device
    flat = torch.cat([torch.cat([mean, sq]).to(device) for mean, sq in moments])
    torch.distributed.all_reduce(flat)  # sum over processes
    flat /= world_size
    offset = 0
    for layer, (mean, _) in zip(layers, moments):
        c = mean.numel()
        _write_moments(layer, flat[offset:offset + c].to(mean.device), flat[offset + c:offset + 2 * c].to(mean.device))
        offset += 2 * c
    return len(layers)


class AveragePopulationStatistics(HookBase):
    """Run :func:`average_population_statistics` after every iteration that ends with a checkpoint or an
    evaluation (``i + 1`` a multiple of one of ``periods``, or the last iteration), so that the model
    every process evaluates and the model saved are one. Register it in every process, after
    :class:`PreciseNorm` and before the checkpointer and the evaluation; a no-op in a single process.

    Args:
        periods: the checkpoint and evaluation periods in iterations; values <= 0 mean "never".
    Raises:
        ValueError: a period that is not an integer.
    """

    def __init__(self, periods: Sequence[int]):
        for p in periods:
            if isinstance(p, bool) or not isinstance(p, int):
                raise ValueError(f"period = {p!r} is invalid; allowed: an integer (iterations; <= 0: never)")
        self.periods = tuple(p for p in periods if p > 0)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or any(next_iter % p == 0 for p in self.periods):
            n = average_population_statistics(self.trainer.model)
            if n:
                logger.info(f"Averaged the population statistics of {n} norm layers over "
                            f"{comm.get_world_size()} processes (iteration {self.trainer.iter})")
