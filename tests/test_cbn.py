"""Layer-level tests of Cross-Iteration BN (METHODS.md, "CBN", items 1-8).

Every check compares :class:`CrossIterationBatchNorm2d` / :class:`NaiveCrossIterationBatchNorm2d`
and :mod:`smallbn_d2.layers.cbn_grad` with an independent reference: ``torch.nn.BatchNorm2d``,
the exact statistics of the union of the window's batches, ``torch.autograd.grad``, or
:class:`CBNReference` below, a float64 CBN written directly from METHODS.md items 2-4 (it stores
theta_old, mu_old, nu_old and the gradients per iteration, as the paper does, unlike the layer,
which stores folded constants).

Tests that take the ``device`` fixture (tests/conftest.py) run on the CPU and, when a GPU is
present, on CUDA (the float64 references then run there too).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallbn_d2  # noqa: F401  (compat fixes, norm names)
from smallbn_d2 import CrossIterationBatchNorm2d as CBN
from smallbn_d2 import NaiveCrossIterationBatchNorm2d as NaiveCBN
from smallbn_d2 import NormNotWiredError
from smallbn_d2.layers.cbn_grad import stat_grads_autograd, stat_grads_closed_form

from lowp_checks import assert_affine_close  # tests/lowp_checks.py

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ helpers
def c4(v):
    return v.view(1, -1, 1, 1)


def make_conv(cin=3, cout=4, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=False, dtype=F64,
              seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias).to(device=device, dtype=dtype)


def make_cbn(conv, cls=CBN, dtype=F64, gamma_seed=None, **kw):
    """A ``cls`` layer after ``conv``, on the conv's device, in ``dtype``; random gamma / beta from
    ``gamma_seed``."""
    layer = cls(conv.out_channels, **kw).to(device=conv.weight.device, dtype=dtype)
    if gamma_seed is not None and layer.affine:
        g = torch.Generator().manual_seed(gamma_seed)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.num_features, generator=g, dtype=F64) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=g, dtype=F64))
    layer.attach_conv(conv)
    return layer


def rand_batch(gen, shape, dtype=F64, device="cpu"):
    """Non-centred input with an iteration-specific per-channel offset and scale (drawn on the CPU,
    so every device sees the same numbers)."""
    off = torch.randn(1, shape[1], 1, 1, generator=gen, dtype=F64)
    scale = torch.rand(1, shape[1], 1, 1, generator=gen, dtype=F64) + 0.5
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + off).to(device=device, dtype=dtype)


def perturb(conv, gen, size=0.1):
    """Move the conv's parameters by ``size`` times their mean magnitude (random direction)."""
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(p) * size * p.abs().mean())


def conv_fn(conv, u, weight, bias):
    return F.conv2d(u, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def state_snapshot(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


CONVS = {
    "plain": dict(cin=3, cout=4),
    "strided": dict(cin=3, cout=4, stride=2),
    "dilated": dict(cin=3, cout=4, dilation=2, padding=2),
    "grouped": dict(cin=4, cout=6, groups=2),
    "depthwise": dict(cin=4, cout=4, groups=4),
    "biased": dict(cin=3, cout=4, bias=True),
    "biased_1x1_strided": dict(cin=3, cout=5, kernel=1, padding=0, stride=2, bias=True),
    "rect_kernel": dict(cin=3, cout=4, kernel=(3, 2), stride=(2, 1), padding=(1, 0), bias=True),
    "all": dict(cin=4, cout=6, stride=2, dilation=2, padding=2, groups=2, bias=True),
}
U_SHAPE = lambda conv: (3, conv.in_channels, 9, 11)  # noqa: E731 (odd sizes: strides do not divide)


# ------------------------------------------------------------------------------------ reference
class CBNReference:
    """Float64 CBN straight from METHODS.md CBN items 1-4, 6, 7 (paper eq. 4-9).

    Per iteration s it stores theta_s, b_s, mu_s, nu_s and d mu_s / d(theta, b), d nu_s /
    d(theta, b) computed by ``torch.autograd.grad``; at iteration t it compensates every stored
    entry with s in [t-k+1, t-1] to the conv's current parameters, and aggregates them with the
    current batch (``"paper"``: mean of mu and of max(nu, mu^2); ``"drop_invalid"``: entries with a
    negative compensated variance are left out, per channel). k = 1 for t < burn_in; entries are
    stored from iteration burn_in - (k - 1) on.
    """

    def __init__(self, C, k, burn_in=0, eps=1e-5, momentum=0.1, aggregation="paper", compensate=True,
                 device="cpu"):
        self.k, self.burn_in, self.eps, self.momentum = k, burn_in, eps, momentum
        self.aggregation, self.compensate = aggregation, compensate
        self.entries = {}
        self.running_mean = torch.zeros(C, dtype=F64, device=device)
        self.running_var = torch.ones(C, dtype=F64, device=device)
        self.invalid_entries = 0  # compensated entries (per channel) with nu < mu^2

    def window_entries(self, conv, t, theta=None):
        """Compensated (mu, nu) of the stored entries in the window: constants (no autograd),
        unless a ``theta`` carrying autograd is given in place of the conv's current weight."""
        k = 1 if t < self.burn_in else self.k
        theta = conv.weight.detach().to(F64) if theta is None else theta
        b = None if conv.bias is None else conv.bias.detach().to(F64)
        out = []
        for s in range(t - k + 1, t):
            if s not in self.entries:
                continue
            e = self.entries[s]
            mu, nu = e["mu"], e["nu"]
            if self.compensate:
                mu = mu + (e["gmu_w"] * (theta - e["theta"])).sum((1, 2, 3))
                nu = nu + (e["gnu_w"] * (theta - e["theta"])).sum((1, 2, 3))
                if b is not None:
                    mu = mu + e["gmu_b"] * (b - e["b"])
                    nu = nu + e["gnu_b"] * (b - e["b"])
            self.invalid_entries += int((nu < mu * mu).sum())
            out.append((mu, nu))
        return out

    def aggregate(self, mu_t, nu_t, entries):
        """(mu_bar, sigma_bar^2) of METHODS.md item 3 (or the drop-invalid rule)."""
        if self.aggregation == "paper":
            mus = [mu_t] + [m for m, _ in entries]
            nus = [nu_t] + [torch.maximum(n, m * m) for m, n in entries]
            mu_bar = sum(mus) / len(mus)
            nu_bar = sum(nus) / len(nus)
        else:
            s_mu, s_nu, count = mu_t, nu_t, torch.ones_like(mu_t)
            for m, n in entries:
                valid = (n - m * m >= 0).to(F64)
                s_mu, s_nu, count = s_mu + valid * m, s_nu + valid * n, count + valid
            mu_bar, nu_bar = s_mu / count, s_nu / count
        return mu_bar, nu_bar - mu_bar * mu_bar

    def record(self, conv, u, t):
        if self.k == 1 or t < self.burn_in - (self.k - 1):
            return
        w = conv.weight.detach().to(F64).clone().requires_grad_(True)
        b = None if conv.bias is None else conv.bias.detach().to(F64).clone().requires_grad_(True)
        x = conv_fn(conv, u.detach().to(F64), w, b)
        mu, nu = x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
        params = [w] if b is None else [w, b]
        gmu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
        gnu = torch.autograd.grad(nu.sum(), params)
        e = dict(theta=w.detach(), mu=mu.detach(), nu=nu.detach(), gmu_w=gmu[0], gnu_w=gnu[0])
        if b is not None:
            e.update(b=b.detach(), gmu_b=gmu[1], gnu_b=gnu[1])
        self.entries[t] = e

    def forward(self, conv, u, t, gamma=None, beta=None, x=None):
        """y for input ``x`` = conv(u) (computed here, without autograd, if not given)."""
        if x is None:
            with torch.no_grad():
                x = conv_fn(conv, u.to(F64), conv.weight.detach().to(F64),
                            None if conv.bias is None else conv.bias.detach().to(F64))
        mu_t, nu_t = x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
        mu_bar, var_bar = self.aggregate(mu_t, nu_t, self.window_entries(conv, t))
        y = (x - c4(mu_bar)) / torch.sqrt(c4(var_bar) + self.eps)
        if gamma is not None:
            y = y * c4(gamma.detach().to(F64)) + c4(beta.detach().to(F64))
        m = self.momentum
        P = x.numel() // x.shape[1]  # unbiased variance (P / (P - 1)); P = 1: the biased one, 0
        self.running_mean = (1 - m) * self.running_mean + m * mu_t.detach()
        var = x.detach().var((0, 2, 3), unbiased=False)
        self.running_var = (1 - m) * self.running_var + m * var * P / max(P - 1, 1)
        self.record(conv, u, t)
        return y


# ------------------------------------------------------------------- 1. k = 1 and burn-in == BN
def _compare_with_batchnorm(window_size, burn_in, iters, expect_equal, device="cpu"):
    torch.manual_seed(0)
    conv_a = nn.Conv2d(3, 6, 3, padding=1, bias=True).to(device)
    conv_b = copy.deepcopy(conv_a)
    cbn = CBN(6, window_size=window_size, burn_in=burn_in, momentum=0.2, eps=1e-5).to(device)
    bn = nn.BatchNorm2d(6, momentum=0.2, eps=1e-5).to(device)
    with torch.no_grad():
        cbn.weight.copy_(torch.rand(6) + 0.5)
        cbn.bias.copy_(torch.randn(6))  # (drawn on the CPU, copied to the device)
        bn.weight.copy_(cbn.weight)
        bn.bias.copy_(cbn.bias)
    cbn.attach_conv(conv_a)
    opt_a = torch.optim.SGD(list(conv_a.parameters()) + list(cbn.parameters()), lr=0.2)
    opt_b = torch.optim.SGD(list(conv_b.parameters()) + list(bn.parameters()), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-5)
    w_start = conv_a.weight.detach().clone()
    for t in range(iters):
        u = rand_batch(gen, (4, 3, 8, 8), torch.float32, device)
        gy = torch.randn(4, 6, 8, 8, generator=gen).to(device)
        ua, ub = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
        cbn.set_iteration(t)
        ya, yb = cbn(conv_a(ua)), bn(conv_b(ub))
        (ya * gy).sum().backward()
        (yb * gy).sum().backward()
        if not expect_equal(t):
            assert (ya - yb).abs().max() > 1e-3, f"iteration {t}: the window was not used"
            return
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(ua.grad, ub.grad, **tol)
        torch.testing.assert_close(cbn.weight.grad, bn.weight.grad, **tol)
        torch.testing.assert_close(cbn.bias.grad, bn.bias.grad, **tol)
        torch.testing.assert_close(conv_a.weight.grad, conv_b.weight.grad, **tol)
        # (the conv bias gradient is 0 through any BN, up to rounding: nothing to compare)
        torch.testing.assert_close(cbn.running_mean, bn.running_mean, **tol)
        torch.testing.assert_close(cbn.running_var, bn.running_var, **tol)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    assert (conv_a.weight - w_start).norm() > 0.05 * w_start.norm(), "the conv weights did not move"
    return cbn


def test_k1_equals_batchnorm(device):
    _compare_with_batchnorm(window_size=1, burn_in=0, iters=6, expect_equal=lambda t: True, device=device)


def test_burn_in_equals_batchnorm_then_window(device):
    # k = 4, burn-in 5: iterations 0..4 are BN; iteration 5 uses the window (must differ)
    _compare_with_batchnorm(window_size=4, burn_in=5, iters=6, expect_equal=lambda t: t < 5, device=device)


def test_window_filled_from_burn_in_minus_k_minus_1():
    conv = make_conv()
    layer = make_cbn(conv, window_size=4, burn_in=5)
    gen = torch.Generator().manual_seed(0)
    for t in range(6):
        layer.set_iteration(t)
        assert layer.effective_window_size() == (1 if t < 5 else 4)
        layer(conv(rand_batch(gen, (2, 3, 6, 6))))
        tags = sorted(int(v) for v in layer.window_iters if v >= 0)
        assert tags == [s for s in range(2, t + 1)][-3:], (t, tags)  # written from 5 - 3 = 2 on


# ---------------------------------------------- 2. fixed weights: exact statistics of the union
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_fixed_weights_equal_union_statistics(k, bias, device):
    conv = make_conv(bias=bias, stride=2, device=device)
    layer = make_cbn(conv, window_size=k, burn_in=0, affine=False, eps=1e-5)
    gen = torch.Generator().manual_seed(k)
    xs = []
    for t in range(k + 2):  # includes the first iterations with a partly filled window
        layer.set_iteration(t)
        x = conv(rand_batch(gen, (2, 3, 8, 8), device=device))
        y = layer(x)
        xs.append(x.detach())
        union = torch.cat(xs[max(0, t - k + 1):], dim=0)
        mu, var = union.mean((0, 2, 3)), union.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(y, (x - c4(mu)) / torch.sqrt(c4(var) + 1e-5), **TIGHT)
        if t > 0:  # not vacuous: the current batch alone gives something else
            own = F.batch_norm(x, None, None, training=True, eps=1e-5)
            assert (y - own).abs().max() > 1e-2


# ----------------------------------------------------------------- 3. closed-form gradients
@pytest.mark.parametrize("name", list(CONVS))
def test_closed_form_gradients_equal_autograd(name, device):
    conv = make_conv(**CONVS[name], device=device)
    gen = torch.Generator().manual_seed(3)
    u = rand_batch(gen, U_SHAPE(conv), device=device)
    w = conv.weight.detach().clone().requires_grad_(True)
    b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(True)
    x = conv_fn(conv, u, w, b)
    mu, nu = x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
    params = [w] if b is None else [w, b]
    gmu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
    gnu = torch.autograd.grad(nu.sum(), params)
    G, C = conv.groups, conv.out_channels
    tol = dict(rtol=1e-8, atol=1e-8)
    for grads in (stat_grads_closed_form(conv, u, x.detach()), stat_grads_autograd(conv, u)):
        assert grads.mu_weight.shape == (G,) + tuple(conv.weight.shape[1:])
        # d mu_c / d theta[c] is the same for all channels of a group: stored once per group
        torch.testing.assert_close(grads.mu_weight.repeat_interleave(C // G, dim=0), gmu[0], **tol)
        torch.testing.assert_close(grads.nu_weight, gnu[0], **tol)
        if b is None:
            assert grads.mu_bias is None and grads.nu_bias is None
        else:
            torch.testing.assert_close(grads.mu_bias, gmu[1], **tol)
            torch.testing.assert_close(grads.nu_bias, gnu[1], **tol)


@pytest.mark.parametrize("name", ["strided", "grouped", "depthwise", "all"])
def test_grad_modes_give_identical_outputs(name, device):
    conv_a = make_conv(**CONVS[name], device=device)
    conv_b = copy.deepcopy(conv_a)
    la = make_cbn(conv_a, window_size=3, burn_in=0, grad_mode="closed_form", gamma_seed=1)
    lb = make_cbn(conv_b, window_size=3, burn_in=0, grad_mode="autograd", gamma_seed=1)
    gen = torch.Generator().manual_seed(4)
    for t in range(6):
        u = rand_batch(gen, U_SHAPE(conv_a), device=device)
        ys, us = [], []
        for conv, layer in ((conv_a, la), (conv_b, lb)):
            layer.set_iteration(t)
            us.append(u.clone().requires_grad_(True))
            y = layer(conv(us[-1]))
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(t), dtype=F64).to(device)
            (y * gy).sum().backward()  # the autograd path retains the graph it used: backward works
            ys.append(y.detach())
        torch.testing.assert_close(ys[0], ys[1], **TIGHT)
        torch.testing.assert_close(us[0].grad, us[1].grad, **TIGHT)
        torch.testing.assert_close(conv_a.weight.grad, conv_b.weight.grad, **TIGHT)
        torch.testing.assert_close(la.weight.grad, lb.weight.grad, **TIGHT)
        torch.testing.assert_close(la.bias.grad, lb.bias.grad, **TIGHT)
        la.zero_grad(), lb.zero_grad()
        for name_, buf in la.named_buffers():
            torch.testing.assert_close(buf, dict(lb.named_buffers())[name_], **TIGHT)
        for conv in (conv_a, conv_b):
            conv.zero_grad()
            perturb(conv, torch.Generator().manual_seed(100 + t))


# ---------------------------------------------- 4. full compensated CBN vs float64 reference
@pytest.mark.parametrize("name", ["biased", "all", "depthwise"])
@pytest.mark.parametrize("burn_in", [0, 3])
def test_matches_float64_reference(name, burn_in, device):
    conv = make_conv(**CONVS[name], device=device)
    k, eps, mom = 4, 1e-4, 0.3
    layer = make_cbn(conv, window_size=k, burn_in=burn_in, eps=eps, momentum=mom, gamma_seed=2)
    ref = CBNReference(conv.out_channels, k, burn_in=burn_in, eps=eps, momentum=mom, device=device)
    gen = torch.Generator().manual_seed(5)
    for t in range(10):
        u = rand_batch(gen, U_SHAPE(conv), device=device)
        y_ref = ref.forward(conv, u, t, layer.weight, layer.bias)
        layer.set_iteration(t)
        y = layer(conv(u))
        torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-8, atol=1e-8)
        perturb(conv, gen, size=0.1)  # the compensation has work to do
    # not vacuous: without compensation the result would differ
    naive = CBNReference(conv.out_channels, k, burn_in=burn_in, eps=eps, compensate=False, device=device)
    for s, e in ref.entries.items():
        naive.entries[s] = e
    assert (naive.forward(conv, u, 9, layer.weight, layer.bias) - y_ref).abs().max() > 1e-3


def test_skipped_iterations_average_the_entries_present(device):
    """A layer that sees no input in some iterations (e.g. a head with no RoIs) averages only
    the entries of its window [t-k+1, t-1] that exist; stale ring-buffer slots do not count."""
    conv = make_conv(**CONVS["biased"], device=device)
    k = 3
    layer = make_cbn(conv, window_size=k, burn_in=0, gamma_seed=6)
    ref = CBNReference(conv.out_channels, k, device=device)
    gen = torch.Generator().manual_seed(12)
    for t in (0, 1, 3, 4, 7, 8):
        u = rand_batch(gen, U_SHAPE(conv), device=device)
        y_ref = ref.forward(conv, u, t, layer.weight, layer.bias)
        layer.set_iteration(t)
        torch.testing.assert_close(layer(conv(u)), y_ref, rtol=1e-8, atol=1e-8)
        perturb(conv, gen, size=0.1)


def test_naive_cbn_matches_uncompensated_reference(device):
    conv = make_conv(**CONVS["biased"], device=device)
    layer = make_cbn(conv, cls=NaiveCBN, window_size=3, burn_in=0, gamma_seed=3)
    ref = CBNReference(conv.out_channels, 3, compensate=False, device=device)
    gen = torch.Generator().manual_seed(6)
    for t in range(6):
        u = rand_batch(gen, U_SHAPE(conv), device=device)
        y_ref = ref.forward(conv, u, t, layer.weight, layer.bias)
        layer.set_iteration(t)
        torch.testing.assert_close(layer(conv(u)), y_ref, rtol=1e-8, atol=1e-8)
        perturb(conv, gen, size=0.1)


@pytest.mark.parametrize("aggregation", ["paper", "drop_invalid"])
def test_invalid_compensated_variance(aggregation, device):
    """Flipping the sign of the first two output channels' weights at t = 2 makes the first-order
    nu of both stored entries negative for those channels (nu + <2 E[y u], -2 theta> = -3 nu <
    mu^2). Each rule is checked against its own formula, on the compensated entries (mu_j, nu_j)
    of the float64 reference (METHODS.md CBN item 3):

    * ``"paper"``: over the whole window, mu_bar = mean(mu_t, mu_1, mu_2) and
      nu_bar = mean(nu_t, max(nu_1, mu_1^2), max(nu_2, mu_2^2));
    * ``"drop_invalid"``: per channel, entries with nu_j < mu_j^2 are left out and the average is
      over those kept: the flipped channels are normalized with the current batch alone (BN),
      the other channels with all three entries.
    """
    eps = 1e-5
    conv = make_conv(cin=3, cout=4, device=device)
    layer = make_cbn(conv, window_size=3, burn_in=0, aggregation=aggregation, affine=False, eps=eps)
    ref = CBNReference(4, 3, device=device)  # records the entries and compensates them
    gen = torch.Generator().manual_seed(7)
    for t in range(2):
        u = rand_batch(gen, (2, 3, 6, 6), device=device)
        ref.forward(conv, u, t)
        layer.set_iteration(t)
        layer(conv(u))
    u = rand_batch(gen, (2, 3, 6, 6), device=device)
    with torch.no_grad():
        conv.weight[:2].neg_()
    layer.set_iteration(2)
    x = conv(u)
    y = layer(x)

    entries = ref.window_entries(conv, 2)  # [(mu_j, nu_j)] compensated to the flipped weights
    assert len(entries) == 2
    mus = torch.stack([x.mean((0, 2, 3))] + [m for m, _ in entries])  # (3, C), current batch first
    nus = torch.stack([(x * x).mean((0, 2, 3))] + [n for _, n in entries])
    invalid = nus < mus * mus
    flipped = torch.tensor([True, True, False, False], device=device)
    assert not invalid[0].any() and (invalid[1:] == flipped).all()  # the premise of the test

    def normalize(mu_bar, nu_bar):
        return (x - c4(mu_bar)) / torch.sqrt(c4(nu_bar - mu_bar * mu_bar) + eps)

    paper = normalize(mus.mean(0), torch.maximum(nus, mus * mus).mean(0))
    keep = (~invalid).to(F64)
    drop = normalize((keep * mus).sum(0) / keep.sum(0), (keep * nus).sum(0) / keep.sum(0))
    # drop_invalid on the flipped channels is BN with the current batch's statistics
    torch.testing.assert_close(drop[:, :2], F.batch_norm(x, None, None, training=True, eps=eps)[:, :2], **TIGHT)
    expected, other = (paper, drop) if aggregation == "paper" else (drop, paper)
    torch.testing.assert_close(y, expected, rtol=1e-8, atol=1e-8)
    # not vacuous: the rules agree on the valid channels and differ on the flipped ones
    torch.testing.assert_close(paper[:, 2:], drop[:, 2:], **TIGHT)
    assert (y[:, :2] - other[:, :2]).abs().max() > 1e-2


# ----------------------------------------------- 5. real images, real SGD: CBN beats Naive CBN
def _coco_crops(n, size=64):
    from helpers import coco_batches, tiny_cfg

    cfg = tiny_cfg("faster_rcnn", "BN", where=())
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=F64).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=F64).view(3, 1, 1)
    out = []
    for batch in coco_batches(cfg, n, seed=0):
        ims = []
        for d in batch:
            im = d["image"]
            top, left = (im.shape[1] - size) // 2, (im.shape[2] - size) // 2
            ims.append((im[:, top:top + size, left:left + size].to(F64) - mean) / std)
        out.append(torch.stack(ims))
    return out


def _stats_from_output(x, y, eps):
    """(mu, var) a layer with affine=False used, from y = (x - mu) / sqrt(var + eps)."""
    s = y.std((0, 2, 3)) / x.std((0, 2, 3))
    return x.mean((0, 2, 3)) - y.mean((0, 2, 3)) / s, 1.0 / s ** 2 - eps


def test_compensation_beats_naive_on_real_images_under_sgd():
    """A stem conv (3 -> 16, stride 2) on 64x64 crops of the shipped COCO sample, followed by CBN
    (k = 4), ReLU, conv, BN and a linear regression head, trained by SGD (lr 0.01, momentum 0.9).
    A Naive CBN attached to the same conv sees the same inputs. At every iteration with a full
    window, both layers' window statistics are compared with the exact statistics of the k
    batches recomputed under the current weights."""
    k, iters, eps = 4, 12, 1e-5
    data = _coco_crops(iters)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False).double()
    cbn = make_cbn(conv, window_size=k, burn_in=0, affine=False, eps=eps)
    naive = make_cbn(conv, cls=NaiveCBN, window_size=k, burn_in=0, affine=False, eps=eps)
    rest = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8)).double()
    targets = torch.randn(iters, 2, 8, dtype=F64)
    opt = torch.optim.SGD(list(conv.parameters()) + list(rest.parameters()), lr=0.01, momentum=0.9)
    w0 = conv.weight.detach().clone()
    err = {key: 0.0 for key in ("cbn_mu", "naive_mu", "cbn_var", "naive_var")}
    for t in range(iters):
        cbn.set_iteration(t), naive.set_iteration(t)
        x = conv(data[t])
        y = cbn(x)
        y_naive = naive(x.detach())
        if t >= k - 1:
            with torch.no_grad():
                window = [conv(data[s]) for s in range(t - k + 1, t + 1)]  # current weights
                mu = torch.stack([w.mean((0, 2, 3)) for w in window]).mean(0)
                var = torch.stack([(w * w).mean((0, 2, 3)) for w in window]).mean(0) - mu * mu
                for key, out in (("cbn", y), ("naive", y_naive)):
                    mu_hat, var_hat = _stats_from_output(x.detach(), out.detach(), eps)
                    err[key + "_mu"] += ((mu_hat - mu) / var.sqrt()).norm().item()
                    err[key + "_var"] += ((var_hat - var) / var).norm().item()
        loss = F.mse_loss(rest(y), targets[t])
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = ((conv.weight - w0).norm() / w0.norm()).item()
    ratio_mu, ratio_var = err["cbn_mu"] / err["naive_mu"], err["cbn_var"] / err["naive_var"]
    print(f"\nreal images, k={k}, {iters} SGD steps, stem weight moved {moved:.1%}: "
          f"error ratio CBN/Naive: mean {ratio_mu:.3g}, variance {ratio_var:.3g}; "
          f"Naive errors (sum of relative norms): mean {err['naive_mu']:.3g}, variance {err['naive_var']:.3g}")
    assert moved > 0.03, "the weights did not move enough for the comparison to mean anything"
    assert err["naive_mu"] > 0.1 and err["naive_var"] > 0.1  # Naive CBN is measurably off
    # mu is linear in the producing conv's weight: compensation is exact up to rounding
    assert ratio_mu < 1e-6
    # nu is quadratic in it: first order removes most of the error (on the shipped sample: 0.195 with
    # these seeds; 0.15-0.64 over model seeds 0-9, 0.16-0.59 over model and data seeds 0-9)
    assert ratio_var < 0.6


# -------------------------------------------------- 6. gradients only through the current batch
@pytest.mark.parametrize("grad_mode", ["closed_form", "autograd"])
def test_gradients_flow_only_through_current_batch(grad_mode):
    conv = make_conv(**CONVS["biased"])
    k = 3
    layer = make_cbn(conv, window_size=k, burn_in=0, gamma_seed=4, grad_mode=grad_mode)
    ref = CBNReference(conv.out_channels, k)
    gen = torch.Generator().manual_seed(8)
    xs = []
    for t in range(3):
        u = rand_batch(gen, (2, 3, 7, 7)).requires_grad_(True)
        layer.set_iteration(t)
        x = conv(u)
        y = layer(x)
        xs.append(x)
        if t < 2:
            ref.forward(conv, u.detach(), t, layer.weight, layer.bias)
            perturb(conv, gen, size=0.1)
    assert all(not b.requires_grad for b in layer.buffers())
    # the output of iteration 2 does not depend (through autograd) on earlier iterations' tensors
    assert torch.autograd.grad(y.sum(), xs[:2], allow_unused=True, retain_graph=True) == (None, None)

    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    params = [u, conv.weight, conv.bias, layer.weight, layer.bias]
    got = torch.autograd.grad(y, params, gy)

    # reference: window entries (compensated to the current weights) are constants
    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    gamma = layer.weight.detach().clone().requires_grad_(True)
    beta = layer.bias.detach().clone().requires_grad_(True)
    ur = u.detach().clone().requires_grad_(True)
    xr = conv_fn(conv, ur, w, b)
    entries = ref.window_entries(conv, 2)
    assert len(entries) == 2
    mu_bar, var_bar = ref.aggregate(xr.mean((0, 2, 3)), (xr * xr).mean((0, 2, 3)), entries)
    yr = (xr - c4(mu_bar)) / torch.sqrt(c4(var_bar) + layer.eps) * c4(gamma) + c4(beta)
    want = torch.autograd.grad(yr, [ur, w, b, gamma, beta], gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TIGHT)

    # not vacuous: letting the gradient flow through the compensation (theta_t) changes dL/dtheta
    w2 = conv.weight.detach().clone().requires_grad_(True)
    x2 = conv_fn(conv, ur, w2, b)
    mu_bar2, var_bar2 = ref.aggregate(x2.mean((0, 2, 3)), (x2 * x2).mean((0, 2, 3)),
                                      ref.window_entries(conv, 2, theta=w2))
    yr2 = (x2 - c4(mu_bar2)) / torch.sqrt(c4(var_bar2) + layer.eps) * c4(gamma) + c4(beta)
    (gw2,) = torch.autograd.grad(yr2, [w2], gy)
    assert (gw2 - got[1]).abs().max() > 1e-6


# --------------------------------------------------------------------- 7. degenerate inputs
def _trained_layer(cls=CBN, k=3, iters=2):
    conv = make_conv(bias=True)
    layer = make_cbn(conv, cls=cls, window_size=k, burn_in=0)
    gen = torch.Generator().manual_seed(9)
    for t in range(iters):
        layer.set_iteration(t)
        layer(conv(rand_batch(gen, (2, 3, 6, 6))))
    return conv, layer, gen


@pytest.mark.parametrize("cls", [CBN, NaiveCBN])
def test_empty_input_leaves_state_unchanged(cls):
    conv, layer, _ = _trained_layer(cls)
    before = state_snapshot(layer)
    layer.set_iteration(2)
    x = conv(torch.zeros(0, 3, 6, 6, dtype=F64))
    y = layer(x)
    assert y.shape == (0, 4, 6, 6)
    y.sum().backward()  # no crash in backward either
    after = state_snapshot(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("cls", [CBN, NaiveCBN])
@pytest.mark.parametrize("burn_in", [0, 2])  # 2: BN (variance 0) at t = 0, 1, then the window
def test_single_1x1_example(cls, burn_in):
    """One 1x1 example per iteration (variance 0 in every batch): output, input gradient and
    population statistics equal the float64 reference's (during the burn-in: BN, y = beta)."""
    conv = make_conv(bias=True)
    layer = make_cbn(conv, cls=cls, window_size=3, burn_in=burn_in, gamma_seed=10)
    ref = CBNReference(conv.out_channels, 3, burn_in=burn_in, compensate=cls is CBN)
    gen = torch.Generator().manual_seed(10)
    for t in range(5):  # t = 0: window empty; later: 1x1 entries in the window
        layer.set_iteration(t)
        u = rand_batch(gen, (1, 3, 1, 1)).requires_grad_(True)
        gy = torch.randn(1, 4, 1, 1, generator=gen, dtype=F64)
        y = layer(conv(u))
        y.backward(gy)
        ur = u.detach().clone().requires_grad_(True)
        xr = conv_fn(conv, ur, conv.weight.detach(), conv.bias.detach())
        y_ref = ref.forward(conv, ur.detach(), t, layer.weight, layer.bias, x=xr)
        (grad_ref,) = torch.autograd.grad(y_ref, [ur], gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(u.grad, grad_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-8, atol=1e-8)
        if t < burn_in:  # BN of one value: x - mu = 0
            torch.testing.assert_close(y, c4(layer.bias.detach()), **TIGHT)
        for key, buf in layer.state_dict().items():
            assert torch.isfinite(buf.double()).all(), key
        perturb(conv, gen, size=0.1)
    assert int((layer.window_iters >= 0).sum()) == 2
    # not vacuous: the window is used (the last output is not the BN output, beta)
    assert (y - c4(layer.bias.detach())).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_leaves_state_unchanged(bad):
    """A batch with a NaN/Inf at t = 2 changes no state (but ``num_batches_tracked``); at t = 3
    the window [1, 2] holds only the entry of t = 1, as for a layer that never saw t = 2: the
    output equals the float64 reference fed with t = 0, 1, 3 only."""
    conv, layer, gen = _trained_layer()
    # the reference replays the two finite iterations of _trained_layer (same generator seed)
    ref = CBNReference(conv.out_channels, 3)
    ref_gen = torch.Generator().manual_seed(9)
    for t in range(2):
        ref.forward(conv, rand_batch(ref_gen, (2, 3, 6, 6)), t, layer.weight, layer.bias)
    before = state_snapshot(layer)
    u = rand_batch(gen, (2, 3, 6, 6))
    u[1, 2, 3, 3] = bad
    layer.set_iteration(2)
    layer(conv(u))
    after = state_snapshot(layer)
    for key in before:
        if key != "num_batches_tracked":
            assert torch.equal(before[key], after[key]), key
    # the next finite iteration averages only the finite entries
    perturb(conv, gen, size=0.1)
    u = rand_batch(gen, (2, 3, 6, 6))
    layer.set_iteration(3)
    y = layer(conv(u))
    y_ref = ref.forward(conv, u, 3, layer.weight, layer.bias)
    assert len(ref.window_entries(conv, 3)) == 1
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------- 8. errors
@pytest.mark.parametrize("cls", [CBN, NaiveCBN])
@pytest.mark.parametrize("kwargs,allowed", [
    (dict(window_size=0), ">= 1"),
    (dict(window_size=2.5), ">= 1"),
    (dict(burn_in=-1), ">= 0"),
    (dict(eps=0.0), "> 0"),
    (dict(eps=-1e-5), "> 0"),
    (dict(momentum=0.0), "(0, 1]"),
    (dict(momentum=1.5), "(0, 1]"),
    (dict(aggregation="mean"), "'drop_invalid'"),
    (dict(grad_mode="numeric"), "'closed_form'"),
    (dict(grad_subsample=0), ">= 1"),
])
def test_invalid_arguments(cls, kwargs, allowed):
    """Hyperparameters are constructor arguments only: a bad value is a ValueError naming the
    argument, the value and the allowed range; an unknown keyword is a TypeError."""
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError) as err:
        cls(4, **kwargs)
    msg = str(err.value)
    assert name in msg and repr(value) in msg and "allowed" in msg and allowed in msg, msg
    with pytest.raises(TypeError, match="window_sise"):
        cls(4, window_sise=3)


def test_constructor_sets_the_hyperparameters():
    """Every hyperparameter given to the constructor is in force, and the window has k - 1 slots."""
    conv = make_conv()
    layer = make_cbn(conv, window_size=5, burn_in=7, momentum=0.3, eps=1e-3, aggregation="drop_invalid",
                     grad_mode="autograd", grad_subsample=2)
    assert (layer.window_size, layer.burn_in, layer.momentum, layer.eps) == (5, 7, 0.3, 1e-3)
    assert (layer.aggregation, layer.grad_mode, layer.grad_subsample) == ("drop_invalid", "autograd", 2)
    assert layer.window_iters.tolist() == [-1] * 4 and layer.window_mu.shape == (4, 4)
    assert layer.window_nu_grad.shape == (4,) + tuple(conv.weight.shape)
    layer.set_iteration(6)
    assert layer.effective_window_size() == 1
    layer.set_iteration(7)
    assert layer.effective_window_size() == 5
    for text in ("window_size=5", "burn_in=7", "momentum=0.3", "eps=0.001", "'drop_invalid'", "'autograd'",
                 "grad_subsample=2"):
        assert text in repr(layer)


def test_not_wired_errors():
    conv = make_conv()
    u = torch.randn(2, 3, 6, 6, dtype=F64)
    unattached = CBN(4).double()
    unattached.set_iteration(0)
    with pytest.raises(NormNotWiredError, match="attach_conv"):
        unattached(conv(u))
    no_iter = make_cbn(make_conv())
    with pytest.raises(NormNotWiredError, match="iteration"):
        no_iter(no_iter.conv(u))
    layer = make_cbn(conv)
    layer.set_iteration(0)
    with pytest.raises(NormNotWiredError, match="did not run"):  # the conv never ran
        layer(torch.randn(2, 4, 6, 6, dtype=F64))
    conv(u)
    with pytest.raises(NormNotWiredError, match="not produced"):  # wrong spatial size
        layer(torch.randn(2, 4, 5, 6, dtype=F64))
    # eval mode needs neither a conv nor an iteration: BN with the population statistics
    unattached.eval()
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(unattached(x), F.batch_norm(x, unattached.running_mean, unattached.running_var,
                                                           unattached.weight, unattached.bias, False, 0.0,
                                                           unattached.eps), **TIGHT)


# ------------------------------------------------------------------------- 9. state_dict resume
def test_state_dict_round_trip_continues_identically():
    conv, layer, gen = _trained_layer(k=4, iters=5)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    saved_conv = copy.deepcopy(conv.state_dict())
    saved = copy.deepcopy(layer.state_dict())
    assert "window_nu_grad" in saved and "window_iters" in saved

    conv2 = make_conv(bias=True, seed=123)
    fresh = make_cbn(conv2, window_size=4, burn_in=0)
    conv2.load_state_dict(saved_conv)
    fresh.load_state_dict(saved)
    for t in range(5, 9):
        u = rand_batch(gen, (2, 3, 6, 6))
        outs = []
        for c, lay in ((conv, layer), (conv2, fresh)):
            lay.set_iteration(t)
            outs.append(lay(c(u)))
            perturb(c, torch.Generator().manual_seed(t))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # not vacuous: a fresh layer without the loaded window gives other outputs
    conv3 = copy.deepcopy(conv)
    other = make_cbn(conv3, window_size=4, burn_in=0)
    other.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("window")},
                          strict=False)
    other.set_iteration(9), layer.set_iteration(9)
    u = rand_batch(gen, (2, 3, 6, 6))
    assert (other(conv3(u)) - layer(conv(u))).abs().max() > 1e-3


# -------------------------------------------------------------------------------- 10. dtypes
def _run_dtype(dtype, iters=5, autocast=False):
    conv = make_conv(bias=True, dtype=dtype)
    layer = make_cbn(conv, dtype=dtype, window_size=3, burn_in=0, gamma_seed=5)
    gen = torch.Generator().manual_seed(11)
    ys = []
    for t in range(iters):
        u = rand_batch(gen, (2, 3, 8, 8), dtype).requires_grad_(True)
        layer.set_iteration(t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(conv(u))
        y.float().square().sum().backward()
        ys.append(y)
        with torch.no_grad():
            conv.weight.sub_(0.01 * conv.weight.grad)
        conv.zero_grad()
    return layer, ys


def test_float32_float64_and_bf16_autocast():
    l64, y64 = _run_dtype(F64)
    l32, y32 = _run_dtype(torch.float32)
    assert all(y.dtype == F64 for y in y64) and all(y.dtype == torch.float32 for y in y32)
    assert l64.window_nu_grad.dtype == F64 and l32.window_nu_grad.dtype == torch.float32
    for a, b in zip(y32, y64):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l32.running_var.double(), l64.running_var, rtol=1e-4, atol=1e-5)

    lbf, ybf = _run_dtype(torch.float32, autocast=True)
    assert all(y.dtype == torch.bfloat16 for y in ybf)
    for name, buf in lbf.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
    torch.testing.assert_close(lbf.running_mean, l32.running_mean, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lbf.running_var, l32.running_var, rtol=3e-2, atol=3e-2)
    for a, b in zip(ybf, y32):
        torch.testing.assert_close(a.float(), b.detach(), rtol=5e-2, atol=5e-2)


# -------------------------------------------------------- 11. eval mode in bfloat16 / float16
def _eval_cbn(device, seed=20):
    """An eval-mode float32 CBN (and its conv) with non-trivial population statistics and affine."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True).to(device)
    layer = CBN(6, window_size=3).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(6, generator=g))
        layer.running_var.copy_(torch.rand(6, generator=g) * 2 + 0.5)
        layer.weight.copy_(torch.rand(6, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(6, generator=g) * 0.5)
    layer.attach_conv(conv)
    return conv.eval(), layer.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_eval_in_low_precision_equals_batchnorm(dtype, autocast, device):
    """Eval mode with a bfloat16 / float16 input to a float32 layer (the dtypes differ, so the
    layer cannot use BN's fused kernel) is BN with the population statistics (METHODS.md CBN item
    7): ``F.batch_norm`` on the float64 value of the same input, within the dtype's rounding,
    element-wise and in the per-channel mean of the error (see tests/lowp_checks.py; a shift off
    by 0.01 fails). With ``autocast`` the input is the conv's output under ``torch.autocast`` and
    the layer runs inside it, as in mixed-precision inference; without, the input is drawn from
    the population and cast."""
    conv, layer = _eval_cbn(device)
    gen = torch.Generator().manual_seed(21)
    mean, var = layer.running_mean.cpu().view(1, -1, 1, 1), layer.running_var.cpu().view(1, -1, 1, 1)
    with torch.no_grad():
        if autocast:
            u = (torch.randn(8, 3, 16, 16, generator=gen) * 2).to(device)
            with torch.autocast(device.type, dtype=dtype):
                x = conv(u)
                y = layer(x)
        else:
            x = (torch.randn(8, 6, 16, 16, generator=gen) * var.sqrt() + mean).to(device, dtype)
            y = layer(x)
    assert x.dtype == dtype and y.dtype == dtype
    rm, rv, w, b = (t.detach().cpu().double() for t in (layer.running_mean, layer.running_var, layer.weight,
                                                          layer.bias))
    ref = F.batch_norm(x.cpu().double(), rm, rv, w, b, False, 0.0, layer.eps)
    scale = w / torch.sqrt(rv + layer.eps)
    assert_affine_close(y, x, scale, b - rm * scale, ref, what=f"CBN eval, {dtype}")
