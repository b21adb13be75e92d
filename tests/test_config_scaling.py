"""Norm iteration counts follow Detectron2's linear scaling (SOLVER.REFERENCE_WORLD_SIZE)."""
import smallbn_d2  # noqa: F401  (first: compatibility fixes)
from detectron2.engine import DefaultTrainer

from smallbn_d2.config import scale_norm_iterations
from smallbn_d2.engine import load_config


def _cfg(**opts):
    flat = []
    for k, v in opts.items():
        flat += [k.replace("__", "."), v]
    return load_config("", flat)


def test_scaled_like_detectrons_schedule():
    cfg = _cfg(SOLVER__REFERENCE_WORLD_SIZE=8, SOLVER__IMS_PER_BATCH=16, SOLVER__MAX_ITER=90000,
               MODEL__CBN__BURN_IN_ITERS=3000, MODEL__MABN__HEAD_WARMUP_ITERS=10000,
               MODEL__MABN__RENORM_WARMUP_ITERS=1000, MODEL__MABN__WARMUP_ITERS=7,
               MODEL__SMALLBN__FREEZE_NORM_STATS_ITER=85000)
    cfg.freeze()
    ours = scale_norm_iterations(cfg, 2)
    d2 = DefaultTrainer.auto_scale_workers(ours, 2)
    factor = d2.SOLVER.MAX_ITER / cfg.SOLVER.MAX_ITER
    assert factor == 4 and d2.SOLVER.IMS_PER_BATCH == 4  # 2 images per GPU kept
    assert d2.MODEL.CBN.BURN_IN_ITERS == 12000
    assert d2.MODEL.MABN.HEAD_WARMUP_ITERS == 40000
    assert d2.MODEL.MABN.RENORM_WARMUP_ITERS == 4000
    assert d2.MODEL.MABN.WARMUP_ITERS == 28
    assert d2.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER == 340000
    assert ours.is_frozen() and cfg.MODEL.MABN.HEAD_WARMUP_ITERS == 10000  # input untouched


def test_unset_keys_and_no_reference_are_left_alone():
    cfg = _cfg(SOLVER__REFERENCE_WORLD_SIZE=8)
    scaled = scale_norm_iterations(cfg, 4)
    assert scaled.MODEL.CBN.BURN_IN_ITERS is None
    assert scaled.MODEL.SMALLBN.FREEZE_NORM_STATS_ITER == -1
    assert scaled.MODEL.MABN.HEAD_WARMUP_ITERS == 20000
    assert scale_norm_iterations(_cfg(SOLVER__REFERENCE_WORLD_SIZE=0), 4) is not None
    same = _cfg(SOLVER__REFERENCE_WORLD_SIZE=0)
    assert scale_norm_iterations(same, 4) is same
