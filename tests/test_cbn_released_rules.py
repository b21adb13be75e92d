"""CBN's two options for the rules where the authors' released code differs from the paper:
``window_after_burn_in`` ("full": paper, "grow": released code) and ``compensate_bias`` (True:
paper, False: released code), against a direct float64 reference that keeps the old weights
(not the layer's constant-part storage) and differentiates the statistics with autograd."""
import pytest
import torch
from torch import nn

from smallbn_d2.layers import CrossIterationBatchNorm2d

C_IN, C, K, BURN_IN, EPS = 3, 4, 3, 4, 1e-5


def _stats_and_grads(conv: nn.Conv2d, u: torch.Tensor):
    """mu, nu (C,) of conv(u) and their gradients with respect to the conv weight (C, C_in, kh, kw)."""
    w = conv.weight.detach().clone().requires_grad_(True)
    y = torch.nn.functional.conv2d(u, w, conv.bias.detach(), conv.stride, conv.padding)
    mu = y.mean(dim=(0, 2, 3))
    nu = (y * y).mean(dim=(0, 2, 3))
    g_mu = torch.stack([torch.autograd.grad(mu[c], w, retain_graph=True)[0] for c in range(C)])
    g_nu = torch.stack([torch.autograd.grad(nu[c], w, retain_graph=True)[0] for c in range(C)])
    return mu.detach(), nu.detach(), g_mu, g_nu


def _reference(history, t, conv, x, window_after_burn_in, compensate_bias):
    """CBN output at iteration t (paper eq. 4-9, aggregation "paper") from the stored history."""
    first_written = BURN_IN - (K - 1) if window_after_burn_in == "full" else BURN_IN
    mus = [x.mean(dim=(0, 2, 3))]
    nus = [(x * x).mean(dim=(0, 2, 3))]
    if t >= BURN_IN:
        w_t, b_t = conv.weight.detach(), conv.bias.detach()
        for j in range(max(t - K + 1, first_written), t):
            mu, nu, g_mu, g_nu, w_j, b_j = history[j]
            dw = (w_t - w_j)[None]
            mu_c = mu + (g_mu * dw).flatten(1).sum(1)
            nu_c = nu + (g_nu * dw).flatten(1).sum(1)
            if compensate_bias:
                mu_c = mu_c + (b_t - b_j)
                nu_c = nu_c + 2 * mu * (b_t - b_j)
            mus.append(mu_c)
            nus.append(torch.maximum(nu_c, mu_c * mu_c))
    mu_bar = torch.stack(mus).mean(0)
    var = torch.stack(nus).mean(0) - mu_bar * mu_bar
    return (x - mu_bar[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS)


def _run(window_after_burn_in, compensate_bias, iters=BURN_IN + 3):
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN, C, 3, padding=1, bias=True).double()
    layer = CrossIterationBatchNorm2d(C, window_size=K, burn_in=BURN_IN, eps=EPS, affine=False,
                                      window_after_burn_in=window_after_burn_in,
                                      compensate_bias=compensate_bias).double()
    layer.attach_conv(conv)
    history, outputs, references = {}, [], []
    for t in range(iters):
        u = torch.randn(2, C_IN, 6, 6, dtype=torch.float64) * (1 + 0.1 * t)
        layer.set_iteration(t)
        x = conv(u)
        y = layer(x)
        references.append(_reference(history, t, conv, x.detach(), window_after_burn_in, compensate_bias))
        outputs.append(y.detach())
        mu, nu, g_mu, g_nu = _stats_and_grads(conv, u)
        history[t] = (mu, nu, g_mu, g_nu, conv.weight.detach().clone(), conv.bias.detach().clone())
        with torch.no_grad():  # a "training step": weights and bias move
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))
            conv.bias.add_(0.3 * torch.randn_like(conv.bias))
    return outputs, references


@pytest.mark.parametrize("window_after_burn_in", ["full", "grow"])
@pytest.mark.parametrize("compensate_bias", [True, False])
def test_matches_direct_reference(window_after_burn_in, compensate_bias):
    outputs, references = _run(window_after_burn_in, compensate_bias)
    for t, (y, ref) in enumerate(zip(outputs, references)):
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9, msg=f"iteration {t}")


def test_the_options_change_the_output():
    """Each option has an effect where it should: "grow" differs from "full" at the end of the
    burn-in, and ignoring a moving bias changes the compensated statistics."""
    full, _ = _run("full", True)
    grow, _ = _run("grow", True)
    for t in range(BURN_IN):
        torch.testing.assert_close(full[t], grow[t], rtol=0, atol=0)  # burn-in: both are BN
    assert (full[BURN_IN] - grow[BURN_IN]).abs().max() > 1e-3  # grow: only the current batch
    no_bias, _ = _run("full", False)
    assert (full[BURN_IN] - no_bias[BURN_IN]).abs().max() > 1e-3


def test_defaults_are_the_papers_rules():
    layer = CrossIterationBatchNorm2d(4)
    assert layer.window_after_burn_in == "full" and layer.compensate_bias is True
    with pytest.raises(ValueError, match="window_after_burn_in = 'growing'"):
        CrossIterationBatchNorm2d(4, window_after_burn_in="growing")
    with pytest.raises(ValueError, match="compensate_bias"):
        CrossIterationBatchNorm2d(4, compensate_bias=1)
