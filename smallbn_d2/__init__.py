"""smallbn_d2: Cross-Iteration BN (CBN) and Moving Average BN (MABN) for Detectron2.

Two floors. The layers (:mod:`smallbn_d2.layers`) and :func:`convert_norm` (BN -> CBN/MABN in
any PyTorch model) need only torch: ``import smallbn_d2`` and ``import smallbn_d2.layers``
import nothing of Detectron2 and change nothing in it. The Detectron2 integration
(:mod:`smallbn_d2.modeling`) is imported on first use of one of its names
(``smallbn_d2.add_smallbn_config``, ``smallbn_d2.build_model``, ...; module ``__getattr__``) or of
``smallbn_d2.engine`` / ``smallbn_d2.lazy``; its one side effect: Detectron2's ``get_norm``
learns ``NORM: "CBN"``, ``"NaiveCBN"`` and ``"MABN"`` (:mod:`smallbn_d2.modeling.norms`, the
single place where smallbn_d2 extends Detectron2).

Build models with :func:`smallbn_d2.build_model` (the config's hyperparameters in force while
Detectron2 builds the model, then each layer wired to its producing conv) and train with
:class:`smallbn_d2.engine.Trainer`, whose hook tells the layers the trainer iteration.
"""
import importlib
import importlib.util

from .families import NormFamily
from .layers import (
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    NormNotWiredError,
)
from .to_cross_iteration import convert_norm

__version__ = "0.1.0"

#: The Detectron2 integration's names, imported from their module on first use.
_INTEGRATION = {
    "add_smallbn_config": ".config",
    "validate_smallbn_config": ".config",
    "resolve_burn_in": ".config",
    "ConfigValueError": ".config",
    "MissingConfigError": ".config",
    "build_model": ".modeling",
    "norm_hyperparameters": ".modeling",
    "prepare_norms": ".modeling",
    "register_norm": ".modeling",
    "set_norm_iteration": ".modeling",
    "supported_norms": ".modeling",
    "convert_to_frozen_bn": ".deploy",
}

__all__ = [
    "add_smallbn_config",
    "validate_smallbn_config",
    "resolve_burn_in",
    "ConfigValueError",
    "MissingConfigError",
    "CrossIterationBatchNorm2d",
    "NaiveCrossIterationBatchNorm2d",
    "MovingAverageBatchNorm2d",
    "NormNotWiredError",
    "NormFamily",
    "build_model",
    "norm_hyperparameters",
    "prepare_norms",
    "register_norm",
    "set_norm_iteration",
    "supported_norms",
    "convert_to_frozen_bn",
    "convert_norm",
]


def __getattr__(name: str):
    """The integration's names (PEP 562): imported from their module (which imports Detectron2)
    on first access; a subpackage (``smallbn_d2.engine``, ...) likewise.

    Raises:
        AttributeError: neither an integration name nor a submodule of smallbn_d2.
    """
    if name in _INTEGRATION:
        value = getattr(importlib.import_module(_INTEGRATION[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
