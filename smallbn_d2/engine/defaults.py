"""Trainer set-up helpers in Detectron2's style: config creation and the output-dir guard."""
from __future__ import annotations

import os
from typing import Sequence

from detectron2.config import CfgNode, get_cfg

from ..config import add_smallbn_config, validate_smallbn_config

__all__ = ["OutputDirExistsError", "check_output_dir", "load_config"]


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
                     allow_existing: bool = False) -> None:
    """Refuse to start a new training run in a non-empty output directory.

    A new run would overwrite ``last_checkpoint``, ``metrics.json`` and the checkpoints of the
    run already there. Allowed: an empty or missing directory, ``--resume`` (continue that run),
    ``--eval-only`` (adds evaluation results), or ``allow_existing`` (explicit flag).

    Raises:
        OutputDirExistsError: naming the directory, what it holds and the ways out.
    """
    if resume or eval_only or allow_existing or not os.path.isdir(output_dir):
        return
    content = sorted(os.listdir(output_dir))
    if content:
        shown = ", ".join(content[:6]) + (", ..." if len(content) > 6 else "")
        raise OutputDirExistsError(
            f"Output directory {output_dir!r} is not empty ({shown}). Refusing to start a new run that "
            "would overwrite it. Use --resume to continue that run, choose another OUTPUT_DIR, or pass "
            "--allow-existing-output-dir to write into it anyway."
        )
