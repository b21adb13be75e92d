"""Trainer set-up helpers in Detectron2's style: config creation, the output-dir guard and what
the two training tools (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``) share: their
command line, the errors they report without a traceback and the CPU set-up."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser

from ..checkpoint import NormStateShapeError
from ..config import ConfigValueError, add_smallbn_config, validate_smallbn_config
from ..data import DatasetsNotFoundError, SampleRegistrationError
from ..layers import NormNotWiredError

__all__ = ["OutputDirExistsError", "USER_ERRORS", "check_output_dir", "load_config", "training_argument_parser",
           "setup_cpu"]


class OutputDirExistsError(FileExistsError):
    """A new training run was pointed at a non-empty output directory."""


def load_config(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Detectron2's default config + smallbn_d2's keys, merged with a YAML file and overrides.

    Args:
        config_file: path of a YAML config ("" for none).
        opts: ``KEY VALUE`` overrides, as on the command line.
    Returns:
        an unfrozen ``CfgNode``.
    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ConfigValueError: an invalid smallbn_d2 value.
        KeyError: an unknown key (Detectron2's message).
    """
    cfg = get_cfg()
    add_smallbn_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file {config_file!r} does not exist")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    validate_smallbn_config(cfg)
    return cfg


def check_output_dir(output_dir: str, resume: bool = False, eval_only: bool = False,
                     allow_existing: bool = False, weights: str = "") -> None:
    """Refuse to write into another run's output directory.

    * A new training run in a non-empty directory would overwrite ``last_checkpoint``,
      ``metrics.json`` and the checkpoints of the run already there: refused unless ``resume``
      (continue that run) or ``allow_existing``.
    * An evaluation (``eval_only``) in the directory of a training run (it holds
      ``last_checkpoint``) would replace its ``config.yaml`` and add to its inference results:
      allowed for that run's own checkpoints (``weights`` inside ``output_dir``), refused for
      another model (e.g. a converted one) unless ``allow_existing``.

    Raises:
        OutputDirExistsError: naming the directory, what it holds and the ways out.
    """
    if allow_existing or not os.path.isdir(output_dir):
        return
    content = sorted(os.listdir(output_dir))
    if eval_only:
        own = bool(weights) and os.path.abspath(weights).startswith(os.path.abspath(output_dir) + os.sep)
        if "last_checkpoint" in content and not own:
            raise OutputDirExistsError(
                f"Output directory {output_dir!r} holds a training run, and MODEL.WEIGHTS = {weights!r} is not one "
                "of its checkpoints: evaluating another model there would replace the run's config.yaml and mix "
                "its results. Set OUTPUT_DIR to another folder, or pass --allow-existing-output-dir."
            )
        return
    if resume or not content:
        return
    shown = ", ".join(content[:6]) + (", ..." if len(content) > 6 else "")
    raise OutputDirExistsError(
        f"Output directory {output_dir!r} is not empty ({shown}). Refusing to start a new run that "
        "would overwrite it. Use --resume to continue that run, choose another OUTPUT_DIR, or pass "
        "--allow-existing-output-dir to write into it anyway."
    )


#: Errors caused by the user's input (config values, norm wiring, datasets, output dir, checkpoint
#: shapes, missing files): the training tools print them as one line, without a traceback.
USER_ERRORS = (OutputDirExistsError, ConfigValueError, DatasetsNotFoundError, NormNotWiredError, FileNotFoundError,
               NormStateShapeError, SampleRegistrationError)


def training_argument_parser(output_dir_key: str = "OUTPUT_DIR") -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--allow-existing-output-dir`` (see
    :func:`check_output_dir`); ``output_dir_key`` names the output folder in its help
    (``OUTPUT_DIR``, or ``train.output_dir`` for LazyConfigs)."""
    parser = default_argument_parser()
    parser.add_argument("--allow-existing-output-dir", action="store_true",
                        help=f"start a new run even if {output_dir_key} is not empty (files there may be overwritten)")
    return parser


def setup_cpu(device: str) -> None:
    """On a CPU device (``"cpu"``, ``"cpu:0"``): flush subnormal floats to zero. Subnormals
    (|x| < 1.2e-38), common in gradients of models trained from scratch, are 10-100x slower on x86
    CPUs; flushing them changes no result that matters. Other devices: nothing."""
    if str(device).startswith("cpu"):
        torch.set_flush_denormal(True)
