"""Where smallbn_d2 finds its datasets (Detectron2's builtin COCO names)."""
from .paths import DatasetsNotFoundError, candidate_dataset_roots, check_datasets_exist, default_datasets_root

__all__ = ["DatasetsNotFoundError", "candidate_dataset_roots", "check_datasets_exist", "default_datasets_root"]
