"""What the benchmarks measure: rows (norms and variants), detector settings, configs, targets.

The rows are the benchmark's choice of norms and variants; which config keys hold a norm and which
norms have a FrozenBN form are asked of ``smallbn_d2.config.norm_keys`` and the norm registry.

Detector level (``tools/benchmark_norms.py``): the same detector is built with each row's norm
in two settings:

* ``1x``: frozen-BN backbone (``RESNETS.NORM FrozenBN``, ``FREEZE_AT 2``), the norm in the FPN,
  the box head and the mask head (the CBN paper's default "normalizers in the heads");
* ``scratch_3x``: the norm everywhere (backbone too, ``FREEZE_AT 0``, ``STRIDE_IN_1X1 False``,
  as Detectron2's GN scratch configs).

Block level (``tools/benchmark_cbn_layer.py``): :data:`LAYER_NORMS` and their descriptions.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from smallbn_d2.config import norm_keys
from smallbn_d2.modeling.norms import frozen_convertible_norms

__all__ = ["NORMS", "VARIANTS", "FLOOR_NORM", "SETTINGS", "SECTION", "DEFAULT_CONFIG", "BACKBONE_NORM_KEY",
           "NO_FROZEN_FORM", "SUMMARY_NORMS", "TARGETS", "CONVERTED_TOLERANCE",
           "INFERENCE_SAME_AS", "make_cfg", "LAYER_NORMS", "LAYER_DESCRIPTIONS", "LAYER_START_ITER",
           "LAYER_SECTION", "ACCURACY_SECTION"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ detector level
#: rows of the detector-level table, in order
NORMS = ("BN", "SyncBN", "GN", "CBN", "NaiveCBN", "MABN", "floor", "CBN-sub2")
#: norm registered (in the child processes) for the ``floor`` row: see :mod:`.floor`
FLOOR_NORM = "BNFloor"
#: rows that are a norm name plus config overrides
VARIANTS: Dict[str, Tuple[str, List]] = {"floor": (FLOOR_NORM, []),
                                         "CBN-sub2": ("CBN", ["MODEL.CBN.GRAD_SUBSAMPLE", 2])}
SETTINGS = ("1x", "scratch_3x")
#: docs/BENCHMARKS.md sections ``benchmark_norms_<setting>``
SECTION = "benchmark_norms"
#: the default detector (Mask R-CNN R50-FPN 4conv1fc with the overrides of :func:`make_cfg`)
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "Base-RCNN-FPN.yaml")
#: config key of the backbone's norm (FrozenBN in ``1x``, the row's norm in ``scratch_3x``)
BACKBONE_NORM_KEY = "MODEL.RESNETS.NORM"
#: norms without a FrozenBN form (no converted-inference timing): asked of the norm registry
NO_FROZEN_FORM = tuple(n for n in ("BN", "SyncBN", "GN", "CBN", "NaiveCBN", "MABN")
                       if n not in frozen_convertible_norms())
#: rows summarized under the table (ratios to BN, targets)
SUMMARY_NORMS = ("CBN", "CBN-sub2", "MABN")
#: (setting, row) -> (max time ratio, max memory ratio) to BN; rows not listed are reported only
TARGETS = {
    ("1x", "CBN"): (1.20, 1.10),
    ("1x", "MABN"): (1.10, 1.05),
}
#: converted CBN/MABN inference within 2% of BN's eval-mode time
CONVERTED_TOLERANCE = 0.02
#: rows whose inference is, by construction, that of another row (same layers in eval mode)
INFERENCE_SAME_AS = {"floor": "BN", "CBN-sub2": "CBN"}


def make_cfg(args, setting: str, norm: str):
    """The detector config of ``setting`` with the row ``norm`` (see the module docstring).

    Args:
        args: the benchmark's options: ``config_file`` (None: :data:`DEFAULT_CONFIG` as Mask
            R-CNN R50-FPN with the 4conv1fc box head), ``images`` (per iteration), ``min_size``,
            ``max_size`` (pixels, train and test), ``device`` (``MODEL.DEVICE``: "cpu" or "cuda"),
            ``opts`` (``KEY VALUE`` overrides, applied last).
        setting: one of :data:`SETTINGS`.
        norm: one of :data:`NORMS` (or any registered norm name).
    Returns:
        an unfrozen ``CfgNode``, random initialization, ``BASE_LR 0.0025``, CBN without
        burn-in, ``SCORE_THRESH_TEST 0`` (every model returns ``DETECTIONS_PER_IMAGE`` detections).
    Raises:
        ValueError: unknown ``setting`` (naming the allowed ones).
    """
    from smallbn_d2.engine import load_config

    name, opts = VARIANTS.get(norm, (norm, []))
    opts = list(opts)
    if args.config_file is None:
        opts += ["MODEL.RESNETS.DEPTH", 50, "MODEL.MASK_ON", True, "MODEL.ROI_BOX_HEAD.NUM_CONV", 4,
                 "MODEL.ROI_BOX_HEAD.NUM_FC", 1]
    opts += ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", args.images,
             "SOLVER.BASE_LR", 0.0025, "INPUT.MIN_SIZE_TRAIN", (args.min_size,), "INPUT.MAX_SIZE_TRAIN", args.max_size,
             "INPUT.MIN_SIZE_TEST", args.min_size, "INPUT.MAX_SIZE_TEST", args.max_size,
             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "DATALOADER.NUM_WORKERS", 0,
             "MODEL.CBN.BURN_IN_ITERS", 0, "MODEL.CBN.BURN_IN_EPOCHS", None]
    for key in norm_keys(load_config(args.config_file or DEFAULT_CONFIG)):  # every norm but the backbone's
        if key.startswith("MODEL.") and key != BACKBONE_NORM_KEY:
            opts += [key, name]
    if setting == "1x":
        opts += [BACKBONE_NORM_KEY, "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2]
    elif setting == "scratch_3x":
        opts += [BACKBONE_NORM_KEY, name, "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.STRIDE_IN_1X1", False]
    else:
        raise ValueError(f"setting = {setting!r} is invalid; allowed: {SETTINGS}")
    return load_config(args.config_file or DEFAULT_CONFIG, opts + list(args.opts))


# ------------------------------------------------------------------------------ block level
#: rows of the block-level table, in order
LAYER_NORMS = ("BN", "floor", "CBN", "CBN-autograd", "CBN-sub2", "NaiveCBN", "MABN", "GN")
#: the layer behind each block-level row
LAYER_DESCRIPTIONS = {
    "BN": "torch.nn.BatchNorm2d",
    "floor": "BN + one extra weight-gradient conv per block (exact CBN's arithmetic floor)",
    "CBN": "CBN k=4, closed form (grad_mode='closed_form')",
    "CBN-autograd": "CBN k=4, autograd path (grad_mode='autograd', the released code's way)",
    # (rows of the output instead of RoIs if N < 8)
    "CBN-sub2": "CBN k=4, closed form, d nu/d theta from every 2nd RoI (grad_subsample=2, approximate)",
    "NaiveCBN": "Naive CBN k=4 (no compensation)",
    "MABN": "MABN m=16, SMA and renormalization active",
    "GN": "GroupNorm, 32 groups",
}
#: first trainer iteration per block-level row: MABN past its warm-ups (renormalization from 1000)
LAYER_START_ITER = {"MABN": 2000}
#: docs/BENCHMARKS.md sections of the block-level timing and of the grad_subsample accuracy run
LAYER_SECTION = "benchmark_cbn_layer"
ACCURACY_SECTION = "cbn_subsample_accuracy"
