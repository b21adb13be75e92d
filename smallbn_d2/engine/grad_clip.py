"""``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"``: clipping the norm of all gradients together,
mmdetection's ``grad_clip`` of the CBN authors' released configs, which Detectron2's ``"norm"``
(each parameter alone) and ``"value"`` are not. ``CLIP_VALUE`` is ``max_norm`` and ``NORM_TYPE`` is
``norm_type``; other ``CLIP_TYPE`` values go to Detectron2 unchanged. See docs/REPRODUCE.md,
"Gradient clipping".
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from detectron2.config import CfgNode

from ..config import config_with

__all__ = ["FULL_MODEL", "add_full_model_gradient_clipping", "build_optimizer_with_clipping"]

#: The ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` value for clipping the norm of all gradients together.
FULL_MODEL = "full_model"


def add_full_model_gradient_clipping(optimizer: torch.optim.Optimizer, max_norm: float,
                                     norm_type: float = 2.0) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first call ``torch.nn.utils.clip_grad_norm_`` over all its parameters:
    when the total L-``norm_type`` norm exceeds ``max_norm``, every gradient is scaled by
    ``max_norm / (total + 1e-6)``. The class of ``optimizer`` is replaced in place by a subclass built
    with Detectron2's optimizer wrapper (its ``global_clipper``); returns ``optimizer``.

    Args:
        max_norm: a finite number > 0.
        norm_type: a number > 0 or ``inf``.
    Raises:
        ValueError: ``max_norm`` or ``norm_type`` out of range (the message names the config key).
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
    """``build(cfg, model)`` (Detectron2's ``DefaultTrainer.build_optimizer``); with
    ``SOLVER.CLIP_GRADIENTS.ENABLED`` and ``CLIP_TYPE "full_model"``, built without Detectron2's
    clipping and given :func:`add_full_model_gradient_clipping`.

    Raises:
        ValueError: as :func:`add_full_model_gradient_clipping`.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return build(cfg, model)
    plain = config_with(cfg, {"SOLVER.CLIP_GRADIENTS.ENABLED": False})
    return add_full_model_gradient_clipping(build(plain, model), clip.CLIP_VALUE, clip.NORM_TYPE)
