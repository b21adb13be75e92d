"""Loaded weights and MABN's weight centralization: detect, once per model, weights that change.

MABN centralizes the weight of the conv that feeds it (Yan et al., ICLR 2020, Sec. 4.2;
METHODS.md MABN item 2): the conv computes with ``W[c] - mean(W[c])`` per output channel. Weights
trained that way lose nothing. Weights trained *without* it (the standard ImageNet checkpoints,
any BN / FrozenBN model) have per-channel means that the network uses, so once they are loaded
into convs that feed MABN layers the model silently computes another function; fine-tuning
then starts from a damaged initialization. The MABN authors' remedy is weights pretrained with
weight centralization; smallbn_d2's 1x configs use MABN only in the FPN and the heads, whose
convs start from random initialization and are not affected.

:func:`check_loaded_weight_centralization` measures it with
:func:`smallbn_d2.layers.weight_centralization.centralization_report` and logs the result once
per model: a warning naming the affected convs when there are any, one info line otherwise.
Torch only.
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


def check_loaded_weight_centralization(
    model: nn.Module,
    loaded_keys: Optional[Iterable[str]] = None,
    threshold: float = DEFAULT_THRESHOLD,
    random_factor: float = DEFAULT_RANDOM_FACTOR,
    top: int = 5,
) -> List[CentralizedConv]:
    """Report weight-centralized convs whose loaded weights centralization changes; log once per model.

    Call it right after weights were loaded into a model with MABN layers (the checkpointer's
    load, or :func:`smallbn_d2.convert_norm` with ``"MABN"``). A centralized conv is *affected*
    when its ``relative_norm`` (the norm of the removed per-output-channel means relative to the
    weight's norm, :class:`~smallbn_d2.layers.weight_centralization.CentralizedConv`) exceeds both
    ``threshold`` and ``random_factor * random_level``. The second bound keeps freshly initialized
    convs (relative norm about 1 / sqrt(C_in * kh * kw), e.g. 2 % for a 3x3 conv over 256
    channels) and convs trained with centralization (whose raw weights keep their
    initialization's per-channel means) from being reported.

    Logging (logger ``smallbn_d2.pretrained``), once per model: the first call that finds affected
    convs logs a warning with their number, the largest ``top`` of them with their relative norms,
    and what it means; later calls for that model log nothing. A call that finds none logs one
    info line with the largest relative norm, once per model and not after the warning (so that
    checking a freshly converted model does not silence the warning of a later checkpoint
    load). Nothing is logged for a model without centralized convs.

    Args:
        model: the model the weights were loaded into (unwrapped from DDP).
        loaded_keys: state-dict keys that were loaded (e.g. the checkpoint's ``model`` keys); when
            given, only convs whose ``<name>.weight`` is among them are considered, so convs left
            at their initialization are never reported. None: consider all centralized convs.
        threshold: fraction in [0, 1) of the weight norm, default :data:`DEFAULT_THRESHOLD` (1 %).
        random_factor: multiple (>= 0) of ``random_level``, default :data:`DEFAULT_RANDOM_FACTOR`.
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
