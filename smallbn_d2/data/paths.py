"""The default datasets root, and a clear error when the data is not there.

Detectron2 resolves its builtin dataset names (``coco_2017_train``, ``coco_2017_val``, ...)
under ``$DETECTRON2_DATASETS`` (default ``./datasets``), read once when ``detectron2.data`` is
first imported. smallbn_d2 keeps that rule and adds fall-backs, in this order:

1. ``$DETECTRON2_DATASETS`` if set (used as given, even if it does not exist: the user said so);
2. ``./datasets`` (Detectron2's own default, relative to the working directory) if present;
3. ``<repository>/datasets`` if present;
4. ``<repository>/../shared/datasets`` (the shared real COCO 2017 subset) if present.

``import smallbn_d2`` calls :func:`apply_default_datasets_root` before Detectron2's data module
is imported, so that the builtin names resolve to the first existing root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List

__all__ = [
    "DatasetsNotFoundError",
    "candidate_dataset_roots",
    "default_datasets_root",
    "apply_default_datasets_root",
    "check_datasets_exist",
]

ENV = "DETECTRON2_DATASETS"
REPO_ROOT = Path(__file__).resolve().parents[2]
_searched: List[Path] = []  # the candidates apply_default_datasets_root() chose from


class DatasetsNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message lists every place that was looked at."""


def candidate_dataset_roots() -> List[Path]:
    """Return the datasets roots considered, in priority order (see the module docstring)."""
    if os.environ.get(ENV):
        return [Path(os.path.expanduser(os.environ[ENV]))]
    return [Path("datasets").resolve(), REPO_ROOT / "datasets", (REPO_ROOT / ".." / "shared" / "datasets").resolve()]


def default_datasets_root() -> Path:
    """Return the first existing candidate root, or the first candidate if none exists."""
    candidates = candidate_dataset_roots()
    for root in candidates:
        if root.is_dir():
            return root
    return candidates[0]


def apply_default_datasets_root() -> Path:
    """Set ``$DETECTRON2_DATASETS`` to :func:`default_datasets_root` if it is unset; return it."""
    if not os.environ.get(ENV):
        _searched[:] = candidate_dataset_roots()
        os.environ[ENV] = str(default_datasets_root())
    return Path(os.environ[ENV])


def check_datasets_exist(dataset_names: Iterable[str]) -> None:
    """Check that the files of registered COCO-format datasets exist.

    Args:
        dataset_names: names registered in Detectron2's ``DatasetCatalog`` (e.g. ``cfg.DATASETS.TRAIN``).

    Raises:
        KeyError: a name is not registered (the message lists the registered COCO names).
        DatasetsNotFoundError: a dataset's annotation file or image folder does not exist; the
            message names the missing path and every datasets root that was looked at.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in dataset_names:
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if n.startswith("coco"))
            raise KeyError(f"Dataset {name!r} is not registered. Registered COCO datasets: {known}")
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path is not None and not os.path.exists(path):
                looked = "\n  ".join(str(p) for p in (_searched or candidate_dataset_roots()))
                raise DatasetsNotFoundError(
                    f"Dataset {name!r}: {attr} {path!r} does not exist.\n"
                    f"Datasets root in use: {os.environ.get(ENV, 'datasets')!r}. Looked at, in order:\n  {looked}\n"
                    f"Set {ENV} to the folder that holds coco/annotations and coco/train2017, val2017."
                )
