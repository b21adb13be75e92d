"""Gradients of a conv output's channel statistics mu, nu with respect to the conv's parameters,
which CBN's compensation needs (CBN paper, Sec. 3.2 and Appendix B; formulas in docs/METHODS.md
CBN 2 and 5). For weight theta (C, C_in/G, kh, kw): d mu_c / d theta[c] is the mean input patch,
the same for every channel of a group; d nu_c / d theta[c] is the weight gradient for
grad_output = 2 y / P (P = N * Ho * Wo). :func:`stat_grads_closed_form` is CBN's fast path,
:func:`stat_grads_autograd` the released code's two ``torch.autograd.grad`` passes, for comparison.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from .hyperparameters import INT_AT_LEAST_1

__all__ = ["StatGrads", "stat_grads_closed_form", "subsample_plan", "stat_grads_autograd", "check_supported_conv"]


class StatGrads(NamedTuple):
    """Gradients of (mu, nu) of a conv output.

    Attributes:
        mu_weight: d mu_c / d theta[c], shape (G, C_in/G, kh, kw): one slice per group.
        nu_weight: d nu_c / d theta[c], shape (C, C_in/G, kh, kw).
        mu_bias: d mu_c / d b_c, shape (C,) (ones), or None for a conv without bias.
        nu_bias: d nu_c / d b_c = 2 mu_c, shape (C,), or None for a conv without bias.
    """

    mu_weight: torch.Tensor
    nu_weight: torch.Tensor
    mu_bias: Optional[torch.Tensor]
    nu_bias: Optional[torch.Tensor]


def check_supported_conv(conv: nn.Conv2d) -> None:
    """Raise ``ValueError`` unless ``conv`` pads with integer zeros (``padding_mode="zeros"``, no
    ``"same"``/``"valid"``), which the closed form assumes; any stride, dilation, groups, bias work."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"CBN cannot follow {conv}: padding_mode = {conv.padding_mode!r}, padding = "
            f"{conv.padding!r}; allowed: padding_mode 'zeros' with integer padding"
        )


def _tap_slice(tap: int, stride: int, padding: int, dilation: int, out_len: int, in_len: int) -> slice:
    """Input indices read by kernel tap ``tap`` over all ``out_len`` output positions, padding
    positions (outside [0, in_len)) dropped: they are zeros and add nothing to a sum."""
    start = tap * dilation - padding  # input index of output position 0
    o_min = -(start // stride) if start < 0 else 0  # ceil(-start / stride): first in-bounds output
    o_max = min(out_len - 1, (in_len - 1 - start) // stride)
    if o_max < o_min:
        return slice(0, 0)
    return slice(start + stride * o_min, start + stride * o_max + 1, stride)


def _patch_sum(u1: torch.Tensor, conv: nn.Conv2d, out_h: int, out_w: int) -> torch.Tensor:
    """sum_p patch(p) of a (C_in, H, W) image under ``conv``'s geometry: (C_in, kh, kw). Equal to
    ``F.unfold(u1[None], ...).sum(-1)`` without materializing kh * kw copies of the image."""
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    H, W = u1.shape[1], u1.shape[2]
    out = u1.new_zeros(u1.shape[0], kh, kw)
    for i in range(kh):
        rows = _tap_slice(i, sh, ph, dh, out_h, H)
        if rows.stop <= rows.start:
            continue
        row_sum = u1[:, rows, :].sum(1)  # (C_in, W)
        for j in range(kw):
            cols = _tap_slice(j, sw, pw, dw, out_w, W)
            if cols.stop > cols.start:
                out[:, i, j] = row_sum[:, cols].sum(-1)
    return out


def subsample_plan(n: int, subsample: int) -> str:
    """Which output positions :func:`stat_grads_closed_form` keeps for ``subsample`` = s > 1:
    ``"batch"`` (every s-th example: RoI heads, N >= 4 s) or ``"rows"`` (every s-th output row of
    every example: backbone and FPN maps of a few images); ``"all"`` for s = 1."""
    if subsample == 1:
        return "all"
    return "batch" if n >= 4 * subsample else "rows"


def stat_grads_closed_form(conv: nn.Conv2d, conv_input: torch.Tensor, output: torch.Tensor,
                           subsample: int = 1) -> StatGrads:
    """Closed-form d(mu, nu)/d(theta, b) of ``output = conv(conv_input)`` (CBN paper, Appendix B).

    Args:
        conv: the producing ``nn.Conv2d``.
        conv_input: u, shape (N, C_in, H, W).
        output: y = conv(u) with its bias, shape (N, C, Ho, Wo); the gradients take its dtype and
            build no autograd graph.
        subsample: s >= 1; 1 (default) is exact. s > 1, an approximation not in the paper,
            estimates d nu / d theta from the positions of every s-th example or output row
            (:func:`subsample_plan`), dividing that conv's cost by about s; the rest stays exact.
    Returns:
        :class:`StatGrads`, at the cost of one weight-gradient conv (nu) and one pass over u (mu).
    Raises:
        ValueError: ``output`` has no elements, or ``subsample`` is not an integer >= 1.
    """
    INT_AT_LEAST_1.check(subsample, "subsample")
    if output.numel() == 0:
        raise ValueError("stat_grads_closed_form needs a non-empty output (N * Ho * Wo > 0)")
    G = conv.groups
    C, cin_g, kh, kw = conv.weight.shape
    P = output.numel() // C
    dt = output.dtype
    with torch.no_grad():
        u = conv_input.detach().to(dt)
        y = output.detach()
        # weight-gradient conv with grad_output = y, then 2/P applied to the small result
        plan = subsample_plan(y.shape[0], subsample)
        if plan == "all":
            u_s, y_s, stride = u, y, conv.stride
        elif plan == "batch":
            u_s, y_s, stride = u[::subsample], y[::subsample], conv.stride
        else:  # rows 0, s, 2s, ...: the same conv with s times the row stride
            u_s, y_s, stride = u, y[:, :, ::subsample], (conv.stride[0] * subsample, conv.stride[1])
        nu_w = conv2d_weight(u_s, conv.weight.shape, y_s, stride, conv.padding, conv.dilation, G)
        nu_w.mul_(2.0 / (y_s.numel() // C))
        # mean input patch: the batch summed first (one pass over u), then the patches of that
        # one image (C_in is ordered as the C_in/G slices of consecutive groups)
        mu_w = _patch_sum(u.sum(0), conv, y.shape[2], y.shape[3]).reshape(G, cin_g, kh, kw).div_(P)
        if conv.bias is None:
            mu_b = nu_b = None
        else:
            mu_b = y.new_ones(C)
            nu_b = 2.0 * y.mean(dim=(0, 2, 3))
    return StatGrads(mu_w, nu_w, mu_b, nu_b)


def stat_grads_autograd(conv: nn.Conv2d, conv_input: torch.Tensor, output: Optional[torch.Tensor] = None) -> StatGrads:
    """The same gradients by two ``torch.autograd.grad`` passes (the released CBN code's way).

    Through ``output``'s graph with ``retain_graph=True`` if it reaches ``conv.weight`` (a
    training forward), as the released code does; otherwise by re-running the conv on
    ``conv_input`` (u, (N, C_in, H, W)) with a detached weight. ``output``: y, (N, C, Ho, Wo).

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
