"""Detectron2 integration of the layers: norm families, the ``get_norm`` extension, model wiring."""
from .families import NORM_FAMILIES, NormFamily
from .norms import detectron2_norm_names, get_norm, head_types, norm_hyperparameters, register_norm, supported_norms
from .wiring import build_model, iteration_norms, prepare_norms, set_norm_iteration
