"""Detectron2 integration of the layers: norm names and model wiring."""
from .norms import DETECTRON2_NORMS, NORM_REGISTRY, get_norm, register_norm, supported_norms
from .wiring import (
    HEAD_TYPES,
    build_model,
    cbn_burn_in_iters,
    iteration_norms,
    prepare_norms,
    set_norm_iteration,
)
