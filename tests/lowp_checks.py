"""Comparison of a low-precision (bfloat16 / float16) per-channel affine output with its float64
reference, at the tolerance the dtype allows and no more.

An inference-mode norm layer computes y = x * s + b per channel c (s = gamma / sqrt(var + eps),
b = beta - mean * s for CBN; s = gamma / sqrt(running_chi2 + eps), b = beta for MABN). Evaluated
in a dtype with unit roundoff u (2^-8 for bfloat16, 2^-11 for float16: half of
``torch.finfo(dtype).eps``), with s and b rounded to that dtype, the first-order error bound is

    |y - ref| <= u * (2 |x s| + |b| + |ref|)                              (element-wise)

(rounding of s and of the product x * s, of b, and of the sum). An element-wise comparison in
bfloat16 cannot see a systematic error of 1% of |b| (e.g. a shift off by 0.01), so the per-channel
*mean* of the error is checked too: the independent rounding errors of the N*H*W elements average
out, and only the rounding of s and b to the dtype remains systematic:

    |mean_c(y - ref)| <= u * (|s| |mean_c(x)| + |b|) + 4 u (rms_c(x s) + rms_c(ref)) / sqrt(n)

with n the effective number of independent elements of the channel (the last term allows 4
standard deviations of the mean of the element-wise rounding errors). Equal inputs (padding,
flat image regions) round alike, so n counts distinct input values, weighted by how often each
occurs: n = (N*H*W)^2 / sum over distinct values of count^2 (N*H*W when all differ). An
implementation that computes in float32 and rounds once is well inside both bounds.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of ``dtype``: half the distance from 1 to the next representable number."""
    return torch.finfo(dtype).eps / 2


def assert_affine_close(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        ref: torch.Tensor, what: str = "") -> None:
    """Check the low-precision output ``y`` (N, C, *) of the affine map x * scale + shift against
    ``ref`` (its float64 value, e.g. F.batch_norm on the float64 input) with the bounds of the
    module docstring.

    Args:
        y: the layer's output, in x's dtype (bfloat16 / float16 / float32).
        x: the layer's input (N, C, *), same dtype as y.
        scale, shift: (C,) float64 per-channel scale and shift of the reference map (used only for
            the tolerance).
        ref: (N, C, *) float64 reference output.
    Raises:
        AssertionError: an element or a channel mean is outside its bound.
    """
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype} != input dtype {x.dtype}"
    u = unit_roundoff(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0,) + tuple(range(2, x.dim()))
    xd, yd, ref = x.detach().to("cpu", F64), y.detach().to("cpu", F64), ref.detach().to("cpu", F64)
    s, b = scale.detach().to("cpu", F64), shift.detach().to("cpu", F64)
    xs = xd * s.view(shape)
    err = yd - ref
    bound = u * (2 * xs.abs() + b.abs().view(shape) + ref.abs()) + 1e-12
    worst = (err.abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: element-wise error up to {worst:.3g} x the {x.dtype} rounding bound"
    n_eff = torch.stack([_effective_count(xd.select(1, c)) for c in range(xd.shape[1])])
    mean_err = err.mean(dims).abs()
    mean_bound = (u * (s.abs() * xd.mean(dims).abs() + b.abs())
                  + 4 * u * (xs.square().mean(dims).sqrt() + ref.square().mean(dims).sqrt()) / n_eff.sqrt())
    bad = mean_err > mean_bound
    assert not bad.any(), (f"{what}: systematic per-channel error {mean_err[bad].tolist()} above the {x.dtype} "
                           f"rounding bound {mean_bound[bad].tolist()} (channels {bad.nonzero().flatten().tolist()})")


def _effective_count(values: torch.Tensor) -> torch.Tensor:
    """Effective number of independent rounding errors among ``values``: equal inputs give equal
    errors, so the mean error is a weighted mean over the distinct values (weights count / n),
    whose standard deviation is that of a mean of n^2 / sum(count^2) independent errors."""
    counts = torch.unique(values.flatten(), return_counts=True)[1].to(F64)
    return counts.sum() ** 2 / counts.square().sum()
