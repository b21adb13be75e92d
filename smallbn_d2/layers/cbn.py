"""Cross-Iteration Batch Normalization (CBN) and its uncompensated ablation (Naive CBN).

Source: Yao, Cao, Zheng, Huang, Lin. Cross-Iteration Batch Normalization. CVPR 2021
(arXiv 2002.05712), Sec. 3.2-3.3 (eq. 5-10) and Appendix B. docs/METHODS.md, CBN 1-9, gives the
formulas and how the implementation stores the window (CBN 2), computes its variance (CBN 3) and
fills it around the burn-in (CBN 6); docs/RELIABILITY.md, sections 3-4, empty and non-finite
batches (never stored, masked on device) and autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import IterationNormBase, NormNotWiredError, _masked_write
from .cbn_grad import check_supported_conv, stat_grads_autograd, stat_grads_closed_form
from .conv_input import capture_conv_input, pop_conv_input, release_conv_input
from .hyperparameters import BOOLEAN, INT_AT_LEAST_0, INT_AT_LEAST_1, UNIT_INTERVAL, Range, one_of, optional

__all__ = ["CrossIterationBatchNorm2d", "NaiveCrossIterationBatchNorm2d"]

#: Window aggregation rules: the paper's (eq. 9-10) and the released code's.
AGGREGATIONS = ("paper", "drop_invalid")
#: How the window starts after the burn-in: full (the paper) or growing from 1 to k (released code).
WINDOW_AFTER_BURN_IN = ("full", "grow")
GRAD_MODES = ("closed_form", "autograd")


def _conv_output_size(conv: nn.Conv2d, h: int, w: int):
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip((h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation))


def _batch_stats(x: torch.Tensor):
    """Biased variance and mean per channel of (N, C, H, W) ``x``, no autograd; on the CPU by
    BatchNorm's own statistics kernel, faster there than ``torch.var_mean``."""
    with torch.no_grad():
        if x.device.type == "cpu":
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return var, mean
        return torch.var_mean(x, dim=(0, 2, 3), unbiased=False)


class _CBNNormalize(torch.autograd.Function):
    """CBN's normalization with BatchNorm's cost (METHODS.md CBN 4; tests check the backward
    against autograd in float64).

    forward(x (N, C, H, W) float32/64, gamma, beta (C,) or None, mu_bar, var_bar, coef (C,)
    constants, eps, batch_only) -> y = gamma * (x - mu_bar) / sqrt(var_bar + eps) + beta in one
    ``native_batch_norm`` pass; ``batch_only``: the statistics are the batch's own (k = 1).

    Backward. The window statistics depend on the batch only through mu_t, var_t: with coef = 1/n
    (n entries averaged), d mu_bar/d mu_t = d var_bar/d var_t = coef and d var_bar/d mu_t =
    2 coef (mu_t - mu_bar) (the terms through mu_bar, the entries' mean, cancel). With
    s = (var_bar + eps)^-1/2, xhat = (x - mu_bar) s and g = dL/dy:

        dL/dx = gamma s (g - coef mean(g) - coef xhat mean(g xhat)),
        dL/dgamma = sum(g xhat),  dL/dbeta = sum(g),

    i.e. BatchNorm's backward with weight coef * gamma (exactly BatchNorm's when ``batch_only``)
    plus (1 - coef) gamma s g, one in-place ``addcmul_``. Only x is saved, as BatchNorm saves it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mu_bar, var_bar, coef, eps, batch_only):
        y = torch.native_batch_norm(x, weight, bias, mu_bar, var_bar, False, 0.0, eps)[0]
        invstd = torch.rsqrt(var_bar + eps)
        ctx.save_for_backward(x, weight, mu_bar, invstd, coef)
        ctx.eps = eps
        ctx.batch_only = batch_only
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, mu_bar, invstd, coef = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_y.dtype != x.dtype:
            grad_y = grad_y.to(x.dtype)
        # its weight / bias gradients are sum(g xhat), sum(g) whatever the weight
        gamma = None if weight is None else weight.to(invstd.dtype)
        scaled = gamma if ctx.batch_only else (coef if gamma is None else coef * gamma)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, scaled, None, None, mu_bar, invstd, True, ctx.eps,
            [need_x, weight is not None and need_w, ctx.bias_dtype is not None and need_b])
        if need_x and not ctx.batch_only:
            # window: + (1 - coef) gamma s g (one in-place pass)
            a = invstd if gamma is None else invstd * gamma
            grad_x.addcmul_(grad_y, ((1.0 - coef) * a)[None, :, None, None])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class CrossIterationBatchNorm2d(IterationNormBase):
    """Cross-Iteration Batch Normalization for (N, C, H, W) conv outputs (CBN paper, Sec. 3.2-3.3).

    Training normalizes with the statistics of the current and the k-1 previous trainer
    iterations, compensated to the current weights of the producing conv (:meth:`attach_conv`;
    METHODS.md CBN 1-5); eval mode is BatchNorm with ``running_mean``/``running_var`` (CBN 7).

    Args:
        num_features: C.
        window_size: k >= 1, iterations in the window, the current one included (CBN 6).
        burn_in: trainer iterations (0-based) with k = 1 before the window is used (CBN 6); None:
            not known yet (given in epochs), a training forward raises :class:`NormNotWiredError`.
        momentum: in (0, 1], weight of the new batch (PyTorch's convention) in the population
            statistics, updated with the batch's mean and unbiased variance (CBN 7).
        eps: > 0, added to the variance inside the square root.
        affine: learn gamma/beta of shape (C,).
        aggregation: ``"paper"`` (average ``max(nu, mu^2)``, eq. 9-10) or ``"drop_invalid"`` (the
            released code: drop entries whose compensated variance is negative); CBN 3.
        compensate: False gives Naive CBN (CBN 8).
        grad_mode: ``"closed_form"`` (Appendix B's statistics gradients, normalization by
            :class:`_CBNNormalize`) or ``"autograd"`` (the released code's two
            ``torch.autograd.grad`` passes and autograd ops): the same function and gradients.
        grad_subsample: s >= 1, ``"closed_form"`` only: 1 is exact, s > 1 an approximation not in
            the paper (:func:`~smallbn_d2.layers.cbn_grad.stat_grads_closed_form`; measured in
            docs/BENCHMARKS.md).
        window_after_burn_in: ``"full"`` (the paper: the window is full at its first use) or
            ``"grow"`` (the released code: it grows from 1 to k after the burn-in); CBN 6.
        compensate_bias: True (the paper: the conv bias is part of theta) or False (the released
            code ignores it); CBN 2.

    Buffers, each allocated once: ``running_mean``, ``running_var`` (C,), ``num_batches_tracked``,
    ``window_iters`` (k-1,), ``window_mu``, ``window_mu0``, ``window_nu0`` (k-1, C) and, once a
    conv is attached (not Naive CBN), ``window_mu_grad`` (k-1, G, C_in/G, kh, kw) and
    ``window_nu_grad`` (k-1, C, C_in/G, kh, kw). N * H * W may be 0 (an empty output, no state
    change) or 1.

    Raises:
        ValueError: an argument out of range (the message names it and the range), an attached
            conv that :func:`~smallbn_d2.layers.cbn_grad.check_supported_conv` rejects, an input
            that is not (N, C, H, W).
        NormNotWiredError: training forward without a producing conv, a trainer iteration
            (:meth:`set_iteration`) or a known burn-in, or on an input the attached conv did not
            produce.
    """

    HYPERPARAMETERS = {
        **IterationNormBase.HYPERPARAMETERS,
        "window_size": INT_AT_LEAST_1,
        "burn_in": optional(INT_AT_LEAST_0, "not known yet: given in epochs, converted by the trainer"),
        "momentum": UNIT_INTERVAL,
        "aggregation": one_of(AGGREGATIONS),
        "compensate": BOOLEAN,
        "compensate_bias": BOOLEAN,
        "window_after_burn_in": one_of(WINDOW_AFTER_BURN_IN),
        "grad_mode": one_of(GRAD_MODES),
        "grad_subsample": Range("an integer >= 1 (1 = exact d nu / d theta)", INT_AT_LEAST_1.test, int),
    }

    def __init__(self, num_features: int, window_size: int = 4, burn_in: Optional[int] = 0, momentum: float = 0.1,
                 eps: float = 1e-5, affine: bool = True, aggregation: str = "paper", compensate: bool = True,
                 grad_mode: str = "closed_form", grad_subsample: int = 1, window_after_burn_in: str = "full",
                 compensate_bias: bool = True):
        super().__init__(num_features, eps=eps, affine=affine)
        self.window_size = self._check("window_size", window_size)
        self.burn_in = self._check("burn_in", burn_in)
        self.momentum = self._check("momentum", momentum)
        self.aggregation = self._check("aggregation", aggregation)
        self.compensate = self._check("compensate", compensate)
        self.compensate_bias = self._check("compensate_bias", compensate_bias)
        self.window_after_burn_in = self._check("window_after_burn_in", window_after_burn_in)
        self.grad_mode = self._check("grad_mode", grad_mode)
        self.grad_subsample = self._check("grad_subsample", grad_subsample)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # The window's per-channel entries; the weight-sized d mu / d theta, d nu / d theta
        # entries need the conv's shape and are allocated when it is attached.
        slots = self.window_size - 1
        self.register_buffer("window_iters", torch.full((slots,), -1, dtype=torch.long))
        for name in ("window_mu", "window_mu0", "window_nu0"):
            self.register_buffer(name, torch.zeros(slots, num_features))

    def _conv_attached(self, conv: nn.Conv2d) -> None:
        check_supported_conv(conv)
        capture_conv_input(conv)
        if self.compensate:
            slots, like = self.window_size - 1, self.running_mean
            self.register_buffer("window_mu_grad", like.new_zeros((slots, conv.groups) + tuple(conv.weight.shape[1:])))
            self.register_buffer("window_nu_grad", like.new_zeros((slots,) + tuple(conv.weight.shape)))

    def release_conv(self) -> None:
        """Stop capturing the producing conv's input (the eval mode does not need it)."""
        if self.conv is not None:
            release_conv_input(self.conv)

    def mode_dependents(self):
        """The producing conv: in training mode it captures its input for the window."""
        return [] if self.conv is None else [self.conv]

    def eval_affine(self):
        """``(running_mean, running_var, eps, gamma, beta)``: eval mode is BN (METHODS.md CBN 7)."""
        return self.running_mean, self.running_var, self.eps, self.weight, self.bias

    def statistics_from_moments(self, mean, sq_mean):
        """``(mean, E[x^2] - mean^2)`` (clamped at 0): BatchNorm's statistics."""
        return mean, (sq_mean - mean * mean).clamp_min(0)

    def population_state(self, mean, sq_mean):
        """``running_mean = E[x]``, ``running_var = E[x^2] - E[x]^2`` in the buffers' dtype."""
        center, var = self.statistics_from_moments(mean, sq_mean)
        dt = self.running_mean.dtype
        return {"running_mean": center.to(dt), "running_var": var.to(dt)}

    def population_state_keys(self):
        """``("running_mean", "running_var")``."""
        return ("running_mean", "running_var")

    def cross_iteration_state_keys(self):
        """The window (``window_*``) and ``num_batches_tracked``."""
        window = tuple(k for k, _ in self.named_buffers(recurse=False) if k.startswith("window_"))
        return window + ("num_batches_tracked",)

    def state_shape_hint(self, key, checkpoint_shape):
        """Window buffers have k - 1 rows: name the window size to set."""
        if key.startswith("window_") and checkpoint_shape:
            k = checkpoint_shape[0] + 1
            return (f"the checkpoint was trained with window size k = {k}, the model has "
                    f"k = {self.window_size} (MODEL.CBN.WINDOW_SIZE); set MODEL.CBN.WINDOW_SIZE {k} "
                    "to resume it, or delete its window_* entries to start with an empty window")
        return None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window_size={self.window_size}, burn_in={self.burn_in}, "
                f"momentum={self.momentum}, eps={self.eps}, affine={self.affine}, "
                f"aggregation={self.aggregation!r}, compensate={self.compensate}, grad_mode={self.grad_mode!r}"
                + (f", grad_subsample={self.grad_subsample}" if self.grad_subsample != 1 else ""))

    def effective_window_size(self, iteration: Optional[int] = None) -> int:
        """k in force at ``iteration`` (default: the current one): 1 during the burn-in, else k.

        Raises:
            NormNotWiredError: no iteration set, or the burn-in is not known (``burn_in=None``).
        """
        t = self._require_iteration() if iteration is None else iteration
        return 1 if t < self._require_burn_in() else self.window_size

    def _require_burn_in(self) -> int:
        if self.burn_in is None:
            raise NormNotWiredError(
                f"{type(self).__name__} is training but its burn-in is not known: it was given in epochs "
                "(MODEL.CBN.BURN_IN_EPOCHS, or neither BURN_IN_ITERS nor BURN_IN_EPOCHS: 3 epochs), which "
                "needs the training set size. Train with smallbn_d2's Trainer (it converts epochs to "
                "iterations), convert with smallbn_d2.config.resolve_burn_in(cfg, dataset_size) before "
                "building the model, or set MODEL.CBN.BURN_IN_ITERS."
            )
        return self.burn_in

    def _first_written_iteration(self) -> int:
        """First iteration whose statistics enter the window: ``burn_in - (k - 1)`` when the window is
        full right after the burn-in (the paper), ``burn_in`` when it grows from 1 to k (released code)."""
        if self.window_after_burn_in == "full":
            return self.burn_in - (self.window_size - 1)
        return self.burn_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` of shape (N, C, H, W); returns the same shape and dtype."""
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects (N, {self.num_features}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if not self.training:
            return self._eval_forward(x)
        t = self._require_iteration()
        conv_input = self._take_conv_input(x)
        if x.numel() == 0:
            return self._affine(x)
        cdt = torch.promote_types(x.dtype, torch.float32)
        P = x.shape[0] * x.shape[2] * x.shape[3]
        k = self.effective_window_size(t)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(cdt)
            if self.grad_mode == "closed_form":
                # statistics without autograd, one fused normalization with BatchNorm's backward
                var_t, mu_t = _batch_stats(xf)
                with torch.no_grad():
                    if k > 1:
                        mu_bar, var_bar, count = self._window_statistics(t, mu_t, var_t, cdt)
                        coef = count.reciprocal()
                    else:
                        mu_bar, var_bar, coef = mu_t, var_t, torch.ones_like(mu_t)
                w = None if self.weight is None else self.weight.to(cdt)
                b = None if self.bias is None else self.bias.to(cdt)
                y = _CBNNormalize.apply(xf, w, b, mu_bar, var_bar, coef, self.eps, k == 1).to(x.dtype)
            else:
                # the released code's approach: statistics and normalization through autograd ops
                var_t, mu_t = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
                if k > 1:
                    mu_bar, var_bar, _ = self._window_statistics(t, mu_t, var_t, cdt)
                else:
                    mu_bar, var_bar = mu_t, var_t
                scale = torch.rsqrt(var_bar + self.eps)
                y = (xf - mu_bar[None, :, None, None]) * scale[None, :, None, None]
                y = self._affine(y).to(x.dtype)
            self._update_state(t, x, conv_input, mu_t.detach(), var_t.detach(), P)
        return y

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.running_mean.dtype and (not self.affine or self.weight.dtype == x.dtype):
            # BatchNorm's own inference kernel: one fused pass, the cost of nn.BatchNorm2d.eval()
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                    False, 0.0, self.eps, torch.backends.cudnn.enabled)
        cdt = torch.promote_types(x.dtype, torch.float32)
        scale = torch.rsqrt(self.running_var.to(cdt) + self.eps)
        if self.affine:
            scale = scale * self.weight.to(cdt)
            shift = self.bias.to(cdt) - self.running_mean.to(cdt) * scale
        else:
            shift = -self.running_mean.to(cdt) * scale
        return (x * scale[None, :, None, None].to(x.dtype) + shift[None, :, None, None].to(x.dtype))

    def _take_conv_input(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Pop the producing conv's captured input and check that it produced ``x``."""
        conv = self._require_conv()
        u = pop_conv_input(conv)
        if u is None and not self.compensate:
            return None  # Naive CBN needs no input; it checks the wiring when the input is there
        if u is None:
            raise NormNotWiredError(
                f"{type(self).__name__}: the attached conv {conv} did not run before this layer in "
                "training mode, so its input is unknown. The conv must directly produce this layer's input."
            )
        expected = (x.shape[0], x.shape[1]) + _conv_output_size(conv, u.shape[2], u.shape[3])
        if tuple(x.shape) != expected or u.shape[0] != x.shape[0]:
            raise NormNotWiredError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} was not produced by the attached "
                f"conv {conv} from its last input of shape {tuple(u.shape)} (expected {expected})."
            )
        return u if self.compensate else None  # Naive CBN checks the wiring but needs no input

    def _window_statistics(self, t: int, mu_t, var_t, cdt):
        """Compensated window mean and variance and the number of entries averaged (the current
        batch included), shape (C,) each (METHODS.md CBN 2-3)."""
        tags = self.window_iters
        present = (tags >= t - self.window_size + 1) & (tags < t) & (tags >= 0)  # (k-1,)
        mu_old = self.window_mu.to(cdt)
        if self.compensate:
            mu_c, nu_c = self._expand(self.window_mu0.to(cdt), self.window_nu0.to(cdt), mu_old,
                                      self.window_mu_grad, self.window_nu_grad, 1.0)
        else:
            mu_c, nu_c = mu_old, self.window_nu0.to(cdt)  # Naive CBN stores nu itself in window_nu0
        var_c = nu_c - mu_c * mu_c
        keep = present[:, None].to(cdt).expand_as(mu_c)
        if self.aggregation == "drop_invalid":
            keep = keep * (var_c >= 0).to(cdt)
        count = 1.0 + keep.sum(0)
        mu_bar = (mu_t + (keep * mu_c).sum(0)) / count
        spread = var_c.clamp(min=0) + (mu_c - mu_bar) ** 2  # max(nu, mu^2) - mu_bar^2, per entry
        var_bar = (var_t + (mu_t - mu_bar) ** 2 + (keep * spread).sum(0)) / count
        return mu_bar, var_bar, count

    def _expand(self, mu, nu, mu_b, g_mu, g_nu, sign: float):
        """``mu + sign (<g_mu, theta> + b)``, ``nu + sign (<g_nu, theta> + 2 mu_b b)`` at the conv's
        current theta, b = 0 without a compensated bias (METHODS.md CBN 2): sign -1 gives an entry's
        stored constant parts, +1 its compensation. g_mu (..., G, C_in/G, kh, kw), g_nu (..., C, ...)."""
        conv, C = self.conv, self.num_features
        theta = conv.weight.detach().to(mu.dtype)
        theta_g = theta.reshape(conv.groups, C // conv.groups, -1)
        mu = mu + sign * torch.einsum("...gd,gcd->...gc", g_mu.to(mu.dtype).flatten(-3), theta_g).flatten(-2)
        nu = nu + sign * (g_nu.to(mu.dtype).flatten(-3) * theta.reshape(C, -1)).sum(-1)  # <g_nu[c], theta[c]>
        if conv.bias is not None and self.compensate_bias:
            b = conv.bias.detach().to(mu.dtype)
            mu = mu + sign * b
            nu = nu + sign * 2.0 * mu_b * b
        return mu, nu

    @torch.no_grad()
    def _update_state(self, t: int, x, conv_input, mu_t, var_t, P: int) -> None:
        finite = torch.isfinite(mu_t).all() & torch.isfinite(var_t).all()
        m = self.momentum
        unbiased = var_t * (P / max(P - 1, 1))
        dt = self.running_mean.dtype
        self.running_mean.copy_(torch.where(finite, (1 - m) * self.running_mean + m * mu_t.to(dt), self.running_mean))
        self.running_var.copy_(torch.where(finite, (1 - m) * self.running_var + m * unbiased.to(dt), self.running_var))
        self.num_batches_tracked.add_(finite.long())  # batches whose statistics were used
        k = self.window_size
        if k == 1 or t < self._first_written_iteration():
            return
        slot = t % (k - 1)
        nu_t = var_t + mu_t * mu_t
        if self.compensate:
            conv = self.conv
            xd = x.detach().to(mu_t.dtype)
            if self.grad_mode == "closed_form":
                grads = stat_grads_closed_form(conv, conv_input, xd, subsample=self.grad_subsample)
            else:
                grads = stat_grads_autograd(conv, conv_input, x if x.requires_grad else None)
            mu0, nu0 = self._expand(mu_t, nu_t, mu_t, grads.mu_weight, grads.nu_weight, -1.0)
            # A NaN/Inf anywhere in the gradients makes mu0 / nu0 non-finite (Inf * 0 = NaN), so
            # checking the (C,) results checks the gradients without another pass over them.
            finite = finite & torch.isfinite(mu0).all() & torch.isfinite(nu0).all()
            _masked_write(self.window_mu_grad, slot, grads.mu_weight, finite)
            _masked_write(self.window_nu_grad, slot, grads.nu_weight, finite)
        else:
            mu0, nu0 = mu_t, nu_t
        _masked_write(self.window_mu, slot, mu_t, finite)
        _masked_write(self.window_mu0, slot, mu0, finite)
        _masked_write(self.window_nu0, slot, nu0, finite)
        self.window_iters[slot : slot + 1].masked_fill_(finite, t)  # no host-to-device copy


class NaiveCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """Naive CBN: the window average of CBN without Taylor compensation (CBN paper Sec. 3.2
    "Naive CBN", METHODS.md CBN item 8), an ablation; degrades at large k. Same arguments as
    :class:`CrossIterationBatchNorm2d` except ``compensate`` (always False); ``grad_mode`` only
    selects the normalization path (fused or autograd ops, same result) and ``grad_subsample`` is
    unused. It still needs its producing conv attached (for the input check) by the wiring.
    """

    def __init__(self, num_features: int, window_size: int = 4, burn_in: Optional[int] = 0, momentum: float = 0.1,
                 eps: float = 1e-5, affine: bool = True, aggregation: str = "paper", **kwargs):
        kwargs.pop("compensate", None)
        super().__init__(num_features, window_size=window_size, burn_in=burn_in, momentum=momentum, eps=eps,
                         affine=affine, aggregation=aggregation, compensate=False, **kwargs)
