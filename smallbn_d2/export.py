"""TorchScript and ONNX export of converted detectors with Detectron2's ``TracingAdapter``.

A model converted by :func:`smallbn_d2.deploy.convert_for_inference` holds only Detectron2 and
torch modules, so Detectron2's tracing export applies unchanged; ``tools/export_model.py`` is the
command line. What is exported, and the ONNX names: docs/DEPLOY.md, section "Export".
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import atomic_path, refuse_existing

__all__ = ["ExportUnavailableError", "tracing_adapter_class", "inference_function", "trace_model", "ExportedModel",
           "export_torchscript", "export_onnx", "onnx_available", "onnx_output_names", "ONNX_INPUT_NAME", "FORMATS",
           "OUTPUT_FILES"]

#: Export formats and the file each writes in the output directory.
FORMATS = ("torchscript", "onnx")
OUTPUT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
#: ONNX opset of :func:`export_onnx`, the lowest that exports torchvision's RoIAlign with
#: ``aligned=True`` (Detectron2's ROIAlignV2) correctly; Detectron2 main's
#: ``STABLE_ONNX_OPSET_VERSION`` 11 gives other boxes and masks.
ONNX_OPSET = 16
#: Name of the ONNX graph's input, the (3, H, W) float32 image; outputs: :func:`onnx_output_names`.
ONNX_INPUT_NAME = "image"
_PRIVATE_PACKAGE = "smallbn_d2._detectron2_export"


class ExportUnavailableError(ImportError):
    """Detectron2's ``TracingAdapter`` (or ONNX export) cannot be used in this environment."""


def tracing_adapter_class() -> type:
    """Detectron2's ``TracingAdapter`` class.

    Detectron2 v0.6's ``detectron2/export/__init__.py`` imports its Caffe2 exporter, which current
    PyTorch cannot import; ``flatten.py``, where ``TracingAdapter`` lives, needs no Caffe2. Where
    ``from detectron2.export import TracingAdapter`` fails, that file (and ``torchscript_patch.py``,
    which it imports) is loaded as a submodule of a private package whose path is the installed
    ``detectron2/export`` folder; ``detectron2.export`` itself is neither changed nor replaced.

    Raises:
        ExportUnavailableError: neither works; the message gives both reasons.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError as e:
        first = e
    spec = importlib.util.find_spec("detectron2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    export_dirs = [os.path.join(f, "export") for f in folders
                   if os.path.isfile(os.path.join(f, "export", "flatten.py"))]
    if not export_dirs:
        raise ExportUnavailableError(
            f"Detectron2's detectron2/export/flatten.py (TracingAdapter) was not found in {folders}; "
            "allowed: a Detectron2 with detectron2.export (v0.6 or later)")
    if _PRIVATE_PACKAGE not in sys.modules:
        package = types.ModuleType(_PRIVATE_PACKAGE, "detectron2/export loaded without its __init__ (Caffe2)")
        package.__path__ = export_dirs[:1]
        package.__package__ = _PRIVATE_PACKAGE
        sys.modules[_PRIVATE_PACKAGE] = package
    try:
        return importlib.import_module(f"{_PRIVATE_PACKAGE}.flatten").TracingAdapter
    except Exception as e:  # an import error inside flatten.py or torchscript_patch.py
        raise ExportUnavailableError(
            f"Detectron2's TracingAdapter is unavailable: 'from detectron2.export import TracingAdapter' failed "
            f"({type(first).__name__}: {first}), and loading detectron2/export/flatten.py directly failed "
            f"({type(e).__name__}: {e})") from e


def inference_function(model: nn.Module) -> Optional[Callable]:
    """What Detectron2's tracing export records: for a ``GeneralizedRCNN``
    ``model.inference(inputs, do_postprocess=False)`` (outputs in the input image's coordinates,
    R x R mask probabilities), else None (``model(inputs)``)."""
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        def rcnn_inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

        return rcnn_inference
    return None


def _check_image(image: Any) -> torch.Tensor:
    """``image`` as float32; ValueError unless it is a (3, H, W) tensor."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image = {shape} is invalid; allowed: a (3, H, W) tensor in the model's input format")
    return image.to(torch.float32)


@dataclass
class ExportedModel:
    """A traced model (``module(image) -> tuple of tensors``, a ``torch.jit.ScriptModule``) and the
    ``TracingAdapter`` it was traced from (``adapter``, which holds the output schema)."""

    module: Any
    adapter: nn.Module

    def outputs(self, flat: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
        """``[{"instances": Instances}]`` from the flat outputs of ``module`` (or of an ONNX runtime, as tensors)."""
        return self.adapter.outputs_schema(list(flat))

    def __call__(self, image: torch.Tensor) -> List[Dict[str, Any]]:
        """Run the traced module on one (3, H, W) image; returns ``[{"instances": Instances}]``."""
        with torch.no_grad():
            return self.outputs(self.module(_check_image(image)))


def _adapter(model: nn.Module, image: torch.Tensor) -> Tuple[nn.Module, torch.Tensor]:
    """(``TracingAdapter`` of ``model`` in eval mode, the float32 sample image)."""
    if model.training:
        raise ValueError("the model is in training mode; allowed: a model in eval mode (call model.eval()) "
                         "converted for inference (smallbn_d2.deploy.convert_for_inference)")
    image = _check_image(image)
    adapter = tracing_adapter_class()(model, [{"image": image}], inference_function(model))
    # exporters restore the wrapper's mode recursively: a wrapper left in training mode (nn.Module's
    # default) would put the model in training mode
    return adapter.eval(), image


def trace_model(model: nn.Module, image: torch.Tensor) -> ExportedModel:
    """Trace ``model``, a Detectron2 detector in eval mode converted for inference, with ``TracingAdapter``
    and ``torch.jit.trace`` on ``image``, a (3, H, W) sample in the model's input format (made float32;
    the traced model accepts other sizes). A model that still holds CBN/MABN layers traces too (slower).

    Raises:
        ValueError: the model is in training mode, or a malformed image.
        ExportUnavailableError: as :func:`tracing_adapter_class`.
    """
    adapter, image = _adapter(model, image)
    with torch.no_grad():
        module = torch.jit.trace(adapter, (image,), check_trace=False)
    return ExportedModel(module, adapter)


def export_torchscript(model: nn.Module, image: torch.Tensor, path: str, overwrite: bool = False) -> ExportedModel:
    """:func:`trace_model`, then ``torch.jit.save`` to ``path``, atomically.

    The file loads with ``torch.jit.load`` after ``import torchvision`` (its RoIAlign and NMS ops),
    without smallbn_d2 or Detectron2.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        as :func:`trace_model`.
    """
    refuse_existing(path, overwrite)
    exported = trace_model(model, image)
    with atomic_path(path) as tmp:
        torch.jit.save(exported.module, tmp)
    return exported


def _schema_leaves(schema, path: Tuple[str, ...], per_detection: bool) -> List[Tuple[Tuple[str, ...], bool]]:
    """(names, is per detection) of each flat value of a ``TracingAdapter`` schema, in flattening order."""
    if not hasattr(schema, "schemas"):
        return [(path, per_detection)]  # a tensor (IdentitySchema) or a tensor wrapper (Boxes)
    instances = type(schema).__name__ == "InstancesSchema"
    if hasattr(schema, "keys"):  # DictSchema, InstancesSchema: by sorted key
        steps = [(key,) for key in schema.keys]
    else:  # ListSchema, TupleSchema: by index, if several
        steps = [(str(i),) if len(schema.schemas) > 1 else () for i in range(len(schema.schemas))]
    out = []
    for step, sub in zip(steps, schema.schemas):
        out += _schema_leaves(sub, path + step, per_detection or instances)
    return out + ([(path + ("image_size",), False)] if instances else [])


def onnx_output_names(adapter: nn.Module) -> List[Tuple[str, bool]]:
    """The names of a traced ``TracingAdapter``'s outputs (after one forward call, which records
    the schema), in order, each with whether its first dimension counts detections (R).

    A name is the field's name in Detectron2's output: ``Instances`` fields sorted, then
    ``image_size`` (Mask R-CNN: ``pred_boxes, pred_classes, pred_masks, scores, image_size``).
    Names that would repeat are prefixed by their path, joined with ``"/"``.
    """
    leaves = _schema_leaves(adapter.outputs_schema, (), False)
    short = [p[-1] if p else "output" for p, _ in leaves]
    names = [s if short.count(s) == 1 else "/".join(p) for s, (p, _) in zip(short, leaves)]
    return list(zip(names, [d for _, d in leaves]))


def onnx_available() -> Optional[str]:
    """None if ``torch.onnx.export`` can run here, else why not (the ``onnx`` package is missing)."""
    if importlib.util.find_spec("onnx") is None:
        return "the 'onnx' package is not installed (pip install onnx; onnxruntime to run the exported model)"
    return None


def export_onnx(model: nn.Module, image: torch.Tensor, path: str, overwrite: bool = False,
                opset_version: int = ONNX_OPSET) -> nn.Module:
    """Export ``model`` (as :func:`trace_model`) to the ONNX file ``path``, atomically, through ``TracingAdapter``
    (``torch.onnx.export(..., dynamo=False)``); returns the adapter, whose ``outputs_schema``
    rebuilds Detectron2's structures.

    The graph's input ``"image"`` is (3, H, W) float32 with dynamic H and W; its outputs are named
    by :func:`onnx_output_names`, the number of detections R dynamic (docs/DEPLOY.md, "Export").
    Models with Detectron2's ``ROIAlignV2`` (R-CNN heads) need ``opset_version`` >= 16: below,
    torchvision exports RoIAlign with ``aligned=False``, which gives other boxes and masks.

    Raises:
        ValueError: ``opset_version`` < 16 for a model with aligned RoIAlign, or as :func:`trace_model`.
        ExportUnavailableError: :func:`onnx_available` gives a reason.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from detectron2.layers import ROIAlign

    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < 1:
        raise ValueError(f"opset_version = {opset_version!r} is invalid; allowed: an integer >= 1")
    if opset_version < ONNX_OPSET and any(isinstance(m, ROIAlign) and m.aligned for m in model.modules()):
        raise ValueError(f"opset_version = {opset_version} is invalid for this model, whose RoIAlign layers have "
                         f"aligned=True (Detectron2's ROIAlignV2); allowed: an integer >= {ONNX_OPSET}")
    reason = onnx_available()
    if reason:
        raise ExportUnavailableError(f"ONNX export unavailable: {reason}")
    refuse_existing(path, overwrite)
    adapter, image = _adapter(model, image)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad():
        adapter(image)  # records the output schema, which names the outputs
        outputs = onnx_output_names(adapter)
        dynamic_axes = {ONNX_INPUT_NAME: {1: "height", 2: "width"}}
        dynamic_axes.update({name: {0: "detections"} for name, per_detection in outputs if per_detection})
        with atomic_path(path) as tmp:
            torch.onnx.export(adapter, (image,), tmp, opset_version=opset_version, input_names=[ONNX_INPUT_NAME],
                              output_names=[name for name, _ in outputs], dynamic_axes=dynamic_axes, **kwargs)
    return adapter
