"""CBN inside a real detector trained by smallbn_d2's Trainer averages exactly the window the method
defines (METHODS.md, CBN 2-3 and 6).

The unit tests check the layer against float64 references with hand-made iterations; this checks
the wiring around it: the producing conv each layer is attached to, the trainer iteration that the
hook hands to the layers, the window tags and the burn-in. Independent reference ("own-conv"): the
layer's conv, with its weight at iteration t, re-run on the conv inputs of the iterations in the
window. The window mean is linear in that weight, so CBN's first-order compensation must equal
this reference to rounding. The compensated second moment misses the Taylor remainder
E[(delta_theta . x)^2] >= 0, so CBN's window variance can only be below the reference's.
"""
import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from helpers import tiny_cfg
from smallbn_d2.data import register_coco_sample
from smallbn_d2.engine import Trainer
from smallbn_d2.layers import CrossIterationBatchNorm2d

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

K, BURN_IN, ITERS = 4, 3, 8


class _WindowRecorder(HookBase):
    """Records, for every CBN layer, the conv input of each iteration and, after the burn-in, the
    layer's window mean/variance/count next to the own-conv reference computed from the records."""

    def __init__(self, model):
        self.inputs, self.results, self.layers = {}, [], []
        for name, layer in model.named_modules():
            if isinstance(layer, CrossIterationBatchNorm2d):
                self.layers.append(name)
                self.inputs[name] = {}
                layer.conv.register_forward_pre_hook(self._pre(name))
                layer.register_forward_hook(self._post(name, layer))
                layer._window_statistics = self._spy(layer, name)
        self.window = {}
        self.window_iters = set()  # (trainer iteration, layer) where the window was used

    def _pre(self, name):
        def hook(conv, inputs):
            if conv.training:
                self.inputs[name][get_event_storage().iter] = inputs[0].detach().clone()
        return hook

    def _spy(self, layer, name):
        original = layer._window_statistics

        def window_statistics(t, mu_t, var_t, cdt):
            self.window_iters.add((get_event_storage().iter, name))
            out = original(t, mu_t, var_t, cdt)
            self.window[name] = tuple(v.detach().clone() for v in out)
            return out
        return window_statistics

    def _post(self, name, layer):
        def hook(module, inputs, output):
            t = get_event_storage().iter
            if not module.training or t < BURN_IN:
                return
            mu_bar, var_bar, count = self.window.pop(name)
            conv = layer.conv
            mus, nus = [], []
            for j in range(t - K + 1, t + 1):
                with torch.no_grad():
                    y = F.conv2d(self.inputs[name][j], conv.weight, conv.bias, conv.stride, conv.padding,
                                 conv.dilation, conv.groups).double()
                mu, nu = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
                mus.append(mu)
                nus.append(torch.maximum(nu, mu * mu))
            mu_ref = torch.stack(mus).mean(0)
            var_ref = torch.stack(nus).mean(0) - mu_ref ** 2
            self.results.append((t, name, count, mu_bar.double(), mu_ref, var_bar.double(), var_ref))
        return hook


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    register_coco_sample()
    cfg = tiny_cfg("mask_rcnn", "CBN", opts=[
        "MODEL.CBN.WINDOW_SIZE", K, "MODEL.CBN.BURN_IN_ITERS", BURN_IN, "MODEL.CBN.BURN_IN_EPOCHS", None,
        "DATASETS.TRAIN", ("coco_2017_sample_train",), "DATASETS.TEST", (), "SOLVER.MAX_ITER", ITERS,
        "SOLVER.BASE_LR", 0.02, "OUTPUT_DIR", str(tmp_path_factory.mktemp("cbn_window"))])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    recorder = _WindowRecorder(trainer.model)
    trainer.register_hooks([recorder])
    trainer.train()
    return recorder


def test_every_cbn_layer_was_checked_at_every_iteration_after_the_burn_in(recorded):
    assert len(recorded.layers) > 20  # backbone, FPN, box and mask heads
    seen = {(t, name) for t, name, *_ in recorded.results}
    for name in recorded.layers:
        for t in range(BURN_IN, ITERS):
            assert (t, name) in seen, (t, name)


def test_window_is_used_from_the_end_of_the_burn_in_on_and_never_before(recorded):
    expected = {(t, name) for t in range(BURN_IN, ITERS) for name in recorded.layers}
    assert recorded.window_iters == expected


def test_window_is_full_from_the_end_of_the_burn_in(recorded):
    for t, name, count, *_ in recorded.results:
        assert torch.all(count == K), (t, name, count.unique().tolist())


def test_window_mean_equals_the_own_conv_reference(recorded):
    for t, name, _, mu_bar, mu_ref, _, _ in recorded.results:
        err = ((mu_bar - mu_ref).norm() / mu_ref.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, (t, name, err)


def test_window_variance_is_the_reference_less_a_nonnegative_taylor_remainder(recorded):
    for t, name, _, _, _, var_bar, var_ref in recorded.results:
        excess = (var_bar - var_ref) / var_ref.clamp_min(1e-12)
        assert excess.max().item() < 1e-5, (t, name, excess.max().item())
        assert var_bar.min().item() >= 0, (t, name)
