"""Tiny Faster R-CNN, Mask R-CNN and RetinaNet with CBN / NaiveCBN / MABN trained on real COCO
batches (the COCO 2017 sample shipped with the package): finite losses, burn-in and head warm-up
at the configured iterations, and eval-mode inference (issue 3 item 7, issue 4 item 6)."""
import math

import pytest
import torch
import torch.nn.functional as F

import smallbn_d2
from detectron2.structures import Instances
from helpers import coco_batches, tiny_cfg, train_steps
from smallbn_d2 import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from smallbn_d2.modeling import iteration_norms

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

WHERE = {
    "faster_rcnn": ("backbone", "fpn", "box_head"),
    "mask_rcnn": ("backbone", "fpn", "box_head", "mask_head"),
    "retinanet": ("backbone", "fpn", "retinanet_head"),
}
# MABN with m = 2 and short warm-ups: SMA from iteration 2 (t = 3 > m), r != 1 from iteration 1
MABN_ACTIVE = ["MODEL.MABN.BUFFER_SIZE", 2, "MODEL.MABN.WARMUP_ITERS", 0, "MODEL.MABN.RENORM_WARMUP_ITERS", 1,
               "MODEL.MABN.HEAD_WARMUP_ITERS", 1, "MODEL.MABN.R_MAX", 1.5]


def _check_inference(model, cfg, batch):
    model.eval()
    with torch.no_grad():
        inputs = [{"image": d["image"], "height": d["image"].shape[1], "width": d["image"].shape[2]} for d in batch]
        outputs = model(inputs)
    assert len(outputs) == len(inputs)
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        assert isinstance(inst, Instances)
        assert inst.image_size == (inp["height"], inp["width"])
        for field in ("pred_boxes", "scores", "pred_classes") + (("pred_masks",) if cfg.MODEL.MASK_ON else ()):
            assert inst.has(field), field
        assert torch.isfinite(inst.scores).all()


def _train_and_check(arch, norm, opts=(), iters=3):
    cfg = tiny_cfg(arch, norm, where=WHERE[arch], opts=list(opts))
    model = smallbn_d2.build_model(cfg)
    layers = [layer for _, layer in iteration_norms(model)]
    assert layers and all(layer.conv is not None for layer in layers)
    batches = coco_batches(cfg, iters)
    losses = train_steps(model, batches)
    for it, loss in enumerate(losses):
        for name, value in loss.items():
            assert math.isfinite(value), f"iteration {it}: {name} = {value}"
    for layer in layers:
        for name, buf in layer.named_buffers():
            assert torch.isfinite(buf.double()).all(), name
    _check_inference(model, cfg, batches[0])
    return model, layers


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_cbn_detectors_train(arch):
    # tiny configs: MODEL.CBN.BURN_IN_ITERS 0, WINDOW_SIZE 4: the window is used from iteration 1
    _, layers = _train_and_check(arch, "CBN")
    for layer in layers:
        assert type(layer) is CrossIterationBatchNorm2d and layer.window_size == 4 and layer.burn_in == 0
        assert sorted(int(v) for v in layer.window_iters) == [0, 1, 2]


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_mabn_detectors_train(arch):
    _, layers = _train_and_check(arch, "MABN", MABN_ACTIVE)
    for layer in layers:
        assert type(layer) is MovingAverageBatchNorm2d and layer.buffer_size == 2
        # iterations 0, 1, 2 with m = 2: the buffers hold iterations 1, 2 and the SMA averaged them
        assert sorted(int(v) for v in layer.chi2_iters) == [1, 2]
        assert sorted(int(v) for v in layer.psi_iters) == [1, 2]  # the backward ran
        assert not torch.equal(layer.running_chi2, torch.ones_like(layer.running_chi2))


def test_naive_cbn_detector_trains():
    _, layers = _train_and_check("mask_rcnn", "NaiveCBN")
    assert all(not layer.compensate and sorted(int(v) for v in layer.window_iters) == [0, 1, 2]
               for layer in layers)


# ----------------------------------------------------------------------------- CBN burn-in
def _record(layers):
    """Forward pre/post hooks storing (input, output, gamma, beta) of each layer's last call."""
    log = {}

    def hook(mod, inp, out):
        log[id(mod)] = (inp[0].detach().clone(), out.detach().clone(),
                        None if mod.weight is None else mod.weight.detach().clone(),
                        None if mod.bias is None else mod.bias.detach().clone())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    return log, handles


def test_cbn_burn_in_switches_window_at_configured_iteration():
    burn_in, k = 2, 2
    cfg = tiny_cfg("faster_rcnn", "CBN", where=WHERE["faster_rcnn"],
                   opts=["MODEL.CBN.BURN_IN_ITERS", burn_in, "MODEL.CBN.WINDOW_SIZE", k])
    model = smallbn_d2.build_model(cfg)
    layers = [layer for _, layer in iteration_norms(model)]
    log, _ = _record(layers)
    batches = coco_batches(cfg, 3)
    for it in range(3):
        smallbn_d2.set_norm_iteration(model, it)
        for layer in layers:
            assert layer.effective_window_size() == (1 if it < burn_in else k)
        log.clear()
        train_steps(model, batches[it:it + 1], start_iter=it)
        n_differ = 0
        for layer in layers:
            x, y, gamma, beta = log[id(layer)]
            bn = F.batch_norm(x, None, None, gamma, beta, True, 0.0, layer.eps)  # BN-equivalent
            diff = (y - bn).abs().max().item()
            if it < burn_in:
                assert diff < 1e-4, (it, diff)
            else:
                n_differ += diff > 1e-3
            # entries are written from iteration burn_in - (k - 1) = 1 on
            tags = [int(v) for v in layer.window_iters]
            assert tags == ([-1] if it < burn_in - (k - 1) else [it]), (it, tags)
        if it >= burn_in:
            assert n_differ == len(layers), f"{len(layers) - n_differ} layers did not use the window"


# ------------------------------------------------------------------------ MABN head warm-up
def test_mabn_head_warmup_ends_at_configured_iteration():
    """m = 2, WARMUP_ITERS 0, HEAD_WARMUP_ITERS 4, RENORM_WARMUP_ITERS 2. With t = iteration + 1:
    backbone layers use the SMA from t = 3 (t > m) and r from t = 3; head layers use the batch
    statistic while t < 4, the SMA from t = 4, and r from t = 5 (t > max(renorm, warm-up)).
    Observed from each layer's forward: y must equal gamma * r * x / sqrt(chi2 + eps) + beta with
    chi2 the current E[x^2] or the mean of the last m recorded E[x^2], r from the population
    statistic before the step."""
    m, head_warmup, renorm, r_max = 2, 4, 2, 1.5
    cfg = tiny_cfg("faster_rcnn", "MABN", where=WHERE["faster_rcnn"], opts=[
        "MODEL.MABN.BUFFER_SIZE", m, "MODEL.MABN.WARMUP_ITERS", 0, "MODEL.MABN.HEAD_WARMUP_ITERS", head_warmup,
        "MODEL.MABN.RENORM_WARMUP_ITERS", renorm, "MODEL.MABN.R_MAX", r_max])
    model = smallbn_d2.build_model(cfg)
    named = dict(iteration_norms(model))
    watched = {"head": named["roi_heads.box_head.conv1.norm"], "backbone": named["backbone.bottom_up.stem.conv1.norm"]}
    assert watched["head"].warmup_iters == head_warmup and watched["backbone"].warmup_iters == 0
    log, _ = _record(watched.values())
    pre = {}
    for layer in watched.values():
        layer.register_forward_pre_hook(lambda mod, inp: pre.__setitem__(id(mod), mod.running_chi2.clone()))
    batches = coco_batches(cfg, 5)
    chi2_hist = {key: {} for key in watched}
    uses_sma = {key: [] for key in watched}
    for it in range(5):
        t = it + 1
        train_steps(model, batches[it:it + 1], start_iter=it)
        for key, layer in watched.items():
            x, y, gamma, beta = (v.double() for v in log[id(layer)])
            chi2_t = (x * x).mean((0, 2, 3))
            chi2_hist[key][t] = chi2_t
            sma = sum(chi2_hist[key][s] for s in range(t - m + 1, t + 1)) / m if t > m else None
            warm = t <= m or t < layer.warmup_iters
            renorm_on = t > max(renorm, layer.warmup_iters)

            def formula(chi2, renorm_on=renorm_on):
                sd = torch.sqrt(chi2 + layer.eps)
                r = (sd / torch.sqrt(pre[id(layer)].double() + layer.eps)).clamp(1 / r_max, r_max) \
                    if renorm_on else torch.ones_like(sd)
                return (gamma * r / sd).view(1, -1, 1, 1) * x + beta.view(1, -1, 1, 1)

            tol = 1e-4 * max(1.0, y.abs().max().item())
            err_batch = (y - formula(chi2_t)).abs().max().item()
            err_sma = (y - formula(sma)).abs().max().item() if sma is not None else float("inf")
            assert min(err_batch, err_sma) < tol, (key, it, err_batch, err_sma)
            uses_sma[key].append(err_sma < err_batch)
            assert uses_sma[key][-1] == (not warm), (key, it)
            if renorm_on:  # not vacuous: r differs from 1
                assert (y - formula(chi2_t if warm else sma, renorm_on=False)).abs().max().item() > 100 * tol
    # backbone: SMA from iteration 2; head: the warm-up ends at iteration HEAD_WARMUP_ITERS - 1 (t = 4)
    assert uses_sma["backbone"] == [False, False, True, True, True]
    assert uses_sma["head"] == [False, False, False, True, True]
