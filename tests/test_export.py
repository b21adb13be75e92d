"""Export of converted detectors (smallbn_d2.export, tools/export_model.py): TorchScript through
Detectron2's TracingAdapter, ONNX when the onnx packages are installed.

References: the eager model's own eval-mode outputs on real COCO images (boxes, scores, classes,
R x R mask probabilities): the eager converted model (the traced graph runs the same ops: equal
up to float rounding) and the eager model *before* conversion (CBN/MABN layers with
PreciseBN population statistics; as tests/test_deploy.py, within 1e-4).
"""
import functools
import importlib
import importlib.util
import os
import sys

import pytest
import torch

import smallbn_d2
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.layers import FrozenBatchNorm2d
from smallbn_d2.data import register_coco_sample
from smallbn_d2.deploy import convert_for_inference
from smallbn_d2.engine import update_norm_stats
from smallbn_d2.export import export_onnx, export_torchscript, inference_function, trace_model, tracing_adapter_class
from smallbn_d2.layers import IterationNormBase

from helpers import REPO, TINY, coco_batches, tiny_cfg

pytestmark = pytest.mark.integration

PLACES = ("fpn", "box_head", "mask_head")
OPTS = ["DATASETS.TRAIN", "('coco_2017_sample_train',)", "DATASETS.TEST", "('coco_2017_sample_val',)",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]


def _cfg(norm):
    register_coco_sample()
    return tiny_cfg("mask_rcnn", norm, where=PLACES, opts=OPTS)


def _predict(model, inputs):
    """Eager R-CNN outputs before postprocessing, one image at a time (as the traced model)."""
    with torch.no_grad():
        return [model.inference([i], do_postprocess=False)[0] for i in inputs]


def _assert_same(ref, out, atol, what):
    assert len(ref) == len(out), f"{what}: {len(ref)} vs {len(out)} detections"
    assert torch.equal(ref.pred_classes, out.pred_classes), what
    for field, a, b in (("boxes", ref.pred_boxes.tensor, out.pred_boxes.tensor), ("scores", ref.scores, out.scores),
                        ("masks", ref.pred_masks, out.pred_masks)):
        assert a.shape == b.shape, (what, field)
        diff = (a - b).abs().max().item()
        assert diff <= atol[field], f"{what}: max |difference| of {field} = {diff:.2e} > {atol[field]:.0e}"


@functools.lru_cache(maxsize=None)
def _trained(norm):
    """(cfg, state dict, two val inputs of different shapes, eager outputs) of a tiny Mask R-CNN with
    ``norm`` in the FPN and heads, its population statistics computed from real images (PreciseBN)."""
    cfg = _cfg(norm)
    torch.manual_seed(0)
    model = smallbn_d2.build_model(cfg)
    counts = update_norm_stats(model, coco_batches(cfg, 1), num_iters=1)
    assert counts and all(n > 0 for n in counts.values())
    layers = [m for m in model.modules() if isinstance(m, IterationNormBase)]
    for layer in layers:  # population statistics from data, not the initial ones
        mean, var, *_ = layer.eval_affine()
        assert not torch.allclose(var, torch.ones_like(var))
    with torch.no_grad():  # spread the scores and mask probabilities (tiny predictor inits: near ties)
        model.roi_heads.mask_head.predictor.weight.mul_(300.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    model.eval()
    dicts = DatasetCatalog.get("coco_2017_sample_val")
    portrait = next(d for d in dicts if d["height"] > d["width"])
    inputs = [DatasetMapper(cfg, is_train=False)(d) for d in (dicts[0], portrait)]
    assert inputs[0]["image"].shape[1:] != inputs[1]["image"].shape[1:]
    ref = _predict(model, inputs)
    assert all(len(r) >= 20 and r.scores.std() > 1e-3 and r.pred_masks.std() > 1e-2 for r in ref)
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}, inputs, ref


def _model(norm):
    cfg, state, inputs, ref = _trained(norm)
    model = smallbn_d2.build_model(cfg)
    model.load_state_dict(state)
    return model.eval(), inputs, ref


TO_EAGER_CONVERTED = {"boxes": 1e-5, "scores": 1e-6, "masks": 1e-6}  # same ops, float32
TO_EAGER_ORIGINAL = {"boxes": 1e-4, "scores": 1e-4, "masks": 1e-4}  # conversion/folding reorder roundings


# ----------------------------------------------------------------------------- TracingAdapter
def test_tracing_adapter_found_and_detectron2_export_left_alone():
    cls = tracing_adapter_class()
    assert cls.__name__ == "TracingAdapter"
    try:
        package = importlib.import_module("detectron2.export")
    except ImportError as e:  # Detectron2 v0.6: its __init__ needs Caffe2
        assert "caffe2" in str(e)
        assert cls.__module__ == "smallbn_d2._detectron2_export.flatten"
        assert "detectron2.export" not in sys.modules
    else:  # Detectron2 main
        assert cls is package.TracingAdapter


@pytest.mark.slow
@pytest.mark.parametrize("norm,fold", [("CBN", False), ("MABN", True)])
def test_traced_converted_detector_equals_eager_on_real_images(norm, fold):
    model, inputs, ref = _model(norm)
    n_norms = sum(isinstance(m, IterationNormBase) for m in model.modules())
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # the backbone's
    with pytest.raises(ValueError, match="training mode"):
        trace_model(model.train(), inputs[0]["image"])
    model.eval()
    model, records = convert_for_inference(model, fold=fold)
    assert not any(isinstance(m, IterationNormBase) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == (0 if fold else n_frozen + n_norms)
    eager = _predict(model, inputs)
    exported = trace_model(model, inputs[0]["image"])  # traced on the first image only
    assert not any(m.training for m in model.modules())
    for i, (x, e, r) in enumerate(zip(inputs, eager, ref)):
        out = exported(x["image"])[0]["instances"]
        _assert_same(e, out, TO_EAGER_CONVERTED, f"image {i}: traced vs eager converted")
        _assert_same(r, out, TO_EAGER_ORIGINAL, f"image {i}: traced vs eager {norm} model")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        trace_model(model, inputs[0]["image"][0])


# ----------------------------------------------------------------------------- the tool
def _tool():
    spec = importlib.util.spec_from_file_location("export_model", os.path.join(REPO, "tools", "export_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_export_tool_writes_torchscript_equal_to_eager_and_never_overwrites(tmp_path, capsys):
    cfg, state, inputs, ref = _trained("CBN")
    weights = str(tmp_path / "model_final.pth")
    torch.save({"model": state}, weights)  # a trained CBN checkpoint, not converted
    out = tmp_path / "exported"
    argv = ["--config-file", TINY["mask_rcnn"], "--export-method", "tracing", "--format", "torchscript",
            "--output", str(out), "--fold", "MODEL.WEIGHTS", weights,
            "MODEL.FPN.NORM", "CBN", "MODEL.ROI_BOX_HEAD.NORM", "CBN", "MODEL.ROI_MASK_HEAD.NORM", "CBN"] + OPTS
    assert _tool().main(argv) == 0
    printed = capsys.readouterr().out
    assert "exported vs eager on the sample image" in printed and "different" not in printed
    path = out / "model.ts"

    # the file alone against the eager CBN model (not converted), on both images (traced on the
    # first): the flat outputs of Detectron2's TracingAdapter around the eager model
    model, _, _ = _model("CBN")
    adapter = tracing_adapter_class()(model, [{"image": inputs[0]["image"]}], inference_function(model))
    loaded = torch.jit.load(str(path))
    kinds = {m.original_name for m in loaded.modules()}
    assert "Conv2d" in kinds and not kinds & {"CrossIterationBatchNorm2d", "FrozenBatchNorm2d"}, kinds  # --fold
    for x, r in zip(inputs, ref):
        with torch.no_grad():
            flat = loaded(x["image"])
            flat_eager = adapter(x["image"])
        assert len(flat) == len(flat_eager) >= 4  # boxes, classes, masks, scores
        _assert_same(r, adapter.outputs_schema(list(flat))[0]["instances"], TO_EAGER_ORIGINAL,
                     "tool's model.ts vs eager CBN model")

    before = path.read_bytes()
    assert _tool().main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export_torchscript(model, inputs[0]["image"], str(path))
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.slow
def test_onnx_export_of_the_full_detector_equals_eager(tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (installed by tools/install.sh)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs 'onnxruntime'")
    model, inputs, ref = _model("CBN")
    model, _ = convert_for_inference(model, fold=True)
    eager = _predict(model, inputs)
    path = str(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="aligned=True"):
        export_onnx(model, inputs[0]["image"], path, opset_version=11)
    adapter = export_onnx(model, inputs[0]["image"], path)
    assert not any(m.training for m in model.modules())  # the exporter left the model in eval mode
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tol = {"boxes": 1e-3, "scores": 1e-4, "masks": 1e-4}  # another runtime: other roundings (boxes in pixels)
    for i, (x, e, r) in enumerate(zip(inputs, eager, ref)):
        flat = session.run(None, {session.get_inputs()[0].name: x["image"].float().numpy()})
        out = adapter.outputs_schema([torch.as_tensor(t) for t in flat])[0]["instances"]
        _assert_same(e, out, tol, f"image {i}: ONNX Runtime vs eager converted")
        _assert_same(r, out, tol, f"image {i}: ONNX Runtime vs eager CBN model")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export_onnx(model, inputs[0]["image"], path)
