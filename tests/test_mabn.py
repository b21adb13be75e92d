"""Layer-level tests of MovingAverageBatchNorm2d and weight centralization (METHODS.md, MABN).

Tests that take the ``device`` fixture (tests/conftest.py) run on the CPU and, when a GPU is
present, on CUDA."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d  # noqa: E402

from smallbn_d2.layers.base import NormNotWiredError  # noqa: E402
from smallbn_d2.layers.mabn import MovingAverageBatchNorm2d  # noqa: E402
from smallbn_d2.layers.weight_centralization import (  # noqa: E402
    WeightCentralization,
    centralize_conv_weight,
    is_weight_centralized,
    remove_weight_centralization,
)

from lowp_checks import assert_affine_close  # noqa: E402  (tests/lowp_checks.py)

TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ reference
class Reference:
    """MABN written directly from METHODS.md items 3-5, float64, history kept by iteration t."""

    def __init__(self, C, m, momentum, eps, warmup, renorm_warmup, r_max, gamma, beta):
        self.m, self.momentum, self.eps = m, momentum, eps
        self.warmup, self.renorm_warmup, self.r_max = warmup, renorm_warmup, r_max
        self.gamma, self.beta = gamma.clone(), beta.clone()
        self.chi2_hist, self.psi_hist = {}, {}
        self.running = torch.ones(C, dtype=torch.float64, device=gamma.device)
        self.r_log = []

    def _window_mean(self, hist, t):
        vals = [hist[s] for s in range(t - self.m + 1, t + 1) if s in hist]
        return sum(vals) / len(vals)

    def _warm(self, t):
        return t <= self.m or t < self.warmup

    def forward(self, x, t):
        c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        chi2_t = (x ** 2).mean(dim=(0, 2, 3))
        self.chi2_hist[t] = chi2_t
        chi2 = chi2_t if self._warm(t) else self._window_mean(self.chi2_hist, t)
        sd = torch.sqrt(chi2 + self.eps)
        z = x / c(sd)
        if t <= max(self.renorm_warmup, self.warmup):
            r = torch.ones_like(chi2)
        else:
            r = torch.clamp(sd / torch.sqrt(self.running + self.eps), 1 / self.r_max, self.r_max)
        self.r_log.append(r)
        y = c(self.gamma) * c(r) * z + c(self.beta)
        self.running = self.momentum * self.running + (1 - self.momentum) * chi2
        return y, (t, z, r, sd)

    def backward(self, gy, saved):
        c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        t, z, r, sd = saved
        g = gy * c(self.gamma) * c(r)
        psi_t = (g * z).mean(dim=(0, 2, 3))
        self.psi_hist[t] = psi_t
        psi = psi_t if self._warm(t) else self._window_mean(self.psi_hist, t)
        dx = (g - z * c(psi)) / c(sd)
        dgamma = (gy * c(r) * z).sum(dim=(0, 2, 3))
        dbeta = gy.sum(dim=(0, 2, 3))
        return dx, dgamma, dbeta


def make_pair(C=4, m=3, momentum=0.7, eps=1e-3, warmup=5, renorm_warmup=8, r_max=1.5, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    layer = MovingAverageBatchNorm2d(C, buffer_size=m, momentum=momentum, eps=eps, warmup_iters=warmup,
                                     renorm_warmup_iters=renorm_warmup, r_max=r_max).to(device, torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    ref = Reference(C, m, momentum, eps, warmup, renorm_warmup, r_max, layer.weight.detach(), layer.bias.detach())
    return layer, ref, gen


def run_step(layer, x, gy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, [x, layer.weight, layer.bias], gy)
    return y.detach(), dx, dw, db


def random_input(gen, shape=(2, 4, 3, 5), scale=None):
    s = scale if scale is not None else math.exp(torch.randn((), generator=gen, dtype=torch.float64).item())
    # per-channel offsets make the input not centered, so psi and r differ per channel
    off = torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64)
    return s * (torch.randn(shape, generator=gen, dtype=torch.float64) + off)


# ------------------------------------------------------------------------------ reference tests
@pytest.mark.parametrize("m,warmup,renorm_warmup", [(3, 5, 8), (4, 2, 6)])
def test_matches_reference_across_warmups(m, warmup, renorm_warmup, device):
    # (3, 5, 8): warm-up ends by t < warmup_iters; (4, 2, 6): by t <= m
    layer, ref, gen = make_pair(m=m, warmup=warmup, renorm_warmup=renorm_warmup, device=device)
    layer.train()
    for it in range(16):  # t = 1..16: crosses t <= m, t < warmup_iters, renorm warm-up
        t = it + 1
        layer.set_iteration(it)
        x = random_input(gen).to(device)
        gy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
        y, dx, dw, db = run_step(layer, x, gy)
        y_ref, saved = ref.forward(x, t)
        dx_ref, dw_ref, db_ref = ref.backward(gy, saved)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(dx, dx_ref, **TOL)
        torch.testing.assert_close(dw, dw_ref, **TOL)
        torch.testing.assert_close(db, db_ref, **TOL)
        torch.testing.assert_close(layer.running_chi2, ref.running, **TOL)
        slot = it % m  # the layer counts iterations from 0 (the reference's t = it + 1)
        torch.testing.assert_close(layer.chi2_buffer[slot], ref.chi2_hist[t], **TOL)
        torch.testing.assert_close(layer.psi_buffer[slot], ref.psi_hist[t], **TOL)
        assert int(layer.chi2_iters[slot]) == it and int(layer.psi_iters[slot]) == it
    # the test is only meaningful if r was clipped for some channels and not for others
    late = torch.stack(ref.r_log[max(renorm_warmup, warmup):])
    clipped = (late - 1.5).abs().lt(1e-12) | (late - 1 / 1.5).abs().lt(1e-12)
    assert clipped.any() and (~clipped & (late - 1).abs().gt(1e-6)).any()


def test_sma_differs_from_batch_statistics():
    """Guard against a reference and layer that both ignore the window: outputs must differ."""
    layer, _, gen = make_pair(warmup=0, renorm_warmup=100)
    plain = MovingAverageBatchNorm2d(4, buffer_size=1, eps=1e-3, renorm_warmup_iters=100).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}, strict=False)
    layer.train(), plain.train()
    for it in range(6):
        layer.set_iteration(it), plain.set_iteration(it)
        x = random_input(gen)
        y1, y2 = layer(x), plain(x)
    assert not torch.allclose(y1, y2)


def test_m1_backward_equals_autograd_of_formula():
    gen = torch.Generator().manual_seed(1)
    layer = MovingAverageBatchNorm2d(3, buffer_size=1, eps=1e-4, renorm_warmup_iters=1000).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    layer.train()
    for it in range(4):  # t = 1 (t <= m) and t >= 2 (SMA over one entry)
        layer.set_iteration(it)
        x = random_input(gen, (2, 3, 4, 4))
        gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        y, dx, dw, db = run_step(layer, x, gy)
        xr = x.clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        yr = w.view(1, -1, 1, 1) * xr / torch.sqrt((xr ** 2).mean(dim=(0, 2, 3), keepdim=True) + 1e-4) + b.view(1, -1, 1, 1)
        dxr, dwr, dbr = torch.autograd.grad(yr, [xr, w, b], gy)
        torch.testing.assert_close(y, yr.detach(), **TOL)
        torch.testing.assert_close(dx, dxr, **TOL)
        torch.testing.assert_close(dw, dwr, **TOL)
        torch.testing.assert_close(db, dbr, **TOL)


def test_skipped_and_repeated_iterations():
    m, eps = 3, 1e-3
    gen = torch.Generator().manual_seed(2)
    layer = MovingAverageBatchNorm2d(4, buffer_size=m, eps=eps, warmup_iters=0, renorm_warmup_iters=1000,
                                     affine=False).double().train()
    chi2, psi = {}, {}

    def step(it, x, gy):
        layer.set_iteration(it)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        (dx,) = torch.autograd.grad(y, [xr], gy)
        return y.detach(), dx

    def expected(x, gy, c_used, p_used):
        sd = torch.sqrt(c_used + eps).view(1, -1, 1, 1)
        z = x / sd
        return z, (gy - z * p_used.view(1, -1, 1, 1)) / sd

    def stats(x, gy):
        c = (x ** 2).mean(dim=(0, 2, 3))
        z = x / torch.sqrt(c + eps).view(1, -1, 1, 1)
        return c, (gy * z).mean(dim=(0, 2, 3))

    # t = 1..4; t = 4 averages t = 2, 3, 4
    for it in range(4):
        x, gy = random_input(gen), torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
        step(it, x, gy)
        chi2[it + 1] = (x ** 2).mean(dim=(0, 2, 3))
    # iteration 4 (t = 5) skipped; t = 6 averages the entries of t = 4 and t = 6 only
    x, gy = random_input(gen), torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    y, dx = step(5, x, gy)
    chi2[6] = (x ** 2).mean(dim=(0, 2, 3))
    c_used = (chi2[4] + chi2[6]) / 2
    z = x / torch.sqrt(c_used + eps).view(1, -1, 1, 1)
    p6 = (gy * z).mean(dim=(0, 2, 3))
    psi4 = layer.psi_buffer[3 % m].clone()  # t = 4 is iteration 3 (slots and tags are 0-based)
    assert int(layer.psi_iters[3 % m]) == 3
    z_exp, dx_exp = expected(x, gy, c_used, (psi4 + p6) / 2)
    torch.testing.assert_close(y, z_exp, **TOL)
    torch.testing.assert_close(dx, dx_exp, **TOL)
    assert int(layer.chi2_iters[4 % m]) == 1  # the skipped slot keeps its stale (ignored) entry

    # t = 7 called twice: the second call overwrites slot 7 % m; window (4, 7] = {6, 7}
    xa, xb = random_input(gen), random_input(gen)
    gy = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    run_before = layer.running_chi2.clone()
    step(6, xa, gy)
    yb, dxb = step(6, xb, gy)
    cb = (xb ** 2).mean(dim=(0, 2, 3))
    c_used_a = (chi2[6] + (xa ** 2).mean(dim=(0, 2, 3))) / 2
    c_used_b = (chi2[6] + cb) / 2
    torch.testing.assert_close(layer.chi2_buffer[6 % m], cb, **TOL)
    assert int(layer.chi2_iters[6 % m]) == 6
    torch.testing.assert_close(yb, xb / torch.sqrt(c_used_b + eps).view(1, -1, 1, 1), **TOL)
    # running_chi2 is updated once per call
    mom = layer.momentum
    run_exp = mom * (mom * run_before + (1 - mom) * c_used_a) + (1 - mom) * c_used_b
    torch.testing.assert_close(layer.running_chi2, run_exp, **TOL)
    # psi: the second backward wrote slot 7 with its psi and used the window {6, 7}
    zb = xb / torch.sqrt(c_used_b + eps).view(1, -1, 1, 1)
    pb = (gy * zb).mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.psi_buffer[6 % m], pb, **TOL)
    _, dx_exp = expected(xb, gy, c_used_b, (p6 + pb) / 2)
    torch.testing.assert_close(dxb, dx_exp, **TOL)


def test_entries_from_later_iterations_are_ignored():
    """A run restarted at an earlier iteration (buffers loaded from a later one) ignores them."""
    m, eps = 3, 1e-3
    gen = torch.Generator().manual_seed(8)
    layer = MovingAverageBatchNorm2d(4, buffer_size=m, eps=eps, renorm_warmup_iters=1000, affine=False).double()
    layer.train()
    for it in range(10):
        layer.set_iteration(it)
        layer(random_input(gen))
    assert sorted(layer.chi2_iters.tolist()) == [7, 8, 9]
    layer.set_iteration(4)  # t = 5 > m: the window (2, 5] holds only this iteration's entry
    x = random_input(gen)
    y = layer(x)
    torch.testing.assert_close(y, x / torch.sqrt((x ** 2).mean(dim=(0, 2, 3)) + eps).view(1, -1, 1, 1), **TOL)


def test_resume_from_state_dict_is_exact():
    a, _, gen = make_pair(warmup=0, renorm_warmup=2, seed=3)
    a.train()
    xs = [random_input(gen) for _ in range(10)]
    gys = [torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64) for _ in range(10)]
    b = None
    outs_a, outs_b = [], []
    for it in range(10):
        if it == 6:
            b = MovingAverageBatchNorm2d(4, buffer_size=3, momentum=0.7, eps=1e-3, warmup_iters=0,
                                         renorm_warmup_iters=2, r_max=1.5).double()
            buf = io.BytesIO()
            torch.save(a.state_dict(), buf)
            buf.seek(0)
            b.load_state_dict(torch.load(buf), strict=True)
            b.train()
        a.set_iteration(it)
        outs_a.append(run_step(a, xs[it], gys[it]))
        if b is not None:
            b.set_iteration(it)
            outs_b.append(run_step(b, xs[it], gys[it]))
    for oa, ob in zip(outs_a[6:], outs_b):
        for u, v in zip(oa, ob):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------ eval
def test_eval_is_linear_and_uses_running_chi2():
    gen = torch.Generator().manual_seed(4)
    layer = MovingAverageBatchNorm2d(4, eps=1e-3).double()
    with torch.no_grad():
        layer.running_chi2.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.1)
        layer.weight.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    layer.eval()  # no set_iteration needed
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x1, x2 = random_input(gen), random_input(gen)
    a, b = 0.7, -2.3
    f = layer
    beta = layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(f(a * x1 + b * x2), a * f(x1) + b * f(x2) - (a + b - 1) * beta, **TOL)
    expected = (layer.weight.detach().view(1, -1, 1, 1) * x1 / torch.sqrt(layer.running_chi2 + 1e-3).view(1, -1, 1, 1)
                + beta)
    torch.testing.assert_close(f(x1), expected, **TOL)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def _eval_formula(layer, x):
    """(scale, shift, y) in float64 of METHODS.md MABN item 6: y = gamma * x / sqrt(running_chi2
    + eps) + beta, for x (N, C, H, W)."""
    chi2, gamma, beta = (t.detach().cpu().double() for t in (layer.running_chi2, layer.weight, layer.bias))
    scale = gamma / torch.sqrt(chi2 + layer.eps)
    return scale, beta, x.detach().cpu().double() * scale.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_eval_in_low_precision_matches_formula(dtype, autocast, device):
    """Inference with a bfloat16 / float16 input (a float32 layer with non-trivial running_chi2,
    gamma, beta) is y = gamma * x / sqrt(running_chi2 + eps) + beta on the float64 value of the
    same input, within the dtype's rounding, element-wise and in the per-channel mean of the error
    (tests/lowp_checks.py). With ``autocast`` the input is a conv's output under ``torch.autocast``
    and the layer runs inside it."""
    torch.manual_seed(30)
    gen = torch.Generator().manual_seed(30)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(device).eval()
    layer = MovingAverageBatchNorm2d(6).to(device).eval()
    with torch.no_grad():
        layer.running_chi2.copy_(torch.rand(6, generator=gen) * 2 + 0.3)
        layer.weight.copy_(torch.rand(6, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(6, generator=gen) * 0.5)
    with torch.no_grad():
        if autocast:
            with torch.autocast(device.type, dtype=dtype):
                x = conv((torch.randn(8, 3, 16, 16, generator=gen) * 2).to(device))
                y = layer(x)
        else:
            x = (torch.randn(8, 6, 16, 16, generator=gen) * layer.running_chi2.cpu().sqrt().view(1, -1, 1, 1)
                 ).to(device, dtype)
            y = layer(x)
    assert x.dtype == dtype and y.dtype == dtype
    scale, shift, ref = _eval_formula(layer, x)
    assert_affine_close(y, x, scale, shift, ref, what=f"MABN eval, {dtype}")


# ------------------------------------------------------------------------------ weight centralization
def test_attach_conv_centralizes_over_input_channels_and_kernel_only():
    """After ``layer.attach_conv(conv)`` the conv's effective weight is w - mean(w[c]) per output
    channel c, the mean over (C_in / groups, kh, kw) (METHODS.md MABN item 2), computed here
    directly. The raw weight has non-zero means over the other dimensions too (over output
    channels, over input channels, over kernel positions); those of the centralized weight are
    what the formula gives, not zero: centering over the wrong dimensions fails."""
    gen = torch.Generator().manual_seed(40)
    for groups in (1, 2):
        conv = nn.Conv2d(4, 6, 3, groups=groups, bias=False)
        cin = 4 // groups
        with torch.no_grad():  # w = a[c_out] + b[c_in] + c[kh, kw] + noise
            conv.weight.copy_(torch.randn(6, 1, 1, 1, generator=gen) * 3 + torch.randn(1, cin, 1, 1, generator=gen) * 2
                              + torch.randn(1, 1, 3, 3, generator=gen) * 2 + torch.randn(6, cin, 3, 3, generator=gen))
        raw = conv.weight.detach().clone()
        MovingAverageBatchNorm2d(6).attach_conv(conv)
        w = conv.weight.detach()
        expected = raw - raw.mean(dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-5)
        assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-5  # zero mean per output channel
        assert raw.mean(dim=(1, 2, 3)).abs().min() > 0.1  # ... which the raw weight did not have
        for dims in ((0,), (0, 2, 3), (0, 1)):  # other means stay those of the formula, not zero
            assert expected.mean(dim=dims).abs().max() > 0.1, dims
            torch.testing.assert_close(w.mean(dim=dims), expected.mean(dim=dims), rtol=0, atol=1e-5)
        x = torch.randn(2, 4, 5, 5, generator=gen)
        torch.testing.assert_close(conv(x), F.conv2d(x, expected, groups=groups), rtol=1e-5, atol=1e-5)


def test_weight_centralization_zero_mean_grouped():
    for groups in (1, 2):
        conv = nn.Conv2d(4, 6, 3, groups=groups, bias=False)
        with torch.no_grad():
            conv.weight.add_(1.0)  # make it clearly non-centered
        raw = conv.weight.detach().clone()
        centralize_conv_weight(conv)
        w = conv.weight
        assert w.shape == raw.shape
        assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-6
        torch.testing.assert_close(w, raw - raw.mean(dim=(1, 2, 3), keepdim=True))
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(conv(x), F.conv2d(x, raw - raw.mean(dim=(1, 2, 3), keepdim=True), groups=groups))
    # WeightCentralization alone
    w = torch.randn(3, 2, 1, 1) + 5
    assert WeightCentralization()(w).mean(dim=(1, 2, 3)).abs().max() < 1e-5


def _small_model(seed, attach=True):
    torch.manual_seed(seed)
    model = nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=MovingAverageBatchNorm2d(8, buffer_size=2)),
        nn.ReLU(),
        Conv2d(8, 4, 1, bias=True, norm=MovingAverageBatchNorm2d(4, buffer_size=2)),
    )
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.add_(0.5)
    if attach:
        for conv in (model[0], model[2]):
            conv.norm.attach_conv(conv)
    return model


def test_centralized_model_state_dict_round_trip():
    model = _small_model(0)
    assert is_weight_centralized(model[0]) and is_weight_centralized(model[2])
    # train a little so the norm buffers are non-trivial
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    originals = [model[0].parametrizations.weight.original, model[2].parametrizations.weight.original]
    names = dict(model.named_parameters())
    assert "0.parametrizations.weight.original" in names
    param_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in param_ids for p in originals)
    before = originals[0].detach().clone()
    for it in range(3):
        for mod in model.modules():
            if isinstance(mod, MovingAverageBatchNorm2d):
                mod.set_iteration(it)
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
    assert not torch.equal(before, originals[0].detach())  # the optimizer updates it

    sd = model.state_dict()
    assert "0.weight" in sd and "2.weight" in sd and "2.bias" in sd
    assert not any("parametrizations" in k for k in sd)
    assert torch.equal(sd["0.weight"], originals[0].detach())  # saved raw, not centralized
    plain_keys = set(_small_model(0, attach=False).state_dict())
    assert set(sd) == plain_keys

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = _small_model(1)
    other.load_state_dict(torch.load(buf), strict=True)
    sd2 = other.state_dict()
    assert list(sd2) == list(sd)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    model.eval(), other.eval()
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(model(x), other(x))


def test_detection_checkpointer_round_trip(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    model = _small_model(4)
    with torch.no_grad():
        model[0].norm.running_chi2.mul_(3.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert "0.weight" in saved and not any("parametrizations" in k for k in saved)
    other = _small_model(5)
    DetectionCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert is_weight_centralized(other[0])


def test_non_centralized_state_dict_loads_and_is_centralized():
    plain = _small_model(2, attach=False)
    sd = plain.state_dict()
    model = _small_model(3)
    model.load_state_dict(sd, strict=True)
    raw = sd["0.weight"]
    wc = raw - raw.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(model[0].weight, wc)
    # the forward uses the centralized weight: eval MABN is linear with known statistics
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    norm = model[0].norm
    expected = F.conv2d(x, wc, padding=1)
    expected = (norm.weight.view(1, -1, 1, 1) * expected / torch.sqrt(norm.running_chi2 + norm.eps).view(1, -1, 1, 1)
                + norm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(model[0](x), expected)
    # a plain (un-centralized) conv with the same weights computes something else
    assert not torch.allclose(plain[0].eval()(x), model[0](x), atol=1e-3)


def test_centralize_idempotent_and_remove():
    conv = nn.Conv2d(3, 4, 3)
    n_save, n_load = len(conv._state_dict_hooks), len(conv._load_state_dict_pre_hooks)
    param = conv.weight
    centralize_conv_weight(conv)
    centralize_conv_weight(conv)
    assert len(conv.parametrizations.weight) == 1
    assert len(conv._state_dict_hooks) == n_save + 1 and len(conv._load_state_dict_pre_hooks) == n_load + 1
    assert conv.parametrizations.weight.original is param
    import copy

    clone = copy.deepcopy(conv)
    assert set(clone.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        param.add_(1.0)
    wc = conv.weight.detach().clone()
    remove_weight_centralization(conv, bake=True)
    assert not is_weight_centralized(conv) and type(conv) is nn.Conv2d
    assert isinstance(conv.weight, nn.Parameter) and torch.equal(conv.weight.detach(), wc)
    assert len(conv._state_dict_hooks) == n_save and len(conv._load_state_dict_pre_hooks) == n_load
    assert set(conv.state_dict()) == {"weight", "bias"}
    # a deep copy made before the removal still works and is removed independently
    assert is_weight_centralized(clone) and set(clone.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(clone.weight.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    # bake=False restores the raw value
    centralize_conv_weight(clone)
    with torch.no_grad():
        clone.parametrizations.weight.original.add_(1.0)
    raw = clone.parametrizations.weight.original.detach().clone()
    remove_weight_centralization(clone, bake=False)
    assert torch.equal(clone.weight.detach(), raw) and type(clone) is nn.Conv2d


# ------------------------------------------------------------------------------ robustness
def _trained_layer(iters=5):
    gen = torch.Generator().manual_seed(5)
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, renorm_warmup_iters=1).train()
    for it in range(iters):
        layer.set_iteration(it)
        x = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
        layer(x).sum().backward()
    return layer


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_empty_input():
    layer = _trained_layer()
    before = _state(layer)
    layer.set_iteration(5)
    x = torch.zeros(0, 4, 3, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    layer.weight.grad = None
    layer.bias.grad = None
    y = layer(torch.zeros(0, 4, 3, 3))
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(4)) and torch.equal(layer.bias.grad, torch.zeros(4))
    for k, v in layer.state_dict().items():
        if k not in ("weight", "bias"):
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_never_enters_buffers(bad):
    """A batch with a NaN/Inf changes no buffer, in forward or backward; the next finite
    iteration then gives exactly what a layer that never saw the bad batch gives (output, input
    gradient, gamma / beta gradients and every buffer)."""
    for warm in (True, False):  # current statistics (warm-up) and SMA + renormalization
        iters = 1 if warm else 5
        layer, clean = _trained_layer(iters=iters), _trained_layer(iters=iters)
        before = _state(layer)
        layer.set_iteration(iters)
        x = torch.randn(2, 4, 3, 3)
        x[0, 1, 0, 0] = bad
        x.requires_grad_(True)
        y = layer(x)
        y.sum().backward()
        for k, v in layer.state_dict().items():
            if k not in ("weight", "bias"):
                assert torch.equal(v, before[k]), k
                if v.is_floating_point():
                    assert torch.isfinite(v).all(), k
        # the next iteration, compared with the layer that skipped the bad one
        gen = torch.Generator().manual_seed(50)
        x = torch.randn(2, 4, 3, 3, generator=gen) + 0.5
        gy = torch.randn(2, 4, 3, 3, generator=gen)
        outs = []
        for lay in (layer, clean):
            lay.zero_grad()
            lay.set_iteration(iters + 1)
            xi = x.clone().requires_grad_(True)
            yi = lay(xi)
            yi.backward(gy)
            outs.append((yi.detach(), xi.grad, lay.weight.grad, lay.bias.grad))
        for a, b in zip(*outs):
            assert torch.isfinite(a).all() and torch.equal(a, b)
        for k, v in clean.state_dict().items():
            assert torch.equal(layer.state_dict()[k], v), k


def test_training_without_iteration_raises():
    layer = MovingAverageBatchNorm2d(4).train()
    with pytest.raises(NormNotWiredError):
        layer(torch.randn(2, 4, 3, 3))
    layer.eval()
    layer(torch.randn(2, 4, 3, 3))  # inference needs no iteration


@pytest.mark.parametrize(
    "name,value",
    [("buffer_size", 0), ("buffer_size", 2.0), ("buffer_size", True), ("momentum", 0.0), ("momentum", 1.5),
     ("eps", 0.0), ("eps", -1e-5), ("warmup_iters", -1), ("warmup_iters", 1.5), ("renorm_warmup_iters", -3),
     ("r_max", 0.5), ("r_max", float("inf"))],
)
def test_invalid_arguments(name, value):
    """Hyperparameters are constructor arguments only: a bad value is a ValueError naming the
    argument, the value and the allowed range."""
    allowed = {"buffer_size": ">= 1", "momentum": "(0, 1]", "eps": "> 0", "warmup_iters": ">= 0",
               "renorm_warmup_iters": ">= 0", "r_max": ">= 1"}[name]
    with pytest.raises(ValueError) as err:
        MovingAverageBatchNorm2d(4, **{name: value})
    msg = str(err.value)
    assert name in msg and repr(value) in msg and "allowed" in msg and allowed in msg, msg


def test_constructor_sets_the_hyperparameters_and_repr():
    layer = MovingAverageBatchNorm2d(4)
    assert layer.chi2_buffer.shape == (16, 4)  # default m = 16
    layer = MovingAverageBatchNorm2d(4, buffer_size=5, momentum=0.9, eps=1e-4, warmup_iters=7,
                                     renorm_warmup_iters=9, r_max=2.0)
    assert (layer.buffer_size, layer.momentum, layer.eps) == (5, 0.9, 1e-4)
    assert (layer.warmup_iters, layer.renorm_warmup_iters, layer.r_max) == (7, 9, 2.0)
    assert layer.chi2_buffer.shape == (5, 4) and layer.psi_buffer.shape == (5, 4)
    assert layer.chi2_iters.tolist() == [-1] * 5 and layer.psi_iters.dtype == torch.int64
    assert layer.chi2_buffer.dtype == torch.float32 and layer.running_chi2.tolist() == [1.0] * 4
    r = repr(layer)
    for s in ("buffer_size=5", "momentum=0.9", "eps=0.0001", "warmup_iters=7", "renorm_warmup_iters=9", "r_max=2.0"):
        assert s in r
    with pytest.raises(TypeError, match="bufer_size"):
        MovingAverageBatchNorm2d(4, bufer_size=3)
    with pytest.raises(ValueError, match="num_features"):
        MovingAverageBatchNorm2d(0)


def test_bf16_autocast_matches_float32():
    gen = torch.Generator().manual_seed(6)
    kw = dict(buffer_size=2, renorm_warmup_iters=2, r_max=2.0)
    lb, lf = MovingAverageBatchNorm2d(4, **kw).train(), MovingAverageBatchNorm2d(4, **kw).train()
    for it in range(5):
        x = (torch.randn(2, 4, 6, 6, generator=gen) * (it + 1) + 0.3).bfloat16()
        gy = torch.randn(2, 4, 6, 6, generator=gen).bfloat16()
        lb.set_iteration(it), lf.set_iteration(it)
        xb = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = lb(xb)
        assert yb.dtype == torch.bfloat16
        yb.backward(gy)
        assert xb.grad.dtype == torch.bfloat16
        xf = x.float().requires_grad_(True)
        yf = lf(xf)
        yf.backward(gy.float())
        torch.testing.assert_close(yb.float(), yf, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=2e-2, atol=2e-2)
        for k in ("chi2_buffer", "psi_buffer", "running_chi2"):
            assert getattr(lb, k).dtype == torch.float32
            torch.testing.assert_close(getattr(lb, k), getattr(lf, k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb.weight.grad, lf.weight.grad, rtol=1e-4, atol=1e-4)
    # inference under autocast: the formula of item 6 with the trained running_chi2, in bf16
    lb.eval()
    x = (torch.randn(4, 4, 8, 8, generator=gen) * 2 + 0.3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lb(x)
    scale, shift, ref = _eval_formula(lb, x)
    assert_affine_close(y, x, scale, shift, ref, what="MABN eval after bf16 training")


def test_conv_bf16_autocast_end_to_end():
    model = _small_model(7)
    model.train()
    for mod in model.modules():
        if isinstance(mod, MovingAverageBatchNorm2d):
            mod.set_iteration(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 6, 6))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].parametrizations.weight.original.grad is not None
    assert model[0].norm.chi2_buffer.dtype == torch.float32
