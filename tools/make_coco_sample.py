#!/usr/bin/env python
"""Make a small, downscaled COCO 2017 sample (images + instance annotations) from a COCO 2017 root.

Example (the command that made the sample shipped in ``smallbn_d2/data/coco_2017_sample``)::

    python tools/make_coco_sample.py --coco-root $DETECTRON2_DATASETS/coco \\
        --output smallbn_d2/data/coco_2017_sample

A non-empty ``--output`` is refused unless ``--overwrite``. The sample is registered by
:func:`smallbn_d2.data.register_coco_sample`.

Input: a COCO 2017 root in Detectron2's layout (``annotations/instances_{train,val}2017.json``,
``train2017/``, ``val2017/``). Output, in the same layout: ``annotations/instances_{split}.json``
and the JPEG images of the chosen images, plus a ``README.md`` (provenance, licences, size).

Selection (deterministic, :func:`select_images`): images with at least one non-crowd annotation,
whose licence allows adaptations (Flickr "NoDerivs" licences are left out by default, since the
images are resized), sorted by image id, then ``n`` evenly spaced ones; if none of them has a crowd
annotation but a candidate has, the last pick is replaced by the first such candidate, so that
crowd RLE handling is exercised. ``ids_from`` instead takes the image ids of an existing sample.

Rescaling (:func:`rescale_annotation`): each image is resized so that its long side is at most
``max_size`` pixels (never enlarged) to ``W' = round(W s)``, ``H' = round(H s)``; x coordinates are
multiplied by ``sx = W'/W`` and y coordinates by ``sy = H'/H``:

* polygons and every ``bbox`` are scaled; every ``area`` is multiplied by ``sx * sy`` (exact for
  the area of a polygon under this axis-aligned scaling; the official crowd areas are not the pixel
  counts of their masks, so they are scaled too, not recomputed);
* RLE masks (crowd regions) are decoded with ``pycocotools.mask``, resized with nearest-neighbour
  sampling and re-encoded in the input's format (the official files use *uncompressed* RLE:
  ``{"counts": [int, ...], "size": [H', W']}``);
* ``info``, ``licenses``, ``categories`` (all of them) and every other field of images and
  annotations (ids, ``license``, ``coco_url``, ``flickr_url``, ...) are kept; ``width``/``height``
  are updated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = [
    "SPLITS",
    "SampleSplitStats",
    "select_images",
    "encode_uncompressed_rle",
    "resize_rle",
    "rescale_annotation",
    "resized_shape",
    "make_coco_sample",
    "folder_size_bytes",
]

#: The COCO 2017 splits a sample holds, in Detectron2's folder names.
SPLITS = ("train2017", "val2017")
#: What an output folder of :func:`make_coco_sample` holds; ``overwrite`` replaces only a folder
#: that holds nothing else.
_OUTPUT_ENTRIES = {"annotations", "README.md", *SPLITS}
COCO_TERMS_URL = "https://cocodataset.org/#termsofuse"


@dataclass
class SampleSplitStats:
    """What one split of a made sample holds (for the README and the tool's report)."""

    split: str
    source_images: int  # images listed in the source annotation file
    images: int
    annotations: int
    crowd: int
    image_bytes: int
    licenses: Dict[str, int] = field(default_factory=dict)  # licence name -> number of images


def _annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _is_crowd(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0))


def select_images(coco: dict, n: int, allow_no_derivatives: bool = False) -> List[dict]:
    """Choose ``n`` images of a COCO annotation dict, deterministically (see the module docstring).

    Args:
        coco: a COCO instances dict (``images``, ``annotations``, ``licenses``).
        n: number of images (>= 1).
        allow_no_derivatives: also consider images under a "NoDerivs" licence.
    Returns:
        the chosen image dicts (the input's objects), sorted by image id.
    Raises:
        ValueError: ``n < 1``, or fewer than ``n`` candidates (the message gives the count and why
            images were left out).
    """
    if n < 1:
        raise ValueError(f"number of images n={n} is invalid; allowed: n >= 1")
    with_object = {a["image_id"] for a in coco["annotations"] if not _is_crowd(a)}
    with_crowd = {a["image_id"] for a in coco["annotations"] if _is_crowd(a)}
    no_derivs = {lic["id"] for lic in coco.get("licenses", []) if "noderiv" in lic.get("name", "").lower()}
    candidates = sorted(
        (im for im in coco["images"]
         if im["id"] in with_object and (allow_no_derivatives or im.get("license") not in no_derivs)),
        key=lambda im: im["id"])
    if len(candidates) < n:
        raise ValueError(
            f"asked for {n} images but only {len(candidates)} of {len(coco['images'])} qualify (at least one "
            f"non-crowd annotation{'' if allow_no_derivatives else ', licence without NoDerivs'}); "
            f"allowed: n <= {len(candidates)}")
    picks = [candidates[(i * len(candidates)) // n] for i in range(n)]
    if not any(im["id"] in with_crowd for im in picks):
        crowd = [im for im in candidates if im["id"] in with_crowd]
        if crowd:
            picks[-1] = crowd[0]
    return sorted(picks, key=lambda im: im["id"])


def resized_shape(height: int, width: int, max_size: int):
    """``(H', W')`` with the long side at most ``max_size`` (never enlarged), aspect kept up to rounding.

    Raises:
        ValueError: ``max_size < 1`` or a non-positive image size.
    """
    if max_size < 1:
        raise ValueError(f"max_size={max_size} is invalid; allowed: an integer >= 1 (pixels)")
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is invalid; allowed: positive height and width")
    s = min(1.0, max_size / max(height, width))
    return max(1, round(height * s)), max(1, round(width * s))


def encode_uncompressed_rle(mask: np.ndarray) -> dict:
    """Encode a binary mask as COCO's *uncompressed* RLE, the format of crowd regions in the official files.

    Args:
        mask: shape (H, W), any dtype; nonzero = inside.
    Returns:
        ``{"counts": [int, ...], "size": [H, W]}``: run lengths of the mask read in column-major
        (Fortran) order, starting with a run of zeros (possibly 0), as pycocotools expects
        (``pycocotools.mask.frPyObjects`` turns it into compressed RLE).
    Raises:
        ValueError: ``mask`` is not 2-D.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask of shape {tuple(mask.shape)} is invalid; allowed: 2-D (H, W)")
    flat = (np.asarray(mask).reshape(-1, order="F") != 0).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1  # positions where a new run starts
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _decode(segm: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    rle = segm
    if isinstance(segm["counts"], list):  # uncompressed -> compressed
        rle = mask_util.frPyObjects(segm, height, width)
    elif isinstance(segm["counts"], str):
        rle = dict(segm, counts=segm["counts"].encode("ascii"))
    return mask_util.decode(rle)


def resize_rle(segm: dict, height: int, width: int, new_height: int, new_width: int) -> dict:
    """Resize an RLE mask with nearest-neighbour sampling; keep its format.

    Args:
        segm: COCO RLE of an (height, width) mask: uncompressed (``counts`` a list) or compressed
            (``counts`` a str, as in JSON, or bytes).
        new_height, new_width: the output size in pixels.
    Returns:
        an RLE of the resized mask, shape (new_height, new_width): uncompressed if the input was,
        else compressed with ``counts`` a str.
    Raises:
        ValueError: ``segm["size"]`` is not ``[height, width]``.
    """
    from PIL import Image
    from pycocotools import mask as mask_util

    if list(segm.get("size", [])) != [height, width]:
        raise ValueError(f"RLE size {segm.get('size')} is invalid for an image of {height}x{width}; "
                         f"allowed: [{height}, {width}]")
    mask = _decode(segm, height, width)
    small = np.asarray(Image.fromarray(mask * 255).resize((new_width, new_height), Image.Resampling.NEAREST)) > 127
    if isinstance(segm["counts"], list):
        return encode_uncompressed_rle(small)
    rle = mask_util.encode(np.asfortranarray(small.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rescale_annotation(ann: dict, height: int, width: int, new_height: int, new_width: int) -> dict:
    """Rescale one COCO instance annotation from a (height, width) image to (new_height, new_width).

    x coordinates scale by ``sx = new_width / width``, y by ``sy = new_height / height``: polygon
    points and ``bbox`` scaled (2 decimals, as in the official files), ``area`` times ``sx * sy``;
    an RLE mask (crowd region) is resized by nearest-neighbour sampling (:func:`resize_rle`).
    Every other field is kept.

    Returns:
        a new dict; ``ann`` is not changed.
    Raises:
        ValueError: a segmentation that is neither a list of polygons nor an RLE dict.
    """
    sx, sy = new_width / width, new_height / height
    out = dict(ann)
    segm = ann.get("segmentation")
    if isinstance(segm, dict):
        out["segmentation"] = resize_rle(segm, height, width, new_height, new_width)
    elif segm is not None and not isinstance(segm, list):
        raise ValueError(f"annotation {ann.get('id')}: segmentation of type {type(segm).__name__} is invalid; "
                         "allowed: a list of polygons or an RLE dict")
    elif segm is not None:
        out["segmentation"] = [
            [round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in segm]
    x, y, w, h = ann["bbox"]
    out["bbox"] = [round(x * sx, 2), round(y * sy, 2), round(w * sx, 2), round(h * sy, 2)]
    out["area"] = round(float(ann["area"]) * sx * sy, 4)
    return out


def _save_image(src: Path, dst: Path, height: int, width: int, new_height: int, new_width: int, quality: int):
    from PIL import Image

    with Image.open(src) as im:
        im.load()
        if im.size != (width, height):
            raise ValueError(f"image {src} is {im.size[0]}x{im.size[1]} (WxH) but its annotation file says "
                             f"{width}x{height}; allowed: the size given in the annotation file")
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        small = im.resize((new_width, new_height), Image.Resampling.LANCZOS)
        small.save(dst, "JPEG", quality=quality, optimize=True)


def folder_size_bytes(path: os.PathLike) -> int:
    """Total size in bytes of the regular files under ``path`` (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _ids_of(sample_root: Path, split: str) -> List[int]:
    path = _annotation_file(sample_root, split)
    if not path.is_file():
        raise FileNotFoundError(f"ids_from: {path} does not exist; allowed: a folder made by make_coco_sample")
    with open(path) as f:
        return [im["id"] for im in json.load(f)["images"]]


def _make_split(coco_root: Path, split: str, n: int, out: Path, max_size: int, quality: int,
                allow_no_derivatives: bool, ids: Optional[Sequence[int]]) -> SampleSplitStats:
    ann_path = _annotation_file(coco_root, split)
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path} does not exist; --coco-root must hold annotations/instances_{split}.json "
                                f"and {split}/ (Detectron2's COCO layout)")
    with open(ann_path) as f:
        coco = json.load(f)
    if ids is None:
        chosen = select_images(coco, n, allow_no_derivatives)
    else:
        by_id = {im["id"]: im for im in coco["images"]}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"image ids {missing[:10]} of ids_from are not in {ann_path}")
        chosen = sorted((by_id[i] for i in ids), key=lambda im: im["id"])
    chosen_ids = {im["id"] for im in chosen}
    (out / split).mkdir(parents=True)
    images, shapes = [], {}
    for im in chosen:
        h, w = int(im["height"]), int(im["width"])
        nh, nw = resized_shape(h, w, max_size)
        src = coco_root / split / im["file_name"]
        if not src.is_file():
            raise FileNotFoundError(f"image {src} (id {im['id']}) is listed in {ann_path} but does not exist")
        _save_image(src, out / split / im["file_name"], h, w, nh, nw, quality)
        images.append(dict(im, height=nh, width=nw))
        shapes[im["id"]] = (h, w, nh, nw)
    anns = [rescale_annotation(a, *shapes[a["image_id"]]) for a in coco["annotations"] if a["image_id"] in chosen_ids]
    result = {}
    for key, value in coco.items():  # the official key order: info, licenses, images, annotations, categories
        result[key] = images if key == "images" else anns if key == "annotations" else value
    (out / "annotations").mkdir(exist_ok=True)
    with open(_annotation_file(out, split), "w") as f:
        json.dump(result, f, separators=(",", ":"))
    names = {lic["id"]: lic.get("name", str(lic["id"])) for lic in coco.get("licenses", [])}
    licenses: Dict[str, int] = {}
    for im in images:
        name = names.get(im.get("license"), f"licence id {im.get('license')}")
        licenses[name] = licenses.get(name, 0) + 1
    return SampleSplitStats(split=split, source_images=len(coco["images"]), images=len(images), annotations=len(anns),
                            crowd=sum(_is_crowd(a) for a in anns), image_bytes=folder_size_bytes(out / split),
                            licenses=licenses)


def _check_output(output: Path, coco_root: Path, overwrite: bool) -> None:
    out, root = output.resolve(), coco_root.resolve()
    if out == root or root in out.parents or out in root.parents:
        raise ValueError(f"--output {output} overlaps --coco-root {coco_root}; allowed: a folder outside the COCO root")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; allowed: a new or empty folder")
    entries = sorted(os.listdir(output)) if output.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(f"--output {output} is not empty (it holds: {', '.join(entries[:8])}); "
                              "use --overwrite to replace a sample made before, or another folder")
    other = [e for e in entries if e not in _OUTPUT_ENTRIES]
    if other:
        raise FileExistsError(f"--output {output} holds files that are not part of a sample ({', '.join(other[:8])}); "
                              f"--overwrite replaces only a folder that holds nothing but {sorted(_OUTPUT_ENTRIES)}")


def make_coco_sample(coco_root: os.PathLike, output: os.PathLike, num_train: int = 24, num_val: int = 24,
                     max_size: int = 320, quality: int = 85, overwrite: bool = False,
                     allow_no_derivatives: bool = False, ids_from: Optional[os.PathLike] = None,
                     command: Optional[str] = None) -> List[SampleSplitStats]:
    """Write a downscaled COCO 2017 sample (see the module docstring) to ``output``.

    Args:
        coco_root: folder with ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``.
        output: the new sample's folder (created); written into a temporary sibling first and
            moved into place at the end, so a failure leaves ``output`` as it was.
        num_train, num_val: images per split (ignored with ``ids_from``).
        max_size: the long side's maximum, in pixels.
        quality: JPEG quality (1-95, Pillow's scale).
        overwrite: replace a sample made before (only if ``output`` holds nothing but a sample's entries).
        allow_no_derivatives: also select images under a "NoDerivs" licence.
        ids_from: a sample folder whose image ids to take (to rebuild the same sample from another root).
        command: the command line to record in the README (None: not recorded).
    Returns:
        one :class:`SampleSplitStats` per split.
    Raises:
        FileNotFoundError: a missing annotation file or image.
        FileExistsError: ``output`` is not empty (without ``overwrite``) or holds other files.
        ValueError: bad sizes, counts or quality (the message names the value and what is allowed),
            ``output`` overlaps ``coco_root``.
    """
    coco_root, output = Path(coco_root), Path(output)
    if not 1 <= quality <= 95:
        raise ValueError(f"quality={quality} is invalid; allowed: 1..95 (Pillow's JPEG quality)")
    resized_shape(1, 1, max_size)  # validates max_size
    if not coco_root.is_dir():
        raise FileNotFoundError(f"--coco-root {coco_root} does not exist; allowed: a COCO 2017 root "
                                "(annotations/instances_{train,val}2017.json, train2017/, val2017/)")
    _check_output(output, coco_root, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        counts = {"train2017": num_train, "val2017": num_val}
        stats = [_make_split(coco_root, split, counts[split], tmp, max_size, quality, allow_no_derivatives,
                             None if ids_from is None else _ids_of(Path(ids_from), split)) for split in SPLITS]
        data_bytes = folder_size_bytes(tmp)
        (tmp / "README.md").write_text(sample_readme(stats, data_bytes, max_size, quality, command))
        if output.exists():
            for entry in os.listdir(output):
                path = output / entry
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            for entry in os.listdir(tmp):
                os.replace(tmp / entry, output / entry)
            tmp.rmdir()
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return stats


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def sample_readme(stats: Iterable[SampleSplitStats], data_bytes: int, max_size: int, quality: int,
                  command: Optional[str]) -> str:
    """The sample's README.md: content, provenance, how it was made, licences and size."""
    stats = list(stats)
    rows = "\n".join(f"| {s.split} | {s.images} | {s.annotations} | {s.crowd} | {_mb(s.image_bytes)} |" for s in stats)
    source = " and ".join(f"{s.source_images} {s.split}" for s in stats)
    licences = {}
    for s in stats:
        for name, k in s.licenses.items():
            licences[name] = licences.get(name, 0) + k
    lic_rows = "\n".join(f"| {name} | {k} |" for name, k in sorted(licences.items(), key=lambda kv: -kv[1]))
    made = f"```bash\n{command}\n```\n" if command else ""
    return f"""# COCO 2017 sample

A small sample of real COCO 2017 images with their official instance annotations (boxes,
polygon masks, crowd RLE masks, all 80 categories), downscaled, shipped inside the package so
that the main job and its tests run on a fresh clone. `smallbn_d2.data.register_coco_sample()`
registers it in Detectron2 as `coco_2017_sample_train` (the `train2017` images) and
`coco_2017_sample_val` (the `val2017` images) with `register_coco_instances`, so
`COCOEvaluator` computes box and mask AP on it. It is for end-to-end runs and tests, not for
accuracy claims: a few dozen images do not rank normalization methods.

| split | images | instances | of them crowd (RLE) | images on disk |
|---|---|---|---|---|
{rows}

Total size: {_mb(data_bytes)} (images and annotation files, without this README).

## Provenance and how it was made

Images and annotations are the official COCO 2017 files (`train2017` and `val2017`, instances
annotations): the chosen images, their annotations, and the official `info`, `licenses` and
`categories`. Image ids, file names, `license`, `coco_url`, `flickr_url` and `date_captured` are
unchanged. The source root's annotation files listed {source} images. It was made with
`tools/make_coco_sample.py` (where the rules are documented), COCO_ROOT being that COCO 2017 root in Detectron2's layout:

{made}
* **Selection** (deterministic): images with at least one non-crowd annotation and a licence
  that allows adaptations (Flickr "NoDerivs" images are left out, since the images are resized),
  sorted by image id, evenly spaced; at least one image with a crowd annotation where one exists.
  To rebuild the same images from another copy of COCO 2017 (e.g. the full one), add
  `--ids-from smallbn_d2/data/coco_2017_sample`.
* **Downscaling**: every image resized (Lanczos) so that its long side is at most {max_size} px,
  saved as JPEG quality {quality}; `width`/`height` updated. Annotations rescaled consistently
  (x by new width / width, y by new height / height): polygons and boxes scaled, `area` multiplied
  by both factors; crowd RLE masks decoded with `pycocotools.mask`, resized nearest-neighbour and
  re-encoded as uncompressed RLE (the official files' format).

## Licences

* Annotations: COCO Consortium, [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).
* Images: from Flickr, each under the licence named by its `license` id in the `licenses` list
  of the annotation files (with the licence's URL); the downscaled copies are kept under the
  same licence. Attribution: each image's `flickr_url`. Images under a NonCommercial licence
  may not be used commercially. Here:

| licence | images |
|---|---|
{lic_rows}

See the COCO terms of use: {COCO_TERMS_URL}. The COCO Consortium does not own the images'
copyright; use of the images must abide by the Flickr terms of use.

Made on {datetime.date.today().isoformat()}.
"""


# ------------------------------------------------------------------------------ command line
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
