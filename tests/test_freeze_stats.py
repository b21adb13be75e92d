"""Freezing of normalization statistics from iteration N on (smallbn_d2.engine.freeze): issue 6, item 3.

References: the same network in eval mode (output and gradients of gamma/beta), and the state
before the freeze (statistics, windows, SMA buffers, counters must stay bit-identical).
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import smallbn_d2
from detectron2.engine import HookBase
from detectron2.layers import Conv2d, CycleBatchNormList
from smallbn_d2 import ConfigValueError
from smallbn_d2.engine import FreezeNormStatsHook, NormIterationHook, Trainer, freeze_norm_statistics, load_config
from smallbn_d2.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, has_conv_input

from helpers import TINY, tiny_cfg


def _net():
    torch.manual_seed(0)
    conv1 = Conv2d(3, 6, 3, padding=1, bias=False, norm=CrossIterationBatchNorm2d(6, window_size=2))
    conv2 = nn.Conv2d(6, 5, 3, bias=False)
    mabn = MovingAverageBatchNorm2d(5, buffer_size=2, renorm_warmup_iters=0)
    conv3 = nn.Conv2d(5, 4, 1)
    conv4 = nn.Conv2d(4, 4, 1)
    cycle = CycleBatchNormList(length=1, bn_class=nn.BatchNorm2d, num_features=4)
    net = nn.Sequential(conv1, nn.ReLU(), conv2, mabn, nn.ReLU(), conv3, nn.BatchNorm2d(4), nn.ReLU(),
                        conv4, cycle).double()
    conv1.norm.attach_conv(conv1)
    mabn.attach_conv(conv2)
    return net


def _norms(net):
    return [m for m in net.modules() if isinstance(m, (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d,
                                                        nn.BatchNorm2d))]


def _step(net, opt, t, x):
    smallbn_d2.set_norm_iteration(net, t)
    loss = net(x).sin().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _buffers(net):
    return {k: v.clone() for k, v in net.named_buffers()}


def test_frozen_statistics_do_not_change_forward_equals_eval_and_gamma_beta_train():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64) + 0.3 for _ in range(6)]
    net.train()
    start = _buffers(net)
    for t in range(3):
        _step(net, opt, t, data[t])
    trained = _buffers(net)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # statistics were moving

    N = 3
    assert freeze_norm_statistics(net) == 4  # CBN, MABN, BN, the cycle's BN
    assert not any(m.training for m in _norms(net)) and not net[0].training  # CBN's producing conv
    assert net.training and net[2].training and net[9].training

    # frozen forward == eval-mode forward, gradients of gamma/beta equal too (and non-zero)
    x = data[N]
    smallbn_d2.set_norm_iteration(net, N)
    opt.zero_grad()
    y_frozen = net(x)
    y_frozen.sin().sum().backward()
    grads_frozen = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    reference = copy.deepcopy(net).eval()
    y_eval = reference(x)
    y_eval.sin().sum().backward()
    torch.testing.assert_close(y_frozen, y_eval, rtol=0, atol=0)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads_frozen[n], p.grad, rtol=1e-12, atol=1e-14)
    affine = [n for n in grads_frozen if n.endswith(("norm.weight", "norm.bias", "3.weight", "3.bias", "6.weight",
                                                      "6.bias", "9.weight", "9.bias"))]
    assert len(affine) == 8 and all(grads_frozen[n].abs().sum() > 0 for n in affine)

    # more steps: parameters train, no buffer changes (statistics, window, SMA, counters)
    params = {n: p.clone() for n, p in net.named_parameters()}
    for t in range(N, N + 3):
        freeze_norm_statistics(net)  # what the hook does before every step
        _step(net, opt, t, data[t % len(data)])
    after = _buffers(net)
    for k, v in trained.items():
        assert torch.equal(after[k], v), k
    assert all(not torch.equal(p, params[n]) for n, p in net.named_parameters() if n in affine)
    assert not has_conv_input(net[0])  # the conv keeps no activation

    net.train()  # model.train() (e.g. after an evaluation) unfreezes
    assert all(m.training for m in _norms(net))


def test_hook_freezes_from_iteration_n_on_every_step_and_after_resume():
    net = _net().train()
    hook = FreezeNormStatsHook(2)
    hook.trainer = SimpleNamespace(iter=0, model=net)
    for it, frozen in ((0, False), (1, False), (2, True)):
        hook.trainer.iter = it
        hook.before_step()
        assert all(m.training != frozen for m in _norms(net)), it
    net.eval()
    net.train()  # Detectron2's evaluation restores training mode ...
    hook.trainer.iter = 3
    hook.before_step()  # ... and the next step freezes again
    assert not any(m.training for m in _norms(net))

    resumed = _net().train()  # a fresh process resuming at iteration 7 > N
    hook = FreezeNormStatsHook(2)
    hook.trainer = SimpleNamespace(iter=7, model=resumed)
    hook.before_step()
    assert not any(m.training for m in _norms(resumed))
    with pytest.raises(ValueError, match="start_iter = -1"):
        FreezeNormStatsHook(-1)


def test_config_key_is_validated():
    assert load_config(TINY["mask_rcnn"]).MODEL.SMALLBN.FREEZE_NORM_STATS_ITER == -1
    with pytest.raises(ConfigValueError, match="FREEZE_NORM_STATS_ITER = -2"):
        load_config(TINY["mask_rcnn"], ["MODEL.SMALLBN.FREEZE_NORM_STATS_ITER", -2])


class _Recorder(HookBase):
    def __init__(self):
        self.states, self.modes, self.gammas = [], [], []

    def after_step(self):
        model = self.trainer.model
        self.states.append({k: v.clone() for k, v in model.named_buffers()
                            if "anchor" not in k and "pixel" not in k})
        self.modes.append([m.training for m in _norms(model)])
        self.gammas.append({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("norm.weight")})


@pytest.mark.slow
def test_trainer_freezes_statistics_from_the_configured_iteration(tmp_path):
    cfg = tiny_cfg("mask_rcnn", "CBN", where=("fpn",), opts=[
        "MODEL.ROI_BOX_HEAD.NORM", "MABN", "MODEL.RESNETS.NORM", "BN", "SOLVER.IMS_PER_BATCH", 1,
        "SOLVER.MAX_ITER", 3, "MODEL.SMALLBN.FREEZE_NORM_STATS_ITER", 1, "TEST.EVAL_PERIOD", 0,
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    assert isinstance(trainer._hooks[0], NormIterationHook)
    freeze = [h for h in trainer._hooks if isinstance(h, FreezeNormStatsHook)]
    assert len(freeze) == 1 and freeze[0].start_iter == 1
    recorder = _Recorder()
    trainer.register_hooks([recorder])
    initial = {k: v.clone() for k, v in trainer.model.named_buffers() if "anchor" not in k and "pixel" not in k}
    trainer.train()
    s0, s1, s2 = recorder.states
    assert any(not torch.equal(s0[k], initial[k]) for k in initial)  # iteration 0 trains the statistics
    for k in s0:
        assert torch.equal(s1[k], s0[k]) and torch.equal(s2[k], s0[k]), k  # frozen from iteration 1 on
    assert all(recorder.modes[0]) and not any(recorder.modes[1]) and not any(recorder.modes[2])
    g1, g2 = recorder.gammas[1:]
    kinds = {type(m).__name__ for m in _norms(trainer.model)}
    assert kinds == {"CrossIterationBatchNorm2d", "MovingAverageBatchNorm2d", "BatchNorm2d"}
    assert len(g1) >= 20 and all(not torch.equal(g2[n], g1[n]) for n in g1)  # gamma keeps training
