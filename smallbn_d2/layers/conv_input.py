"""Capture of a producing conv's input u, which CBN's statistics gradients need (CBN paper,
Sec. 3.2 and Appendix B; docs/METHODS.md CBN 5).

A forward pre-hook keeps u (a reference, no copy) while the conv trains. The hook and u live in the
conv's ``__dict__``, so neither appears in ``state_dict()``, ``named_modules()`` or checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["capture_conv_input", "pop_conv_input", "has_conv_input", "release_conv_input"]

_HOOK = "_smallbn_capture"
_INPUT = "_smallbn_conv_input"


def _store_input(conv: nn.Module, args) -> None:
    conv.__dict__[_INPUT] = args[0] if conv.training else None


def capture_conv_input(conv: nn.Module) -> None:
    """Make ``conv`` keep its input of each training-mode forward for :func:`pop_conv_input`.

    Idempotent (several norm layers wired to one conv register one hook). ``conv``: any module
    whose first positional forward argument is the tensor to keep (an ``nn.Conv2d``: (N, C_in, H, W)).

    Raises:
        TypeError: ``conv`` is not an ``nn.Module``.
    """
    if not isinstance(conv, nn.Module):
        raise TypeError(f"capture_conv_input: expected an nn.Module, got {type(conv).__name__}")
    if _HOOK not in conv.__dict__:
        conv.__dict__[_HOOK] = conv.register_forward_pre_hook(_store_input)


def pop_conv_input(conv: nn.Module) -> Optional[torch.Tensor]:
    """Return and forget the input (N, C_in, H, W) of ``conv``'s last training-mode forward.

    None if the conv has not run in training mode since the last call, or has no capture.
    Forgetting it keeps the conv from holding an activation beyond the iteration.
    """
    return conv.__dict__.pop(_INPUT, None)


def has_conv_input(conv: nn.Module) -> bool:
    """True if ``conv`` currently holds a captured input (an activation kept alive)."""
    return conv.__dict__.get(_INPUT) is not None


def release_conv_input(conv: nn.Module) -> None:
    """Remove the capture hook of ``conv`` and drop any captured input (no-op without one)."""
    handle = conv.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()
    conv.__dict__.pop(_INPUT, None)
