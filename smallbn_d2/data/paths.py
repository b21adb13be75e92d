"""A clear error when the files of a dataset are not there.

Detectron2's builtin names (``coco_2017_train``, ...) resolve under ``$DETECTRON2_DATASETS``
(default ``./datasets``), read when ``detectron2.data`` is first imported; this module does not set it.
"""
from __future__ import annotations

import os
from typing import Iterable

__all__ = ["ENV", "DatasetsNotFoundError", "DatasetNotRegisteredError", "datasets_root", "check_datasets_exist"]

ENV = "DETECTRON2_DATASETS"


class DatasetsNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the missing path and where it was looked for."""


class DatasetNotRegisteredError(KeyError):
    """A dataset name is not registered in Detectron2's ``DatasetCatalog``; the message lists the
    registered COCO names."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def datasets_root() -> str:
    """The root of Detectron2's builtin datasets by Detectron2's rule: ``$DETECTRON2_DATASETS``
    (user ``~`` expanded) if set, else ``datasets`` (relative to the working directory)."""
    return os.path.expanduser(os.environ.get(ENV) or "datasets")


def check_datasets_exist(dataset_names: Iterable[str]) -> None:
    """Check that the files of registered COCO-format datasets (e.g. ``cfg.DATASETS.TRAIN``) exist.

    Raises:
        DatasetNotRegisteredError: (a ``KeyError``) a name is not in ``DatasetCatalog``; the message
            lists the registered COCO names (and, for ``coco_2017_sample_*``, how to register it).
        DatasetsNotFoundError: an annotation file or image folder does not exist; the message names
            it, the datasets root in use and how to change it.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in dataset_names:
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if n.startswith("coco"))
            hint = (" Call smallbn_d2.data.register_coco_sample() first (tools/train_net.py does)."
                    if name.startswith("coco_2017_sample") else "")
            raise DatasetNotRegisteredError(
                f"Dataset {name!r} is not registered.{hint} Registered COCO datasets: {known}")
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path is not None and not os.path.exists(path):
                raise DatasetsNotFoundError(
                    f"Dataset {name!r}: {attr} {path!r} does not exist (working directory {os.getcwd()!r}). "
                    f"Detectron2's builtin datasets resolve under ${ENV}, default 'datasets' in the working "
                    f"directory (in use: {datasets_root()!r}): set {ENV} to the folder that holds "
                    "coco/annotations/instances_{train,val}2017.json and coco/{train,val}2017/, "
                    "or train on the COCO 2017 sample shipped with smallbn_d2: "
                    "DATASETS.TRAIN \"('coco_2017_sample_train',)\" DATASETS.TEST \"('coco_2017_sample_val',)\"."
                )
