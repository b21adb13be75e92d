"""Detectron2 integration of the layers: the ``get_norm`` extension, placement and model wiring.

Importing this package (``add_smallbn_config``, ``smallbn_d2.build_model``, the Trainer and
``smallbn_d2.lazy`` do) extends Detectron2 once: :func:`~smallbn_d2.modeling.norms.install`
teaches its ``get_norm`` smallbn_d2's names and gives their layers BN's treatment
(:mod:`smallbn_d2.modeling.parity`). ``import smallbn_d2.layers`` does not import it.
"""
from ..families import NORM_FAMILIES, NormFamily
from . import norms as _norms
from .norms import (detectron2_norm_names, get_norm, head_types, norm_hyperparameters, place_norms, register_norm,
                    supported_norms)
from .wiring import build_model, iteration_norms, prepare_norms, set_norm_iteration

_norms.install()
