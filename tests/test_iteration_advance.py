"""Training whose trainer iteration does not advance is caught within a few steps.

With ``set_norm_iteration`` called once (a plain training loop that forgot it), CBN's window would
never fill and MABN's warm-ups never end: the layers would train silently as something else. A
training forward that finds its producing conv's weight updated since the previous forward at the
same iteration counts a stale step; the second raises. Repeated forwards within one iteration
(several passes, gradient accumulation) stay silent.
"""
import pytest
import torch
from torch import nn

import smallbn_d2
from smallbn_d2.layers import (
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    NormNotWiredError,
)

LAYERS = [CrossIterationBatchNorm2d, NaiveCrossIterationBatchNorm2d, MovingAverageBatchNorm2d]


def _block(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cls(4), nn.ReLU())
    smallbn_d2.prepare_norms(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.05), torch.randn(2, 3, 8, 8)


def _step(model, opt, x, forwards=1):
    for _ in range(forwards):
        model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("cls", LAYERS)
def test_iteration_set_once_fails_within_two_steps(cls):
    model, opt, x = _block(cls)
    smallbn_d2.set_norm_iteration(model, 0)
    _step(model, opt, x)
    _step(model, opt, x)  # one stale step is allowed (e.g. a checkpoint was loaded)
    with pytest.raises(NormNotWiredError, match="stayed at 0.*set_norm_iteration"):
        _step(model, opt, x)


@pytest.mark.parametrize("cls", LAYERS)
def test_advancing_iteration_and_repeated_forwards_stay_silent(cls):
    model, opt, x = _block(cls)
    for it in range(6):
        smallbn_d2.set_norm_iteration(model, it)
        _step(model, opt, x, forwards=3)  # three forwards (e.g. gradient accumulation), one step
        model(x)  # and an extra forward after the step, still at this iteration
    smallbn_d2.set_norm_iteration(model, 6)
    _step(model, opt, x)


@pytest.mark.parametrize("cls", LAYERS)
def test_frozen_weights_need_no_advance(cls):
    """Without weight updates (e.g. evaluating the training loss) nothing is stale."""
    model, _, x = _block(cls)
    smallbn_d2.set_norm_iteration(model, 3)
    for _ in range(5):
        model(x)
