"""Moving Average Batch Normalization (MABN).

Source: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020: Sec. 4.1 (SMAS / EMAS replace the batch
statistics), Sec. 4.2 (normalization without centering, weight centralization, clipping and
renormalizing, and the final "All in all" MABN formulation); warm-up schedule from the authors'
released code. Specification: ``docs/METHODS.md``, section "MABN", items 1-6.
"""
from __future__ import annotations

import contextlib
import torch
from torch import nn

from .base import IterationNormBase
from .hyperparameters import FINITE_AT_LEAST_1, INT_AT_LEAST_0, INT_AT_LEAST_1, UNIT_INTERVAL
from .weight_centralization import centralize_conv_weight

__all__ = ["MovingAverageBatchNorm2d"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------- helpers
def _compute_dtype(x_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 for float64 inputs (or float64 state)."""
    if x_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"MovingAverageBatchNorm2d needs a floating-point input, got {x_dtype}")
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), state_dtype)


def _no_autocast(device_type: str):
    """Disable autocast inside the layer (all its arithmetic is explicitly typed)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # old torch / exotic device: nothing to disable
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


def _write_slot(values: torch.Tensor, tags: torch.Tensor, slot: int, t: int,
                new: torch.Tensor, ok: torch.Tensor) -> None:
    """values[slot] <- new and tags[slot] <- t, only where ``ok`` (0-dim bool) holds; no host sync."""
    row = values[slot]
    torch.where(ok, new.to(values.dtype), row, out=row)
    tags[slot : slot + 1].masked_fill_(ok, t)


def _sma(values: torch.Tensor, tags: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean of the rows of ``values`` (m, C) whose tag lies in (t - m, t]; zeros if none does."""
    m = values.shape[0]
    valid = (tags > t - m) & (tags <= t)
    w = valid.to(dtype)
    return (values.to(dtype) * w[:, None]).sum(0) / w.sum().clamp_min(1.0)


class _MABNFunction(torch.autograd.Function):
    """Training-mode MABN with its custom backward (METHODS.md MABN items 3-5).

    forward(x (N, C, *), weight (C,) or None, bias (C,) or None, layer, t, use_sma, use_renorm)
    -> y, same shape and dtype as x. Updates ``layer``'s chi2 buffers and ``running_chi2``;
    backward updates the psi buffers. Statistics are computed in ``dtype`` (float32 or
    float64).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, t, use_sma, use_renorm):
        dtype = _compute_dtype(x.dtype, layer.running_chi2.dtype)
        dims = (0,) + tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        eps = layer.eps

        # chi2_t = E[x^2] per channel (one pass, no temporary of x's size)
        chi2_t = torch.linalg.vector_norm(x, 2, dim=dims, dtype=dtype).square_().div_(count)
        ok = torch.isfinite(chi2_t).all()
        _write_slot(layer.chi2_buffer, layer.chi2_iters, t % layer.buffer_size, t, chi2_t, ok)
        chi2_used = _sma(layer.chi2_buffer, layer.chi2_iters, t, dtype) if use_sma else chi2_t

        std = (chi2_used + eps).sqrt_()
        inv_std = std.reciprocal()
        running = layer.running_chi2
        if use_renorm:
            r = (std / (running.to(dtype) + eps).sqrt_()).clamp_(1.0 / layer.r_max, layer.r_max)
        else:
            r = None
        # EMA update; momentum weights the OLD value (paper convention)
        new_running = torch.lerp(running.to(dtype), chi2_used, 1.0 - layer.momentum)
        ok_running = ok & torch.isfinite(new_running).all()
        torch.where(ok_running, new_running.to(running.dtype), running, out=running)

        scale = inv_std if r is None else inv_std * r  # r * / sqrt(chi2 + eps)
        gscale = scale if weight is None else scale * weight.to(dtype)  # gamma * r / sqrt(.)
        if bias is None:
            y = x * gscale.view(shape)
        else:
            y = torch.addcmul(bias.to(dtype).view(shape), x, gscale.view(shape))

        ctx.save_for_backward(x, weight, inv_std, scale, gscale)
        ctx.layer = layer
        ctx.t = t
        ctx.use_sma = use_sma
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, inv_std, scale, gscale = ctx.saved_tensors
        layer, t, dtype = ctx.layer, ctx.t, ctx.dtype
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        need_b = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        with _no_autocast(x.device.type):
            # Half/bf16 tensors go to the reduction as they are (it accumulates in float32, as
            # autocast BN does); other dtype mixes are cast to the compute dtype.
            direct = grad_y.dtype == x.dtype and (
                x.dtype == dtype or (dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))
            )
            gy, xc = (grad_y, x) if direct else (grad_y.to(dtype), x.to(dtype))
            # One fused pass for sum(dL/dy * x) and sum(dL/dy) per channel: BN's own backward
            # reduction with mean 0 and invstd 1 (its grad_weight and grad_bias).
            _, s, sum_gy = torch.ops.aten.native_batch_norm_backward(
                gy, xc, None, None, None, inv_std.new_zeros(inv_std.shape), inv_std.new_ones(inv_std.shape),
                True, 0.0, [False, True, need_b],
            )
            # psi_t = mean(g * z) with g = dL/dy * gamma * r and z = x / sqrt(chi2 + eps)
            psi_t = gscale * s / count
            ok = torch.isfinite(psi_t).all()
            _write_slot(layer.psi_buffer, layer.psi_iters, t % layer.buffer_size, t, psi_t, ok)
            psi_used = _sma(layer.psi_buffer, layer.psi_iters, t, dtype) if ctx.use_sma else psi_t
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                # dL/dx = (g - z * psi) / sqrt(chi2 + eps) = dL/dy * gscale - x * psi / (chi2 + eps)
                grad_x = gy * gscale.view(shape)
                grad_x.addcmul_(xc, (psi_used * inv_std * inv_std).view(shape), value=-1.0)
                grad_x = grad_x.to(x.dtype)
            if weight is not None and ctx.needs_input_grad[1]:
                grad_w = (scale * s).to(weight.dtype)  # sum(dL/dy * r * z)
            if need_b:
                grad_b = sum_gy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class MovingAverageBatchNorm2d(IterationNormBase):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020, Sec. 4; METHODS.md MABN 1-6).

    Input x: (N, C, H, W) (any (N, C, *) works); output: same shape and dtype. Per channel, with
    t = the trainer iteration (0-based, from :meth:`set_iteration`, never from counting calls)
    and m = ``buffer_size``:

    Training (METHODS.md items 1, 3, 4, 5):
        chi2_t   = E[x^2] over (N, H, W), written to slot t % m of ``chi2_buffer`` (tag t);
        chi2     = chi2_t while t < m or t < warmup_iters - 1 (the released code's warm-up,
                   which counts iterations from 1), else the simple moving average (SMA) of the
                   buffer entries tagged in (t - m, t];
        z        = x / sqrt(chi2 + eps);
        r        = 1 while t < max(renorm_warmup_iters, warmup_iters), else
                   clip(sqrt(chi2 + eps) / sqrt(running_chi2 + eps), 1/r_max, r_max), with
                   running_chi2 taken before this iteration's update; r is a constant;
        y        = gamma * r * z + beta;
        running_chi2 <- momentum * running_chi2 + (1 - momentum) * chi2.
        Backward (custom autograd.Function): g = dL/dy * gamma * r; psi_t = mean(g * z) over
        (N, H, W), written to slot t % m of ``psi_buffer`` (tag t, the forward's t); psi = psi_t
        during the same warm-up, else the SMA of the valid psi entries;
        dL/dx = (g - z * psi) / sqrt(chi2 + eps); dL/dgamma = sum(dL/dy * r * z);
        dL/dbeta = sum(dL/dy).
    Inference (item 6): y = gamma * x / sqrt(running_chi2 + eps) + beta; linear, no state
        change, no iteration needed.

    The conv producing x must be attached (:meth:`attach_conv`): attaching applies weight
    centralization to it (item 2, :func:`centralize_conv_weight`). Training itself does not
    require the conv.

    Semantics worth knowing:

    * ``momentum`` is the weight of the OLD value (the paper's EMAS convention, 0.98 published),
      unlike ``nn.BatchNorm2d.momentum`` (0.1 = weight of the new value).
    * Buffer entries carry the t that wrote them, so an entry counts only for t in (tag, tag + m).
      A layer skipped in an iteration (e.g. 0 RoIs) averages fewer entries; a layer called twice
      in one iteration overwrites that iteration's slot (the last forward / the last backward to
      run wins), and ``running_chi2`` is updated once per call. Entries tagged after t (a run
      restarted at an earlier iteration) are ignored. All of this lives in buffers that are part
      of ``state_dict``, so resuming is exact.
    * Non-finite input: the output (and gradient) may be NaN/Inf, but NaN/Inf never enters a
      buffer: every write is masked on device (``torch.where(isfinite(new).all(), new, old)``,
      no host sync), and a non-finite chi2_t also freezes ``running_chi2`` for that call.
    * Empty input (N*H*W == 0): returns ``x * gamma + beta`` (empty, still in the graph, so
      gamma/beta get zero gradients, not None); nothing is updated.
    * dtypes: buffers are float32 (they follow ``module.to(dtype)``, e.g. float64 after
      ``.double()``). Half/bf16 inputs (autocast) are processed in float32 (statistics, buffers,
      backward) and the output has the input's dtype; float64 inputs are processed in float64
      (buffer writes are rounded to the buffers' dtype, so call ``.double()`` for a fully
      float64 layer).
    * Gradient checkpointing re-runs the forward: the slot write is idempotent but
      ``running_chi2`` is updated again.

    Args:
        num_features: C >= 1.
        buffer_size: m, the SMA window in iterations, integer >= 1 (published: 16; 32 with
            normalized heads on COCO).
        momentum: EMA weight of the old ``running_chi2``, in (0, 1] (published 0.98).
        eps: > 0, added to chi2 inside the square root.
        warmup_iters: integer >= 0: the current batch statistics are used while
            t < warmup_iters - 1 (and during the first m iterations), r = 1 while t < warmup_iters.
        renorm_warmup_iters: integer >= 0; r = 1 while t < max(renorm_warmup_iters,
            warmup_iters) (released code: 1000).
        r_max: clip bound of r, finite number >= 1 (released code: 5).
        affine: learn gamma (``weight``) and beta (``bias``), shape (C,).

    Buffers (all in ``state_dict``): ``chi2_buffer`` (m, C) and ``psi_buffer`` (m, C) float32,
    zeros; ``chi2_iters`` (m,) and ``psi_iters`` (m,) int64, -1 (the iteration t that wrote each slot);
    ``running_chi2`` (C,) float32, ones (the EMA population statistic chi2_ema).

    Raises:
        ValueError (constructor): an argument out of its range; the message
            names the argument, the value and the allowed range.
        NormNotWiredError (forward): training without a trainer iteration (:meth:`set_iteration`).
        ValueError (forward): input with fewer than 2 dims or a channel count != C.
        TypeError (forward): non-floating-point input.
    """

    HYPERPARAMETERS = {
        **IterationNormBase.HYPERPARAMETERS,
        "buffer_size": INT_AT_LEAST_1,
        "momentum": UNIT_INTERVAL,
        "warmup_iters": INT_AT_LEAST_0,
        "renorm_warmup_iters": INT_AT_LEAST_0,
        "r_max": FINITE_AT_LEAST_1,
    }

    def __init__(self, num_features: int, buffer_size: int = 16, momentum: float = 0.98, eps: float = 1e-5,
                 warmup_iters: int = 0, renorm_warmup_iters: int = 1000, r_max: float = 5.0, affine: bool = True):
        super().__init__(num_features, eps=eps, affine=affine)
        self.buffer_size = self._check("buffer_size", buffer_size)
        self.momentum = self._check("momentum", momentum)
        self.warmup_iters = self._check("warmup_iters", warmup_iters)
        self.renorm_warmup_iters = self._check("renorm_warmup_iters", renorm_warmup_iters)
        self.r_max = self._check("r_max", r_max)
        m, c = self.buffer_size, num_features
        self.register_buffer("running_chi2", torch.ones(c))
        self.register_buffer("chi2_buffer", torch.zeros(m, c))
        self.register_buffer("chi2_iters", torch.full((m,), -1, dtype=torch.int64))
        self.register_buffer("psi_buffer", torch.zeros(m, c))
        self.register_buffer("psi_iters", torch.full((m,), -1, dtype=torch.int64))

    def _conv_attached(self, conv: nn.Conv2d) -> None:
        """Apply weight centralization to the producing conv (METHODS.md MABN item 2)."""
        centralize_conv_weight(conv)

    # ------------------------------------------------------------------ population statistics
    def eval_affine(self):
        """``(0, running_chi2, eps, gamma, beta)``: inference is y = gamma * x / sqrt(chi2 + eps) + beta."""
        chi2 = self.running_chi2
        return torch.zeros_like(chi2), chi2, self.eps, self.weight, self.bias

    def statistics_from_moments(self, mean, sq_mean):
        """``(0, E[x^2])``: MABN normalizes without centering."""
        return torch.zeros_like(sq_mean), sq_mean

    def population_state(self, mean, sq_mean):
        """``running_chi2 = E[x^2]`` in the buffer's dtype (from BN statistics: var + mean^2)."""
        return {"running_chi2": sq_mean.to(self.running_chi2.dtype)}

    def population_state_keys(self):
        """``("running_chi2",)``."""
        return ("running_chi2",)

    def cross_iteration_state_keys(self):
        """The SMA buffers of chi2 and psi and their iteration tags."""
        return ("chi2_buffer", "chi2_iters", "psi_buffer", "psi_iters")

    def state_shape_hint(self, key, checkpoint_shape):
        """SMA buffers have m rows: name the buffer size to set."""
        if key in self.cross_iteration_state_keys() and checkpoint_shape:
            m = checkpoint_shape[0]
            return (f"the checkpoint was trained with buffer size m = {m}, the model has "
                    f"m = {self.buffer_size} (MODEL.MABN.BUFFER_SIZE); set MODEL.MABN.BUFFER_SIZE {m} "
                    "to resume it, or delete its chi2_*/psi_* entries to start the moving averages afresh")
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize x of shape (N, C, *); see the class docstring. Returns x's shape and dtype."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape {tuple(x.shape)}; "
                f"allowed: (N, {self.num_features}, ...)"
            )
        if not self.training:
            return self._inference(x)
        t = self._require_iteration()
        if x.numel() == 0:
            return self._affine(x) if self.affine else x.clone()
        m = self.buffer_size
        # the released code's rules, which count iterations from 1: batch statistics while
        # t + 1 <= m or t + 1 < warmup_iters; r = 1 while t + 1 <= max(renorm_warmup_iters, warmup_iters)
        use_sma = t >= m and t + 1 >= self.warmup_iters
        use_renorm = t >= max(self.renorm_warmup_iters, self.warmup_iters)
        with _no_autocast(x.device.type):
            return _MABNFunction.apply(x, self.weight, self.bias, self, t, use_sma, use_renorm)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dtype = _compute_dtype(x.dtype, self.running_chi2.dtype)
        with _no_autocast(x.device.type):
            scale = torch.rsqrt(self.running_chi2.to(dtype) + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            if self.bias is None:
                y = x * scale.view(shape)
            else:
                y = torch.addcmul(self.bias.to(dtype).view(shape), x, scale.view(shape))
            return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, momentum={self.momentum}, eps={self.eps}, "
            f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
            f"r_max={self.r_max}, affine={self.affine}"
        )
