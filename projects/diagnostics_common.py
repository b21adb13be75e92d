"""What the statistics diagnostics of projects/ (CBNStatistics, MABNStatistics) share.

Both train a small Detectron2 detector with plain BN (in backbone, FPN and heads) by SGD,
record per-channel statistics of chosen layers at every iteration, and compare estimates with a
reference at *probe iterations*. This module holds the parts that do not depend on the method:
the BN config and the seeded training loader, the model/optimizer/scheduler set-up, buffer
snapshots (so that a probe leaves BN's running statistics as they were), the relative error,
progress logging, the command line common to both scripts (``--config-file``, ``--dataset``,
``--layers``, ``--iters``, ``--lr``, ``--seed``, ``--output-dir``, ``--overwrite``, ``KEY VALUE``
overrides) and the run-and-write entry point with the output-directory guard.

Data: by default the COCO 2017 sample shipped with smallbn_d2 (``coco_2017_sample_train``, 24
images, registered here), so that the scripts run on a clone; ``--dataset coco_2017_train`` (or
any registered name) trains on Detectron2's builtin COCO under ``$DETECTRON2_DATASETS``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_DATASET", "build_bn_config", "train_loader", "setup_training", "preserved_buffers",
           "relative_error", "check_finite_loss", "log_progress", "layer_names", "diagnostic_parser",
           "add_common_options", "check_output_dir", "pyplot", "save_outputs", "run_and_write"]

#: The training set of the diagnostics unless ``--dataset`` names another: the shipped COCO sample.
DEFAULT_DATASET = "coco_2017_sample_train"


# ---------------------------------------------------------------------------------- training
def build_bn_config(config_file: str, iters: int, lr: Optional[float] = None, opts: Sequence[str] = (),
                    dataset: str = DEFAULT_DATASET):
    """The detector config: ``config_file`` with BN in every norm key (``smallbn_d2.config.norm_keys``:
    backbone, FPN, heads), ``DATASETS.TRAIN`` = ``(dataset,)``, then ``opts``.

    ``SOLVER.MAX_ITER`` becomes ``iters`` (the LR schedule's steps from the file are kept if they
    fall inside, dropped otherwise), ``SOLVER.BASE_LR`` becomes ``lr`` unless None; data loading
    in the main process (``NUM_WORKERS 0``). The shipped COCO sample is registered first.

    Raises:
        FileNotFoundError, ConfigKeyError, ConfigValueError: from ``smallbn_d2.engine.load_config``.
        DatasetNotRegisteredError, DatasetsNotFoundError: the training set is not registered, or
            its files are missing (:func:`smallbn_d2.data.check_datasets_exist`).
    """
    from smallbn_d2.config import norm_keys
    from smallbn_d2.data import check_datasets_exist, register_coco_sample
    from smallbn_d2.engine import load_config

    register_coco_sample()
    overrides = []
    for key, value in norm_keys(load_config(config_file)).items():
        if key.startswith("MODEL."):
            overrides += [key, "BN"]
    overrides += ["DATASETS.TRAIN", (dataset,), "DATALOADER.NUM_WORKERS", 0]
    cfg = load_config(config_file, overrides + list(opts))
    check_datasets_exist(cfg.DATASETS.TRAIN)
    cfg.SOLVER.MAX_ITER = iters
    if lr is not None:
        cfg.SOLVER.BASE_LR = float(lr)
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < iters)
    return cfg


def train_loader(cfg, batch_size: int, seed: int):
    """An infinite Detectron2 training loader over ``cfg.DATASETS.TRAIN`` with a seeded sampler,
    ``batch_size`` images per batch (lists of Detectron2 dataset dicts)."""
    from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.data.samplers import TrainingSampler

    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    return build_detection_train_loader(cfg, dataset=dataset, sampler=TrainingSampler(len(dataset), seed=seed),
                                        total_batch_size=batch_size, num_workers=0)


def setup_training(config_file: str, iters: int, lr: Optional[float], seed: int, opts: Sequence[str] = (),
                   dataset: str = DEFAULT_DATASET):
    """Seed everything, build the BN config (:func:`build_bn_config`, training on ``dataset``), the
    model in training mode, Detectron2's SGD optimizer and LR scheduler (warm-up and steps of the
    config).

    Returns:
        ``(cfg, model, optimizer, scheduler)``.
    Raises:
        ValueError: ``lr`` is neither None (the config's ``SOLVER.BASE_LR``) nor a number > 0.
    """
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.env import seed_all_rng

    from smallbn_d2.modeling import build_model

    seed_all_rng(seed)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr = {lr!r} is invalid; allowed: None (the config's SOLVER.BASE_LR) or a number > 0")
    cfg = build_bn_config(config_file, iters, lr, opts, dataset)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer, build_lr_scheduler(cfg, optimizer)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (BN's running statistics, ``num_batches_tracked``) to
    its value at the start of the ``with`` block when the block ends (also on an error)."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """||estimate - reference||_2 / ||reference||_2 over the channels (shape (C,) each);
    0 if both are zero, inf if only the reference is."""
    den = float(reference.detach().norm())
    num = float((estimate - reference).detach().norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def check_finite_loss(total: torch.Tensor, iteration: int) -> None:
    """Raise ``FloatingPointError`` (naming the iteration and the way out) if the loss is not finite."""
    if not torch.isfinite(total):
        raise FloatingPointError(f"training loss is {float(total)} at iteration {iteration}; lower SOLVER.BASE_LR")


def log_progress(logger: logging.Logger, t: int, iters: int, loss: float, optimizer, start: float) -> None:
    """Log loss, learning rate and elapsed seconds at every 10th and at the last iteration."""
    if t % 10 == 0 or t == iters - 1:
        logger.info(f"iter {t}/{iters}: loss {loss:.3f}, lr {optimizer.param_groups[0]['lr']:.4g}, "
                    f"{time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------- command line
def layer_names(text: str) -> List[str]:
    """argparse type of ``--layers``: comma-separated module names.

    Raises:
        argparse.ArgumentTypeError: no name in ``text``.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer; allowed: comma-separated module names")
    return names


def diagnostic_parser(description: str, default_config: str, default_layers: Sequence[str],
                      layers_help: str) -> argparse.ArgumentParser:
    """A parser with ``--config-file``, ``--layers`` and ``--iters``; the script adds its own
    options and then :func:`add_common_options`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config-file", default=default_config, help="detector config (BN is set in backbone, FPN, heads)")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="training set (DATASETS.TRAIN): the COCO 2017 sample shipped with smallbn_d2 (24 images), "
                        "or a registered name such as coco_2017_train (Detectron2's builtin COCO under "
                        "$DETECTRON2_DATASETS)")
    p.add_argument("--layers", type=layer_names, default=list(default_layers), help=layers_help)
    p.add_argument("--iters", type=int, default=60, help="training iterations")
    return p


def add_common_options(p: argparse.ArgumentParser, default_output_dir: str) -> None:
    """``--lr``, ``--seed``, ``--output-dir``, ``--overwrite`` and the ``KEY VALUE`` overrides."""
    p.add_argument("--lr", type=float, default=0.02, help="SGD base learning rate (overrides SOLVER.BASE_LR; "
                   "0.02 as in configs/quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the augmentations")
    p.add_argument("--output-dir", default=default_output_dir, help="folder for the tables, plots and JSON")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir, replacing "
                   "this script's outputs there")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")


# ---------------------------------------------------------------------------------- outputs
def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``output_dir`` unless ``overwrite``: smallbn_d2's
    output-directory guard (:func:`smallbn_d2.engine.check_output_dir`) with this command line's
    ways out.

    Raises:
        smallbn_d2.engine.OutputDirExistsError (a ``FileExistsError``): naming the directory,
            what it holds, and ``--output-dir`` / ``--overwrite``.
    """
    from smallbn_d2.engine import OutputDirExistsError
    from smallbn_d2.engine import check_output_dir as guard

    try:
        guard(output_dir, allow_existing=overwrite)
    except OutputDirExistsError:
        content = sorted(os.listdir(output_dir))
        shown = ", ".join(content[:6]) + (", ..." if len(content) > 6 else "")
        raise OutputDirExistsError(f"Output directory {output_dir!r} is not empty ({shown}); refusing to overwrite. "
                                   "Choose another --output-dir or pass --overwrite.") from None


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_outputs(result: Dict, output_dir: str, stem: str, table: str, plot: Callable[[str], None]) -> None:
    """Write ``<stem>.md`` (``table``), the plots (``plot(output_dir)``) and ``<stem>.json``
    (``result``) to ``output_dir`` (created if missing)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    plot(output_dir)
    with open(os.path.join(output_dir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)


def run_and_write(args: argparse.Namespace, run: Callable[[argparse.Namespace], Dict],
                  write_outputs: Callable[[Dict, str], str], script: str, argv: Optional[Sequence[str]]) -> Dict:
    """The diagnostics' entry point: check ``args.output_dir``, run, record how, write, print.

    Args:
        args: the parsed command line (``output_dir``, ``overwrite``).
        run: ``args -> result dict`` (the script's training and probing).
        write_outputs: ``(result, output_dir) -> table``; the table is printed.
        script: the script as recorded in ``command`` (its path relative to the repository).
        argv: the arguments given (None: ``sys.argv[1:]``).
    Returns:
        the result, with ``command``, ``torch`` (version) and ``threads`` added.
    Raises:
        OutputDirExistsError: see :func:`check_output_dir` (before anything runs).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_output_dir(args.output_dir, args.overwrite)
    result = run(args)
    result["command"] = " ".join([script] + (sys.argv[1:] if argv is None else list(argv)))
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    print(write_outputs(result, args.output_dir))
    return result
