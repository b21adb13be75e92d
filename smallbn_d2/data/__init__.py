"""Datasets: the COCO 2017 sample shipped with the package (:func:`register_coco_sample`, called by
the tools, not on import) and clear errors for missing data (:func:`check_datasets_exist`).
See docs/TRAINING.md.
"""
from .paths import DatasetNotRegisteredError, DatasetsNotFoundError, check_datasets_exist, datasets_root
from .sample import SAMPLE_DATASETS, SAMPLE_ROOT, SampleRegistrationError, coco_sample_files, register_coco_sample

__all__ = ["DatasetNotRegisteredError", "DatasetsNotFoundError", "check_datasets_exist", "datasets_root",
           "SAMPLE_DATASETS", "SAMPLE_ROOT", "SampleRegistrationError", "coco_sample_files", "register_coco_sample"]
