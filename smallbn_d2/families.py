"""The norm families of smallbn_d2: each norm name described once (:class:`NormFamily`).

:data:`NORM_FAMILIES` holds the registered families by name; :mod:`smallbn_d2.modeling.norms`
serves them through Detectron2's ``get_norm``, and every list of smallbn_d2's norm names is read
from here. Torch only. See docs/ARCHITECTURE.md ("Norm names").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Type

from .layers import (
    CrossIterationBatchNorm2d,
    IterationNormBase,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
)

__all__ = ["NormFamily", "NORM_FAMILIES", "family_of", "burn_in_from_config"]


def _no_extra(section: Mapping[str, Any], in_head: bool) -> Dict[str, Any]:
    return {}


@dataclass(frozen=True)
class NormFamily:
    """One norm name of smallbn_d2 and what the integration needs to know about it.

    Attributes:
        name: the ``NORM`` value in configs, e.g. ``"CBN"``.
        layer_class: the layer, a subclass of ``IterationNormBase``; called as
            ``layer_class(out_channels, **kwargs)``.
        config_section: the config node under ``cfg.MODEL`` that holds the hyperparameters
            (``"CBN"`` -> ``cfg.MODEL.CBN``), or None if the layer has no config keys.
        config_keys: config key in that section -> constructor argument, for the keys that map
            one to one (their range checks are the layer's ``HYPERPARAMETERS``).
        extra_kwargs: ``(section, in_head) -> kwargs`` for arguments derived from several keys
            or from where the layer sits (``in_head``: inside a box, mask or RetinaNet head).
        needs_producing_conv: the layer must directly follow an ``nn.Conv2d`` (the wiring
            attaches it and refuses a layer without one).
        per_level_in_retinanet: RetinaNet's head (one head shared by all FPN levels) gets one
            layer per level with a shared affine (Detectron2's ``CycleBatchNormList``, "Rethinking
            Batch in BatchNorm" Sec. 5.2), as Detectron2 does for "BN".
    """

    name: str
    layer_class: Type[IterationNormBase]
    config_section: Optional[str] = None
    config_keys: Mapping[str, str] = field(default_factory=dict)
    extra_kwargs: Callable[[Mapping[str, Any], bool], Dict[str, Any]] = _no_extra
    needs_producing_conv: bool = True
    per_level_in_retinanet: bool = True

    def layer_kwargs(self, section: Optional[Mapping[str, Any]], in_head: bool = False) -> Dict[str, Any]:
        """``{constructor argument: value}`` from ``cfg.MODEL.<config_section>`` (a ``CfgNode`` or a
        dict with its keys; None: the layer's defaults, ``{}``), for a layer inside a box, mask or
        RetinaNet head if ``in_head``. The layer's constructor checks the values."""
        if section is None:
            return {}
        kwargs = {arg: section[key] for key, arg in self.config_keys.items()}
        kwargs.update(self.extra_kwargs(section, in_head))
        return kwargs


def burn_in_from_config(section: Mapping[str, Any]) -> Optional[int]:
    """CBN's burn-in in iterations from ``MODEL.CBN``: ``BURN_IN_ITERS`` if set, 0 for 0 epochs,
    else None (epochs, converted where the training set size is known:
    :func:`smallbn_d2.config.resolve_burn_in`)."""
    if section["BURN_IN_ITERS"] is not None:
        return section["BURN_IN_ITERS"]
    return 0 if section["BURN_IN_EPOCHS"] == 0 else None


def _cbn_extra(section: Mapping[str, Any], in_head: bool) -> Dict[str, Any]:
    return {"burn_in": burn_in_from_config(section)}


def _mabn_extra(section: Mapping[str, Any], in_head: bool) -> Dict[str, Any]:
    # MABN paper, Appendix B.3 (COCO): the heads use the current batch statistics for longer
    if in_head:
        return {"warmup_iters": max(section["WARMUP_ITERS"], section["HEAD_WARMUP_ITERS"])}
    return {}


_CBN_KEYS = {"WINDOW_SIZE": "window_size", "MOMENTUM": "momentum", "EPS": "eps", "AGGREGATION": "aggregation",
             "WINDOW_AFTER_BURN_IN": "window_after_burn_in", "COMPENSATE_BIAS": "compensate_bias"}

#: The registered families by name (smallbn_d2's own three; ``register_norm`` adds more).
NORM_FAMILIES: Dict[str, NormFamily] = {
    f.name: f
    for f in (
        NormFamily("CBN", CrossIterationBatchNorm2d, "CBN", {**_CBN_KEYS, "GRAD_SUBSAMPLE": "grad_subsample"},
                   _cbn_extra),
        NormFamily("NaiveCBN", NaiveCrossIterationBatchNorm2d, "CBN", _CBN_KEYS, _cbn_extra),
        NormFamily("MABN", MovingAverageBatchNorm2d, "MABN",
                   {"BUFFER_SIZE": "buffer_size", "MOMENTUM": "momentum", "EPS": "eps", "WARMUP_ITERS": "warmup_iters",
                    "RENORM_WARMUP_ITERS": "renorm_warmup_iters", "R_MAX": "r_max"},
                   _mabn_extra),
    )
}


def family_of(layer_class: type) -> Optional[NormFamily]:
    """The registered family whose ``layer_class`` is exactly ``layer_class``, or None."""
    return next((f for f in NORM_FAMILIES.values() if f.layer_class is layer_class), None)
