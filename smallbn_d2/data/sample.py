"""The COCO 2017 sample shipped in ``smallbn_d2/data/coco_2017_sample/`` (see its README.md), as the
Detectron2 datasets ``coco_2017_sample_train`` / ``coco_2017_sample_val`` (its ``train2017`` /
``val2017`` images), found relative to this file. Detectron2's builtin names are untouched.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from .paths import DatasetsNotFoundError

__all__ = ["SAMPLE_ROOT", "SAMPLE_DATASETS", "SampleRegistrationError", "coco_sample_files", "register_coco_sample"]

#: The sample's folder (Detectron2's COCO layout: annotations/, train2017/, val2017/).
SAMPLE_ROOT = Path(__file__).resolve().parent / "coco_2017_sample"
#: Dataset name -> split folder.
SAMPLE_DATASETS = {"coco_2017_sample_train": "train2017", "coco_2017_sample_val": "val2017"}


class SampleRegistrationError(ValueError):
    """A dataset name of the sample is already registered in Detectron2 for other files."""


def coco_sample_files(root: Optional[os.PathLike] = None) -> Dict[str, Tuple[str, str]]:
    """Dataset name -> ``(json_file, image_root)`` of the sample (absolute paths; not checked)."""
    root = Path(root) if root is not None else SAMPLE_ROOT
    return {name: (str(root / "annotations" / f"instances_{split}.json"), str(root / split))
            for name, split in SAMPLE_DATASETS.items()}


def register_coco_sample(root: Optional[os.PathLike] = None) -> Tuple[str, ...]:
    """Register the shipped COCO 2017 sample in Detectron2's catalogs; a second call does nothing.

    With Detectron2's ``register_coco_instances`` (``evaluator_type`` "coco": ``COCOEvaluator``
    computes box and mask AP) and the builtin COCO class names and colours.

    Args:
        root: the sample's folder; default :data:`SAMPLE_ROOT` (the one in the package).
    Returns:
        the registered names, ``("coco_2017_sample_train", "coco_2017_sample_val")``.
    Raises:
        DatasetsNotFoundError: an annotation file or image folder of the sample is missing.
        SampleRegistrationError: a name is already registered (``DatasetCatalog``, or ``json_file``/
            ``image_root`` in ``MetadataCatalog``) for other files; the message names both.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    files = coco_sample_files(root)
    for name, (json_file, image_root) in files.items():
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise DatasetsNotFoundError(
                    f"Dataset {name!r}: {path!r} does not exist; the COCO 2017 sample is incomplete. "
                    "Restore smallbn_d2/data/coco_2017_sample from the repository, or rebuild it with "
                    "tools/make_coco_sample.py")
    todo = []
    for name, (json_file, image_root) in files.items():
        meta = MetadataCatalog.get(name)
        have = (getattr(meta, "json_file", None), getattr(meta, "image_root", None))
        if have == (json_file, image_root) and name in DatasetCatalog.list():
            continue  # registered by an earlier call
        if name in DatasetCatalog.list() or have != (None, None):
            raise SampleRegistrationError(
                f"Dataset {name!r} is already registered for json_file={have[0]!r}, image_root={have[1]!r}; "
                f"register_coco_sample() would register it for json_file={json_file!r}, image_root={image_root!r}. "
                f"Remove it first (DatasetCatalog.remove({name!r}); MetadataCatalog.remove({name!r})) or use "
                "another name for the other dataset")
        todo.append(name)
    builtin = MetadataCatalog.get("coco_2017_val").as_dict() if todo else {}  # class names, colours, id map
    metadata = {k: builtin[k] for k in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")
                if k in builtin}
    for name in todo:
        register_coco_instances(name, metadata, *files[name])
    return tuple(files)
