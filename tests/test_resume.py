"""Exact resume of the normalization state through the real Trainer machinery (issue 7, item 1).

N iterations, a checkpoint, a simulated preemption, ``resume_or_load(resume=True)`` and M more
iterations must give the same weights, population statistics and CBN window / MABN
moving-average buffers as N + M iterations straight (deterministic CPU run, 1e-6).

Detectron2 restores neither its data loader position nor the RNG on resume, so the batches and
the RNG seed depend only on the trainer iteration (:class:`IterationIndexedTrainer`). The
reference is the uninterrupted run; BN is the control (Detectron2's own resume).
"""
import os

import pytest
import torch

import smallbn_d2  # noqa: I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.engine import HookBase
from helpers import coco_batches, tiny_cfg
from smallbn_d2.engine import Trainer

N, M = 3, 2  # iterations before the preemption, after the resume


class Preempted(Exception):
    """Raised by :class:`PreemptAfter` to stop a run the way a killed job stops."""


class _IndexedLoader:
    """An endless 'data loader' yielding the batch its trainer chose for the current iteration."""

    def __init__(self):
        self.current = None

    def __iter__(self):
        while True:
            yield self.current


class _IterationInput(HookBase):
    """Before every step: seed the RNG with the iteration (RoI/anchor sampling) and pick the batch."""

    def __init__(self, loader, batches, seed):
        self.loader, self.batches, self.seed = loader, batches, seed

    def before_step(self):
        it = self.trainer.iter
        torch.manual_seed(self.seed + it)
        self.loader.current = self.batches[it]


class PreemptAfter(HookBase):
    """Raise :class:`Preempted` after iteration ``it`` (after the hooks before it, the
    checkpointer included, have run)."""

    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise Preempted(f"preempted after iteration {self.it}")


class RecordNormIteration(HookBase):
    """Record the iteration the first CBN/MABN layer sees at every step."""

    def __init__(self):
        self.seen = []

    def after_step(self):
        layers = [layer for _, layer in smallbn_d2.modeling.iteration_norms(self.trainer.model)]
        if layers:
            self.seen.append(layers[0].iteration)


class IterationIndexedTrainer(Trainer):
    """smallbn_d2's Trainer fed ``batches[iteration]`` with the RNG seeded by the iteration.

    Set ``batches`` (and optionally ``extra_hooks``) on a subclass / via :func:`make_trainer`.
    No metric writers (they do not affect the state).
    """

    batches = None
    seed = 1234
    extra_hooks = ()

    @classmethod
    def build_train_loader(cls, cfg):
        return _IndexedLoader()

    def build_writers(self):
        return []

    def build_hooks(self):
        hooks = super().build_hooks()
        loader = self._trainer.data_loader
        return hooks[:1] + [_IterationInput(loader, self.batches, self.seed)] + hooks[1:] + list(self.extra_hooks)


def make_trainer(cfg, batches, extra_hooks=(), seed=0):
    """A fresh :class:`IterationIndexedTrainer` (model initialised with ``seed``)."""
    cls = type("T", (IterationIndexedTrainer,), {"batches": batches, "extra_hooks": tuple(extra_hooks)})
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)  # tools/train_net.py's default_setup does this
    torch.manual_seed(seed)
    return cls(cfg)


def resume_cfg(norm, out_dir, max_iter=N + M, opts=()):
    """Tiny Mask R-CNN, ``norm`` everywhere, checkpoint every N iterations, no evaluation."""
    return tiny_cfg("mask_rcnn", norm, opts=[
        "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", N, "DATASETS.TEST", (),
        "OUTPUT_DIR", str(out_dir),
        # CBN: window k = 4 (3 stored iterations), no burn-in: entries written before the
        # checkpoint are still in the window after the resume.
        "MODEL.CBN.WINDOW_SIZE", 4, "MODEL.CBN.BURN_IN_ITERS", 0,
        # MABN: SMA over m = 3 iterations from t = 4 (1-based) on, renormalization from the start,
        # no head warm-up: every state path is used on both sides of the checkpoint.
        "MODEL.MABN.BUFFER_SIZE", 3, "MODEL.MABN.RENORM_WARMUP_ITERS", 0,
        "MODEL.MABN.HEAD_WARMUP_ITERS", 0, "MODEL.MABN.WARMUP_ITERS", 0,
    ] + list(opts))


# one_thread: tests/conftest.py


def _model_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.checkpointer.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["BN", "CBN", "MABN"])
def test_resume_is_exact(norm, tmp_path, one_thread):
    cfg = resume_cfg(norm, tmp_path / "straight")
    batches = coco_batches(cfg, N + M)

    straight = make_trainer(cfg, batches)
    straight.resume_or_load(resume=False)
    straight.train()
    expected = _model_state(straight)
    expected_opt = straight.optimizer.state_dict()

    # the same run, preempted after iteration N-1, right after the checkpoint there
    cfg_b = resume_cfg(norm, tmp_path / "preempted")
    first = make_trainer(cfg_b, batches, extra_hooks=[PreemptAfter(N - 1)])
    first.resume_or_load(resume=False)
    with pytest.raises(Preempted):
        first.train()
    assert os.path.exists(tmp_path / "preempted" / f"model_{N - 1:07d}.pth")

    # --resume: a new process would build a new trainer (another init seed: all is loaded)
    recorder = RecordNormIteration()
    resumed = make_trainer(cfg_b, batches, extra_hooks=[recorder], seed=99)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == N
    resumed.train()
    got = _model_state(resumed)

    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # optimizer (SGD momentum buffers) too
    for (i, a), (j, b) in zip(sorted(resumed.optimizer.state_dict()["state"].items()),
                              sorted(expected_opt["state"].items())):
        torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"], rtol=1e-6, atol=1e-6)

    if norm == "BN":
        return
    # the layers saw the trainer's iterations after the resume, not a count restarted at 0
    assert recorder.seen == list(range(N, N + M))
    # the compared state really carries entries written before the checkpoint (so a resume that
    # lost them would have changed the outputs of iterations N.. and thus the weights)
    tag_key = "window_iters" if norm == "CBN" else "chi2_iters"
    tags = [v for k, v in got.items() if k.endswith(tag_key)]
    assert tags, f"no {tag_key} buffers in the model"
    before_resume = N - 1 if norm == "CBN" else N  # MABN tags are 1-based (t = iteration + 1)
    for t in tags:
        assert (t == before_resume).any() and (t >= N).any(), t


# ----------------------------------------------------------------------------- a finished run
def _cross_state(state, norm):
    keys = ("window_",) if norm == "CBN" else ("chi2_buffer", "chi2_iters", "psi_buffer", "psi_iters")
    return {k: v for k, v in state.items() if any(s in k.rsplit(".", 1)[-1] for s in keys)}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_resume_of_a_finished_run_takes_the_full_checkpoint_of_the_same_iteration(norm, tmp_path, one_thread, caplog):
    """``--resume`` of a finished run (``last_checkpoint`` = model_final.pth, which leaves out the
    cross-iteration state) continues from the periodic checkpoint written in the same step: the
    CBN windows / MABN buffers are those of the finished run, not empty."""
    cfg = resume_cfg(norm, tmp_path / "run", max_iter=N)  # CHECKPOINT_PERIOD N: model_{N-1} and model_final
    batches = coco_batches(cfg, N + M)
    finished = make_trainer(cfg, batches)
    finished.resume_or_load(resume=False)
    finished.train()
    assert open(tmp_path / "run" / "last_checkpoint").read().strip() == "model_final.pth"
    expected = _cross_state(_model_state(finished), norm)
    assert expected and any(bool((v != 0).any()) for k, v in expected.items() if not k.endswith("_iters"))

    cfg_more = resume_cfg(norm, tmp_path / "run", max_iter=N + M)  # train further
    resumed = make_trainer(cfg_more, batches, seed=99)
    with caplog.at_level("INFO"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == N
    assert f"Resuming from {tmp_path / 'run' / f'model_{N - 1:07d}.pth'}" in caplog.text
    got = _cross_state(_model_state(resumed), norm)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_resume_from_a_final_checkpoint_alone_warns_what_restarts(norm, tmp_path, one_thread, caplog):
    """Without a periodic checkpoint of the last iteration (the main job writes none), resuming
    from model_final.pth starts every window / moving average empty, and says so as a warning."""
    cfg = resume_cfg(norm, tmp_path / "run", max_iter=N, opts=["SOLVER.CHECKPOINT_PERIOD", 1000])
    batches = coco_batches(cfg, N + M)
    finished = make_trainer(cfg, batches)
    finished.resume_or_load(resume=False)
    finished.train()
    assert not list((tmp_path / "run").glob("model_0*.pth"))

    resumed = make_trainer(resume_cfg(norm, tmp_path / "run", max_iter=N + M), batches, seed=99)
    with caplog.at_level("INFO"):
        resumed.resume_or_load(resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("restarts empty" in w and "model_final.pth" in w for w in warnings), warnings
    tags = [v for k, v in _model_state(resumed).items() if k.endswith("window_iters" if norm == "CBN" else "chi2_iters")]
    assert tags and all(bool((t == -1).all()) for t in tags)  # empty slots
