"""PreciseBN for CBN and MABN (smallbn_d2.engine.precise_norm): issue 6, item 2.

Reference: the exact population statistics over the same batches, computed independently in
float64 from the layers' inputs (a direct functional re-computation of the network, or inputs
recorded by forward pre-hooks): mean and biased variance of all positions pooled (CBN, BN) and
E[x^2] pooled (MABN).
"""
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallbn_d2
from detectron2.engine import hooks as d2_hooks
from detectron2.layers import CycleBatchNormList
from smallbn_d2.engine import NormIterationHook, PreciseNorm, Trainer, update_norm_stats
from smallbn_d2.layers import CrossIterationBatchNorm2d, IterationNormBase, MovingAverageBatchNorm2d, has_conv_input

from helpers import coco_batches, tiny_cfg

STAT_NAMES = ("running_mean", "running_var", "running_chi2")


def _pooled(xs):
    """Per-channel mean, biased variance and E[x^2] of all positions of the (N, C, H, W) tensors."""
    flat = torch.cat([x.detach().double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False)
    return mean, var, (flat * flat).mean(dim=1)


def _state_except_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in STAT_NAMES}


def _net():
    torch.manual_seed(0)
    conv1, conv2, conv3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, bias=False), nn.Conv2d(5, 4, 1)
    cbn = CrossIterationBatchNorm2d(6, window_size=3)
    mabn = MovingAverageBatchNorm2d(5, buffer_size=2, renorm_warmup_iters=0)
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(conv1, cbn, nn.ReLU(), conv2, mabn, nn.ReLU(), conv3, bn).double()
    cbn.attach_conv(conv1)
    mabn.attach_conv(conv2)
    with torch.no_grad():
        for norm in (cbn, mabn, bn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    # a few training iterations: windows, SMA buffers and running statistics get real content
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for t in range(4):
        smallbn_d2.set_norm_iteration(net, t)
        net(torch.randn(2, 3, 8, 8, dtype=torch.float64) + 1.0).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net


def test_update_norm_stats_equals_exact_population_statistics():
    net = _net()
    cbn, mabn, bn = net[1], net[4], net[7]
    g = torch.Generator().manual_seed(1)
    # batches of different sizes and means: pooled statistics differ from averaged ones
    batches = [torch.randn(shape, generator=g, dtype=torch.float64) * s + o
               for shape, s, o in (((2, 3, 8, 8), 1.0, 0.5), ((1, 3, 5, 7), 2.0, -1.0), ((3, 3, 6, 6), 0.5, 2.0))]
    before = _state_except_stats(net)
    old_var = cbn.running_var.clone()

    counts = update_norm_stats(net, iter(batches), num_iters=3)

    # independent reference: the network re-computed functionally, each norm normalizing with
    # the current batch's statistics (BN-style), as during fvcore's PreciseBN
    h1s, h2s, h3s = [], [], []
    conv1, conv2, conv3 = net[0], net[3], net[6]
    with torch.no_grad():
        for x in batches:
            h1 = F.conv2d(x, conv1.weight, conv1.bias, padding=1)
            y1 = F.relu(F.batch_norm(h1, None, None, cbn.weight, cbn.bias, training=True, eps=cbn.eps))
            h2 = F.conv2d(y1, conv2.weight)  # weight-centralized
            chi2 = h2.square().mean(dim=(0, 2, 3), keepdim=True)
            y2 = F.relu(h2 / (chi2 + mabn.eps).sqrt() * mabn.weight.view(1, -1, 1, 1) + mabn.bias.view(1, -1, 1, 1))
            h3 = F.conv2d(y2, conv3.weight, conv3.bias)
            h1s.append(h1), h2s.append(h2), h3s.append(h3)
    mean1, var1, _ = _pooled(h1s)
    _, _, sq2 = _pooled(h2s)
    mean3, var3, _ = _pooled(h3s)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cbn.running_mean, mean1, **tol)
    torch.testing.assert_close(cbn.running_var, var1, **tol)
    torch.testing.assert_close(mabn.running_chi2, sq2, **tol)
    torch.testing.assert_close(bn.running_mean, mean3, **tol)  # fvcore, same definition
    torch.testing.assert_close(bn.running_var, var3, **tol)
    assert counts == {"1": sum(h.numel() // 6 for h in h1s), "4": sum(h.numel() // 5 for h in h2s)}
    # the pooled variance is not the mean of per-batch variances here (the test discriminates)
    per_batch = torch.stack([h.var(dim=(0, 2, 3), unbiased=False) for h in h1s]).mean(0)
    assert (per_batch - var1).abs().max() > 1e-2 and (old_var - var1).abs().max() > 1e-2

    # nothing else changed: CBN window, MABN SMA buffers and tags, BN-unrelated state, modes
    after = _state_except_stats(net)
    for key, value in before.items():
        if key.startswith("7."):  # BN's num_batches_tracked: fvcore's business
            continue
        assert torch.equal(after[key], value), key
    assert all(m.training for m in net.modules())
    assert not has_conv_input(conv1)  # no activation kept by the conv


def test_update_norm_stats_skips_layers_in_eval_mode_and_checks_arguments():
    net = _net()
    net[1].eval()  # e.g. frozen statistics
    frozen = net[1].running_var.clone()
    counts = update_norm_stats(net, [torch.randn(2, 3, 8, 8, dtype=torch.float64)], num_iters=1)
    assert "1" not in counts and "4" in counts
    assert torch.equal(net[1].running_var, frozen)
    with pytest.raises(ValueError, match="num_iters = 0"):
        update_norm_stats(net, [], num_iters=0)
    net[7].eval()  # no BN in training mode: our own loop
    with pytest.raises(ValueError, match="stopped after 1"):
        update_norm_stats(net, [torch.randn(1, 3, 4, 4, dtype=torch.float64)], num_iters=2)


def test_precise_norm_hook_schedule():
    net = _net()
    hook = PreciseNorm(2, net, itertools.repeat(torch.randn(1, 3, 6, 6, dtype=torch.float64)), 1)
    ran = []
    hook.update_stats = lambda: ran.append(hook.trainer.iter)
    hook.trainer = SimpleNamespace(iter=0, max_iter=5)
    for it in range(5):
        hook.trainer.iter = it
        hook.after_step()
    assert ran == [1, 3, 4]  # after iterations 2 and 4 (1-based) and after the last
    with pytest.raises(ValueError, match="NUM_ITER = 0"):
        PreciseNorm(0, net, [], 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_detector_precise_statistics_match_recorded_inputs(arch):
    """CBN (FPN), MABN (box head / RetinaNet head, per FPN level), BN (backbone) in one pass."""
    head = "box_head" if arch == "mask_rcnn" else "retinanet_head"
    cfg = tiny_cfg(arch, "MABN", where=(head,), opts=["MODEL.FPN.NORM", "CBN", "MODEL.RESNETS.NORM", "BN",
                                                     "SOLVER.IMS_PER_BATCH", 1])
    torch.manual_seed(0)
    model = smallbn_d2.build_model(cfg)
    model.train()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IterationNormBase)]
    kinds = {type(m) for _, m in layers}
    assert kinds == {CrossIterationBatchNorm2d, MovingAverageBatchNorm2d}
    if arch == "retinanet":
        assert any(isinstance(m, CycleBatchNormList) for m in model.modules())
    recorded = {n: [] for n, _ in layers}
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: recorded[n].append(inp[0].detach().clone()))
               for n, m in layers]
    before = _state_except_stats(model)
    counts = update_norm_stats(model, iter(coco_batches(cfg, 2)), num_iters=2)
    for h in handles:
        h.remove()
    for name, layer in layers:
        xs = recorded[name]
        assert xs and counts[name] == sum(x.numel() // x.shape[1] for x in xs)
        mean, var, sq = _pooled(xs)
        if isinstance(layer, MovingAverageBatchNorm2d):
            torch.testing.assert_close(layer.running_chi2.double(), sq, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)
    after = _state_except_stats(model)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for key, value in before.items():
        if key.rsplit(".", 1)[0] not in bn_names:  # BN's num_batches_tracked: fvcore's business
            assert torch.equal(after[key], value), key
    assert all(m.training for m in model.modules())


@pytest.mark.slow
def test_trainer_replaces_detectron2_precise_bn(tmp_path):
    cfg = tiny_cfg("mask_rcnn", "CBN", where=("fpn",), opts=[
        "MODEL.ROI_BOX_HEAD.NORM", "MABN", "MODEL.RESNETS.NORM", "BN", "SOLVER.IMS_PER_BATCH", 1,
        "SOLVER.MAX_ITER", 1, "TEST.PRECISE_BN.ENABLED", True, "TEST.PRECISE_BN.NUM_ITER", 2,
        "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    hooks = trainer._hooks
    assert isinstance(hooks[0], NormIterationHook)
    assert not any(type(h) is d2_hooks.PreciseBN for h in hooks)
    precise = [i for i, h in enumerate(hooks) if isinstance(h, PreciseNorm)]
    checkpointer = [i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.PeriodicCheckpointer)]
    assert len(precise) == 1 and precise[0] < checkpointer[0]

    # record the inputs the layers see during the precise pass (CBN/MABN are in eval mode then)
    model = trainer.model
    cbn = model.backbone.fpn_output2.norm
    mabn = model.roi_heads.box_head.conv1.norm
    bn = model.backbone.bottom_up.res2[0].conv1.norm
    seen = {"cbn": [], "mabn": [], "bn": []}

    def recorder(key):
        return lambda mod, inp: seen[key].append(inp[0].detach().clone()) if not cbn.training else None

    handles = [cbn.register_forward_pre_hook(recorder("cbn")), mabn.register_forward_pre_hook(recorder("mabn")),
               bn.register_forward_pre_hook(recorder("bn"))]
    trainer.train()
    for h in handles:
        h.remove()
    assert seen["cbn"] and seen["mabn"] and seen["bn"]
    mean, var, _ = _pooled(seen["cbn"])
    torch.testing.assert_close(cbn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cbn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mabn.running_chi2.double(), _pooled(seen["mabn"])[2], rtol=1e-5, atol=1e-7)
    mean, var, _ = _pooled(seen["bn"])
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-4, atol=1e-5)
