"""``torch.compile(block, fullgraph=True)`` of a conv + CBN / MABN training block gives the eager
results: outputs, input gradients, conv and norm parameter gradients and every buffer, over
iterations that cross the burn-in (CBN: BN at t = 0, the compensated window at t = 1) or the
warm-ups (MABN: batch statistics at t = 1, renormalization from t = 2, SMA statistics at t = 3).

``fullgraph=True`` makes any graph break an error, so the layers' training forward (statistics,
window / moving-average updates masked on the device, the custom autograd Functions with their
backward-time buffer writes) must be capturable as one graph.

Backend ``"aot_eager"``: Dynamo's graph capture and AOTAutograd's joint forward / backward graph,
run with eager kernels. Inductor (``backend="inductor"``, the default) generates and compiles
C++ on the CPU: measured 81 s for the first iteration of the CBN block and 23 s for the next on
the 2-core CI machine, against about 5 s here; its code generation is not what these tests are
about. float64, so that compiled and eager results can be compared tightly.

By default Dynamo treats the layer's integer ``iteration`` attribute as a constant (guard
``iteration == t``), so each new trainer iteration is a new compilation; README tells users to set
``torch._dynamo.config.allow_unspec_int_on_nn_module = True``, with which the compilations stop
after the burn-in / warm-up boundaries (checked below).
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import smallbn_d2  # noqa: F401  (compat fixes)
from smallbn_d2 import CrossIterationBatchNorm2d as CBN
from smallbn_d2.layers import MovingAverageBatchNorm2d as MABN

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _block(kind):
    """conv (3 -> 8, 3x3, bias) + the norm, float64, from a fixed seed; iterations to run."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    if kind == "CBN":
        layer, iters = CBN(8, window_size=2, burn_in=1), 2
    else:
        layer, iters = MABN(8, buffer_size=2, warmup_iters=0, renorm_warmup_iters=1, r_max=2.0), 3
    conv, layer = conv.to(F64), layer.to(F64)
    layer.attach_conv(conv)
    return nn.Sequential(conv, layer), iters


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["CBN", "MABN"])
def test_compiled_training_block_equals_eager(kind):
    torch._dynamo.reset()
    (eager, iters), (block, _) = _block(kind), _block(kind)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, block)]
    gen = torch.Generator().manual_seed(1)
    for it in range(iters):
        u = torch.randn(2, 3, 8, 8, generator=gen, dtype=F64) + 0.5
        gy = torch.randn(2, 8, 8, 8, generator=gen, dtype=F64)
        results = []
        for model, fn in ((eager, eager), (block, compiled)):
            model[1].set_iteration(it)
            ui = u.clone().requires_grad_(True)
            y = fn(ui)
            y.backward(gy)
            results.append((y.detach(), ui.grad, {n: p.grad.clone() for n, p in model.named_parameters()},
                            {n: b.clone() for n, b in model.named_buffers()}))
        (y_e, g_e, p_e, b_e), (y_c, g_c, p_c, b_c) = results
        torch.testing.assert_close(y_c, y_e, **TIGHT)
        torch.testing.assert_close(g_c, g_e, **TIGHT)
        assert p_c.keys() == p_e.keys() and b_c.keys() == b_e.keys()
        for name in p_e:
            torch.testing.assert_close(p_c[name], p_e[name], **TIGHT, msg=lambda m: f"grad of {name}: {m}")
        for name in b_e:
            torch.testing.assert_close(b_c[name], b_e[name], **TIGHT, msg=lambda m: f"buffer {name}: {m}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    # the compiled function ran (no silent eager fallback) and the cross-iteration state was used
    assert counter.frame_count >= 1 and counter.op_count > 0
    layer = block[1]
    if kind == "CBN":
        assert layer.effective_window_size() == 2 and int((layer.window_iters >= 0).sum()) == 1
    else:  # iteration 2 >= m = 2: SMA over the entries of iterations 1 and 2
        assert sorted(layer.chi2_iters.tolist()) == [1, 2] and sorted(layer.psi_iters.tolist()) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["CBN", "MABN"])
def test_with_unspecialized_module_ints_the_iterations_stop_recompiling(kind):
    """README's setting: 12 iterations (past CBN's burn-in, past MABN's warm-ups) compile at most
    4 times, none after iteration 6, and the last iterations still equal eager."""
    torch._dynamo.reset()
    (eager, _), (block, _) = _block(kind), _block(kind)
    counter = CompileCounterWithBackend("aot_eager")
    frames = []
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = torch.compile(block, backend=counter)
        gen = torch.Generator().manual_seed(1)
        for it in range(12):
            u = torch.randn(2, 3, 8, 8, generator=gen, dtype=F64) + 0.5
            outs = []
            for model, fn in ((eager, eager), (block, compiled)):
                model[1].set_iteration(it)
                ui = u.clone().requires_grad_(True)
                y = fn(ui)
                y.sum().backward()
                outs.append((y.detach(), ui.grad))
            torch.testing.assert_close(outs[1], outs[0], **TIGHT)
            frames.append(counter.frame_count)
    assert frames[-1] <= 4 and frames[6] == frames[-1], frames
