"""smallbn_d2's Detectron2 hooks, all in one module as Detectron2 keeps its own
(``detectron2.engine.hooks``): they drive the cross-iteration norm layers (:class:`NormIterationHook`,
:class:`FreezeNormStatsHook`, :class:`PreciseNorm`), keep one model across processes
(:class:`AveragePopulationStatistics`) and record the peak memory (:class:`PeakMemoryHook`).
The functions they call live with their subject: :mod:`.freeze`, :mod:`.precise_norm`,
:mod:`.resources`."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..compat import torch_batch_norm_base
from ..layers import IterationNormBase
from ..modeling.wiring import set_norm_iteration
from .freeze import freeze_norm_statistics
from .precise_norm import update_norm_stats
from .resources import peak_memory_mb

__all__ = ["NormIterationHook", "FreezeNormStatsHook", "PreciseNorm", "PeakMemoryHook", "AveragePopulationStatistics",
           "average_population_statistics", "population_statistics_layers", "population_moments"]

logger = logging.getLogger(__name__)


class NormIterationHook(HookBase):
    """Before every step, tell each CBN/MABN layer the trainer's iteration (``trainer.iter``).

    The layers' burn-in (CBN), warm-ups (MABN) and window bookkeeping depend on the iteration,
    which therefore comes from the trainer, never from counting forward calls: a layer may run
    several times per iteration or not at all, and after ``--resume`` the trainer's iteration is
    the one restored from the checkpoint. Put it first among the hooks.
    """

    def before_step(self):
        set_norm_iteration(self.trainer.model, self.trainer.iter)


class FreezeNormStatsHook(HookBase):
    """Detectron2 hook: before every step with ``trainer.iter >= start_iter``, call
    :func:`freeze_norm_statistics` on the trainer's model.

    Register it after :class:`smallbn_d2.engine.NormIterationHook` (the Trainer does so when
    ``MODEL.SMALLBN.FREEZE_NORM_STATS_ITER >= 0``).

    Args:
        start_iter: N, the first (0-based) trainer iteration trained with frozen statistics;
            integer >= 0.
    Raises:
        ValueError: ``start_iter`` is not an integer >= 0.
    """

    def __init__(self, start_iter: int):
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter = {start_iter!r} is invalid; allowed: an integer >= 0 (iterations)")
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
    """Detectron2 hook: :func:`update_norm_stats` every ``period`` iterations and after the last.

    The counterpart of ``detectron2.engine.hooks.PreciseBN`` (same arguments, same schedule:
    after the step whose ``iter + 1`` is a multiple of ``period``, and after the final
    iteration), covering CBN, NaiveCBN and MABN besides BN. :class:`smallbn_d2.engine.Trainer`
    installs it instead of Detectron2's when ``TEST.PRECISE_BN.ENABLED``, with
    ``period = TEST.EVAL_PERIOD`` and ``num_iter = TEST.PRECISE_BN.NUM_ITER``.

    Args:
        period: iterations between runs; 0: only after the last iteration.
        model: the model (in training mode when the hook runs).
        data_loader: yields model inputs (a separate training loader, as Detectron2 builds).
        num_iter: forward passes per run, integer >= 1.
    Raises:
        ValueError: ``period`` < 0 or ``num_iter`` < 1.
    """

    def __init__(self, period: int, model: nn.Module, data_loader: Iterable[Any], num_iter: int):
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            raise ValueError(f"period = {period!r} is invalid; allowed: an integer >= 0 (iterations)")
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"TEST.PRECISE_BN.NUM_ITER = {num_iter!r} is invalid; allowed: an integer >= 1")
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
    """After every step, store :func:`peak_memory_mb` of ``device`` in the event storage.

    The value is monotone (a peak), stored without smoothing; Detectron2's ``PeriodicWriter``
    then writes it to ``metrics.json`` (put this hook before the writer).

    Args:
        device: the model's device (``cfg.MODEL.DEVICE``).
    """

    def __init__(self, device: torch.device | str):
        self._device = torch.device(device)

    def after_step(self):
        key, mb = peak_memory_mb(self._device)
        self.trainer.storage.put_scalar(key, mb, smoothing_hint=False)


# ----------------------------------------------------------------------------- one model across processes
def population_statistics_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every norm layer of ``model`` that holds population statistics: torch
    BatchNorm (torch's ``_BatchNorm``, :func:`smallbn_d2.compat.torch_batch_norm_base`, with ``running_mean``/``running_var``: BN, SyncBN, Detectron2's
    NaiveSyncBatchNorm and the per-level BNs of RetinaNet's head) and every CBN / NaiveCBN / MABN
    layer (any :class:`~smallbn_d2.layers.IterationNormBase`, so every family of
    ``NORM_FAMILIES``), in training or eval mode. FrozenBN and GN hold none."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, IterationNormBase)
            or (isinstance(m, torch_batch_norm_base()) and m.running_mean is not None and m.running_var is not None)]


def population_moments(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first and second moments ``(E[x], E[x^2])``, each (C,) float64, that ``layer``'s
    population statistics stand for.

    torch BN: ``(running_mean, running_var + running_mean^2)``. CBN / NaiveCBN / MABN: the
    layer's eval-mode statistics ``(center, var)`` (:meth:`~smallbn_d2.layers.IterationNormBase.eval_affine`)
    as ``(center, var + center^2)``, the inverse of ``statistics_from_moments``: CBN's
    ``(running_mean, running_var + running_mean^2)``, MABN's ``(0, running_chi2)``. Writing them
    back with ``set_population_statistics`` (``population_state``) restores the buffers.

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
    """Average the population statistics of every norm layer of ``model`` over the processes,
    as moments, so that every process holds the same model.

    Detectron2 trains with DDP and ``broadcast_buffers=False``: weights stay identical, but each
    process updates its own BN running mean/var, CBN running mean/var and MABN ``running_chi2``
    (EMA statistics) from its own images. This replaces them, in every process, by
    E[x] = mean over processes of E_p[x] and E[x^2] = mean over processes of E_p[x^2] (the
    statistics of the pooled inputs of all processes, each weighted equally: equal images per
    process), converted back to each layer's buffers: var = E[x^2] - E[x]^2 for BN/CBN,
    ``running_chi2`` = E[x^2] for MABN. Only the population statistics change: CBN's window, MABN's
    SMA buffers and iteration tags and ``num_batches_tracked`` stay per process (the papers'
    per-GPU statistics). Layers: :func:`population_statistics_layers`. (Detectron2 issue 5398
    reports the per-process statistics for its PreciseBN.)

    One ``all_reduce`` (sum) of one flattened float64 tensor on the layers' device, so it must be
    called by every process at the same point. Does nothing in a single process.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper or the module itself); every
            process holds the same architecture.
    Returns:
        the number of layers averaged (0 in a single process).
    """
    world_size = comm.get_world_size()
    if world_size == 1:
        return 0
    layers = [m for _, m in population_statistics_layers(model)]
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
        avg_mean, avg_sq = flat[offset:offset + c], flat[offset + c:offset + 2 * c]
        offset += 2 * c
        _write_moments(layer, avg_mean.to(mean.device), avg_sq.to(mean.device))
    return len(layers)


class AveragePopulationStatistics(HookBase):
    """Averages the norms' population statistics over the processes
    (:func:`average_population_statistics`) after every iteration that ends with a checkpoint or
    an evaluation, so that the model that every process evaluates and the model saved are one.

    Runs after the step of iteration ``i`` (0-based) when ``i + 1`` is a multiple of one of
    ``periods`` (Detectron2's ``PeriodicCheckpointer`` saves and ``EvalHook`` evaluates then) or
    ``i + 1`` is the last iteration (``model_final`` and the final evaluation). Register it in
    every process, after PreciseBN / :class:`~smallbn_d2.engine.PreciseNorm` and before the
    checkpointer and the evaluation (``Trainer.build_hooks`` and ``smallbn_d2.lazy.do_train`` do).
    A no-op in a single process.

    Args:
        periods: the checkpoint and evaluation periods in iterations (``SOLVER.CHECKPOINT_PERIOD``
            and ``TEST.EVAL_PERIOD``; ``train.checkpointer.period`` and ``train.eval_period``);
            values <= 0 mean "never", as for Detectron2's hooks.
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
