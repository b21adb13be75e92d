"""Trainer set-up helpers in Detectron2's style: config creation, the output-dir guard and what
the two training tools (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``) share: their
command line, the errors they report without a traceback and the CPU set-up."""
from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser

from ..checkpoint import IncompatibleCheckpointError, NormStateShapeError
from ..compat import argument_parser_actions
from ..config import ConfigValueError, add_smallbn_config, validate_smallbn_config
from ..data import DatasetNotRegisteredError, DatasetsNotFoundError, SampleRegistrationError, check_datasets_exist
from ..layers import NormNotWiredError

__all__ = ["OutputDirExistsError", "ConfigKeyError", "USER_ERRORS", "check_output_dir", "load_config",
           "check_lazy_config", "lazy_norm_fields", "lazy_dataset_names", "training_argument_parser", "setup_cpu"]


class OutputDirExistsError(FileExistsError):
    """An output folder or file holds what a tool would overwrite (:func:`check_output_dir`)."""


class ConfigKeyError(ConfigValueError):
    """A config file or override names a key the config does not have (e.g. a misspelt one); the
    message names the key, the closest existing keys and the keys of its group."""


_NO_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")
_TYPE_MISMATCH = re.compile(r"Type mismatch .* vs\. (?P<value>.*?)\) for config key: (?P<key>\S+)$", re.S)
_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a float, written with a decimal point",
               str: "a string", tuple: "a tuple or list, e.g. \"('a', 'b')\"", list: "a list or tuple"}


def _all_keys(cfg: CfgNode, prefix: str = "") -> Iterator[str]:
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            yield from _all_keys(value, prefix + key + ".")
        else:
            yield prefix + key


def _lookup(cfg: CfgNode, dotted: str) -> Tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _unknown_key_error(cfg: CfgNode, key: str, where: str) -> ConfigKeyError:
    """The message for ``key`` missing from ``cfg``: close matches (difflib) and the keys of the
    deepest existing group on its path."""
    keys = list(_all_keys(cfg))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    parts = key.split(".")
    group, node = "", cfg
    for part in parts[:-1]:
        if isinstance(node.get(part), CfgNode):
            group, node = group + part + ".", node[part]
        else:
            break
    shown = sorted(node.keys())
    listed = ", ".join(shown[:30]) + (", ..." if len(shown) > 30 else "")
    return ConfigKeyError(f"{key} ({where}) is not a config key.{hint} Keys of {group.rstrip('.') or 'the config'}: "
                          f"{listed}")


def _type_error(cfg: CfgNode, key: str, value: str, where: str) -> ConfigValueError:
    found, default = _lookup(cfg, key)
    if found and isinstance(default, CfgNode):
        allowed = f"a group of keys ({', '.join(sorted(default.keys()))}): set one of them, e.g. {key}.KEY VALUE"
    else:
        words = _TYPE_WORDS.get(type(default), type(default).__name__)
        allowed = f"{words}, the type of its default {default!r} (a YACS key keeps its default's type)"
    return ConfigValueError(f"{key} = {value} ({where}) is invalid; allowed: {allowed}")


def _merge(cfg: CfgNode, merge, where: str) -> None:
    """Run ``merge()`` (a YACS merge into ``cfg``) with its key and type errors as one-line
    :class:`ConfigKeyError` / :class:`ConfigValueError` messages."""
    try:
        merge()
    except (KeyError, AssertionError, ValueError) as e:
        if isinstance(e, ConfigValueError):
            raise
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
    """Detectron2's default config + smallbn_d2's keys, merged with a YAML file and overrides.

    Args:
        config_file: path of a YAML config ("" for none).
        opts: ``KEY VALUE`` overrides, as on the command line.
    Returns:
        an unfrozen ``CfgNode``.
    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ConfigKeyError: the file or an override names a key the config does not have (the message
            names it, the closest existing keys and the keys of its group).
        ConfigValueError: an invalid smallbn_d2 value, or a value of another type than the key's
            default (YACS keeps each key's type; the message names the key and the type).
    """
    cfg = get_cfg()
    add_smallbn_config(cfg)
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
    """Refuse to write over what a user has in an output folder: the one output guard of the
    tools (``train_net``, ``lazyconfig_train_net``, ``convert_for_inference``, ``export_model``,
    ``compare_runs``). Checks only; creates and writes nothing.

    Rules, by what the tool writes:

    * Always: ``output_dir`` must be a folder or not exist yet (a file there is refused, even with
      ``allow_existing``), and so must every path a tool writes be a file or not exist.
    * Named files (``files`` given: a converted checkpoint and its YAML, an exported model, the
      comparison table and plots): refused if any of them exists in ``output_dir``, unless
      ``allow_existing``; the folder's other content is never touched, so it does not matter.
    * A run folder (``files`` empty: training writes ``last_checkpoint``, ``metrics.json``,
      checkpoints, ``config.yaml``): a new run in a non-empty folder is refused unless ``resume``
      (continue the run there) or ``allow_existing``. An evaluation (``eval_only``) in the folder
      of a training run (it holds ``last_checkpoint``) would replace its ``config.yaml`` and add to
      its inference results: allowed for that run's own checkpoints (``weights`` inside
      ``output_dir``), refused for another model (e.g. a converted one) unless ``allow_existing``.

    Args:
        output_dir: the output folder.
        resume: the run continues the one in ``output_dir`` (run folders only).
        eval_only: the run only evaluates ``weights`` (run folders only).
        allow_existing: write anyway (what ``way_out`` sets on the command line).
        weights: the checkpoint an ``eval_only`` run evaluates.
        files: the names (relative to ``output_dir``) of the files the tool writes, if it writes
            only these.
        way_out: the command-line option that sets ``allow_existing``, named in the message
            (``"--overwrite"`` for the tools that write named files); ``""`` if the tool has none.
    Raises:
        OutputDirExistsError (a ``FileExistsError``): one line naming the folder or files, what
            is there and the ways out.
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


def _lazy_tree(node: Any) -> Any:
    """A LazyConfig node as plain containers (interpolations resolved where they can be)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that cannot resolve yet: read the raw values
        return OmegaConf.to_container(node, resolve=False)


def _walk(node: Any, path: str) -> Iterator[Tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every entry of a plain nested dict/list."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub, str(key), value
            yield from _walk(value, sub)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}.{i}")


def lazy_norm_fields(cfg) -> Dict[str, str]:
    """The norm names a LazyConfig's model asks ``get_norm`` for.

    Args:
        cfg: a loaded LazyConfig (its ``model`` field is read).
    Returns:
        ``{dotted field: name}`` for every string field called ``norm`` or ``*_norm`` in the model
        tree (``model.backbone.norm``, ``model.roi_heads.box_head.conv_norm``, ...); callables
        and other values are left out.
    """
    model = cfg.get("model", None) if hasattr(cfg, "get") else None
    tree = _lazy_tree(model)
    return {path: value for path, key, value in _walk(tree, "model")
            if (key == "norm" or key.endswith("_norm")) and isinstance(value, str)}


def lazy_dataset_names(cfg, eval_only: bool = False) -> List[str]:
    """The dataset names a LazyConfig run reads: the ``names`` fields (a name or a list of names,
    as ``detectron2.data.get_detection_dataset_dicts`` takes them) under ``dataloader.train``
    (unless ``eval_only``) and under ``dataloader.test`` (when ``dataloader.evaluator`` is set:
    without an evaluator nothing is evaluated). Order kept, duplicates left out."""
    loader = cfg.get("dataloader", None) if hasattr(cfg, "get") else None
    if loader is None:
        return []
    parts = [] if eval_only else ["train"]
    if loader.get("evaluator", None) is not None:
        parts.append("test")
    names: List[str] = []
    for part in parts:
        for _, key, value in _walk(_lazy_tree(loader.get(part, None)), f"dataloader.{part}"):
            if key == "names":
                for name in [value] if isinstance(value, str) else list(value or []):
                    if isinstance(name, str) and name not in names:
                        names.append(name)
    return names


def check_lazy_config(cfg, eval_only: bool = False) -> None:
    """What ``tools/lazyconfig_train_net.py`` checks before any process starts or writes: the
    LazyConfig counterpart of ``tools/train_net.py``'s norm-name and dataset checks.

    Args:
        cfg: a loaded LazyConfig (overrides applied).
        eval_only: only the test datasets are read.
    Raises:
        ConfigValueError: a norm field (:func:`lazy_norm_fields`) holds a name ``get_norm`` does
            not know; the message names the field, the value and every supported name.
        DatasetNotRegisteredError: a dataset (:func:`lazy_dataset_names`) is not registered.
        DatasetsNotFoundError: a dataset's annotation file or image folder is missing.
    """
    from ..modeling import supported_norms

    allowed = supported_norms()
    for field, value in lazy_norm_fields(cfg).items():
        if value and value not in allowed:
            raise ConfigValueError(
                f"{field} = {value!r} is invalid; allowed: {', '.join(repr(n) for n in allowed)}, or '' (no norm)")
    check_datasets_exist(lazy_dataset_names(cfg, eval_only))


#: Errors caused by the user's input (config values, norm wiring, datasets, output dir, checkpoint
#: shapes, missing files): the training tools print them as one line, without a traceback.
USER_ERRORS = (OutputDirExistsError, ConfigValueError, DatasetsNotFoundError, DatasetNotRegisteredError,
               NormNotWiredError, FileNotFoundError, NormStateShapeError, SampleRegistrationError,
               IncompatibleCheckpointError)


def training_argument_parser(output_dir_key: str = "OUTPUT_DIR", description: str = "",
                             examples: str = "", lazy: bool = False) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--allow-existing-output-dir`` (see
    :func:`check_output_dir`).

    Args:
        output_dir_key: the output folder's config key, named in the help (``OUTPUT_DIR``, or
            ``train.output_dir`` for LazyConfigs).
        description: what the tool does, shown first by ``--help``.
        examples: example command lines shown last by ``--help`` (default: Detectron2's, which
            use YACS overrides).
        lazy: the tool reads LazyConfigs (overrides ``key=value``), not YACS configs (``KEY VALUE``).
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
    """On a CPU device (``"cpu"``, ``"cpu:0"``): flush subnormal floats to zero. Subnormals
    (|x| < 1.2e-38), common in gradients of models trained from scratch, are 10-100x slower on x86
    CPUs; flushing them changes no result that matters. Other devices: nothing."""
    if str(device).startswith("cpu"):
        torch.set_flush_denormal(True)
