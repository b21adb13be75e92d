"""Detectron2 hooks that drive the cross-iteration norm layers and keep one model across processes."""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import IterationNormBase
from ..modeling.wiring import set_norm_iteration

__all__ = ["NormIterationHook", "AveragePopulationStatistics", "average_population_statistics",
           "population_statistics_layers", "population_moments"]

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


# ----------------------------------------------------------------------------- one model across processes
def population_statistics_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, layer)`` of every norm layer of ``model`` that holds population statistics: torch
    BatchNorm (``_BatchNorm`` with ``running_mean``/``running_var``: BN, SyncBN, Detectron2's
    NaiveSyncBatchNorm and the per-level BNs of RetinaNet's head) and every CBN / NaiveCBN / MABN
    layer (any :class:`~smallbn_d2.layers.IterationNormBase`, so every family of
    ``NORM_FAMILIES``), in training or eval mode. FrozenBN and GN hold none."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, IterationNormBase)
            or (isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None)]


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
    elif isinstance(layer, _BatchNorm):
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
