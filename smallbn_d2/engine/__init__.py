"""Detectron2 engine integration: trainer, hooks and set-up helpers."""
from .defaults import OutputDirExistsError, check_output_dir, load_config
from .hooks import NormIterationHook
from .trainer import Trainer
