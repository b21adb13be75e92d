"""Two training processes on CPU (gloo): ``tools/train_net.py --num-gpus 2`` semantics (issue 7, item 5).

:func:`smallbn_d2.engine.launch.launch` with ``device="cpu"`` spawns two processes that each
build smallbn_d2's Trainer (real data loader on the shipped COCO sample: one image per process,
DDP) for a tiny Mask R-CNN and train a few iterations with CBN, MABN and synchronized BN
(``naiveSyncBN``: PyTorch's SyncBatchNorm is CUDA-only). Checked: finite losses, weights
identical across the processes after every step (SHA-256 of every parameter), and statistics per
process for CBN/MABN during training (different across processes: each sees its own image) but
identical for synchronized BN.

One model across processes (issue 18, item 4): a model with BN in the backbone, CBN in the FPN,
NaiveCBN in the box head and MABN in the mask head trains 3 iterations with a checkpoint period
of 2. The population statistics of every norm layer, recorded in each process just before
``AveragePopulationStatistics`` runs, differ across the processes; after it (iteration 1: the
periodic checkpoint; iteration 2: ``model_final``) they are equal in both processes, equal to
the saved checkpoints, and equal to the average of the recorded statistics as moments (E[x],
E[x^2]) computed here independently; CBN's windows and MABN's SMA buffers stay per process.
"""
import hashlib
import os

import pytest
import torch

import smallbn_d2  # noqa: F401,I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.engine import HookBase
from detectron2.utils import comm

from helpers import NORM_KEYS, REPO, tiny_cfg
from smallbn_d2.config import ConfigValueError
from smallbn_d2.data import register_coco_sample
from smallbn_d2.engine import AveragePopulationStatistics, Trainer, average_population_statistics
from smallbn_d2.engine.hooks import _write_moments, population_moments
from smallbn_d2.engine.launch import check_cpu_distributed, launch
from smallbn_d2.layers import IterationNormBase
from smallbn_d2.modeling import NORM_FAMILIES

ITERS = 3
NORMS = {"CBN": "running_mean", "MABN": "running_chi2", "naiveSyncBN": "running_mean"}
#: The model of the averaging test: one norm family per place (tests/helpers.py NORM_KEYS).
MIXED = {"backbone": "BN", "fpn": "CBN", "box_head": "NaiveCBN", "mask_head": "MABN"}
MIXED_CHECKPOINT_PERIOD = 2


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


def _norm_state(model, cross_iteration=False):
    """``{layer name: {buffer: tensor}}``: the population statistics of every torch BN and
    CBN/MABN layer (``running_*``), or with ``cross_iteration`` the CBN windows / MABN SMA buffers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, IterationNormBase) or isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            keys = [k for k in m._buffers if k.startswith("running_") != cross_iteration
                    and k != "num_batches_tracked" and m._buffers[k] is not None]
            out[name] = {k: m._buffers[k].detach().clone() for k in keys}
    return out


class _RecordBeforeAveraging(HookBase):
    """Registered just before AveragePopulationStatistics: this process's population statistics
    after every step, before they are averaged."""

    def __init__(self):
        self.states = {}

    def after_step(self):
        self.states[self.trainer.iter] = _norm_state(self.trainer.model.module)


class _Trainer(Trainer):
    def build_writers(self):
        return []

    def build_hooks(self):
        hooks = super().build_hooks()
        at = [i for i, h in enumerate(hooks) if isinstance(h, AveragePopulationStatistics)]
        self.record = _RecordBeforeAveraging()
        hooks.insert(at[0], self.record)
        return hooks


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
        after = _norm_state(model)
        per_process = comm.all_gather({"before": trainer.record.states, "after": after,
                                       "cross_after": _norm_state(model, cross_iteration=True),
                                       "classes": {n: type(m).__name__ for n, m in model.named_modules() if n in after}})
        if comm.is_main_process():
            losses = [v for v, _ in trainer.storage.history("total_loss").values()]
            results[norm] = {"same_weights": check.same, "losses": losses, "per_process": per_process,
                             "output_dir": cfg.OUTPUT_DIR, "world_size": comm.get_world_size(),
                             "ddp": type(trainer.model).__name__}
    if comm.is_main_process():
        torch.save(results, result_path)


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
    opts = ["SOLVER.MAX_ITER", ITERS, "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp / "mixed"),
            "SOLVER.CHECKPOINT_PERIOD", MIXED_CHECKPOINT_PERIOD, "MODEL.CBN.WINDOW_SIZE", 2,
            "MODEL.MABN.BUFFER_SIZE", 2, "MODEL.MABN.RENORM_WARMUP_ITERS", 0, "MODEL.MABN.HEAD_WARMUP_ITERS", 0]
    for place, norm in MIXED.items():
        opts += [NORM_KEYS[place], norm]
    cfgs["mixed"] = tiny_cfg("mask_rcnn", "BN", opts=opts)
    cfgs["mixed"].freeze()
    result_path = tmp / "results.pt"
    # a file rendezvous: no TCP port that a concurrent job could take between choosing and binding it
    launch(_worker, 2, dist_url=f"file://{tmp / 'rendezvous'}", args=(cfgs, str(result_path)), device="cpu")
    return torch.load(result_path, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("norm", list(NORMS))
def test_two_cpu_processes_train_with_identical_weights(norm, two_process_results):
    r = two_process_results[norm]
    assert r["world_size"] == 2 and r["ddp"] == "DistributedDataParallel"
    assert len(r["losses"]) == ITERS and all(map(lambda v: v == v and abs(v) != float("inf"), r["losses"]))
    assert r["same_weights"] == [True] * ITERS
    # the first norm layer of the backbone stem, in each process after the last step, before averaging
    a, b = (p["before"][ITERS - 1]["backbone.bottom_up.stem.conv1.norm"][NORMS[norm]] for p in r["per_process"])
    if norm == "naiveSyncBN":
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # synchronized: global statistics
    else:
        assert (a - b).abs().max() > 1e-4, "CBN/MABN statistics must stay per process"


def _moment_average(states):
    """The independent reference: per-process population statistics {buffer: (C,)} averaged as
    moments. BN/CBN: E[x] = mean of the running means, E[x^2] = mean of (running_var + mean^2),
    var = E[x^2] - E[x]^2; MABN (running_chi2 = E[x^2]): the mean of running_chi2."""
    n = len(states)
    if "running_chi2" in states[0]:
        return {"running_chi2": sum(s["running_chi2"].double() for s in states) / n}
    mean = sum(s["running_mean"].double() for s in states) / n
    sq = sum(s["running_var"].double() + s["running_mean"].double() ** 2 for s in states) / n
    return {"running_mean": mean, "running_var": sq - mean ** 2}


#: layer class -> norm name (the classes Detectron2's get_norm builds for MIXED's names)
NORM_OF_CLASS = {"BatchNorm2d": "BN", "CrossIterationBatchNorm2d": "CBN",
                 "NaiveCrossIterationBatchNorm2d": "NaiveCBN", "MovingAverageBatchNorm2d": "MABN"}


@pytest.mark.slow
def test_population_statistics_are_one_model_across_processes(two_process_results):
    """Before each checkpoint and evaluation the population statistics of every norm layer are
    averaged over the processes as moments: equal in both processes, equal to the checkpoint
    saved then, equal to the moment average of what each process had; windows stay per process."""
    r = two_process_results["mixed"]
    assert r["world_size"] == 2 and r["same_weights"] == [True] * ITERS
    p0, p1 = r["per_process"]
    kinds = {name: NORM_OF_CLASS[cls] for name, cls in p0["classes"].items()}
    assert kinds.keys() == p0["after"].keys()
    assert sorted(set(kinds.values())) == sorted(set(MIXED.values())), kinds  # every family, each place
    assert sum(v == "MABN" for v in kinds.values()) >= 4 and sum(v == "BN" for v in kinds.values()) >= 10

    # the statistics would differ: each process saw its own images (before averaging, last step)
    for name, kind in kinds.items():
        for key, a in p0["before"][ITERS - 1][name].items():
            b = p1["before"][ITERS - 1][name][key]
            assert (a.double() - b.double()).abs().max() > 1e-6, (name, key, "identical before averaging")

    final = torch.load(os.path.join(r["output_dir"], "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    periodic_iter = MIXED_CHECKPOINT_PERIOD - 1
    periodic = torch.load(os.path.join(r["output_dir"], f"model_{periodic_iter:07d}.pth"), map_location="cpu",
                          weights_only=False)["model"]
    worst_naive = 0.0
    for name in kinds:
        expected_final = _moment_average([p0["before"][ITERS - 1][name], p1["before"][ITERS - 1][name]])
        expected_periodic = _moment_average([p0["before"][periodic_iter][name], p1["before"][periodic_iter][name]])
        for key, expected in expected_final.items():
            a, b = p0["after"][name][key], p1["after"][name][key]
            assert torch.equal(a, b), (name, key, "processes differ after training")
            assert torch.equal(a, final[f"{name}.{key}"]), (name, key, "model_final.pth differs")
            torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
            torch.testing.assert_close(periodic[f"{name}.{key}"].double(), expected_periodic[key],
                                       rtol=1e-5, atol=1e-6, msg=f"{name}.{key} at the periodic checkpoint")
            if key == "running_var":  # averaging the variances directly would be measurably wrong
                naive = (p0["before"][ITERS - 1][name][key].double() + p1["before"][ITERS - 1][name][key].double()) / 2
                worst_naive = max(worst_naive, ((naive - expected).abs() / expected.abs().clamp_min(1e-6)).max().item())
    assert worst_naive > 1e-3, worst_naive

    # cross-iteration state (CBN windows, MABN SMA buffers) stays per process
    cross = [(name, key) for name, bufs in p0["cross_after"].items() for key in bufs
             if key in ("window_nu0", "chi2_buffer")]  # second moments: > 0
    assert {kinds[n] for n, _ in cross} == {"CBN", "NaiveCBN", "MABN"}, cross
    for name, key in cross:
        a, b = p0["cross_after"][name][key], p1["cross_after"][name][key]
        assert ((a.double() - b.double()).abs() / (a.double().abs() + b.double().abs())).max() > 1e-3, \
            (name, key, "windows must stay per process")


# ----------------------------------------------------------------------------- single-process checks
@pytest.mark.parametrize("family", ["torch BN"] + list(NORM_FAMILIES))
def test_population_moments_round_trip_for_every_family(family):
    """What the averaging reads (moments) and writes back (``population_state``) restores every
    family's population statistics: averaging identical processes changes nothing. A family
    registered later is covered here without editing the test."""
    torch.manual_seed(0)
    c = 6
    if family == "torch BN":
        layer = torch.nn.BatchNorm2d(c)
        layer.running_mean.copy_(torch.randn(c))
        layer.running_var.copy_(torch.rand(c) + 0.1)
    else:
        layer = NORM_FAMILIES[family].layer_class(c)
        mean = torch.randn(c, dtype=torch.float64)
        layer.set_population_statistics(mean, mean ** 2 + torch.rand(c, dtype=torch.float64) + 0.1)
    before = {k: v.clone() for k, v in layer.named_buffers() if k.startswith("running_")}
    assert before and (layer.population_state_keys() if family != "torch BN" else ("running_mean", "running_var"))
    mean, sq_mean = population_moments(layer)
    assert mean.dtype == sq_mean.dtype == torch.float64 and mean.shape == sq_mean.shape == (c,)
    assert bool((sq_mean >= mean ** 2).all())  # a second moment
    _write_moments(layer, mean, sq_mean)
    for k, v in before.items():
        torch.testing.assert_close(getattr(layer, k), v, rtol=1e-6, atol=1e-7, msg=k)


def test_averaging_is_a_no_op_in_one_process():
    layer = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    layer[0].running_mean.fill_(2.0)
    assert average_population_statistics(layer) == 0
    assert torch.equal(layer[0].running_mean, torch.full((3,), 2.0))


def test_averaging_hook_runs_where_a_checkpoint_or_evaluation_follows(monkeypatch):
    import smallbn_d2.engine.hooks as hooks_module

    calls = []
    monkeypatch.setattr(hooks_module, "average_population_statistics", lambda model: calls.append(trainer.iter) or 0)
    hook = AveragePopulationStatistics((3, 0))  # checkpoint every 3 iterations, no periodic evaluation
    trainer = type("FakeTrainer", (), {"model": None, "max_iter": 8, "iter": 0})()
    hook.trainer = trainer
    for trainer.iter in range(8):
        hook.after_step()
    assert calls == [2, 5, 7]  # model_0000002, model_0000005, model_final (Detectron2's periodic rules)
    with pytest.raises(ValueError, match=r"period = 2.5 is invalid"):
        AveragePopulationStatistics((2.5,))


def _index(hooks, cls):
    found = [i for i, h in enumerate(hooks) if isinstance(h, cls)]
    assert len(found) == 1, (cls.__name__, [type(h).__name__ for h in hooks])
    return found[0]


def test_trainer_averages_after_precise_norm_and_before_checkpoint_and_evaluation(tmp_path):
    from detectron2.engine import hooks as d2_hooks

    from smallbn_d2.engine import PreciseNorm

    cfg = tiny_cfg("mask_rcnn", "MABN", where=["fpn"], opts=[
        "OUTPUT_DIR", str(tmp_path), "TEST.PRECISE_BN.ENABLED", True, "TEST.EVAL_PERIOD", 7,
        "SOLVER.CHECKPOINT_PERIOD", 5])
    hooks = _Trainer(cfg)._hooks
    i = _index(hooks, AveragePopulationStatistics)
    assert _index(hooks, PreciseNorm) < i < _index(hooks, d2_hooks.PeriodicCheckpointer) < _index(hooks, d2_hooks.EvalHook)
    assert hooks[i].periods == (5, 7)


def test_lazy_flow_averages_after_precise_norm_and_before_checkpoint_and_evaluation(tmp_path, monkeypatch):
    from detectron2.config import LazyConfig
    from detectron2.engine import SimpleTrainer
    from detectron2.engine import hooks as d2_hooks

    from smallbn_d2.engine import PreciseNorm
    from smallbn_d2.lazy import do_train

    registered = []
    monkeypatch.setattr(SimpleTrainer, "train", lambda self, start, max_iter: registered.extend(self._hooks))
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "test", "tiny_mask_rcnn_CBN_lazy.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"train.output_dir={tmp_path}", "train.eval_period=4",
                                           "train.checkpointer.period=6", "smallbn.precise_norm.enabled=true"])
    do_train(cfg)
    i = _index(registered, AveragePopulationStatistics)
    assert (_index(registered, PreciseNorm) < i < _index(registered, d2_hooks.PeriodicCheckpointer)
            < _index(registered, d2_hooks.EvalHook))
    assert registered[i].periods == (6, 4)


def test_cuda_only_sync_bn_is_refused_on_cpu_before_start():
    cfg = tiny_cfg("mask_rcnn", "SyncBN", where=["fpn"])
    check_cpu_distributed(cfg, 1)  # one process: SyncBatchNorm falls back to BN
    with pytest.raises(ConfigValueError, match=r"MODEL.FPN.NORM = 'SyncBN'.*naiveSyncBN"):
        check_cpu_distributed(cfg, 2)
