"""What the two training tools (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``) share: the
config loading with one-line errors, the checks they run before any process starts (output folder,
norm names, datasets), the errors they print without a traceback, their command line and the CPU
set-up. docs/RELIABILITY.md, section 2, lists the checks."""
from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser

from ..checkpoint import IncompatibleCheckpointError, NormStateShapeError
from ..compat import argument_parser_actions
from ..config import ConfigValueError, add_smallbn_config, norm_keys, validate_smallbn_config, walk_config
from ..data import DatasetNotRegisteredError, DatasetsNotFoundError, SampleRegistrationError, check_datasets_exist
from ..layers import NormNotWiredError
from ..lazy import lazy_dataset_names, lazy_norm_fields

__all__ = ["OutputDirExistsError", "ConfigKeyError", "USER_ERRORS", "check_output_dir", "load_config",
           "check_norm_names", "check_lazy_config",
           "training_argument_parser", "setup_cpu"]


class OutputDirExistsError(FileExistsError):
    """An output folder or file holds what a tool would overwrite (:func:`check_output_dir`)."""


class ConfigKeyError(ConfigValueError):
    """A config file or override names a key the config does not have; the message names the key,
    the closest existing keys and the keys of its group."""


_NO_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")
_TYPE_MISMATCH = re.compile(r"Type mismatch .* vs\. (?P<value>.*?)\) for config key: (?P<key>\S+)$", re.S)
_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a float, written with a decimal point",
               str: "a string", tuple: "a tuple or list, e.g. \"('a', 'b')\"", list: "a list or tuple"}


def _unknown_key_error(cfg: CfgNode, key: str, where: str) -> ConfigKeyError:
    entries = {path: value for path, _, value in walk_config(cfg)}
    leaves = [path for path, value in entries.items() if not isinstance(value, CfgNode)]
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.8)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    group = key.rpartition(".")[0]
    while group and not isinstance(entries.get(group), CfgNode):  # the deepest existing group on the path
        group = group.rpartition(".")[0]
    shown = sorted((entries[group] if group else cfg).keys())
    listed = ", ".join(shown[:30]) + (", ..." if len(shown) > 30 else "")
    return ConfigKeyError(f"{key} ({where}) is not a config key.{hint} Keys of {group or 'the config'}: {listed}")


def _type_error(cfg: CfgNode, key: str, value: str, where: str) -> ConfigValueError:
    default = {path: v for path, _, v in walk_config(cfg)}.get(key)
    if isinstance(default, CfgNode):
        allowed = f"a group of keys ({', '.join(sorted(default.keys()))}): set one of them, e.g. {key}.KEY VALUE"
    else:
        words = _TYPE_WORDS.get(type(default), type(default).__name__)
        allowed = f"{words}, the type of its default {default!r} (a YACS key keeps its default's type)"
    return ConfigValueError(f"{key} = {value} ({where}) is invalid; allowed: {allowed}")


def _merge(cfg: CfgNode, merge, where: str) -> None:
    """Run ``merge()`` (a YACS merge into ``cfg``) with its key and type errors as one-line messages."""
    try:
        merge()
    except ConfigValueError:
        raise
    except (KeyError, AssertionError, ValueError) as e:
        text = str(e.args[0]) if e.args else str(e)
        unknown = _NO_KEY.search(text)
        if unknown:
            raise _unknown_key_error(cfg, unknown.group(1), where) from None
        mismatch = _TYPE_MISMATCH.search(text)
        if mismatch:
            raise _type_error(cfg, mismatch.group("key"), mismatch.group("value"), where) from None
        if "odd length" in text:
            raise ConfigValueError(f"overrides {where} are invalid; allowed: KEY VALUE pairs, e.g. "
                                   "SOLVER.MAX_ITER 100") from None
        raise ConfigValueError(f"{where}: {' '.join(text.split())}") from None


def load_config(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Detectron2's default config with smallbn_d2's keys, merged with a YAML file ("" for none) and
    ``KEY VALUE`` overrides as on the command line; unfrozen.

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ConfigKeyError: the file or an override names a key the config does not have.
        ConfigValueError: an invalid smallbn_d2 value, or a value of another type than the key's
            default (YACS keeps each key's type).
    """
    cfg = add_smallbn_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file {config_file!r} does not exist")
        _merge(cfg, lambda: cfg.merge_from_file(config_file), f"in {config_file}")
    _merge(cfg, lambda: cfg.merge_from_list(list(opts)), "on the command line")
    validate_smallbn_config(cfg)
    return cfg


def check_output_dir(output_dir: str, resume: bool = False, eval_only: bool = False,
                     allow_existing: bool = False, weights: str = "", files: Sequence[str] = (),
                     way_out: str = "--allow-existing-output-dir") -> None:
    """Refuse to write over what a user has in an output folder: the one output guard of the tools.
    Checks only; creates and writes nothing.

    * ``output_dir`` must be a folder or not exist yet, and every path a tool writes a file or nothing.
    * Named files (``files``, relative to ``output_dir``: a converted checkpoint, an exported model,
      the comparison table): refused if one exists, unless ``allow_existing``.
    * A run folder (``files`` empty): a new run in a non-empty folder is refused unless ``resume`` or
      ``allow_existing``; an ``eval_only`` run in a training run's folder (it holds ``last_checkpoint``)
      is refused for ``weights`` that are not that run's own checkpoints, unless ``allow_existing``.

    Args:
        way_out: the command-line option that sets ``allow_existing``, named in the message; "" if none.
    Raises:
        OutputDirExistsError (a ``FileExistsError``): one line naming the folder or files, what is
            there and the ways out.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirExistsError(f"Output directory {output_dir!r} is a file; allowed: a new or existing folder")
    option = f", or pass {way_out}" if way_out else ""
    if files:
        paths = [os.path.join(output_dir, f) for f in files]
        folders = [p for p in paths if os.path.isdir(p)]
        if folders:
            raise OutputDirExistsError(f"{', '.join(repr(p) for p in folders)}: a folder where a file is to be "
                                       "written; allowed: a new file. Choose another output")
        existing = [p for p in paths if os.path.exists(p)]
        if existing and not allow_existing:
            verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
            raise OutputDirExistsError(f"{', '.join(repr(p) for p in existing)} {verb}; refusing to overwrite {them}. "
                                       f"Choose another output{option}.")
        return
    if allow_existing or not os.path.isdir(output_dir):
        return
    content = sorted(os.listdir(output_dir))
    if eval_only:
        own = bool(weights) and os.path.abspath(weights).startswith(os.path.abspath(output_dir) + os.sep)
        if "last_checkpoint" in content and not own:
            raise OutputDirExistsError(
                f"Output directory {output_dir!r} holds a training run, and MODEL.WEIGHTS = {weights!r} is not one "
                "of its checkpoints: evaluating another model there would replace the run's config.yaml and mix "
                f"its results. Set OUTPUT_DIR to another folder{option}."
            )
        return
    if resume or not content:
        return
    shown = ", ".join(content[:6]) + (", ..." if len(content) > 6 else "")
    raise OutputDirExistsError(
        f"Output directory {output_dir!r} is not empty ({shown}). Refusing to start a new run that "
        f"would overwrite it. Use --resume to continue that run, choose another OUTPUT_DIR{option}"
        f"{' to write into it anyway' if way_out else ''}."
    )


def check_norm_names(cfg) -> None:
    """Check every norm name of a config before anything is built (Detectron2 reports an unknown
    name only when the layer is built, without the key): the keys called ``NORM`` of a YACS config
    (:func:`~smallbn_d2.config.norm_keys`), the ``norm``/``*_norm`` fields of a LazyConfig's model
    (:func:`lazy_norm_fields`).

    Raises:
        ConfigValueError: a name ``get_norm`` does not know; the message names the key, the value and
            every supported name.
    """
    from ..modeling import supported_norms

    allowed = supported_norms()
    fields = norm_keys(cfg) if isinstance(cfg, CfgNode) else lazy_norm_fields(cfg)
    for field, value in fields.items():
        if value and value not in allowed:
            raise ConfigValueError(
                f"{field} = {value!r} is invalid; allowed: {', '.join(repr(n) for n in allowed)}, or '' (no norm)")


def check_lazy_config(cfg, eval_only: bool = False) -> None:
    """What ``tools/lazyconfig_train_net.py`` checks before any process starts: :func:`check_norm_names`
    and that the datasets the run reads (:func:`lazy_dataset_names`) are registered and present.

    Raises:
        ConfigValueError, DatasetNotRegisteredError, DatasetsNotFoundError.
    """
    check_norm_names(cfg)
    check_datasets_exist(lazy_dataset_names(cfg, eval_only))


#: Errors caused by the user's input: the training tools print them as one line, without a traceback.
USER_ERRORS = (OutputDirExistsError, ConfigValueError, DatasetsNotFoundError, DatasetNotRegisteredError,
               NormNotWiredError, FileNotFoundError, NormStateShapeError, SampleRegistrationError,
               IncompatibleCheckpointError)


def training_argument_parser(output_dir_key: str = "OUTPUT_DIR", description: str = "",
                             examples: str = "", lazy: bool = False) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--allow-existing-output-dir`` (:func:`check_output_dir`),
    whose help names ``output_dir_key``; ``description`` and ``examples`` (default: Detectron2's) are shown
    first and last by ``--help``; ``lazy``: the overrides are LazyConfig ``key=value``, not YACS ``KEY VALUE``.
    """
    parser = default_argument_parser(epilog=examples or None)
    parser.description = description or None
    for action in argument_parser_actions(parser):  # the trailing overrides: say which form this tool takes
        if action.dest == "opts":
            action.help = ('LazyConfig overrides at the end of the command, "path.key=value" (e.g. train.max_iter=100 '
                           'smallbn.norms.CBN.window_size=4)' if lazy else
                           'config overrides at the end of the command, space-separated "KEY VALUE" pairs (e.g. '
                           'SOLVER.MAX_ITER 100 MODEL.CBN.WINDOW_SIZE 4)')
    parser.add_argument("--allow-existing-output-dir", action="store_true",
                        help=f"start a new run even if {output_dir_key} is not empty (files there may be overwritten)")
    return parser


def setup_cpu(device: str) -> None:
    """On a CPU device, flush subnormal floats to zero: subnormals (|x| < 1.2e-38), common in the
    gradients of models trained from scratch, are 10-100x slower on x86 CPUs. Other devices: nothing."""
    if str(device).startswith("cpu"):
        torch.set_flush_denormal(True)
