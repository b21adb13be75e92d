"""smallbn_d2: Cross-Iteration BN (CBN) and Moving Average BN (MABN) for Detectron2.

``import smallbn_d2`` is all it takes to use ``NORM: "CBN"``, ``"NaiveCBN"`` or ``"MABN"`` in a
Detectron2 config. On import it

1. applies the Detectron2 v0.6 compatibility fixes (:mod:`smallbn_d2.compat`);
2. sets the default datasets root (:mod:`smallbn_d2.data.paths`) before Detectron2's builtin
   datasets are registered;
3. registers the norm names in Detectron2's ``get_norm`` (:mod:`smallbn_d2.modeling.norms`).

Build models with :func:`smallbn_d2.build_model` (or call :func:`prepare_norms` on a model built
by Detectron2) and train with :class:`smallbn_d2.engine.Trainer`, whose hook tells the layers the
trainer iteration.
"""
from . import compat as _compat

_compat.install()

from .data.paths import apply_default_datasets_root as _apply_default_datasets_root  # noqa: E402

_apply_default_datasets_root()

from .config import ConfigValueError, add_smallbn_config, validate_smallbn_config  # noqa: E402
from .layers import (  # noqa: E402
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    NormNotWiredError,
)
from .modeling import (  # noqa: E402
    build_model,
    prepare_norms,
    register_norm,
    set_norm_iteration,
    supported_norms,
)
from .modeling import norms as _norms  # noqa: E402
from .deploy import convert_to_frozen_bn  # noqa: E402

_norms.install()
_compat.fix_retinanet_norm_probe()  # after the datasets root: it imports detectron2.modeling
if "CBN" not in _norms.NORM_REGISTRY:
    register_norm("CBN", CrossIterationBatchNorm2d)
    register_norm("NaiveCBN", NaiveCrossIterationBatchNorm2d)
    register_norm("MABN", MovingAverageBatchNorm2d)

__version__ = "0.1.0"
__all__ = [
    "add_smallbn_config",
    "validate_smallbn_config",
    "ConfigValueError",
    "CrossIterationBatchNorm2d",
    "NaiveCrossIterationBatchNorm2d",
    "MovingAverageBatchNorm2d",
    "NormNotWiredError",
    "build_model",
    "prepare_norms",
    "register_norm",
    "set_norm_iteration",
    "supported_norms",
    "convert_to_frozen_bn",
]
