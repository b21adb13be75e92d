"""Warn, once per model, when MABN's weight centralization changes loaded weights. Torch only.

MABN centralizes the weight of the conv that feeds it (Yan et al., ICLR 2020, Sec. 4.2): weights
trained without it (standard ImageNet checkpoints) then make a different model. See
docs/CONVERT_NORM.md ("Pretrained weights and MABN").
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterable, List, Optional

from torch import nn

from .layers.weight_centralization import CentralizedConv, centralization_report

__all__ = ["check_loaded_weight_centralization", "DEFAULT_THRESHOLD", "DEFAULT_RANDOM_FACTOR"]

logger = logging.getLogger(__name__)

#: A conv counts as changed when centralization removes more than this fraction of its weight's norm ...
DEFAULT_THRESHOLD = 0.01
#: ... and more than this multiple of the level of i.i.d. zero-mean weights (``random_level``).
DEFAULT_RANDOM_FACTOR = 2.0

_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models given the warning
_informed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models given the info line


def check_loaded_weight_centralization(model: nn.Module, loaded_keys: Optional[Iterable[str]] = None,
                                       threshold: float = DEFAULT_THRESHOLD,
                                       random_factor: float = DEFAULT_RANDOM_FACTOR,
                                       top: int = 5) -> List[CentralizedConv]:
    """Report weight-centralized convs whose loaded weights centralization changes; log once per model.

    Call it right after weights were loaded into a model with MABN layers (the checkpointer does,
    and :func:`smallbn_d2.convert_norm` with ``"MABN"``). A centralized conv is *affected* when its
    ``relative_norm`` (norm of the removed per-output-channel means / the weight's norm,
    :class:`~smallbn_d2.layers.weight_centralization.CentralizedConv`) exceeds both ``threshold``
    and ``random_factor * random_level``; the second bound spares freshly initialized convs (about
    1 / sqrt(C_in * kh * kw)) and convs trained with centralization.

    Logs (logger ``smallbn_d2.pretrained``) once per model: a warning naming the ``top`` largest
    affected convs, or, if none is affected, one info line (not after a warning, so that checking a
    fresh conversion does not silence a later checkpoint's warning). Nothing for a model without
    centralized convs.

    Args:
        model: the model the weights were loaded into (unwrapped from DDP).
        loaded_keys: the state-dict keys loaded; when given, only convs whose ``<name>.weight`` is
            among them count (convs left at their initialization are never reported).
        threshold: fraction in [0, 1) of the weight norm (default 1 %).
        random_factor: multiple (>= 0) of ``random_level`` (default 2).
        top: how many affected convs the warning names (>= 1).
    Returns:
        the affected convs, largest relative norm first.
    Raises:
        ValueError: ``threshold``, ``random_factor`` or ``top`` out of range (the message names it).
    """
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold = {threshold!r} is invalid; allowed: a number in [0, 1)")
    if not (isinstance(random_factor, (int, float)) and random_factor >= 0):
        raise ValueError(f"random_factor = {random_factor!r} is invalid; allowed: a number >= 0")
    if not (isinstance(top, int) and top >= 1):
        raise ValueError(f"top = {top!r} is invalid; allowed: an integer >= 1")
    entries = centralization_report(model)
    if loaded_keys is not None:
        keys = set(loaded_keys)
        entries = [e for e in entries if f"{e.name}.weight" in keys]
    affected = sorted(
        (e for e in entries if e.relative_norm > threshold and e.relative_norm > random_factor * e.random_level),
        key=lambda e: -e.relative_norm,
    )
    if not entries or model in _warned:
        return affected
    if affected:
        _warned.add(model)
        largest = ", ".join(f"{e.name} {e.relative_norm:.1%} (random level {e.random_level:.1%})"
                            for e in affected[:top])
        scope = "loaded convs" if loaded_keys is not None else "convs"
        logger.warning(
            f"Weight centralization changes {len(affected)} of the {len(entries)} {scope} that feed MABN layers: "
            f"it removes their per-output-channel weight means, up to {affected[0].relative_norm:.1%} of "
            f"a weight's norm (largest: {largest}). These weights were not trained with weight centralization, "
            "so the model computes a different function than the one they were trained in, and fine-tuning "
            "starts from a damaged initialization. Remedy: load weights pretrained with weight centralization "
            "(an MABN backbone), or use MABN only where the convs start from random initialization, as the 1x "
            "MABN configs do (MABN in the FPN and heads, FrozenBN in the pretrained backbone)."
        )
    elif model not in _informed:
        _informed.add(model)
        worst = max(entries, key=lambda e: e.relative_norm)
        logger.info(
            f"Weight centralization: {len(entries)} convs feed MABN layers; centralization changes none beyond "
            f"{threshold:.1%} and {random_factor:g}x the level of random weights (largest: {worst.name} "
            f"{worst.relative_norm:.1%}, random level {worst.random_level:.1%})."
        )
    return affected
