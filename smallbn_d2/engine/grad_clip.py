"""Gradient clipping by the norm of the whole model: ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"``.

Detectron2 (v0.6 and main) clips either each gradient element (``CLIP_TYPE: "value"``) or the
norm of **each parameter's** gradient separately (``"norm"``). mmdetection's
``optimizer_config = dict(grad_clip=dict(max_norm=35, norm_type=2))``, used by the CBN authors'
released COCO configs, instead calls ``torch.nn.utils.clip_grad_norm_`` once over all trainable
parameters: when the norm of all gradients together exceeds ``max_norm``, every gradient is
scaled by the same factor. Per-parameter clipping at 35 is a much weaker constraint (each
parameter's norm is at most the total norm), so it is not that recipe. ``"full_model"`` is
mmdetection's rule, built on Detectron2's own optimizer wrapper (its ``global_clipper``, which
Detectron2 keeps "for future use with DETR"): ``CLIP_VALUE`` is ``max_norm`` and ``NORM_TYPE``
is ``norm_type``. :class:`smallbn_d2.engine.Trainer` uses it; other values of ``CLIP_TYPE`` go
to Detectron2 unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from detectron2.config import CfgNode

__all__ = ["FULL_MODEL", "add_full_model_gradient_clipping", "build_optimizer_with_clipping"]

#: The ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` value for clipping the norm of all gradients together.
FULL_MODEL = "full_model"


def add_full_model_gradient_clipping(optimizer: torch.optim.Optimizer, max_norm: float,
                                     norm_type: float = 2.0) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first clip the gradients of all its parameters together.

    Before each step, ``torch.nn.utils.clip_grad_norm_(all parameters, max_norm, norm_type)``:
    the total norm ``||(g_1, ..., g_n)||_p`` over every parameter of every group is computed and,
    when it exceeds ``max_norm``, every gradient is multiplied by ``max_norm / (total + 1e-6)``
    (mmdetection's ``grad_clip``; Detectron2's ``"norm"`` clips each parameter alone).

    Args:
        optimizer: a built ``torch.optim.Optimizer``; its class is replaced in place by a subclass
            (Detectron2's ``maybe_add_gradient_clipping`` does the same).
        max_norm: the largest total gradient norm, a finite number > 0.
        norm_type: p of the L-p norm, a number > 0 or ``inf``.
    Returns:
        ``optimizer`` itself.
    Raises:
        ValueError: ``max_norm`` or ``norm_type`` out of range (the message names it).
    """
    from ..compat import gradient_clipping_optimizer_class

    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not math.isfinite(max_norm) \
            or max_norm <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE = {max_norm!r} is invalid for CLIP_TYPE "
                         f"{FULL_MODEL!r}; allowed: a finite number > 0 (the largest total gradient norm)")
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.NORM_TYPE = {norm_type!r} is invalid for CLIP_TYPE "
                         f"{FULL_MODEL!r}; allowed: a number > 0 or inf (p of the L-p norm)")

    def clip_all(params) -> None:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)

    optimizer.__class__ = gradient_clipping_optimizer_class(type(optimizer), global_clipper=clip_all)
    return optimizer


def build_optimizer_with_clipping(cfg: CfgNode, model: torch.nn.Module,
                                  build: Callable[[CfgNode, torch.nn.Module], torch.optim.Optimizer]
                                  ) -> torch.optim.Optimizer:
    """``build(cfg, model)``, with ``CLIP_TYPE: "full_model"`` handled here.

    Args:
        cfg: a Detectron2 config.
        model: the model whose parameters are optimized.
        build: the optimizer builder to call (Detectron2's ``DefaultTrainer.build_optimizer``).
    Returns:
        the optimizer; with ``SOLVER.CLIP_GRADIENTS.ENABLED`` and ``CLIP_TYPE "full_model"``, built
        without Detectron2's clipping and then given :func:`add_full_model_gradient_clipping`.
    Raises:
        ValueError: ``CLIP_VALUE`` or ``NORM_TYPE`` out of range for ``"full_model"``.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return build(cfg, model)
    plain = cfg.clone()
    plain.defrost()
    plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
    return add_full_model_gradient_clipping(build(plain, model), clip.CLIP_VALUE, clip.NORM_TYPE)
