#!/usr/bin/env python
"""Make a small, downscaled COCO 2017 sample (images + instance annotations) from a COCO 2017 root.

Example (the command that made the sample shipped in ``smallbn_d2/data/coco_2017_sample``)::

    python tools/make_coco_sample.py --coco-root $DETECTRON2_DATASETS/coco \\
        --output smallbn_d2/data/coco_2017_sample

Selection, downscaling and the rescaling of boxes, polygons, areas and crowd RLE masks are
documented in :mod:`smallbn_d2.data.coco_sample`. The output has Detectron2's COCO layout
(``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``) and a README.md
(provenance, licences, size). A non-empty ``--output`` is refused unless ``--overwrite``.
"""
import argparse
import shlex
import sys

from smallbn_d2.data.coco_sample import folder_size_bytes, make_coco_sample


def argument_parser():
    parser = argparse.ArgumentParser(
        description="Make a small downscaled COCO 2017 sample (Detectron2's COCO layout) from a COCO 2017 root.")
    parser.add_argument("--coco-root", required=True,
                        help="COCO 2017 root: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    parser.add_argument("--output", required=True, help="folder to write the sample to (new or empty)")
    parser.add_argument("--num-train", type=int, default=24, help="train2017 images (default 24)")
    parser.add_argument("--num-val", type=int, default=24, help="val2017 images (default 24)")
    parser.add_argument("--max-size", type=int, default=320, help="long side of the images at most, pixels (default 320)")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality 1-95 (default 85)")
    parser.add_argument("--ids-from", default=None,
                        help="take the image ids of this existing sample folder instead of selecting")
    parser.add_argument("--allow-no-derivatives", action="store_true",
                        help="also select images under a Flickr 'NoDerivs' licence (left out by default: images are resized)")
    parser.add_argument("--overwrite", action="store_true", help="replace a sample made before in --output")
    return parser


def recorded_command(args) -> str:
    """The command line for the README, with the machine-specific COCO root as ``COCO_ROOT``."""
    parts = ["python", "tools/make_coco_sample.py", "--coco-root", "COCO_ROOT", "--output", args.output,
             "--num-train", str(args.num_train), "--num-val", str(args.num_val),
             "--max-size", str(args.max_size), "--quality", str(args.quality)]
    if args.ids_from:
        parts += ["--ids-from", args.ids_from]
    if args.allow_no_derivatives:
        parts.append("--allow-no-derivatives")
    return " ".join(p if p == "COCO_ROOT" else shlex.quote(p) for p in parts)


def main(argv=None):
    args = argument_parser().parse_args(argv)
    try:
        stats = make_coco_sample(args.coco_root, args.output, num_train=args.num_train, num_val=args.num_val,
                                 max_size=args.max_size, quality=args.quality, overwrite=args.overwrite,
                                 allow_no_derivatives=args.allow_no_derivatives, ids_from=args.ids_from,
                                 command=recorded_command(args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"make_coco_sample.py: error: {e}")
    for s in stats:
        print(f"{s.split}: {s.images} images, {s.annotations} instances ({s.crowd} crowd), "
              f"images {s.image_bytes / 1e6:.2f} MB")
    print(f"wrote {args.output} ({folder_size_bytes(args.output) / 1e6:.2f} MB in all)")


if __name__ == "__main__":
    main()
