"""Datasets: the COCO 2017 sample shipped with the package, and clear errors for missing data.

* :func:`register_coco_sample` registers ``coco_2017_sample_train`` / ``coco_2017_sample_val``
  (not done on import: the tools call it; code of your own calls it before building a data loader);
* Detectron2's builtin names (``coco_2017_train``, ...) resolve under ``$DETECTRON2_DATASETS``;
  :func:`check_datasets_exist` says which file is missing and where it was looked for.
"""
from .paths import DatasetNotRegisteredError, DatasetsNotFoundError, check_datasets_exist, datasets_root
from .sample import SAMPLE_DATASETS, SAMPLE_ROOT, SampleRegistrationError, coco_sample_files, register_coco_sample

__all__ = [
    "DatasetNotRegisteredError",
    "DatasetsNotFoundError",
    "check_datasets_exist",
    "datasets_root",
    "SAMPLE_DATASETS",
    "SAMPLE_ROOT",
    "SampleRegistrationError",
    "coco_sample_files",
    "register_coco_sample",
]
