"""Detectron2 engine integration: trainer, hooks and set-up helpers (docs/TRAINING.md)."""
from .defaults import (USER_ERRORS, OutputDirExistsError, check_norm_names, check_output_dir, load_config, setup_cpu,
                       training_argument_parser)
from .freeze import freeze_norm_statistics
from .hooks import (AveragePopulationStatistics, FreezeNormStatsHook, NormIterationHook, PeakMemoryHook, PreciseNorm,
                    average_population_statistics)
from .launch import launch
from .precise_norm import update_norm_stats
from .trainer import Trainer, training_set_size
