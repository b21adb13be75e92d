"""PreciseBN for CBN and MABN (and BN): population statistics recomputed with the final weights.

Source: Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), Sec. 3 and appendix; docs/METHODS.md,
last section, and docs/DEPLOY.md, "Related: population statistics during and after training". Per
channel, over every position of every batch (float64, P positions): CBN ``running_mean = sum(x) / P``,
``running_var = sum(x^2) / P - running_mean^2`` (fvcore's definition for BN, not the average of
per-batch variances); MABN ``running_chi2 = sum(x^2) / P``; BN by fvcore's ``update_bn_stats``.

Forward hooks read the layers' inputs while each CBN/MABN layer runs its eval path (no state written:
windows, SMA buffers and iteration tags stay) and replace its output by the normalization with the
current batch's statistics (CBN with k = 1, MABN with r = 1), as BN does in fvcore's PreciseBN; CBN's
producing convs are in eval mode meanwhile. Only layers in training mode are recomputed (fvcore's
rule), so frozen layers (:mod:`.freeze`) keep theirs.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats
from torch import nn

from ..layers import IterationNormBase
from ..layers.hyperparameters import INT_AT_LEAST_1

__all__ = ["update_norm_stats", "precise_norm_layers"]

logger = logging.getLogger(__name__)


def precise_norm_layers(model: nn.Module) -> List[Tuple[str, IterationNormBase]]:
    """``(name, layer)`` of the CBN / NaiveCBN / MABN layers of ``model`` in training mode."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IterationNormBase) and m.training]


class _Accumulator:
    """Per-channel float64 sums of x and x^2 over all positions of all batches, and their count."""

    def __init__(self, layer: IterationNormBase):
        dev = next(layer.buffers()).device
        self.sum = torch.zeros(layer.num_features, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(layer.num_features, dtype=torch.float64, device=dev)
        self.count = 0

    def __call__(self, module: nn.Module, inputs, output):
        x = inputs[0]
        if x.numel() == 0:
            return None
        dims = (0,) + tuple(range(2, x.dim()))
        xd = x.detach().to(torch.float64)
        s = xd.sum(dims)
        ss = (xd * xd).sum(dims)
        n = x.numel() // x.shape[1]
        self.sum += s
        self.sum_sq += ss
        self.count += n
        return _batch_normalize(module, x, s / n, ss / n)


def _batch_normalize(layer: IterationNormBase, x: torch.Tensor, mean: torch.Tensor, sq_mean: torch.Tensor):
    """The layer's normalization with the current batch's statistics (see the module docstring)."""
    center, var = layer.statistics_from_moments(mean, sq_mean)
    scale = torch.rsqrt(var + layer.eps)
    shift = -center * scale
    if layer.affine:
        w = layer.weight.detach().to(torch.float64)
        scale, shift = scale * w, shift * w + layer.bias.detach().to(torch.float64)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


@torch.no_grad()
def update_norm_stats(model: nn.Module, data_loader: Iterable[Any], num_iters: int = 200,
                      progress: Optional[str] = None) -> Dict[str, int]:
    """Recompute the population statistics of the BN, CBN, NaiveCBN and MABN layers of ``model`` in
    training mode (module docstring), from ``model(inputs)`` for ``num_iters`` items of
    ``data_loader``, in one pass inside a throw-away ``EventStorage``.

    Args:
        num_iters: forward passes (batches), integer >= 1.
        progress: None or "tqdm" (passed to fvcore).
    Returns:
        ``{layer name: P}``, the positions (N x H x W over all batches) each CBN/MABN layer's statistics
        come from; a layer that saw no input keeps its statistics (P = 0, a warning).
    Raises:
        ValueError: ``num_iters`` < 1, or ``data_loader`` ended before ``num_iters`` items.
    """
    INT_AT_LEAST_1.check(num_iters, "num_iters")
    layers = precise_norm_layers(model)
    has_bn = len(get_bn_modules(model)) > 0
    if not layers and not has_bn:
        return {}
    accumulators = [_Accumulator(layer) for _, layer in layers]
    # mode flags to restore: the layers (eval path: no state writes) and CBN's producing convs (input capture)
    saved = {m: m.training for _, layer in layers for m in (layer, *layer.mode_dependents())}
    handles = [layer.register_forward_hook(acc) for (_, layer), acc in zip(layers, accumulators)]
    try:
        for module in saved:
            module.training = False
        logger.info(f"Computing precise statistics for {len(layers)} CBN/MABN layers"
                    + (" and the BN layers" if has_bn else "") + f" over {num_iters} iterations ...")
        with EventStorage():
            if has_bn:
                update_bn_stats(model, data_loader, num_iters, progress=progress)
            else:
                done = 0
                for inputs in itertools.islice(data_loader, num_iters):
                    model(inputs)
                    done += 1
                if done != num_iters:
                    raise ValueError(f"update_norm_stats is meant to run {num_iters} iterations, but the data "
                                     f"loader stopped after {done}")
    finally:
        for h in handles:
            h.remove()
        for module, flag in saved.items():
            module.training = flag
    counts = {}
    for (name, layer), acc in zip(layers, accumulators):
        counts[name] = acc.count
        if acc.count == 0:
            logger.warning(f"PreciseBN: {name} ({type(layer).__name__}) saw no input; its statistics are kept")
            continue
        layer.set_population_statistics(acc.sum / acc.count, acc.sum_sq / acc.count)
    return counts
