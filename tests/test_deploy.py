"""Conversion for inference (smallbn_d2.deploy, tools/convert_for_inference.py): issue 6, item 1.

References: a layer's own eval-mode output (float64, exact up to rounding), and the trained
detector's eval-mode outputs (boxes, scores, mask probabilities) on real COCO val images.
"""
import importlib.util
import os

import pytest
import torch
from torch import nn

import smallbn_d2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.layers import BatchNorm2d as D2BatchNorm2d
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model as d2_build_model
from smallbn_d2 import deploy
from smallbn_d2.layers import (
    CrossIterationBatchNorm2d,
    IterationNormBase,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    is_weight_centralized,
)

from helpers import REPO, coco_batches, tiny_cfg, train_steps

pytestmark = pytest.mark.integration

NORM_TYPES = (IterationNormBase, nn.BatchNorm2d, nn.SyncBatchNorm)


def _randomize_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial population statistics and affine parameters in every norm layer."""
    g = torch.Generator().manual_seed(seed)

    def r(t):
        return torch.rand(t.shape, generator=g, dtype=torch.float64).to(t)

    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean",):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.add_(r(t) - 0.5)
            for name in ("running_var", "running_chi2"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.mul_(0.5 + 1.5 * r(t))
            affine = isinstance(getattr(m, "weight", None), nn.Parameter)
            if affine and isinstance(m, NORM_TYPES + (CycleBatchNormList,)):
                m.weight.mul_(0.5 + r(m.weight))
                m.bias.add_(0.2 * (r(m.bias) - 0.5))


# ------------------------------------------------------------------------------ layer level
def _conv_norm_net(norm_factory, conv_bias=False):
    """conv -> norm -> relu -> D2 Conv2d(norm, activation) -> Sequential(conv, norm), float64."""
    torch.manual_seed(0)
    conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias)
    n1 = norm_factory(8)
    conv2 = Conv2d(8, 8, 3, padding=1, bias=False, norm=norm_factory(8), activation=nn.ReLU())
    conv3 = nn.Conv2d(8, 6, 1, bias=True)
    n3 = norm_factory(6)
    net = nn.Sequential(conv1, n1, nn.ReLU(), conv2, conv3, n3).double()
    for conv, norm in ((conv1, n1), (conv2, conv2.norm), (conv3, n3)):
        for layer in (norm if isinstance(norm, CycleBatchNormList) else [norm]):
            if isinstance(layer, IterationNormBase):
                layer.attach_conv(conv)
    _randomize_statistics(net)
    return net


def _cycle(bn_class):
    return lambda c: CycleBatchNormList(length=2, bn_class=bn_class, num_features=c)


LAYER_CASES = {
    "CBN": lambda c: CrossIterationBatchNorm2d(c, window_size=3),
    "NaiveCBN": lambda c: NaiveCrossIterationBatchNorm2d(c, window_size=3),
    "MABN": lambda c: MovingAverageBatchNorm2d(c, eps=1e-3),
    "BN": lambda c: nn.BatchNorm2d(c, eps=1e-3),
    "D2-BN": lambda c: D2BatchNorm2d(c),
    "SyncBN": lambda c: nn.SyncBatchNorm(c),
    "BN-no-affine": lambda c: nn.BatchNorm2d(c, affine=False),
    "Cycle-BN": _cycle(nn.BatchNorm2d),
    "Cycle-CBN": _cycle(CrossIterationBatchNorm2d),
    "Cycle-MABN": _cycle(MovingAverageBatchNorm2d),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_conversion_and_folding_keep_eval_outputs(case):
    net = _conv_norm_net(LAYER_CASES[case]).eval()
    cycle = case.startswith("Cycle")
    xs = [torch.randn(2, 3, 9, 7, dtype=torch.float64) for _ in range(2 if cycle else 1)]  # one per level
    with torch.no_grad():
        ref = [net(x) for x in xs]
    if case.endswith("MABN"):
        assert is_weight_centralized(net[0])
    net, records = deploy.convert_for_inference(net)
    assert not any(isinstance(m, NORM_TYPES) for m in net.modules())
    frozen = [m for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == (6 if cycle else 3)
    assert all(f.eps == deploy.FROZEN_EPS for f in frozen)
    assert not any(is_weight_centralized(m) for m in net.modules())
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())  # CBN's input capture removed
    if cycle:
        assert isinstance(net[1], CycleBatchNormList) and not any(True for _ in net[1].parameters())
    with torch.no_grad():
        out = [net(x) for x in xs]
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)

    net, records = deploy.convert_for_inference(net, fold=True)
    folded = [r for r in records if r.action.startswith("folded")]
    kept = [r for r in records if r.action.startswith("kept")]
    if cycle:  # per-level statistics after a conv shared by the levels: nothing folds
        assert {r.name for r in kept} == {"1.0", "1.1", "3.norm.0", "3.norm.1", "5.0", "5.1"}
        assert not folded
    else:
        assert {r.name for r in folded} == {"1", "3.norm", "5"} and not kept
        assert isinstance(net[1], nn.Identity) and net[3].norm is None and isinstance(net[5], nn.Identity)
        assert net[0].bias is not None and net[3].bias is not None
    with torch.no_grad():
        out = [net(x) for x in xs]
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_conversion_rejects_bn_without_running_statistics_and_keeps_gn():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        deploy.convert_to_frozen_bn(net)
    gn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    out = deploy.convert_to_frozen_bn(gn, fold=True)
    assert isinstance(out[1], nn.GroupNorm)
    with pytest.raises(TypeError, match="fold"):
        deploy.convert_to_frozen_bn(gn, fold="yes")


def test_frozen_bn_eps_moves_into_running_var_and_loads_into_get_norm_layer():
    from detectron2.layers import get_norm

    bn = nn.BatchNorm2d(5, eps=0.1).double().eval()
    _randomize_statistics(bn)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    frozen = deploy.convert_to_frozen_bn(bn)
    target = get_norm("FrozenBN", 5).double()
    target.load_state_dict(frozen.state_dict(), strict=True)
    torch.testing.assert_close(target(x), bn(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ detectors
def _val_inputs(cfg, n=2):
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:n]
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in dicts]


def _predict(model, inputs):
    """Eval-mode predictions in the coordinates of the network's input image (the resized image;
    Detectron2's postprocessing only rescales them to the original size): R-CNN boxes, scores and
    mask probabilities (28 x 28, before paste-back); RetinaNet boxes and scores."""
    model.eval()
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            return model.inference(inputs, do_postprocess=False)
        inputs = [{k: v for k, v in d.items() if k not in ("height", "width")} for d in inputs]
        return [o["instances"] for o in model(inputs)]


def _max_diff(ref, out):
    diffs = {"boxes": 0.0, "scores": 0.0, "masks": 0.0}
    for a, b in zip(ref, out):
        assert len(a) == len(b), f"{len(a)} vs {len(b)} detections"
        assert torch.equal(a.pred_classes, b.pred_classes)
        diffs["boxes"] = max(diffs["boxes"], (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item())
        diffs["scores"] = max(diffs["scores"], (a.scores - b.scores).abs().max().item())
        if a.has("pred_masks"):
            diffs["masks"] = max(diffs["masks"], (a.pred_masks - b.pred_masks).abs().max().item())
    return diffs


def _trained_detector(arch, norm):
    cfg = tiny_cfg(arch, norm, opts=["SOLVER.IMS_PER_BATCH", 1, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                                     "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(0)
    model = smallbn_d2.build_model(cfg)
    train_steps(model, coco_batches(cfg, 1))  # statistics, windows and weights of a real step
    _randomize_statistics(model)
    with torch.no_grad():  # spread the scores and mask probabilities (tiny predictor inits)
        if arch == "mask_rcnn":
            model.roi_heads.mask_head.predictor.weight.mul_(300.0)
            model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
        else:
            model.head.cls_score.weight.mul_(30.0)
    return cfg, model


@pytest.mark.slow
@pytest.mark.parametrize("arch,norm", [("mask_rcnn", "CBN"), ("mask_rcnn", "MABN"),
                                       ("retinanet", "CBN"), ("retinanet", "MABN")])
def test_detector_conversion_equivalence_save_and_load(arch, norm, tmp_path):
    cfg, model = _trained_detector(arch, norm)
    inputs = _val_inputs(cfg)
    ref = _predict(model, inputs)
    assert all(len(r) >= 20 for r in ref)
    assert all(r.scores.std() > 1e-3 for r in ref)  # the comparison is not between constants
    if arch == "mask_rcnn":
        assert all(r.pred_masks.std() > 1e-2 for r in ref)
    n_norms = sum(isinstance(m, IterationNormBase) for m in model.modules())
    per_level = sum(isinstance(m, CycleBatchNormList) for m in model.modules())
    assert (per_level > 0) == (arch == "retinanet")

    model, records = deploy.convert_for_inference(model)
    assert not any(isinstance(m, NORM_TYPES) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) >= n_norms
    if norm == "MABN":
        assert any(r.action == "weight centralization baked" for r in records)
    diffs = _max_diff(ref, _predict(model, inputs))
    assert max(diffs.values()) <= 1e-4, diffs

    # saves as a Detectron2 checkpoint, loads strictly into the FrozenBN model of the config
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("frozen")
    path = str(tmp_path / "frozen.pth")
    if arch == "mask_rcnn":  # the config alone describes it: Detectron2's own build_model
        plain = d2_build_model(deploy.frozen_bn_config(cfg))
        plain.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
        assert max(_max_diff(ref, _predict(plain, inputs)).values()) <= 1e-4
    loaded = deploy.build_inference_model(cfg)
    deploy.load_checkpoint_strict(loaded, path)
    assert max(_max_diff(ref, _predict(loaded, inputs)).values()) <= 1e-4

    # folded
    model, records = deploy.convert_for_inference(model, fold=True)
    folded = [r for r in records if r.action.startswith("folded")]
    kept = [r for r in records if r.action.startswith("kept")]
    assert len(folded) >= n_norms - (2 * cfg.MODEL.RETINANET.NUM_CONVS * 5 if arch == "retinanet" else 0)
    if arch == "retinanet":
        assert len(kept) == 2 * cfg.MODEL.RETINANET.NUM_CONVS * 5  # per level (5) x subnets x convs
    else:
        assert not kept and not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    diffs = _max_diff(ref, _predict(model, inputs))
    assert max(diffs.values()) <= 1e-4, diffs
    fpath = str(tmp_path / "folded.pth")
    deploy.save_inference_checkpoint(model, fpath, fold=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        deploy.save_inference_checkpoint(model, fpath, fold=True)
    loaded = deploy.load_inference_model(cfg, fpath)  # fold=True read from the metadata
    assert max(_max_diff(ref, _predict(loaded, inputs)).values()) <= 1e-4
    with pytest.raises(deploy.IncompatibleCheckpointError, match="missing keys"):
        deploy.load_inference_model(cfg, fpath, fold=False)


# ------------------------------------------------------------------------------ the tool
def _tool():
    spec = importlib.util.spec_from_file_location("convert_for_inference",
                                                  os.path.join(REPO, "tools", "convert_for_inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_convert_tool(tmp_path, capsys):
    tool = _tool()
    cfg_file = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
    opts = ["MODEL.RESNETS.NORM", "MABN", "MODEL.FPN.NORM", "CBN", "MODEL.ROI_BOX_HEAD.NORM", "MABN",
            "MODEL.ROI_MASK_HEAD.NORM", "BN", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = tiny_cfg("mask_rcnn", "BN", where=(), opts=opts)
    torch.manual_seed(0)
    model = smallbn_d2.build_model(cfg)
    _randomize_statistics(model)
    weights = str(tmp_path / "trained.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("trained")
    inputs = _val_inputs(cfg, 1)
    ref = _predict(model, inputs)

    out = str(tmp_path / "deploy" / "frozen.pth")
    argv = ["--config-file", cfg_file, "--weights", weights, "--output", out, "--fold"] + opts
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| MovingAverageBatchNorm2d" in printed and "| CrossIterationBatchNorm2d" in printed
    assert "folded into conv" in printed and "| BatchNorm2d" in printed  # the mask head's BN
    assert os.path.isfile(out) and os.path.isfile(out[:-4] + ".yaml")
    loaded = deploy.load_inference_model(cfg, out)
    assert max(_max_diff(ref, _predict(loaded, inputs)).values()) <= 1e-4

    # refuses to overwrite, leaving the file untouched; --overwrite replaces it
    mtime = os.path.getmtime(out)
    assert tool.main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert os.path.getmtime(out) == mtime
    assert tool.main(["--config-file", cfg_file, "--weights", weights, "--output", out, "--overwrite"] + opts) == 0
    loaded = deploy.load_inference_model(cfg, out)  # now unfolded
    assert any(isinstance(m, FrozenBatchNorm2d) for m in loaded.modules())
    # the written YAML is the FrozenBN config of the model
    from smallbn_d2.engine import load_config

    frozen_cfg = load_config(out[:-4] + ".yaml")
    assert frozen_cfg.MODEL.RESNETS.NORM == "FrozenBN" and frozen_cfg.MODEL.FPN.NORM == "FrozenBN"
    assert frozen_cfg.MODEL.WEIGHTS == os.path.abspath(out)
