"""Published COCO numbers of the CBN and MABN papers: the reference rows of ``compare_runs.py --published``.

AP in percent, copied from the source named in each row (restated in docs/METHODS.md); they come
from full R50-FPN models on full COCO train2017 in the row's ``setting``, so compare a run with
them only when its setting matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from .run_metrics import METRICS

__all__ = ["PublishedResult", "PUBLISHED", "published_for"]


@dataclass(frozen=True)
class PublishedResult:
    """One published result.

    Attributes:
        source: paper and table (or released README).
        model: e.g. "Faster R-CNN R50-FPN".
        norm: which norm sits where, worded as :func:`~.run_metrics.describe_norms` words it.
        setting: schedule, GPUs x images per GPU, initialization.
        images_per_gpu, num_gpus: the batch of the setting.
        results: task ("bbox", "segm") -> metric ("AP", "AP50", ...) -> value in percent; a metric
            the source does not give is absent.
    """

    source: str
    model: str
    norm: str
    setting: str
    images_per_gpu: int
    num_gpus: int
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)


def _results(box, mask=()) -> Dict[str, Dict[str, float]]:
    """task -> metric -> AP from the values given, in the order of METRICS."""
    out = {"bbox": dict(zip(METRICS, box))}
    if mask:
        out["segm"] = dict(zip(METRICS, mask))
    return out


_CBN_SETTING = "1x (12 epochs), ImageNet-pretrained, 4 GPUs x 4 images, 4conv1fc box head"
_CBN_ALL = "backbone (except conv1, res2) + heads"  # the paper's "normalizers everywhere" setting
#: CBN paper (Yao et al. 2021), Tab. 4, Faster R-CNN: box AP, AP50, AP75, APs, APm, APl.
_CBN_TAB4 = {
    "box head: none, backbone: FrozenBN": (36.9, 58.2, 39.9, 21.2, 40.8, 46.9),
    "box head: BN, backbone: FrozenBN": (36.3, 57.3, 39.2, 20.8, 39.7, 47.3),
    "box head: SyncBN, backbone: FrozenBN": (37.7, 58.5, 41.1, 22.0, 40.9, 49.0),
    "box head: GN, backbone: FrozenBN": (37.8, 59.0, 40.8, 22.3, 41.2, 48.4),
    "box head: CBN, backbone: FrozenBN": (37.7, 59.0, 40.7, 22.1, 40.9, 48.8),
    f"{_CBN_ALL}: BN": (35.5, 56.4, 38.7, 19.7, 38.8, 47.3),
    f"{_CBN_ALL}: SyncBN": (37.9, 58.5, 41.1, 21.7, 41.5, 49.7),
    f"{_CBN_ALL}: GN": (37.8, 59.1, 40.9, 22.4, 41.2, 49.0),
    f"{_CBN_ALL}: CBN": (37.3, 57.7, 39.3, 21.9, 40.8, 48.2),
}
#: Tab. 5, Mask R-CNN with norms in the heads: (box, mask) AP, AP50, AP75 (the table gives no more).
_CBN_TAB5 = {
    "heads: GN, backbone: FrozenBN": ((38.6, 59.8, 41.9), (35.0, 56.7, 37.3)),
    "heads: SyncBN, backbone: FrozenBN": ((38.5, 58.9, 42.3), (34.7, 56.3, 36.8)),
    "heads: CBN, backbone: FrozenBN": ((38.5, 59.2, 42.1), (34.6, 56.4, 36.6)),
}
_SCRATCH = "2x from scratch, 8 GPUs x 2 images"  # 2x = 180k iterations of 16 images
#: The released MABN README (Yan et al. 2020), Mask R-CNN, norms placed as in its released config:
#: (norm, setting, box AP, mask AP); it gives no AP50 and beyond.
_MABN_README = [
    ("BN", _SCRATCH, 32.38, 29.07),
    ("BRN", _SCRATCH, 34.07, 30.98),
    ("SyncBN", _SCRATCH, 36.80, 33.10),
    ("MABN", _SCRATCH, 36.50, 32.69),
    ("SyncBN", "2x fine-tuned from ImageNet, 8 GPUs x 2 images", 38.25, 34.22),
    ("MABN", "2x fine-tuned from an ImageNet MABN model pretrained with weight centralization, 8 GPUs x 2 images",
     38.42, 34.12),
]

#: Every published row, in the order of the sources.
PUBLISHED: List[PublishedResult] = (
    [PublishedResult("CBN paper (Yao et al. 2021), Tab. 4", "Faster R-CNN R50-FPN", norm, _CBN_SETTING, 4, 4,
                     _results(box)) for norm, box in _CBN_TAB4.items()]
    + [PublishedResult("CBN paper (Yao et al. 2021), Tab. 5", "Mask R-CNN R50-FPN", norm, _CBN_SETTING, 4, 4,
                       _results(box, mask)) for norm, (box, mask) in _CBN_TAB5.items()]
    + [PublishedResult("MABN released README (Yan et al. 2020)", "Mask R-CNN R50-FPN",
                       f"{norm} (placement of the released config)", setting, 2, 8, _results((box,), (mask,)))
       for norm, setting, box, mask in _MABN_README]
)


def published_for(model_family: str, task: str) -> List[PublishedResult]:
    """The rows of :data:`PUBLISHED` of ``model_family`` ("Faster R-CNN", "Mask R-CNN") that report
    ``task`` ("bbox", "segm"); empty for a family without published rows (e.g. "RetinaNet")."""
    return [r for r in PUBLISHED if r.model.startswith(model_family + " ") and task in r.results]
