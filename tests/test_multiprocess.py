"""Two training processes on CPU (gloo): ``tools/train_net.py --num-gpus 2`` semantics (issue 7, item 5).

:func:`smallbn_d2.engine.launch.launch` with ``device="cpu"`` spawns two processes that each
build smallbn_d2's Trainer (real data loader on the shipped COCO sample: one image per process,
DDP) for a tiny Mask R-CNN and train a few iterations with CBN, MABN and synchronized BN
(``naiveSyncBN``: PyTorch's SyncBatchNorm is CUDA-only). Checked: finite losses, weights
identical across the processes after every step (SHA-256 of every parameter), and statistics per
process for CBN/MABN (different across processes: each sees its own image) but identical for
synchronized BN.
"""
import hashlib
import json
import os

import pytest
import torch

import smallbn_d2  # noqa: F401,I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.engine import HookBase
from detectron2.utils import comm

from helpers import tiny_cfg
from smallbn_d2.config import ConfigValueError
from smallbn_d2.data import register_coco_sample
from smallbn_d2.engine import Trainer
from smallbn_d2.engine.launch import check_cpu_distributed, launch

ITERS = 3
NORMS = {"CBN": "running_mean", "MABN": "running_chi2", "naiveSyncBN": "running_mean"}


class _ReplicaCheck(HookBase):
    """After every step: gather each process's parameter hashes; rank 0 records whether they agree."""

    def __init__(self):
        self.same = []

    def after_step(self):
        model = self.trainer.model.module if hasattr(self.trainer.model, "module") else self.trainer.model
        digest = hashlib.sha256()
        for _, p in sorted(model.named_parameters()):
            digest.update(p.detach().contiguous().numpy().tobytes())
        hashes = comm.all_gather(digest.hexdigest())
        self.same.append(len(set(hashes)) == 1)


class _Trainer(Trainer):
    def build_writers(self):
        return []


def _first_norm_stat(model, norm):
    """The population statistic of the first norm layer of the backbone stem (C,)."""
    stem = model.backbone.bottom_up.stem.conv1.norm
    return getattr(stem, NORMS[norm]).detach().clone()


def _worker(cfgs, result_path):
    register_coco_sample()  # a spawned process: a new interpreter, without tests/conftest.py's registration
    results = {}
    for norm, cfg in cfgs.items():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        torch.manual_seed(0)  # DDP broadcasts rank 0's initial weights anyway
        trainer = _Trainer(cfg)
        check = _ReplicaCheck()
        trainer.register_hooks([check])
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model.module
        stats = comm.all_gather(_first_norm_stat(model, norm).tolist())
        if comm.is_main_process():
            losses = [v for v, _ in trainer.storage.history("total_loss").values()]
            results[norm] = {"same_weights": check.same, "losses": losses, "stats": stats,
                             "world_size": comm.get_world_size(), "ddp": type(trainer.model).__name__}
    if comm.is_main_process():
        with open(result_path, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    cfgs = {}
    for norm in NORMS:
        cfg = tiny_cfg("mask_rcnn", norm, where=["backbone", "fpn", "box_head", "mask_head"], opts=[
            "SOLVER.MAX_ITER", ITERS, "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp / norm),
            "MODEL.CBN.WINDOW_SIZE", 2, "MODEL.MABN.BUFFER_SIZE", 2, "MODEL.MABN.RENORM_WARMUP_ITERS", 0,
            "MODEL.MABN.HEAD_WARMUP_ITERS", 0])
        cfg.freeze()
        cfgs[norm] = cfg
    result_path = tmp / "results.json"
    # a file rendezvous: no TCP port that a concurrent job could take between choosing and binding it
    launch(_worker, 2, dist_url=f"file://{tmp / 'rendezvous'}", args=(cfgs, str(result_path)), device="cpu")
    with open(result_path) as f:
        return json.load(f)


@pytest.mark.parametrize("norm", list(NORMS))
def test_two_cpu_processes_train_with_identical_weights(norm, two_process_results):
    r = two_process_results[norm]
    assert r["world_size"] == 2 and r["ddp"] == "DistributedDataParallel"
    assert len(r["losses"]) == ITERS and all(map(lambda v: v == v and abs(v) != float("inf"), r["losses"]))
    assert r["same_weights"] == [True] * ITERS
    a, b = (torch.tensor(s) for s in r["stats"])
    if norm == "naiveSyncBN":
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # synchronized: global statistics
    else:
        assert (a - b).abs().max() > 1e-4, "CBN/MABN statistics must stay per process"


def test_cuda_only_sync_bn_is_refused_on_cpu_before_start():
    cfg = tiny_cfg("mask_rcnn", "SyncBN", where=["fpn"])
    check_cpu_distributed(cfg, 1)  # one process: SyncBatchNorm falls back to BN
    with pytest.raises(ConfigValueError, match=r"MODEL.FPN.NORM = 'SyncBN'.*naiveSyncBN"):
        check_cpu_distributed(cfg, 2)
