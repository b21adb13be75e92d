"""The producing conv's input capture that CBN's compensation relies on (layers/conv_input.py)."""
import pytest
import torch
from torch import nn

import smallbn_d2  # noqa: F401
from smallbn_d2.layers import (
    CrossIterationBatchNorm2d,
    capture_conv_input,
    has_conv_input,
    pop_conv_input,
    release_conv_input,
)


def test_capture_keeps_the_training_input_once_and_nothing_in_eval():
    conv = nn.Conv2d(3, 4, 3)
    capture_conv_input(conv)
    capture_conv_input(conv)  # idempotent: one hook
    assert len(conv._forward_pre_hooks) == 1
    u = torch.randn(2, 3, 5, 5)
    conv(u)
    assert has_conv_input(conv)
    assert pop_conv_input(conv) is u  # the very tensor, no copy
    assert pop_conv_input(conv) is None and not has_conv_input(conv)  # forgotten after the pop
    conv.eval()
    conv(u)
    assert pop_conv_input(conv) is None  # eval mode keeps no activation


def test_release_removes_the_hook_and_the_input():
    conv = nn.Conv2d(3, 4, 3)
    capture_conv_input(conv)
    conv(torch.randn(1, 3, 5, 5))
    release_conv_input(conv)
    assert len(conv._forward_pre_hooks) == 0 and not has_conv_input(conv)
    conv(torch.randn(1, 3, 5, 5))
    assert pop_conv_input(conv) is None
    release_conv_input(conv)  # a second release is a no-op
    with pytest.raises(TypeError, match="nn.Module"):
        capture_conv_input(torch.zeros(1))


def test_cbn_takes_its_conv_input_in_forward():
    conv = nn.Conv2d(3, 4, 3)
    cbn = CrossIterationBatchNorm2d(4, window_size=2)
    cbn.attach_conv(conv)
    cbn.set_iteration(0)
    cbn(conv(torch.randn(2, 3, 6, 6)))
    assert not has_conv_input(conv)  # consumed by the CBN layer, not kept beyond the iteration
