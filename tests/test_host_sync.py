"""No host synchronization in a training step of CBN, Naive CBN and MABN.

A value read back from the device (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.cpu()``)
or an op whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) stalls the host until the device has finished: on a GPU it costs a
pipeline flush per layer and iteration. The layers are written to avoid them (state updates are
masked on the device with ``torch.where``; the iteration is a Python int given by
``set_iteration``, not a tensor).

Checked here for a conv + norm block in training (forward and backward), past the burn-in (CBN,
k > 1: the window and its compensation are used) and past the warm-ups (MABN: SMA statistics and
renormalization active), and in eval mode:

* on every device, with :class:`NoHostSync`, a ``TorchDispatchMode`` that fails on the ATen ops
  behind those calls (``aten._local_scalar_dense`` is what ``.item()`` and ``bool(t)`` run), plus
  ``Tensor.tolist`` / ``Tensor.cpu`` / ``Tensor.numpy`` patched to fail (they may bypass the
  dispatcher);
* on CUDA (when present), also with ``torch.cuda.set_sync_debug_mode("error")``, which fails on
  every synchronizing CUDA call, host-to-device copies of pageable memory included.

The detector itself is not checked: Detectron2's heads synchronize on their own (e.g. proposal
sampling), which is outside the layers.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import smallbn_d2  # noqa: F401  (compat fixes)
from smallbn_d2 import CrossIterationBatchNorm2d as CBN
from smallbn_d2 import NaiveCrossIterationBatchNorm2d as NaiveCBN
from smallbn_d2.layers import MovingAverageBatchNorm2d as MABN

aten = torch.ops.aten
# Ops that read a device value on the host or size their output by the data.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten._unique2,
            aten.unique_dim, aten.unique_consecutive, aten.equal, aten.is_nonzero, aten.item,
            aten.repeat_interleave, aten.bincount}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostSyncError(AssertionError):
    """A host synchronization happened where none is allowed."""


class NoHostSync(TorchDispatchMode):
    """Fail on every ATen op that synchronizes the host with the device (see the module
    docstring), and on boolean-mask indexing (``x[mask]``, ``x[mask] = v``: a ``nonzero`` inside the
    kernel). Works on any device, the CPU included, where nothing actually waits.

    Args:
        host_data: also fail on tensors made from Python data (``torch.tensor(...)``, seen as
            ``aten.lift_fresh``): on a GPU each is a blocking copy from pageable host memory
            (``cudaMemcpyAsync`` + ``cudaStreamSynchronize``), which
            ``torch.cuda.set_sync_debug_mode("error")`` reports as a synchronization.
    """

    def __init__(self, host_data: bool = True):
        super().__init__()
        self.host_data = host_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            raise HostSyncError(f"host synchronization: {func}")
        if self.host_data and packet is aten.lift_fresh:
            raise HostSyncError("a tensor made from Python data (torch.tensor): a blocking host-to-device "
                                "copy on a GPU")
        if packet in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise HostSyncError(f"host synchronization: {func} with a boolean mask")
        return func(*args, **kwargs)


def _fail(name):
    def raise_(*args, **kwargs):
        raise HostSyncError(f"host synchronization: Tensor.{name}()")
    return raise_


@contextlib.contextmanager
def no_host_sync(device: torch.device, host_data: bool = True):
    """Fail on any host synchronization inside the block (see the module docstring and
    :class:`NoHostSync` for ``host_data``)."""
    with contextlib.ExitStack() as stack:
        for name in ("tolist", "cpu", "numpy"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, _fail(name)))
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, before)
        stack.enter_context(NoHostSync(host_data))
        yield


def _block(kind: str, device: torch.device):
    """conv (3 -> 8, 3x3, bias) + norm layer, attached, float32, on ``device``; and the first
    iteration at which the layer is past its burn-in / warm-ups."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    if kind == "MABN":  # t = it + 1 > m = 2: SMA; t > renorm_warmup_iters = 2: renormalization
        layer, ready = MABN(8, buffer_size=2, warmup_iters=0, renorm_warmup_iters=2, r_max=2.0), 2
    elif kind == "NaiveCBN":
        layer, ready = NaiveCBN(8, window_size=3, burn_in=2), 2
    else:
        grad_mode = {"CBN": "closed_form", "CBN-autograd": "autograd"}[kind]
        layer, ready = CBN(8, window_size=3, burn_in=2, grad_mode=grad_mode), 2
    conv, layer = conv.to(device), layer.to(device)
    layer.attach_conv(conv)
    return conv, layer, ready


KINDS = ["CBN", "CBN-autograd", "NaiveCBN", "MABN"]
def _step(conv, layer, u, gy):
    y = torch.relu(layer(conv(u)))
    (y * gy).sum().backward()
    return y


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_has_no_host_sync(kind, device):
    """No device-to-host read and no data-dependent shape (and, on CUDA, nothing that
    ``set_sync_debug_mode("error")`` reports) in forward + backward, before and after the
    burn-in / warm-ups, nor in eval mode."""
    _run(kind, device, host_data=False)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_makes_no_tensor_from_host_data(kind):
    """As above, and no tensor made from Python data either (a synchronizing copy on a GPU),
    checked on the CPU."""
    _run(kind, torch.device("cpu"), host_data=True)


def _run(kind, device, host_data):
    conv, layer, ready = _block(kind, device)
    gen = torch.Generator().manual_seed(1)
    for it in range(ready + 3):
        u = (torch.randn(2, 3, 8, 8, generator=gen) + 0.5).to(device).requires_grad_(True)
        gy = torch.randn(2, 8, 8, 8, generator=gen).to(device)
        layer.set_iteration(it)  # a Python int: not a synchronization
        with no_host_sync(device, host_data):
            _step(conv, layer, u, gy)
        assert torch.isfinite(u.grad).all() and all(torch.isfinite(p.grad).all() for p in conv.parameters())
        conv.zero_grad(), layer.zero_grad()
    # the test ran the full machinery: the window / the moving averages hold entries
    if kind == "MABN":
        assert int((layer.chi2_iters >= 0).sum()) == 2 and int((layer.psi_iters >= 0).sum()) == 2
    else:
        assert int((layer.window_iters >= 0).sum()) == 2 and layer.effective_window_size() == 3
    # eval mode (population statistics) has none either
    layer.eval(), conv.eval()
    with torch.no_grad(), no_host_sync(device, host_data):
        layer(conv(u.detach()))


def test_the_check_catches_a_host_sync():
    """Not vacuous: ``.item()``, ``bool(t)``, ``.tolist()`` and a boolean-mask index are caught,
    also inside an autograd backward; the same ops without a sync pass."""
    x = torch.randn(4, requires_grad=True)
    for bad in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.tolist(), lambda: x[x > 0],
                lambda: float(x.detach().max()), lambda: x.detach().nonzero()):
        with pytest.raises(HostSyncError), no_host_sync(torch.device("cpu")):
            bad()

    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            if g.sum() > 0:  # bool(tensor): a sync
                return g * 2
            return g * 2

    with pytest.raises(HostSyncError), no_host_sync(torch.device("cpu")):
        SyncInBackward.apply(x).sum().backward()
    with no_host_sync(torch.device("cpu")):
        y = torch.where(x > 0, x, x.new_zeros(())).masked_fill(x < -1, 0.0)
        y.sum().backward()
