#!/usr/bin/env python
"""Export a CBN / NaiveCBN / MABN / BN detector to TorchScript or ONNX, converted for inference.

Detectron2's ``tools/deploy/export_model.py`` command line (tracing export)::

    python tools/export_model.py --config-file configs/.../x.yaml --export-method tracing \\
        --format torchscript --output exported/ [--fold] [--sample-image IMG] \\
        MODEL.WEIGHTS output/model_final.pth [KEY VALUE ...]

``MODEL.WEIGHTS`` is a trained checkpoint of the config's model (``model_final.pth`` or a
periodic one; its CBN/MABN layers are converted to FrozenBatchNorm2d here, ``--fold`` folds them
into the convs: ``smallbn_d2.deploy.convert_for_inference``) or a checkpoint already converted
by ``tools/convert_for_inference.py`` (recognized by its conversion metadata). A LazyConfig
(``.py``) works too, with ``key=value`` overrides: the weights are ``train.init_checkpoint=FILE``,
the default sample image the first of ``dataloader.test``. The model is traced
with Detectron2's ``TracingAdapter`` (``smallbn_d2.export``) on the sample image (default: the
first image of ``DATASETS.TEST[0]``, resized as for testing) and written as
``OUTPUT/model.ts`` (``--format torchscript``; load with ``torch.jit.load`` after ``import
torchvision``, whose RoIAlign and NMS ops it calls) or
``OUTPUT/model.onnx`` (``--format onnx``, needs the ``onnx`` package; opset 16; input ``image``,
outputs ``pred_boxes, pred_classes, pred_masks, scores, image_size`` for a Mask R-CNN:
``smallbn_d2.export.onnx_output_names``, docs/DEPLOY.md). The exported
model takes one (3, H, W) float image in ``INPUT.FORMAT`` and returns R-CNN outputs before
Detectron2's postprocessing (boxes in the input image's coordinates, R x R mask probabilities;
``smallbn_d2.export.ExportedModel.outputs`` rebuilds ``Instances``). An existing output file is
never overwritten. The tool checks the exported file against the eager model on the sample
image (TorchScript always; ONNX when ``onnxruntime`` is installed) and prints the differences.
"""
import argparse
import os
import sys

import torch

from smallbn_d2 import ConfigValueError
from smallbn_d2.checkpoint import read_conversion_metadata
from smallbn_d2.engine import OutputDirExistsError, check_output_dir
from smallbn_d2.deploy import (
    IncompatibleCheckpointError,
    build_training_model,
    convert_for_inference,
    fold_frozen_bn,
    is_lazy_config,
    load_checkpoint_strict,
    load_inference_model,
    load_training_config,
)
from smallbn_d2.export import (
    FORMATS,
    ONNX_OPSET,
    OUTPUT_FILES,
    ExportUnavailableError,
    export_onnx,
    export_torchscript,
    inference_function,
    onnx_available,
)

EXPORT_METHODS = ("tracing",)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="training config of the model (YAML, or a LazyConfig .py)")
    parser.add_argument("--export-method", default="tracing", choices=EXPORT_METHODS,
                        help="Detectron2's TracingAdapter + torch.jit.trace / torch.onnx.export")
    parser.add_argument("--format", default="torchscript", choices=FORMATS, help="output format")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--fold", action="store_true", help="fold the frozen norms into the preceding convs")
    parser.add_argument("--sample-image", metavar="FILE",
                        help="image to trace with (default: the first image of DATASETS.TEST[0])")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE ..., e.g. MODEL.WEIGHTS model_final.pth "
                             "(LazyConfig: key=value ..., e.g. train.init_checkpoint=model_final.pth)")
    return parser


def sample_input(cfg, image_path=None) -> dict:
    """One test-time input ``{"image": (3, H, W) tensor, ...}``: ``image_path`` or the first
    image of ``DATASETS.TEST[0]``, read and resized by Detectron2's test ``DatasetMapper``."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    from smallbn_d2.data import register_coco_sample

    if image_path is None and is_lazy_config(cfg):
        from detectron2.config import instantiate

        register_coco_sample()
        return next(iter(instantiate(cfg.dataloader.test)))[0]
    if image_path is None:
        register_coco_sample()
        if not cfg.DATASETS.TEST:
            raise FileNotFoundError("DATASETS.TEST is empty: pass --sample-image")
        record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    else:
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"--sample-image {image_path!r} does not exist")
        record = {"file_name": image_path, "image_id": 0}
    return DatasetMapper(cfg, is_train=False)(record)


def load_converted_model(cfg, weights: str, fold: bool):
    """The model of ``cfg`` with ``weights``, converted for inference (see the module docstring)."""
    meta = read_conversion_metadata(weights)
    if meta is not None:
        model = load_inference_model(cfg, weights)
        if fold and not meta["fold"]:
            fold_frozen_bn(model)
        return model.eval()
    model = build_training_model(cfg)  # reads no data: a burn-in in epochs stays unknown, unneeded here
    load_checkpoint_strict(model, weights)
    model.eval()
    model, _ = convert_for_inference(model, fold=fold)
    return model


def _differences(ref, out):
    """(same detections?, a line of max |difference| of boxes, scores, masks)."""
    ref, out = ref.to("cpu"), out.to("cpu")
    if len(ref) != len(out) or not torch.equal(ref.pred_classes, out.pred_classes):
        return False, f"different detections: eager {len(ref)}, exported {len(out)}"
    if not len(ref):
        return True, "0 detections"
    parts = [f"{len(ref)} detections", f"boxes {(ref.pred_boxes.tensor - out.pred_boxes.tensor).abs().max():.2e}",
             f"scores {(ref.scores - out.scores).abs().max():.2e}"]
    if ref.has("pred_masks"):
        parts.append(f"masks {(ref.pred_masks - out.pred_masks).abs().max():.2e}")
    return True, ", ".join(parts)


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    path = os.path.join(args.output, OUTPUT_FILES[args.format])
    try:
        check_output_dir(args.output, files=[OUTPUT_FILES[args.format]], way_out="")
    except OutputDirExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "onnx" and onnx_available():
        print(f"error: --format onnx: {onnx_available()}", file=sys.stderr)
        return 2
    try:
        cfg = load_training_config(args.config_file, args.opts)
        lazy = is_lazy_config(cfg)
        key = "train.init_checkpoint" if lazy else "MODEL.WEIGHTS"
        weights = cfg.train.init_checkpoint if lazy else cfg.MODEL.WEIGHTS
        device = cfg.train.device if lazy else cfg.MODEL.DEVICE
        example = f"{key}=FILE" if lazy else f"{key} FILE"
        if not weights:
            raise FileNotFoundError(f"{key} is empty: give the checkpoint to export ({example})")
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"{key} {weights!r} does not exist")
        model = load_converted_model(cfg, weights, args.fold)
        inputs = sample_input(cfg, args.sample_image)
    except (FileNotFoundError, ConfigValueError, IncompatibleCheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image = inputs["image"].to(torch.float32).to(device)
    os.makedirs(args.output, exist_ok=True)
    try:
        if args.format == "torchscript":
            exported = export_torchscript(model, image, path)
            with torch.no_grad():
                outputs = exported.outputs(torch.jit.load(path)(image))
        else:
            adapter = export_onnx(model, image, path)
            outputs = None
            try:
                import onnxruntime
            except ImportError:
                print("onnxruntime is not installed: the ONNX file was not run")
            else:
                session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                flat = session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})
                outputs = adapter.outputs_schema([torch.as_tensor(o) for o in flat])
    except ExportUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opset = f", ONNX opset {ONNX_OPSET}" if args.format == "onnx" else ""
    print(f"wrote {path} ({args.format}{opset}, {'folded' if args.fold else 'FrozenBN'} norms, traced on a "
          f"{tuple(image.shape[1:])} image)")
    if outputs is not None:
        with torch.no_grad():
            rcnn = inference_function(model)
            ref = (rcnn(model, [{"image": image}]) if rcnn else model([{"image": image}]))[0]["instances"]
        same, text = _differences(ref, outputs[0]["instances"])
        print(f"exported vs eager on the sample image, max |difference|: {text}")
        if not same:
            print(f"error: the exported model {path!r} disagrees with the eager model", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
