"""Export of converted detectors with Detectron2's tracing: TorchScript and ONNX.

A model converted for inference (:func:`smallbn_d2.deploy.convert_for_inference`: every CBN,
NaiveCBN, MABN and BN layer a ``FrozenBatchNorm2d``, optionally folded into its conv) holds only
Detectron2 and torch modules, so Detectron2's own export path applies unchanged:
``detectron2.export.TracingAdapter`` flattens the model's dict/``Instances`` inputs and outputs
into tuples of tensors, and ``torch.jit.trace`` or ``torch.onnx.export`` records the flattened
model. This module finds ``TracingAdapter`` in the installed Detectron2 and wraps these steps;
``tools/export_model.py`` is its command line (Detectron2's ``tools/deploy/export_model.py``
convention).

Finding ``TracingAdapter``: Detectron2 main imports ``detectron2.export`` without Caffe2.
Detectron2 v0.6's ``detectron2/export/__init__.py`` imports its Caffe2 exporter first, which
needs the ``caffe2`` package that current PyTorch no longer ships, so ``from detectron2.export
import TracingAdapter`` fails there although ``detectron2/export/flatten.py`` (where
``TracingAdapter`` lives) needs no Caffe2. :func:`tracing_adapter_class` then loads that file
(and the ``torchscript_patch.py`` next to it, which it imports) as the submodules of a private
package whose path is the installed ``detectron2/export`` folder; ``detectron2.export`` itself
is neither changed nor replaced.

What is exported (as in Detectron2's tool): for a ``GeneralizedRCNN`` (Faster/Mask R-CNN), the
outputs of ``model.inference(inputs, do_postprocess=False)``: boxes and masks in the
coordinates of the network's input image, masks as the R x R mask probabilities of each
detection (before pasting into the image); for other meta-architectures (RetinaNet) the
outputs of ``model(inputs)``. The traced function takes one (3, H, W) float32 image tensor in
the model's input format (e.g. BGR, 0-255; sample images of other dtypes, such as the uint8
images of Detectron2's ``DatasetMapper``, are converted) and returns a tuple of tensors; rebuild
Detectron2's structures with :meth:`ExportedModel.outputs`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "ExportUnavailableError",
    "tracing_adapter_class",
    "inference_function",
    "trace_model",
    "ExportedModel",
    "export_torchscript",
    "export_onnx",
    "onnx_available",
    "onnx_output_names",
    "ONNX_INPUT_NAME",
    "FORMATS",
    "OUTPUT_FILES",
]

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


def _load_flatten_from_folder():
    """``detectron2/export/flatten.py`` loaded as ``smallbn_d2._detectron2_export.flatten``."""
    spec = importlib.util.find_spec("detectron2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    export_dirs = [os.path.join(f, "export") for f in folders if os.path.isfile(os.path.join(f, "export", "flatten.py"))]
    if not export_dirs:
        raise ExportUnavailableError(
            f"Detectron2's detectron2/export/flatten.py (TracingAdapter) was not found in {folders}; "
            "allowed: a Detectron2 with detectron2.export (v0.6 or later)")
    if _PRIVATE_PACKAGE not in sys.modules:
        package = types.ModuleType(_PRIVATE_PACKAGE, "detectron2/export loaded without its __init__ (Caffe2)")
        package.__path__ = export_dirs[:1]
        package.__package__ = _PRIVATE_PACKAGE
        sys.modules[_PRIVATE_PACKAGE] = package
    return importlib.import_module(f"{_PRIVATE_PACKAGE}.flatten")


def tracing_adapter_class() -> type:
    """Detectron2's ``TracingAdapter`` class, from ``detectron2.export`` or, where that package
    fails to import for want of Caffe2 (v0.6), from its ``flatten.py`` (module docstring).

    Raises:
        ExportUnavailableError: neither works; the message gives both reasons.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError as e:
        first = e
    try:
        return _load_flatten_from_folder().TracingAdapter
    except ExportUnavailableError:
        raise
    except Exception as e:  # an import error inside flatten.py or torchscript_patch.py
        raise ExportUnavailableError(
            f"Detectron2's TracingAdapter is unavailable: 'from detectron2.export import TracingAdapter' failed "
            f"({type(first).__name__}: {first}), and loading detectron2/export/flatten.py directly failed "
            f"({type(e).__name__}: {e})") from e


def inference_function(model: nn.Module) -> Optional[Callable]:
    """The function that Detectron2's tracing export records for ``model``: for a
    ``GeneralizedRCNN`` ``model.inference(inputs, do_postprocess=False)`` (outputs in the input
    image's coordinates, R x R mask probabilities), else None (``model(inputs)``)."""
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


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("the model is in training mode; allowed: a model in eval mode (call model.eval()) "
                         "converted for inference (smallbn_d2.deploy.convert_for_inference)")


@dataclass
class ExportedModel:
    """A traced model and what turns its tuple outputs back into Detectron2's structures.

    Attributes:
        module: the ``torch.jit.ScriptModule`` (``module(image) -> tuple of tensors``).
        adapter: the ``TracingAdapter`` it was traced from (holds the output schema).
    """

    module: Any
    adapter: nn.Module

    def outputs(self, flat: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
        """Rebuild ``[{"instances": Instances}]`` from the flat outputs of ``module`` (or of an
        ONNX runtime session, converted to tensors), with the schema recorded at tracing."""
        return self.adapter.outputs_schema(list(flat))

    def __call__(self, image: torch.Tensor) -> List[Dict[str, Any]]:
        """Run the traced module on one (3, H, W) image; returns ``[{"instances": Instances}]``."""
        with torch.no_grad():
            return self.outputs(self.module(_check_image(image)))


def _adapter(model: nn.Module, image: torch.Tensor) -> Tuple[nn.Module, torch.Tensor]:
    """(``TracingAdapter`` of ``model`` in eval mode, the float32 sample image)."""
    _check_eval(model)
    image = _check_image(image)
    adapter = tracing_adapter_class()(model, [{"image": image}], inference_function(model))
    # eval like the model: exporters restore the wrapper's mode recursively, which would put a
    # wrapper left in training mode (nn.Module's default) and the model in training mode
    return adapter.eval(), image


def trace_model(model: nn.Module, image: torch.Tensor) -> ExportedModel:
    """Trace a converted detector with ``TracingAdapter`` and ``torch.jit.trace``.

    Args:
        model: a Detectron2 detector in eval mode, converted for inference (a model that still
            holds CBN/MABN layers traces too, with their eval path, but is slower).
        image: a (3, H, W) sample image in the model's input format (converted to float32); the
            traced model accepts other sizes.
    Returns:
        :class:`ExportedModel`.
    Raises:
        ValueError: the model is in training mode, or a malformed image.
        ExportUnavailableError: as :func:`tracing_adapter_class`.
    """
    adapter, image = _adapter(model, image)
    with torch.no_grad():
        module = torch.jit.trace(adapter, (image,), check_trace=False)
    return ExportedModel(module, adapter)


def _refuse_existing(path: str, overwrite: bool) -> None:
    """smallbn_d2's output guard for one file (:func:`smallbn_d2.engine.check_output_dir`)."""
    from .engine.defaults import check_output_dir

    check_output_dir(os.path.dirname(path) or ".", files=[os.path.basename(path)], allow_existing=overwrite,
                     way_out="overwrite=True")


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, renamed to ``path`` if it succeeds
    (a failed export leaves no partial file and ``path`` as it was). The file gets the mode a
    plain ``open`` would give (the user's umask), not the temporary file's 0600."""
    from .checkpoint import new_file_mode

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_torchscript(model: nn.Module, image: torch.Tensor, path: str, overwrite: bool = False) -> ExportedModel:
    """:func:`trace_model` and save the TorchScript module to ``path`` (``torch.jit.save``).

    Load it with ``torch.jit.load(path)`` after ``import torchvision`` (the graph calls
    torchvision's RoIAlign and NMS ops); it needs neither smallbn_d2 nor Detectron2.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        as :func:`trace_model`.
    """
    _refuse_existing(path, overwrite)
    exported = trace_model(model, image)
    _write_atomically(path, lambda tmp: torch.jit.save(exported.module, tmp))
    return exported


def _schema_leaves(schema, path: Tuple[str, ...], per_detection: bool) -> List[Tuple[Tuple[str, ...], bool]]:
    """(path of names, is a per-detection field) of every flat value of a ``TracingAdapter``
    output schema, in the flattening order (dicts and Instances fields by sorted key, then an
    Instances' ``image_size``)."""
    if hasattr(schema, "keys") and hasattr(schema, "schemas"):  # DictSchema, InstancesSchema
        instances = type(schema).__name__ == "InstancesSchema"
        out = []
        for key, sub in zip(schema.keys, schema.schemas):
            out += _schema_leaves(sub, path + (key,), per_detection or instances)
        if instances:
            out.append((path + ("image_size",), False))
        return out
    if hasattr(schema, "schemas"):  # ListSchema, TupleSchema
        many = len(schema.schemas) > 1
        out = []
        for i, sub in enumerate(schema.schemas):
            out += _schema_leaves(sub, path + ((str(i),) if many else ()), per_detection)
        return out
    return [(path, per_detection)]  # a tensor (IdentitySchema) or a tensor wrapper (Boxes)


def onnx_output_names(adapter: nn.Module) -> List[Tuple[str, bool]]:
    """The names :func:`export_onnx` gives the outputs of a traced ``TracingAdapter`` (after one
    forward call, which records the output schema), in order, each with whether its first
    dimension counts detections (R).

    A name is the field's name in Detectron2's output structure: for a Mask R-CNN
    ``pred_boxes, pred_classes, pred_masks, scores, image_size`` (``Instances`` fields sorted,
    then the image size); for a RetinaNet ``pred_boxes, pred_classes, scores, image_size``.
    Names that would repeat (several images or outputs) are prefixed by their path, joined
    with ``"/"``.
    """
    leaves = _schema_leaves(adapter.outputs_schema, (), False)
    short = [p[-1] if p else "output" for p, _ in leaves]
    names = [s if short.count(s) == 1 else "/".join(p) for s, (p, _) in zip(short, leaves)]
    return list(zip(names, [d for _, d in leaves]))


def onnx_available() -> Optional[str]:
    """None if ``torch.onnx.export`` can run here, else the reason (the ``onnx`` package, which
    PyTorch's exporter needs, is missing)."""
    if importlib.util.find_spec("onnx") is None:
        return "the 'onnx' package is not installed (pip install onnx; onnxruntime to run the exported model)"
    return None


def export_onnx(model: nn.Module, image: torch.Tensor, path: str, overwrite: bool = False,
                opset_version: int = ONNX_OPSET) -> nn.Module:
    """Export a converted model to ONNX through ``TracingAdapter`` (TorchScript-based exporter,
    ``torch.onnx.export(..., dynamo=False)``).

    Args:
        model: as :func:`trace_model`.
        image: the (3, H, W) sample image to trace with (converted to float32); the exported
            graph's input ``"image"`` has dynamic height and width.
        path: the ``.onnx`` file to write.
        opset_version: ONNX opset, default :data:`ONNX_OPSET` (16). Models with Detectron2's
            ``ROIAlignV2`` poolers (R-CNN heads) need >= 16: torchvision exports RoIAlign with
            ``aligned=True`` only from opset 16 on (at lower opsets it warns and exports
            ``aligned=False``, which gives other boxes and masks).
    The graph's input is named ``"image"`` (3, H, W); its outputs are named after Detectron2's
    fields (:func:`onnx_output_names`), for a Mask R-CNN: ``pred_boxes`` (R, 4) float32, x1 y1
    x2 y2 in the input image's pixels; ``pred_classes`` (R,) int64; ``pred_masks`` (R, 1, M, M)
    float32 mask probabilities (M = 28 by default); ``scores`` (R,) float32; ``image_size`` (2,)
    int64, (H, W) of the input. R, the number of detections, is a dynamic dimension.

    Returns:
        the ``TracingAdapter`` (its ``outputs_schema`` rebuilds the structures from the outputs).
    Raises:
        ValueError: ``opset_version`` < 16 for a model with aligned RoIAlign.
        ExportUnavailableError: :func:`onnx_available` gives a reason.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        as :func:`trace_model`; whatever ``torch.onnx.export`` raises for an unsupported op.
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
    _refuse_existing(path, overwrite)
    adapter, image = _adapter(model, image)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}

    with torch.no_grad():
        adapter(image)  # records the output schema, which names the outputs
    outputs = onnx_output_names(adapter)
    dynamic_axes = {ONNX_INPUT_NAME: {1: "height", 2: "width"}}
    dynamic_axes.update({name: {0: "detections"} for name, per_detection in outputs if per_detection})

    def write(tmp: str) -> None:
        with torch.no_grad():
            torch.onnx.export(adapter, (image,), tmp, opset_version=opset_version, input_names=[ONNX_INPUT_NAME],
                              output_names=[name for name, _ in outputs], dynamic_axes=dynamic_axes, **kwargs)

    _write_atomically(path, write)
    return adapter
