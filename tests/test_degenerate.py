"""Degenerate batches in a detector with CBN / MABN everywhere (issue 7, item 3).

0 RoIs in the mask head, one image with one RoI, 1x1 feature maps, all-zero input, and NaN/Inf
in the input or the gradient. The documented choice (docs/RELIABILITY.md): the layers never
raise on such data; a layer that sees no element leaves its state alone; a non-finite batch
statistic (forward: E[x], Var[x], E[x^2]; backward: MABN's psi) is not written to any running
statistic, window or moving-average buffer (masked on device), the non-finite output propagates
to the loss, and Detectron2 raises ``FloatingPointError`` (RPN: non-finite proposals; trainer:
non-finite loss) before the optimizer step.
"""
import math

import pytest
import torch

import smallbn_d2  # noqa: I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from helpers import coco_batches, tiny_cfg
from smallbn_d2.modeling import iteration_norms
from test_resume import make_trainer

NORMS = ["CBN", "MABN"]
_COUNTERS = ("num_batches_tracked",)  # counts forward calls, not statistics


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(norm, opts=()):
    return tiny_cfg("mask_rcnn", norm, opts=[
        "MODEL.CBN.WINDOW_SIZE", 2, "MODEL.MABN.BUFFER_SIZE", 2, "MODEL.MABN.RENORM_WARMUP_ITERS", 0,
        "MODEL.MABN.HEAD_WARMUP_ITERS", 0, "DATASETS.TEST", ()] + list(opts))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = smallbn_d2.build_model(cfg)
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)


def _step(model, opt, batch, it):
    smallbn_d2.set_norm_iteration(model, it)
    torch.manual_seed(100 + it)
    with EventStorage(it):  # Detectron2's heads log to it
        losses = model(batch)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    return {k: v.item() for k, v in losses.items()}


def _norm_state(model, prefix=""):
    """Every buffer of the CBN/MABN layers under ``prefix`` (statistics, windows, tags), cloned."""
    return {f"{n}.{b}": t.clone() for n, layer in iteration_norms(model) if n.startswith(prefix)
            for b, t in layer.named_buffers() if b not in _COUNTERS}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def _assert_all_finite(model, losses=None):
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    if losses is not None:
        assert all(math.isfinite(v) for v in losses.values()), losses


class _InputShapes:
    """Record the input shape of every CBN/MABN layer whose name starts with a prefix."""

    def __init__(self, model, prefix=""):
        self.shapes = {}
        self._handles = [layer.register_forward_pre_hook(self._hook(n)) for n, layer in iteration_norms(model)
                         if n.startswith(prefix)]

    def _hook(self, name):
        def hook(module, args):
            self.shapes.setdefault(name, []).append(tuple(args[0].shape))
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


def _synthetic_batch(n, size, fill=None, seed=0):
    """``n`` images of size x size with one box (and its square polygon mask) each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g).float() if fill is None else fill(size)
        inst = Instances((size, size))
        lo, hi = size * 0.15, size * 0.85
        inst.gt_boxes = Boxes(torch.tensor([[lo, lo, hi, hi]]))
        inst.gt_classes = torch.tensor([3])
        inst.gt_masks = PolygonMasks([[[lo, lo, hi, lo, hi, hi, lo, hi]]])
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def _without_annotations(batch):
    out = []
    for d in batch:
        h, w = d["image"].shape[-2:]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.long)
        inst.gt_masks = PolygonMasks([])
        out.append(dict(d, instances=inst))
    return out


# ------------------------------------------------------------------ 0 RoIs in a head
@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_zero_rois_in_the_mask_head_leave_its_state_untouched(norm):
    cfg = _cfg(norm)
    model, opt = _model(cfg)
    good = coco_batches(cfg, 2)
    _step(model, opt, good[0], 0)
    mask_before = _norm_state(model, "roi_heads.mask_head")
    box_before = _norm_state(model, "roi_heads.box_head")
    shapes = _InputShapes(model, "roi_heads.")
    losses = _step(model, opt, _without_annotations(good[1]), 1)  # no gt: every RoI is background
    shapes.close()
    mask_shapes = [s for n, v in shapes.shapes.items() if "mask_head" in n for s in v]
    assert mask_shapes and all(s[0] == 0 for s in mask_shapes)  # the case really happened
    assert losses["loss_mask"] == 0.0
    _assert_all_finite(model, losses)
    _assert_same(_norm_state(model, "roi_heads.mask_head"), mask_before)
    changed = [k for k, v in _norm_state(model, "roi_heads.box_head").items() if not torch.equal(v, box_before[k])]
    assert changed  # the box head (background RoIs) did update
    _assert_all_finite(model, _step(model, opt, good[1], 2))


# ------------------------------------------------------------------ one image, one RoI
@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_one_image_with_one_roi(norm):
    cfg = _cfg(norm, ["SOLVER.IMS_PER_BATCH", 1, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 1,
                      "MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.0])
    model, opt = _model(cfg)
    shapes = _InputShapes(model, "roi_heads.")
    batches = coco_batches(cfg, 2)
    for it in range(2):  # iteration 1 uses the window / moving averages of iteration 0
        before = _norm_state(model, "roi_heads.")
        losses = _step(model, opt, batches[it], it)
        _assert_all_finite(model, losses)
        after = _norm_state(model, "roi_heads.")
        assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith(("running_mean", "running_chi2")))
    shapes.close()
    assert {s[0] for v in shapes.shapes.values() for s in v} == {1}  # box and mask head: one RoI
    assert any("mask_head" in n for n in shapes.shapes) and any("box_head" in n for n in shapes.shapes)


# ------------------------------------------------------------------ 1x1 feature maps
@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_one_by_one_feature_maps(norm):
    model, opt = _model(_cfg(norm))
    shapes = _InputShapes(model, "backbone.")
    for it in range(2):
        losses = _step(model, opt, _synthetic_batch(1, 32, seed=it), it)
        _assert_all_finite(model, losses)
    shapes.close()
    single = [n for n, v in shapes.shapes.items() if any(s[0] * s[2] * s[3] == 1 for s in v)]
    assert any("res5" in n for n in single) and any("fpn_output5" in n for n in single), single
    if norm == "CBN":
        assert all((layer.running_var >= 0).all() for _, layer in iteration_norms(model))


# ------------------------------------------------------------------ all-zero input
@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_all_zero_input(norm):
    """Images equal to the pixel mean: the network input, and the stem norm's input, are exactly 0."""
    model, opt = _model(_cfg(norm))
    mean = model.pixel_mean.detach().clone()
    shapes = []
    stem = model.backbone.bottom_up.stem.conv1.norm
    handle = stem.register_forward_pre_hook(lambda m, a: shapes.append(bool((a[0] == 0).all())))
    for it in range(3):
        batch = _synthetic_batch(2, 64, fill=lambda s: mean.expand(3, s, s).clone())
        losses = _step(model, opt, batch, it)
        _assert_all_finite(model, losses)
    handle.remove()
    assert shapes == [True] * 3
    if norm == "MABN":
        assert torch.count_nonzero(stem.chi2_buffer) == 0  # E[x^2] of a zero input, stored as is
    else:
        assert torch.count_nonzero(stem.window_mu) == 0 and (stem.window_iters == 2).all()  # k - 1 = 1 slot


# ------------------------------------------------------------------ NaN / Inf
def _poisoned(batch, value):
    out = []
    for i, d in enumerate(batch):
        image = d["image"].float().clone()
        if i == 0:
            image[:, 10, 10] = value
        out.append(dict(d, image=image))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_nan_input_never_enters_state_and_the_trainer_raises(norm, tmp_path):
    """Through the Trainer: iteration 1 has a NaN pixel. Detectron2 raises FloatingPointError and
    the model (weights, statistics, windows, moving averages) is exactly as after iteration 0."""
    cfg = _cfg(norm, ["SOLVER.MAX_ITER", 3, "OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", 100])
    good = coco_batches(cfg, 2)
    snapshots = []

    from detectron2.engine import HookBase

    class Snapshot(HookBase):
        def after_step(self):
            snapshots.append({k: v.clone() for k, v in self.trainer.model.state_dict().items()
                              if not k.endswith(_COUNTERS)})

    trainer = make_trainer(cfg, [good[0], _poisoned(good[1], float("nan")), good[1]], extra_hooks=[Snapshot()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert trainer.iter == 1 and len(snapshots) == 1
    now = {k: v for k, v in trainer.model.state_dict().items() if not k.endswith(_COUNTERS)}
    _assert_same(now, snapshots[0])
    # and training can go on from there
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.005)
    _assert_all_finite(trainer.model, _step(trainer.model, opt, good[1], 2))


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_inf_input_never_enters_state(norm):
    cfg = _cfg(norm)
    model, opt = _model(cfg)
    good = coco_batches(cfg, 2)
    _step(model, opt, good[0], 0)
    before = _norm_state(model)
    with pytest.raises(FloatingPointError):  # Detectron2's RPN: non-finite proposals
        _step(model, opt, _poisoned(good[1], float("inf")), 1)
    _assert_same(_norm_state(model), before)
    _assert_all_finite(model, _step(model, opt, good[1], 2))


def test_nan_gradient_never_enters_mabn_psi_buffers():
    """A finite forward with a NaN loss scale: where a layer's backward gets a non-finite dL/dy,
    its psi is non-finite and must not be stored. (A layer whose dL/dy is exactly 0, e.g. an FPN
    level where no anchor was sampled, gets a finite psi = 0, which is stored.)"""
    cfg = _cfg("MABN")
    model, opt = _model(cfg)
    good = coco_batches(cfg, 2)
    _step(model, opt, good[0], 0)
    smallbn_d2.set_norm_iteration(model, 1)
    grad_finite = {}

    def watch(name):
        def hook(module, args, out):
            out.register_hook(lambda g: grad_finite.__setitem__(name, bool(torch.isfinite(g).all())))
        return hook

    handles = [layer.register_forward_hook(watch(n)) for n, layer in iteration_norms(model)]
    torch.manual_seed(101)
    with EventStorage(1):
        losses = model(good[1])
    for h in handles:
        h.remove()
    after_forward = _norm_state(model)
    opt.zero_grad()
    (sum(losses.values()) * float("nan")).backward()
    poisoned = [n for n, ok in grad_finite.items() if not ok]
    assert len(poisoned) > 20  # the NaN did reach most MABN backward passes
    now = _norm_state(model)
    for name in poisoned:
        for buf in ("psi_buffer", "psi_iters", "chi2_buffer", "chi2_iters", "running_chi2"):
            key = f"{name}.{buf}"
            assert torch.equal(now[key], after_forward[key]), f"{key} changed"
    for key, value in now.items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), key
