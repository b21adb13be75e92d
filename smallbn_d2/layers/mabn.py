"""Moving Average Batch Normalization (MABN).

Source: Yan, Wan, Zhang, Zhang, Wei, Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020, Sec. 4.1-4.2; warm-up schedule from the authors'
released code. Specification: docs/METHODS.md, MABN 1-6.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .base import IterationNormBase, _masked_write
from .hyperparameters import FINITE_AT_LEAST_1, INT_AT_LEAST_0, INT_AT_LEAST_1, UNIT_INTERVAL
from .weight_centralization import centralize_conv_weight

__all__ = ["MovingAverageBatchNorm2d"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    _masked_write(values, slot, new, ok)
    tags[slot : slot + 1].masked_fill_(ok, t)


def _scale_shift(x: torch.Tensor, scale: torch.Tensor, bias, dtype: torch.dtype) -> torch.Tensor:
    """x * scale + bias with (C,) ``scale`` and ``bias`` (None: no shift) computed in ``dtype``; x's dtype out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x * scale.view(shape) if bias is None else torch.addcmul(bias.to(dtype).view(shape), x, scale.view(shape))
    return y.to(x.dtype)


def _sma(values: torch.Tensor, tags: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean of the rows of ``values`` (m, C) whose tag lies in (t - m, t]; zeros if none does."""
    m = values.shape[0]
    valid = (tags > t - m) & (tags <= t)
    w = valid.to(dtype)
    return (values.to(dtype) * w[:, None]).sum(0) / w.sum().clamp_min(1.0)


class _MABNFunction(torch.autograd.Function):
    """Training-mode MABN with its custom backward (METHODS.md MABN 3-5).

    forward(x (N, C, *), weight, bias (C,) or None, layer, t, use_sma, use_renorm) -> y, x's shape
    and dtype; updates ``layer``'s chi2 buffers and ``running_chi2``, the backward its psi buffers.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, t, use_sma, use_renorm):
        dtype = _compute_dtype(x.dtype, layer.running_chi2.dtype)
        dims = (0,) + tuple(range(2, x.dim()))
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
        y = _scale_shift(x, gscale, bias, dtype)

        ctx.save_for_backward(x, weight, inv_std, scale, gscale)
        ctx.layer = layer
        ctx.t = t
        ctx.use_sma = use_sma
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

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

    Input x: (N, C, H, W) (any (N, C, *) works); output: x's shape and dtype. With t the trainer
    iteration (0-based; METHODS.md counts from 1) and m = ``buffer_size``, per channel:

    * training: y = gamma * r * z + beta, z = x / sqrt(chi2 + eps), chi2 the simple moving average
      (SMA) of E[x^2] over the iterations (t - m, t] and r the clipped renormalization, a constant
      (MABN 3); the backward uses the SMA of psi = mean(dL/dy * gamma * r * z) (MABN 4). Warm-up,
      by the released code's rules (MABN 5): the batch's chi2_t, psi_t replace the SMAs while
      t < m or t < warmup_iters - 1; r = 1 while t < max(renorm_warmup_iters, warmup_iters).
    * ``running_chi2 <- momentum * running_chi2 + (1 - momentum) * chi2``: ``momentum`` weighs the
      OLD value (the paper's convention, unlike ``nn.BatchNorm2d``); r uses it from before.
    * inference: y = gamma * x / sqrt(running_chi2 + eps) + beta (MABN 6), no iteration needed.

    Attaching the producing conv (:meth:`attach_conv`) centralizes its weight (MABN 2); training
    itself does not need the conv. Buffer entries carry the iteration that wrote them: a layer
    skipped in an iteration averages fewer; one called twice in an iteration overwrites its slot
    (the last forward / backward wins) and updates ``running_chi2`` per call (as does the re-run
    of gradient checkpointing); entries tagged after t (a run restarted earlier) are ignored.
    All of it is in ``state_dict``, so resuming is exact. Empty input returns ``gamma * x + beta``
    (zero gradients for gamma, beta) and updates nothing; non-finite values never enter a buffer
    (docs/RELIABILITY.md, section 3). Half/bf16 input is processed in float32, float64 in float64
    (written to float32 buffers unless the layer is ``.double()``).

    Args:
        num_features: C >= 1.
        buffer_size: m >= 1, the SMA window in iterations (published: 16; 32 with normalized
            heads on COCO).
        momentum: in (0, 1], EMA weight of the old ``running_chi2`` (published 0.98).
        eps: > 0, added to chi2 inside the square root.
        warmup_iters: >= 0, iterations of batch statistics and r = 1 (see above).
        renorm_warmup_iters: >= 0, iterations with r = 1 (released code: 1000).
        r_max: finite, >= 1, the clip bound of r (released code: 5).
        affine: learn gamma (``weight``) and beta (``bias``), shape (C,).

    Buffers: ``chi2_buffer``, ``psi_buffer`` (m, C) float32 zeros; ``chi2_iters``, ``psi_iters``
    (m,) int64, -1 (the iteration that wrote each slot); ``running_chi2`` (C,) float32 ones.

    Raises:
        ValueError: an argument out of range (the message names it, the value and the range); an
            input with fewer than 2 dims or a channel count other than C.
        TypeError: a non-floating-point input.
        NormNotWiredError: training without a trainer iteration (:meth:`set_iteration`).
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
        """Apply weight centralization to the producing conv (METHODS.md MABN 2)."""
        centralize_conv_weight(conv)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize x of shape (N, C, *) (see the class docstring); returns x's shape and dtype."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input of shape {tuple(x.shape)}; "
                             f"allowed: (N, {self.num_features}, ...)")
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
        dtype = _compute_dtype(x.dtype, self.running_chi2.dtype)
        with _no_autocast(x.device.type):
            scale = torch.rsqrt(self.running_chi2.to(dtype) + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
            return _scale_shift(x, scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, buffer_size={self.buffer_size}, momentum={self.momentum}, eps={self.eps}, "
                f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
                f"r_max={self.r_max}, affine={self.affine}")
