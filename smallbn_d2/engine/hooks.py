"""Detectron2 hooks that drive the cross-iteration norm layers."""
from __future__ import annotations

from detectron2.engine import HookBase

from ..modeling.wiring import set_norm_iteration

__all__ = ["NormIterationHook"]


class NormIterationHook(HookBase):
    """Before every step, tell each CBN/MABN layer the trainer's iteration (``trainer.iter``).

    The layers' burn-in (CBN), warm-ups (MABN) and window bookkeeping depend on the iteration,
    which therefore comes from the trainer, never from counting forward calls: a layer may run
    several times per iteration or not at all, and after ``--resume`` the trainer's iteration is
    the one restored from the checkpoint. Put it first among the hooks.
    """

    def before_step(self):
        set_norm_iteration(self.trainer.model, self.trainer.iter)
