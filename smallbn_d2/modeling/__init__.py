"""Detectron2 integration of the layers: the ``get_norm`` extension, placement and model wiring.

Importing it extends Detectron2 once (:func:`~smallbn_d2.modeling.norms.install`); ``import
smallbn_d2.layers`` does not. See docs/ARCHITECTURE.md.
"""
from ..families import NORM_FAMILIES, NormFamily
from . import norms as _norms
from .norms import (detectron2_norm_names, get_norm, head_types, norm_hyperparameters, place_norms, register_norm,
                    supported_norms)
from .wiring import build_model, iteration_norms, prepare_norms, set_norm_iteration

_norms.install()
