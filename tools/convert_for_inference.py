#!/usr/bin/env python
"""Convert a trained CBN / NaiveCBN / MABN / BN detector for inference at BN speed.

Every CBN, NaiveCBN, MABN and BN layer becomes Detectron2's ``FrozenBatchNorm2d`` with the same
eval-mode output; MABN's weight centralization is baked into the conv weights; ``--fold``
additionally folds every frozen norm that directly follows a conv into that conv
(``smallbn_d2.deploy``; docs/DEPLOY.md)::

    python tools/convert_for_inference.py --config-file configs/.../x.yaml \\
        --weights output/model_final.pth --output output/model_final_frozen.pth [--fold] \\
        [--overwrite] [KEY VALUE ...]

``--weights`` may be a ``model_final.pth``: the CBN windows and MABN moving averages it leaves
out are training-only state, which inference does not use; every weight and population
statistic must be there. ``--config-file`` is a YAML config (overrides ``KEY VALUE``) or a
LazyConfig (``.py``, overrides ``key=value``, e.g. for ``tools/lazyconfig_train_net.py`` runs).

Writes ``--output`` (a Detectron2 checkpoint: ``{"model": state_dict, "smallbn_d2_conversion":
{"fold": ...}}``) and, next to it, ``<output without .pth>.yaml``: the config with the converted
norms set to "FrozenBN", the weights (``MODEL.WEIGHTS``; ``train.init_checkpoint``) pointing to
the output and the output folder (``OUTPUT_DIR``; ``train.output_dir``) a new folder
``<output without .pth>_eval`` (so that evaluating the converted model never writes into the
training run's directory). Refuses to overwrite either file unless ``--overwrite``. Prints a
summary of the converted layers. The model is built on the CPU (the checkpoint is
device-independent).

Evaluate the result with the written config, folded or not: ``tools/train_net.py --eval-only
--config-file <that yaml>`` (``tools/lazyconfig_train_net.py`` for a LazyConfig); a folded
checkpoint folds the config's FrozenBN model while it loads (``smallbn_d2.checkpoint.NormCheckpointer``).
From Python: ``smallbn_d2.deploy.load_inference_model(cfg, path)`` with the training config.
"""
import argparse
import collections
import os
import sys

from smallbn_d2 import ConfigValueError
from smallbn_d2.engine import OutputDirExistsError, check_output_dir
from smallbn_d2.deploy import (
    IncompatibleCheckpointError,
    build_training_model,
    convert_for_inference,
    frozen_bn_config,
    is_lazy_config,
    load_checkpoint_strict,
    load_training_config,
    save_inference_checkpoint,
)
from tabulate import tabulate


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="training config of the model (YAML, or a LazyConfig .py)")
    parser.add_argument("--weights", required=True, metavar="FILE", help="trained checkpoint (.pth/.pkl)")
    parser.add_argument("--output", required=True, metavar="FILE", help="converted checkpoint to write (.pth)")
    parser.add_argument("--fold", action="store_true", help="fold the frozen norms into the preceding convs")
    parser.add_argument("--overwrite", action="store_true", help="overwrite existing output files")
    parser.add_argument("--list-layers", action="store_true", help="print every converted layer, not only counts")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE ... (LazyConfig: key=value ...)")
    return parser


def summary_table(records) -> str:
    """Markdown table: counts of (original layer type, result)."""
    counts = collections.Counter((r.source, r.action if not r.action.startswith("folded") else "folded into conv")
                                 for r in records)
    rows = [[src, action, n] for (src, action), n in sorted(counts.items())]
    return tabulate(rows, headers=["layer", "converted to", "count"], tablefmt="pipe")


def _lazy_yaml(cfg) -> str:
    """A LazyConfig as the YAML text ``LazyConfig.save`` writes (``LazyConfig.load`` reads it back)."""
    import tempfile

    from detectron2.config import LazyConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        LazyConfig.save(cfg, path)
        if not os.path.isfile(path):
            raise ValueError("the LazyConfig cannot be written as YAML (LazyConfig.save); allowed: configs whose "
                             "values YAML can hold")
        with open(path) as f:
            return f.read()


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    out = args.output
    out_yaml = os.path.splitext(out)[0] + ".yaml"
    try:
        check_output_dir(os.path.dirname(out) or ".", files=[os.path.basename(out), os.path.basename(out_yaml)],
                         allow_existing=args.overwrite, way_out="--overwrite")
    except OutputDirExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.abspath(out) == os.path.abspath(args.weights):
        print(f"error: --output {out!r} is the --weights file; choose another output", file=sys.stderr)
        return 2
    if "://" not in args.weights and not os.path.isfile(args.weights):
        print(f"error: --weights {args.weights!r} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = load_training_config(args.config_file, args.opts)
        lazy = is_lazy_config(cfg)
        if lazy:
            cfg.train.device = "cpu"
        else:
            cfg.MODEL.DEVICE = "cpu"
        model = build_training_model(cfg)  # reads no data: a burn-in in epochs stays unknown, unneeded here
        load_checkpoint_strict(model, args.weights)
    except (FileNotFoundError, ConfigValueError, IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    model, records = convert_for_inference(model, fold=args.fold)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_inference_checkpoint(model, out, fold=args.fold, overwrite=args.overwrite)
    frozen_cfg = frozen_bn_config(cfg)
    # evaluating the converted model must not write into the training run's directory
    eval_dir = os.path.splitext(os.path.abspath(out))[0] + "_eval"
    if lazy:
        frozen_cfg.train.init_checkpoint = os.path.abspath(out)
        frozen_cfg.train.output_dir = eval_dir
        evaluator = frozen_cfg.dataloader.get("evaluator", None) if "dataloader" in frozen_cfg else None
        if evaluator is not None and evaluator.get("output_dir", None):  # its predictions go there too
            evaluator.output_dir = os.path.join(eval_dir, "inference")
        body = _lazy_yaml(frozen_cfg)
        tool = "tools/lazyconfig_train_net.py"
    else:
        frozen_cfg.MODEL.WEIGHTS = os.path.abspath(out)
        frozen_cfg.OUTPUT_DIR = eval_dir
        body = frozen_cfg.dump()
        tool = "tools/train_net.py"
    with open(out_yaml, "w") as f:
        f.write(f"# {'Folded' if args.fold else 'FrozenBN'} inference config of {args.config_file} "
                f"(written by tools/convert_for_inference.py)\n")
        f.write(f"# Evaluate: {tool} --eval-only --config-file {out_yaml}\n")
        if args.fold:
            f.write("# Folded checkpoint: its norms are folded into the convs, so the FrozenBN model of this config\n"
                    "# is folded while the checkpoint loads (smallbn_d2.checkpoint.NormCheckpointer).\n")
        f.write(body)

    print(summary_table(records))
    if args.list_layers:
        print()
        print(tabulate([[r.name, r.source, r.channels, r.action] for r in records],
                       headers=["module", "layer", "channels", "result"], tablefmt="pipe"))
    kept = [r for r in records if r.action.startswith("kept")]
    if kept:
        print(f"\n{len(kept)} layers kept unfolded, e.g. {kept[0].name}: {kept[0].action}")
    print(f"\nwrote {out}\nwrote {out_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
