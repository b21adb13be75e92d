"""Loading a BN / FrozenBN checkpoint into a CBN or MABN model (issue 7, item 6).

Reference values come straight from the source model: affine parameters and CBN population
statistics equal BN's; MABN's running_chi2 = running_var + running_mean^2 (E[x^2] = Var + E^2,
in float64); the cross-iteration state equals a fresh layer's (zeros, tags -1).
"""
import pickle

import pytest
import torch

import smallbn_d2  # noqa: I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from torch import nn

from helpers import tiny_cfg
from smallbn_d2.checkpoint import NormCheckpointer, convert_norm_state_dict
from smallbn_d2.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from smallbn_d2.modeling import iteration_norms

pytestmark = pytest.mark.integration

_SOURCE_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _source_model(arch, norm, seed=0):
    """A model with ``norm`` everywhere whose norm statistics and affines are random (not identity)."""
    torch.manual_seed(seed)
    model = smallbn_d2.build_model(tiny_cfg(arch, norm))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _SOURCE_TYPES):
                c = module.num_features
                if module.weight is not None:
                    module.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=g))
                module.running_mean.copy_(torch.randn(c, generator=g))
                module.running_var.copy_(torch.rand(c, generator=g) + 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.num_batches_tracked.fill_(7)
            if isinstance(module, CycleBatchNormList):
                module.weight.copy_(torch.rand(module.weight.shape[0], generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape[0], generator=g))
    return model


def _source_of(name, source_modules):
    """The source norm module holding the statistics for target layer ``name`` (the layer
    itself, or the single norm that a per-level RetinaNet layer replaces)."""
    if name in source_modules and isinstance(source_modules[name], _SOURCE_TYPES):
        return source_modules[name], None
    parent = name.rpartition(".")[0]
    return source_modules[parent], parent


def _check_loaded(target, source):
    src_modules = dict(source.named_modules())
    checked = 0
    for name, layer in iteration_norms(target):
        src, parent = _source_of(name, src_modules)
        mean = src.running_mean.double()
        var = src.running_var.double()
        if layer.affine:
            torch.testing.assert_close(layer.weight.data, src.weight.data, rtol=0, atol=0)
            torch.testing.assert_close(layer.bias.data, src.bias.data, rtol=0, atol=0)
        if isinstance(layer, MovingAverageBatchNorm2d):
            torch.testing.assert_close(layer.running_chi2.double(), var + mean ** 2, rtol=1e-6, atol=1e-7)
            for buf in ("chi2_buffer", "psi_buffer"):
                assert torch.count_nonzero(getattr(layer, buf)) == 0, (name, buf)
            for buf in ("chi2_iters", "psi_iters"):
                assert (getattr(layer, buf) == -1).all(), (name, buf)
        else:
            assert isinstance(layer, CrossIterationBatchNorm2d)
            torch.testing.assert_close(layer.running_mean, src.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(layer.running_var, src.running_var, rtol=0, atol=0)
            expected_count = 7 if isinstance(src, nn.BatchNorm2d) else 0
            assert int(layer.num_batches_tracked) == expected_count
            assert (layer.window_iters == -1).all()
            for key, buf in layer.named_buffers():
                if key.startswith("window_") and key != "window_iters":
                    assert torch.count_nonzero(buf) == 0, (name, key)
        checked += 1
    # the producing convs got the source weights (MABN: the raw, un-centralized parameter)
    src_sd = source.state_dict()
    for key, value in target.state_dict().items():
        if key.endswith("conv1.weight") or key.endswith("fpn_output2.weight"):
            torch.testing.assert_close(value, src_sd[key], rtol=0, atol=0)
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("source_norm", ["BN", "FrozenBN"])
@pytest.mark.parametrize("target_norm", ["CBN", "MABN"])
def test_mask_rcnn_checkpoint_loads_across_norms(source_norm, target_norm, tmp_path):
    source = _source_model("mask_rcnn", source_norm)
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("source")
    torch.manual_seed(5)
    target = smallbn_d2.build_model(tiny_cfg("mask_rcnn", target_norm))
    NormCheckpointer(target).load(str(tmp_path / "source.pth"))
    n = _check_loaded(target, source)
    assert n == len(list(iteration_norms(target))) > 20
    # every entry is accounted for: a strict load of the converted state dict succeeds
    state = torch.load(tmp_path / "source.pth", weights_only=False)["model"]
    converted, notes = convert_norm_state_dict(state, target)
    target.load_state_dict(converted, strict=True)
    assert notes


def test_frozen_bn_retinanet_head_gives_its_statistics_to_every_level(tmp_path):
    """Detectron2 keeps one FrozenBN in RetinaNet's shared head; CBN/MABN keep one per FPN level."""
    source = _source_model("retinanet", "FrozenBN")
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("source")
    target = smallbn_d2.build_model(tiny_cfg("retinanet", "MABN"))
    per_level = [name for name, _ in iteration_norms(target) if name.startswith("head.")]
    assert len(per_level) == 2 * 2 * 5  # (cls, bbox) x NUM_CONVS x 5 levels
    NormCheckpointer(target).load(str(tmp_path / "source.pth"))
    _check_loaded(target, source)
    # the shared affine of the per-level lists is the FrozenBN's weight/bias
    src = dict(source.named_modules())
    for name, module in target.named_modules():
        if isinstance(module, CycleBatchNormList):
            torch.testing.assert_close(module.weight.data, src[name].weight, rtol=0, atol=0)


def test_model_zoo_pkl_with_matching_heuristics_reaches_mabn(tmp_path):
    """An ImageNet-style .pkl (backbone keys without prefix, numpy arrays) fills MABN's running_chi2."""
    source = _source_model("mask_rcnn", "BN")
    prefix = "backbone.bottom_up."
    blobs = {k[len(prefix):]: v.numpy() for k, v in source.state_dict().items() if k.startswith(prefix)}
    path = tmp_path / "imagenet.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": blobs, "__author__": "test", "matching_heuristics": True}, f)
    target = smallbn_d2.build_model(tiny_cfg("mask_rcnn", "MABN", where=["backbone"]))
    NormCheckpointer(target).load(str(path))
    src = dict(source.named_modules())
    layers = [(n, l) for n, l in iteration_norms(target) if n.startswith(prefix)]
    assert len(layers) > 15
    for name, layer in layers:
        mean, var = src[name].running_mean.double(), src[name].running_var.double()
        torch.testing.assert_close(layer.running_chi2.double(), var + mean ** 2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.weight.data, src[name].weight.data, rtol=0, atol=0)
