"""Gradients of a conv output's channel statistics with respect to the conv's parameters.

CBN (Yao et al., CVPR 2021, Sec. 3.2 and Appendix B; METHODS.md CBN items 2 and 5) compensates
the statistics of previous iterations with a first-order Taylor expansion in the weights of the
conv that produces the normalized tensor. For a conv with weight theta (C, C_in/G, kh, kw),
optional bias b (C,), input u (N, C_in, H, W) and output y (N, C, Ho, Wo), per output channel c,
with P = N * Ho * Wo output positions and u_patch(p) the input patch (C_in/G, kh, kw) of the
group of c that produces position p:

    mu_c = (1/P) sum_p y_c(p)          d mu_c / d theta[c] = (1/P) sum_p u_patch(p)
    nu_c = (1/P) sum_p y_c(p)^2        d nu_c / d theta[c] = (2/P) sum_p y_c(p) u_patch(p)
                                       d mu_c / d b_c = 1,  d nu_c / d b_c = 2 mu_c

mu_c depends only on theta[c] (the Jacobian is block-diagonal), so the gradient of channel c is
a (C_in/G, kh, kw) slice. d mu / d theta is the same for every channel of a group: it is returned
once per group, shape (G, C_in/G, kh, kw). d nu / d theta is the conv weight-gradient with
grad_output = 2 y / P, one ``torch.nn.grad.conv2d_weight`` call.

Two interchangeable implementations are provided: :func:`stat_grads_closed_form` (the fast path
CBN uses) and :func:`stat_grads_autograd` (two ``torch.autograd.grad`` calls, the released
code's approach), so that tests and benchmarks can compare them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

__all__ = ["StatGrads", "stat_grads_closed_form", "stat_grads_autograd", "check_supported_conv"]


class StatGrads(NamedTuple):
    """Gradients of (mu, nu) of a conv output.

    Attributes:
        mu_weight: d mu_c / d theta[c], shape (G, C_in/G, kh, kw): one slice per group, shared by
            the C/G channels of the group.
        nu_weight: d nu_c / d theta[c], shape (C, C_in/G, kh, kw).
        mu_bias: d mu_c / d b_c, shape (C,) (ones), or None for a conv without bias.
        nu_bias: d nu_c / d b_c = 2 mu_c, shape (C,), or None for a conv without bias.
    """

    mu_weight: torch.Tensor
    nu_weight: torch.Tensor
    mu_bias: Optional[torch.Tensor]
    nu_bias: Optional[torch.Tensor]


def check_supported_conv(conv: nn.Conv2d) -> None:
    """Raise ``ValueError`` if ``conv`` uses a padding CBN cannot differentiate in closed form.

    Supported: any stride, dilation, groups, bias, and numeric zero padding. Unsupported:
    ``padding_mode`` other than ``"zeros"`` and string padding (``"same"``/``"valid"``).
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"CBN cannot follow {conv}: padding_mode = {conv.padding_mode!r}, padding = "
            f"{conv.padding!r}; allowed: padding_mode 'zeros' with integer padding"
        )


def _output_positions(y: torch.Tensor) -> int:
    return y.shape[0] * y.shape[2] * y.shape[3]


def stat_grads_closed_form(conv: nn.Conv2d, conv_input: torch.Tensor, output: torch.Tensor) -> StatGrads:
    """Closed-form d(mu, nu)/d(theta, b) of ``output = conv(conv_input)`` (Appendix B of CBN).

    Args:
        conv: the producing ``nn.Conv2d`` (its stride, padding, dilation, groups are used).
        conv_input: u, shape (N, C_in, H, W).
        output: y = conv(u), shape (N, C, Ho, Wo), including the bias. Gradients are computed in
            ``output``'s dtype; no autograd graph is built.
    Returns:
        :class:`StatGrads`. Cost: one weight-gradient conv (as in the backward pass) for nu and a
        batch-summed, one-output-channel-per-group weight-gradient for mu.
    Raises:
        ValueError: ``output`` has no elements.
    """
    P = _output_positions(output)
    if P == 0:
        raise ValueError("stat_grads_closed_form needs a non-empty output (N * Ho * Wo > 0)")
    G = conv.groups
    C, cin_g, kh, kw = conv.weight.shape
    dt = output.dtype
    with torch.no_grad():
        u = conv_input.detach().to(dt)
        y = output.detach()
        nu_w = conv2d_weight(u, conv.weight.shape, y * (2.0 / P), conv.stride, conv.padding, conv.dilation, G)
        # Sum over the batch first: the patch mean of a group is the same for all its channels.
        ones = y.new_full((1, G, y.shape[2], y.shape[3]), 1.0 / P)
        mu_w = conv2d_weight(u.sum(0, keepdim=True), (G, cin_g, kh, kw), ones, conv.stride, conv.padding,
                             conv.dilation, G)
        if conv.bias is None:
            mu_b = nu_b = None
        else:
            mu_b = y.new_ones(C)
            nu_b = 2.0 * y.mean(dim=(0, 2, 3))
    return StatGrads(mu_w, nu_w, mu_b, nu_b)


def stat_grads_autograd(conv: nn.Conv2d, conv_input: torch.Tensor, output: Optional[torch.Tensor] = None) -> StatGrads:
    """The same gradients by two ``torch.autograd.grad`` passes (the released CBN code's way).

    If ``output`` is given and its graph reaches ``conv.weight`` (a training forward), the
    gradients are taken through that graph with ``retain_graph=True``, as the released code does;
    otherwise the conv is re-run on ``conv_input`` with a detached copy of the weight.

    Args:
        conv: the producing ``nn.Conv2d``.
        conv_input: u, shape (N, C_in, H, W).
        output: optional y = conv(u) carrying autograd history, shape (N, C, Ho, Wo).
    Returns:
        :class:`StatGrads` in the dtype of the computation (mu_weight reduced to one slice per group).
    """
    G = conv.groups
    C = conv.weight.shape[0]
    live = output is not None and output.requires_grad and conv.weight.requires_grad
    with torch.enable_grad():
        if live:
            weight, bias, y = conv.weight, conv.bias, output
        else:
            weight = conv.weight.detach().requires_grad_(True)
            bias = None if conv.bias is None else conv.bias.detach().requires_grad_(True)
            dt = output.dtype if output is not None else conv_input.dtype
            y = F.conv2d(conv_input.detach().to(dt), weight.to(dt), None if bias is None else bias.to(dt),
                         conv.stride, conv.padding, conv.dilation, G)
        params = [weight] if bias is None or not bias.requires_grad else [weight, bias]
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        mu = y.mean(dim=(0, 2, 3))
        nu = y.pow(2).mean(dim=(0, 2, 3))
        g_mu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
        g_nu = torch.autograd.grad(nu.sum(), params, retain_graph=live)
    mu_w = g_mu[0].reshape(G, C // G, *weight.shape[1:])[:, 0].to(y.dtype)
    nu_w = g_nu[0].to(y.dtype)
    if len(params) == 2:
        return StatGrads(mu_w, nu_w, g_mu[1].to(y.dtype), g_nu[1].to(y.dtype))
    if conv.bias is not None:  # bias frozen: its closed form is trivial
        return StatGrads(mu_w, nu_w, torch.ones_like(mu), 2.0 * mu.detach())
    return StatGrads(mu_w, nu_w, None, None)
