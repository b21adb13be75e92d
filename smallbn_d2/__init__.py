"""smallbn_d2: Cross-Iteration BN (CBN) and Moving Average BN (MABN) for Detectron2.

``import smallbn_d2`` makes ``NORM: "CBN"``, ``"NaiveCBN"`` and ``"MABN"`` usable in any
Detectron2 config. Its one side effect: Detectron2's ``get_norm`` learns these names
(:mod:`smallbn_d2.modeling.norms`, the single place where smallbn_d2 extends Detectron2).

Build models with :func:`smallbn_d2.build_model` (the config's hyperparameters in force while
Detectron2 builds the model, then each layer wired to its producing conv) and train with
:class:`smallbn_d2.engine.Trainer`, whose hook tells the layers the trainer iteration.
"""
from .config import (
    ConfigValueError,
    MissingConfigError,
    add_smallbn_config,
    resolve_burn_in,
    validate_smallbn_config,
)
from .layers import (
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    NormNotWiredError,
)
from .modeling import (
    NormFamily,
    build_model,
    norm_hyperparameters,
    prepare_norms,
    register_norm,
    set_norm_iteration,
    supported_norms,
)
from .modeling import norms as _norms
from .deploy import convert_to_frozen_bn
from .to_cross_iteration import convert_norm

_norms.install()

__version__ = "0.1.0"
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
