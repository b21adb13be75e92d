"""Published COCO numbers of the CBN and MABN papers, as reference rows for comparisons.

Values are copied from the sources named in each row (also restated in the project's
METHODS.md); AP in percent. None marks a number the source does not give. They were obtained
with the full R50-FPN models, full COCO train2017 and the settings in ``setting``: compare a
run with them only when its setting matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["PublishedResult", "PUBLISHED", "published_for"]


@dataclass(frozen=True)
class PublishedResult:
    """One published result.

    Attributes:
        source: paper and table (or released README).
        model: e.g. "Faster R-CNN R50-FPN".
        norm: where which norm sits, in the words of :func:`smallbn_d2.utils.run_metrics.describe_norms`.
        setting: schedule, GPUs x images per GPU, initialization.
        images_per_gpu, num_gpus: the batch of the setting.
        results: task ("bbox", "segm") -> metric ("AP", "AP50", ...) -> value in percent.
    """

    source: str
    model: str
    norm: str
    setting: str
    images_per_gpu: int
    num_gpus: int
    results: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)


_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _box(*values) -> Dict[str, Dict[str, Optional[float]]]:
    return {"bbox": dict(zip(_METRICS, values))}


def _box_mask(box, mask) -> Dict[str, Dict[str, Optional[float]]]:
    return {"bbox": dict(zip(_METRICS, box)), "segm": dict(zip(_METRICS, mask))}


_CBN4 = "CBN paper (Yao et al. 2021), Tab. 4"
_CBN5 = "CBN paper (Yao et al. 2021), Tab. 5"
_MABN = "MABN released README (Yan et al. 2020)"
_FRCNN = "Faster R-CNN R50-FPN"
_MRCNN = "Mask R-CNN R50-FPN"
_CBN_SETTING = "1x (12 epochs), ImageNet-pretrained, 4 GPUs x 4 images, 4conv1fc box head"
_CBN_ALL = "backbone (except conv1, res2) + heads"  # the paper's "normalizers everywhere" setting

#: Every published row, in the order of the sources.
PUBLISHED: List[PublishedResult] = [
    PublishedResult(_CBN4, _FRCNN, "box head: none, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box(36.9, 58.2, 39.9, 21.2, 40.8, 46.9)),
    PublishedResult(_CBN4, _FRCNN, "box head: BN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box(36.3, 57.3, 39.2, 20.8, 39.7, 47.3)),
    PublishedResult(_CBN4, _FRCNN, "box head: SyncBN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box(37.7, 58.5, 41.1, 22.0, 40.9, 49.0)),
    PublishedResult(_CBN4, _FRCNN, "box head: GN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box(37.8, 59.0, 40.8, 22.3, 41.2, 48.4)),
    PublishedResult(_CBN4, _FRCNN, "box head: CBN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box(37.7, 59.0, 40.7, 22.1, 40.9, 48.8)),
    PublishedResult(_CBN4, _FRCNN, f"{_CBN_ALL}: BN", _CBN_SETTING, 4, 4, _box(35.5, 56.4, 38.7, 19.7, 38.8, 47.3)),
    PublishedResult(_CBN4, _FRCNN, f"{_CBN_ALL}: SyncBN", _CBN_SETTING, 4, 4, _box(37.9, 58.5, 41.1, 21.7, 41.5, 49.7)),
    PublishedResult(_CBN4, _FRCNN, f"{_CBN_ALL}: GN", _CBN_SETTING, 4, 4, _box(37.8, 59.1, 40.9, 22.4, 41.2, 49.0)),
    PublishedResult(_CBN4, _FRCNN, f"{_CBN_ALL}: CBN", _CBN_SETTING, 4, 4, _box(37.3, 57.7, 39.3, 21.9, 40.8, 48.2)),
    # Tab. 5 gives AP, AP50, AP75 only (box, then mask); default setting: norms in the heads.
    PublishedResult(_CBN5, _MRCNN, "heads: GN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box_mask((38.6, 59.8, 41.9, None, None, None), (35.0, 56.7, 37.3, None, None, None))),
    PublishedResult(_CBN5, _MRCNN, "heads: SyncBN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box_mask((38.5, 58.9, 42.3, None, None, None), (34.7, 56.3, 36.8, None, None, None))),
    PublishedResult(_CBN5, _MRCNN, "heads: CBN, backbone: FrozenBN", _CBN_SETTING, 4, 4,
                    _box_mask((38.5, 59.2, 42.1, None, None, None), (34.6, 56.4, 36.6, None, None, None))),
    # The released MABN README gives box AP / mask AP only; 2x = 180k iterations at 16 images.
    PublishedResult(_MABN, _MRCNN, "BN (placement of the released config)", "2x from scratch, 8 GPUs x 2 images", 2, 8,
                    _box_mask((32.38,), (29.07,))),
    PublishedResult(_MABN, _MRCNN, "BRN (placement of the released config)", "2x from scratch, 8 GPUs x 2 images", 2, 8,
                    _box_mask((34.07,), (30.98,))),
    PublishedResult(_MABN, _MRCNN, "SyncBN (placement of the released config)", "2x from scratch, 8 GPUs x 2 images", 2, 8,
                    _box_mask((36.80,), (33.10,))),
    PublishedResult(_MABN, _MRCNN, "MABN (placement of the released config)", "2x from scratch, 8 GPUs x 2 images", 2, 8,
                    _box_mask((36.50,), (32.69,))),
    PublishedResult(_MABN, _MRCNN, "SyncBN (placement of the released config)", "2x fine-tuned from ImageNet, 8 GPUs x 2 images", 2, 8,
                    _box_mask((38.25,), (34.22,))),
    PublishedResult(_MABN, _MRCNN, "MABN (placement of the released config)", "2x fine-tuned from an ImageNet MABN model pretrained with "
                    "weight centralization, 8 GPUs x 2 images", 2, 8, _box_mask((38.42,), (34.12,))),
]


def published_for(model_family: str, task: str) -> List[PublishedResult]:
    """Published rows of a model family that report ``task``.

    Args:
        model_family: "Faster R-CNN", "Mask R-CNN" or "RetinaNet" (none published for RetinaNet).
        task: "bbox" or "segm".
    Returns:
        the matching rows of :data:`PUBLISHED` (possibly empty).
    Raises:
        ValueError: an unknown family or task, naming the allowed values.
    """
    families = ("Faster R-CNN", "Mask R-CNN", "RetinaNet")
    if model_family not in families:
        raise ValueError(f"model_family = {model_family!r} is invalid; allowed: {', '.join(families)}")
    if task not in ("bbox", "segm"):
        raise ValueError(f"task = {task!r} is invalid; allowed: 'bbox', 'segm'")
    return [r for r in PUBLISHED if r.model.startswith(model_family) and task in r.results]
