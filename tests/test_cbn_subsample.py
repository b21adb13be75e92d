"""CBN's optional approximation of d nu / d theta on a subsample of output positions
(``grad_subsample`` / ``MODEL.CBN.GRAD_SUBSAMPLE``), checked against a direct float64 formula:
d nu_c / d theta[c] ~= (2/|S|) sum_{p in S} y_c(p) u_patch(p) over the kept positions S
(METHODS.md CBN item 5 restricted to S)."""
import pytest
import torch
import torch.nn.functional as F

import smallbn_d2
from smallbn_d2.config import ConfigValueError, add_smallbn_config, validate_smallbn_config
from smallbn_d2.layers import CrossIterationBatchNorm2d
from smallbn_d2.layers.cbn_grad import stat_grads_closed_form, subsample_plan


def reference_nu_grad(conv, u, y, rows, batch):
    """(2/|S|) sum over S of y_c(p) * patch(p), S = examples ``batch`` x output rows ``rows``."""
    N, C, Ho, Wo = y.shape
    G = conv.groups
    patches = F.unfold(u, conv.kernel_size, conv.dilation, conv.padding, conv.stride).view(N, G, -1, Ho, Wo)
    yg = y.view(N, G, C // G, Ho, Wo)
    patches, yg = patches[batch][:, :, :, rows], yg[batch][:, :, :, rows]
    count = patches.shape[0] * patches.shape[3] * patches.shape[4]
    return (2.0 / count) * torch.einsum("ngdhw,ngchw->gcd", patches, yg).reshape(conv.weight.shape)


CONVS = {
    "plain": dict(kernel_size=3, padding=1, bias=False),
    "strided_grouped_biased": dict(kernel_size=3, stride=2, padding=1, groups=2, bias=True),
    "dilated": dict(kernel_size=3, dilation=2, padding=2, bias=False),
    "1x1": dict(kernel_size=1, bias=False),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("n,size,s", [(2, (9, 11), 2), (3, (10, 10), 3), (16, (7, 7), 2), (24, (5, 6), 3)])
def test_subsampled_nu_grad_equals_formula(name, n, size, s):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, **CONVS[name]).double()
    u = torch.randn(n, 4, *size, dtype=torch.float64) * 2 + 0.3
    y = conv(u).detach()
    plan = subsample_plan(n, s)
    assert plan == ("batch" if n >= 4 * s else "rows")
    batch = slice(None, None, s) if plan == "batch" else slice(None)
    rows = slice(None, None, s) if plan == "rows" else slice(None)
    got = stat_grads_closed_form(conv, u, y, subsample=s)
    exact = stat_grads_closed_form(conv, u, y)
    torch.testing.assert_close(got.nu_weight, reference_nu_grad(conv, u, y, rows, batch), rtol=0, atol=1e-12)
    # d mu / d theta and the bias gradients stay exact; s = 1 is the full formula
    torch.testing.assert_close(got.mu_weight, exact.mu_weight, rtol=0, atol=0)
    torch.testing.assert_close(exact.nu_weight, reference_nu_grad(conv, u, y, slice(None), slice(None)),
                               rtol=0, atol=1e-12)
    assert not torch.allclose(got.nu_weight, exact.nu_weight)  # it is an approximation


def test_layer_stores_the_subsampled_gradient():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    layer = CrossIterationBatchNorm2d(5, window_size=2, burn_in=0, grad_subsample=2).double()
    layer.attach_conv(conv)
    u = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layer.set_iteration(0)
    y = conv(u)
    layer(y)
    expected = reference_nu_grad(conv, u, y.detach(), slice(None, None, 2), slice(None))
    torch.testing.assert_close(layer.window_nu_grad[0], expected, rtol=0, atol=1e-12)
    assert "grad_subsample=2" in repr(layer)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_invalid_subsample_values(bad):
    with pytest.raises(ValueError, match="grad_subsample"):
        CrossIterationBatchNorm2d(4, grad_subsample=bad)
    conv = torch.nn.Conv2d(2, 4, 1)
    with pytest.raises(ValueError, match="subsample"):
        stat_grads_closed_form(conv, torch.randn(1, 2, 3, 3), conv(torch.randn(1, 2, 3, 3)), subsample=bad)
    from detectron2.config import get_cfg

    cfg = add_smallbn_config(get_cfg())
    cfg.MODEL.CBN.GRAD_SUBSAMPLE = bad
    with pytest.raises(ConfigValueError, match="MODEL.CBN.GRAD_SUBSAMPLE"):
        validate_smallbn_config(cfg)


def test_config_key_reaches_the_layers():
    """MODEL.CBN.GRAD_SUBSAMPLE reaches the layers that Detectron2's ``get_norm("CBN", C)`` builds
    while the config's hyperparameters are in force (what ``smallbn_d2.build_model`` does)."""
    from detectron2.config import get_cfg
    from detectron2.layers import Conv2d, get_norm

    cfg = add_smallbn_config(get_cfg())
    assert cfg.MODEL.CBN.GRAD_SUBSAMPLE == 1  # exact by default
    cfg.MODEL.CBN.GRAD_SUBSAMPLE = 3
    cfg.MODEL.CBN.BURN_IN_ITERS = 0
    with smallbn_d2.norm_hyperparameters(cfg):
        model = torch.nn.Sequential(Conv2d(3, 4, 3, padding=1, bias=False, norm=get_norm("CBN", 4)))
    default = get_norm("CBN", 4)  # outside: the constructor's default
    smallbn_d2.prepare_norms(model, cfg)
    assert isinstance(model[0].norm, CrossIterationBatchNorm2d)
    assert model[0].norm.grad_subsample == 3 and model[0].norm.burn_in == 0
    assert default.grad_subsample == 1
