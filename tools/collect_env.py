#!/usr/bin/env python
"""Print the environment report: Detectron2's collect_env table plus smallbn_d2's view.

    python tools/collect_env.py [--no-detectron2-table]

Says which ``detectron2._C`` is in use (a compiled extension, or smallbn_d2's stub for the
pb1-detectron2 sdist install), the registered norm names, and the datasets: the root that
Detectron2's builtin names (``coco_2017_train``, ...) resolve under (``$DETECTRON2_DATASETS``,
else ``./datasets``), whether it and its COCO files exist, and the COCO 2017 sample shipped with
smallbn_d2 if the installed version has one.
"""
from __future__ import annotations

import argparse
import os
from typing import List

#: Detectron2's variable for the root of its builtin datasets.
ENV = "DETECTRON2_DATASETS"
#: Files of Detectron2's COCO 2017 layout under a datasets root.
COCO_FILES = ("coco/annotations/instances_train2017.json", "coco/annotations/instances_val2017.json",
              "coco/train2017", "coco/val2017")


def datasets_report(environ=None, cwd: str = None) -> List[str]:
    """Lines describing where the datasets are, by Detectron2's rule.

    Args:
        environ: the environment to read ``DETECTRON2_DATASETS`` from (default ``os.environ``).
        cwd: the working directory that a relative root is resolved against (default the current one).
    Returns:
        lines of text: the variable (or that it is not set), the root in use and whether it
        exists, each COCO 2017 file under it (present / missing), and the shipped sample.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    value = environ.get(ENV)
    lines = []
    if value:
        lines.append(f"{ENV}: {value}")
        root = os.path.expanduser(value)
    else:
        lines.append(f"{ENV}: not set; Detectron2 uses ./datasets in the working directory")
        root = "datasets"
    root_abs = os.path.normpath(os.path.join(cwd, root))
    if os.path.isdir(root_abs):
        lines.append(f"datasets root in use: {root_abs} (exists)")
        for rel in COCO_FILES:
            state = "present" if os.path.exists(os.path.join(root_abs, rel)) else "missing"
            lines.append(f"  {rel}: {state}")
    else:
        lines.append(f"datasets root in use: {root_abs} (does NOT exist): no datasets root found, so "
                     f"Detectron2's builtin COCO names do not resolve; set {ENV} to the folder that holds "
                     "coco/annotations/ and coco/{train,val}2017/")
    lines.extend(_sample_report())
    return lines


def _sample_report() -> List[str]:
    """The COCO 2017 sample shipped with smallbn_d2, if this version has one."""
    try:
        from smallbn_d2.data import coco_sample_files
    except ImportError:
        return []
    out = []
    for name, (json_file, image_root) in coco_sample_files().items():
        ok = os.path.isfile(json_file) and os.path.isdir(image_root)
        out.append(f"dataset {name}: {image_root} ({'present' if ok else 'missing'})")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-detectron2-table", action="store_true",
                        help="skip Detectron2's collect_env table (print only smallbn_d2's lines)")
    args = parser.parse_args(argv)

    import smallbn_d2  # first: applies the compatibility fixes for Detectron2 v0.6
    import detectron2._C as C
    from smallbn_d2.compat import has_compiled_ops

    if not args.no_detectron2_table:
        from detectron2.utils.collect_env import collect_env_info

        print(collect_env_info())
    print(f"smallbn_d2 {smallbn_d2.__version__} @ {os.path.dirname(smallbn_d2.__file__)}")
    print("detectron2._C:", "compiled extension at " + str(getattr(C, "__file__", "?")) if has_compiled_ops()
          else "stub of smallbn_d2_detectron2_compat (no compiled ops: rotated boxes, deformable conv on CUDA, fast COCOeval)")
    print("norm names:", ", ".join(smallbn_d2.supported_norms()))
    for line in datasets_report():
        print(line)


if __name__ == "__main__":
    main()
