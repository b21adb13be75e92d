#!/usr/bin/env python
"""Compare training runs of tools/train_net.py and tools/lazyconfig_train_net.py: Markdown tables and PNG plots.

    python tools/compare_runs.py OUTPUT_DIR [OUTPUT_DIR ...] [--names N1 N2 ...] [--published]
        [--output-dir DIR] [--overwrite]

Prints one Markdown table per task (box AP, mask AP) with AP, AP50, AP75, APs, APm, APl, training
s/iter, peak memory, inference s/image, and the norm and images per GPU of each run (from its
config.yaml and log.txt); ``--published`` adds the papers' numbers as rows labelled "published".
Writes ``ap_vs_iter.png`` and ``loss_curves.png`` (and the table as ``comparison.md``) to
``--output-dir`` (default ``compare_runs``; ``--out-dir``, its former name, still works), refusing
to overwrite them without ``--overwrite``.
Reading: ``tools/run_report/run_metrics.py``; tables and plots: ``tools/run_report/compare.py``.
"""
import argparse
import os
import sys

from smallbn_d2.engine import check_output_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run_report/, also when loaded by importlib
from run_report.compare import comparison_markdown, plot_ap, plot_losses  # noqa: E402
from run_report.run_metrics import load_run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of tools/train_net.py (OUTPUT_DIR) or "
                        "tools/lazyconfig_train_net.py (train.output_dir)")
    parser.add_argument("--names", nargs="+", help="labels of the runs (default: directory names)")
    parser.add_argument("--published", action="store_true", help="add the published numbers as reference rows")
    parser.add_argument("--output-dir", default="compare_runs", help="where to write the plots and comparison.md")
    # deprecated spelling of --output-dir, kept so that old commands work; not shown in --help
    parser.add_argument("--out-dir", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="overwrite plots / comparison.md in --output-dir")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names has {len(args.names)} labels for {len(args.runs)} runs; give one per run")
    names = args.names or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(set(names)) != len(names):  # same directory names: label by the last two path parts
        names = [os.path.join(*os.path.normpath(os.path.abspath(r)).split(os.sep)[-2:]) for r in args.runs]
    names_out = ("comparison.md", "ap_vs_iter.png", "loss_curves.png")
    files = [os.path.join(args.output_dir, f) for f in names_out]
    try:
        check_output_dir(args.output_dir, files=names_out, allow_existing=args.overwrite, way_out="--overwrite")
        runs = [load_run(d, n) for d, n in zip(args.runs, names)]
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"compare_runs.py: error: {e}")

    text = comparison_markdown(runs, published=args.published)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(files[0], "w") as f:
        f.write(text)
    for plot, path in ((plot_ap, files[1]), (plot_losses, files[2])):
        try:
            plot(runs, path)
            print(f"wrote {path}")
        except ValueError as e:  # nothing to plot for this figure
            print(f"not written: {path}: {e}", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
