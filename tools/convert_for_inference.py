#!/usr/bin/env python
"""Convert a trained CBN / NaiveCBN / MABN / BN detector for inference at BN speed.

Every CBN, NaiveCBN, MABN and BN layer becomes Detectron2's ``FrozenBatchNorm2d`` with the same
eval-mode output; MABN's weight centralization is baked into the conv weights; ``--fold``
additionally folds every frozen norm that directly follows a conv into that conv
(``smallbn_d2.deploy``; docs/DEPLOY.md)::

    python tools/convert_for_inference.py --config-file configs/.../x.yaml \\
        --weights output/model_final.pth --output output/model_final_frozen.pth [--fold] \\
        [--overwrite] [KEY VALUE ...]

Writes ``--output`` (a Detectron2 checkpoint: ``{"model": state_dict, "smallbn_d2_conversion":
{"fold": ...}}``) and, next to it, ``<output without .pth>.yaml``: the config with the converted
norms set to "FrozenBN", ``MODEL.WEIGHTS`` pointing to the output and ``OUTPUT_DIR`` a new
folder ``<output without .pth>_eval`` (so that evaluating the converted model never writes into
the training run's directory). Refuses to overwrite
either file unless ``--overwrite``. Prints a summary of the converted layers. The model is
built on the CPU (the checkpoint is device-independent).

Load the result with ``smallbn_d2.deploy.load_inference_model(cfg, path)`` (any model, folded or
not), or, for an unfolded R-CNN model, with the written YAML like any Detectron2 config
(``tools/train_net.py --eval-only --config-file <that yaml>``).
"""
import argparse
import collections
import os
import sys

from smallbn_d2 import ConfigValueError, build_model
from smallbn_d2.deploy import (
    IncompatibleCheckpointError,
    convert_for_inference,
    frozen_bn_config,
    load_checkpoint_strict,
    save_inference_checkpoint,
)
from smallbn_d2.engine import load_config
from tabulate import tabulate


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="training config of the model")
    parser.add_argument("--weights", required=True, metavar="FILE", help="trained checkpoint (.pth/.pkl)")
    parser.add_argument("--output", required=True, metavar="FILE", help="converted checkpoint to write (.pth)")
    parser.add_argument("--fold", action="store_true", help="fold the frozen norms into the preceding convs")
    parser.add_argument("--overwrite", action="store_true", help="overwrite existing output files")
    parser.add_argument("--list-layers", action="store_true", help="print every converted layer, not only counts")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def summary_table(records) -> str:
    """Markdown table: counts of (original layer type, result)."""
    counts = collections.Counter((r.source, r.action if not r.action.startswith("folded") else "folded into conv")
                                 for r in records)
    rows = [[src, action, n] for (src, action), n in sorted(counts.items())]
    return tabulate(rows, headers=["layer", "converted to", "count"], tablefmt="pipe")


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    out = args.output
    out_yaml = os.path.splitext(out)[0] + ".yaml"
    if not args.overwrite:
        for path in (out, out_yaml):
            if os.path.exists(path):
                print(f"error: {path!r} exists; refusing to overwrite it (pass --overwrite)", file=sys.stderr)
                return 2
    if os.path.abspath(out) == os.path.abspath(args.weights):
        print(f"error: --output {out!r} is the --weights file; choose another output", file=sys.stderr)
        return 2
    if "://" not in args.weights and not os.path.isfile(args.weights):
        print(f"error: --weights {args.weights!r} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config_file, args.opts)
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)  # reads no data: a burn-in in epochs stays unknown, unneeded here
        load_checkpoint_strict(model, args.weights)
    except (FileNotFoundError, ConfigValueError, IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    model, records = convert_for_inference(model, fold=args.fold)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_inference_checkpoint(model, out, fold=args.fold, overwrite=args.overwrite)
    frozen_cfg = frozen_bn_config(cfg)
    frozen_cfg.MODEL.WEIGHTS = os.path.abspath(out)
    # evaluating the converted model must not write into the training run's directory
    frozen_cfg.OUTPUT_DIR = os.path.splitext(os.path.abspath(out))[0] + "_eval"
    with open(out_yaml, "w") as f:
        f.write(f"# {'Folded' if args.fold else 'FrozenBN'} inference config of {args.config_file} "
                f"(written by tools/convert_for_inference.py)\n")
        if args.fold:
            f.write("# Folded checkpoint: load it with smallbn_d2.deploy.load_inference_model(cfg, weights);\n"
                    "# no Detectron2 config describes convs with folded norms.\n")
        f.write(frozen_cfg.dump())

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
