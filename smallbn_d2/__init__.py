"""smallbn_d2: Cross-Iteration BN (CBN) and Moving Average BN (MABN) for Detectron2.

``import smallbn_d2`` loads the torch-only floor (the layers, :func:`convert_norm`) and imports no
Detectron2. The integration's names (``build_model``, ``add_smallbn_config``, ...) and the
subpackages ``engine``, ``lazy``, ``deploy`` are imported on first access (PEP 562 ``__getattr__``);
importing ``smallbn_d2.modeling`` extends Detectron2's ``get_norm``. See docs/ARCHITECTURE.md.
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

#: The Detectron2 integration's names -> their module, imported on first use.
_INTEGRATION = {
    **dict.fromkeys(["add_smallbn_config", "validate_smallbn_config", "resolve_burn_in", "ConfigValueError",
                     "MissingConfigError"], ".config"),
    **dict.fromkeys(["build_model", "norm_hyperparameters", "prepare_norms", "register_norm", "set_norm_iteration",
                     "supported_norms"], ".modeling"),
    "convert_to_frozen_bn": ".deploy",
}

__all__ = ["CrossIterationBatchNorm2d", "NaiveCrossIterationBatchNorm2d", "MovingAverageBatchNorm2d",
           "NormNotWiredError", "NormFamily", "convert_norm", *_INTEGRATION]


def __getattr__(name: str):
    """An integration name or a subpackage (``smallbn_d2.engine``, ...), imported on first access.

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
