"""smallbn_d2.compat and the environment's Detectron2 fixes it relies on: the detectron2._C
stub, the NumPy/Pillow aliases (applied by the start-up module smallbn_d2_detectron2_compat that
tools/install_detectron2.py installs; tests/test_detectron2_env.py tests it without smallbn_d2)."""
import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import smallbn_d2  # noqa: F401
from smallbn_d2 import compat


def test_detectron2_layers_imports_and_stub_is_in_use():
    import detectron2.layers  # noqa: F401

    assert not compat.has_compiled_ops()


def test_rotated_and_deformable_ops_raise_clear_error():
    import detectron2._C as C
    from detectron2.layers import ROIAlignRotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(compat.MissingExtensionError, match="box_iou_rotated.*C\\+\\+ extension"):
        pairwise_iou_rotated(boxes, boxes)
    pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=0)
    with pytest.raises(compat.MissingExtensionError, match="roi_align_rotated_forward"):
        pooler(torch.randn(1, 1, 8, 8), torch.tensor([[0.0, 4.0, 4.0, 2.0, 2.0, 0.0]]))
    # v0.6 runs DeformConv on CPU through torchvision; on CUDA it calls these:
    for op in ("deform_conv_forward", "modulated_deform_conv_forward"):
        with pytest.raises(compat.MissingExtensionError, match=op):
            getattr(C, op)()


def test_collect_env_reports_the_stub():
    from detectron2.utils.collect_env import collect_env_info

    assert "stub of smallbn_d2_detectron2_compat" in collect_env_info()


@pytest.mark.slow
def test_compiled_extension_is_used_untouched(tmp_path):
    """A real detectron2._C found by the normal import system wins over the fallback."""
    code = textwrap.dedent(
        f"""
        import sys, importlib.abc, importlib.machinery, types
        class Real(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "detectron2._C":
                    return importlib.machinery.ModuleSpec(name, self, origin="compiled.so")
            def create_module(self, spec):
                m = types.ModuleType(spec.name); m.box_iou_rotated = lambda a, b: "compiled"; return m
            def exec_module(self, m): pass
        sys.meta_path.insert(0, Real())
        import smallbn_d2
        from smallbn_d2 import compat
        import detectron2._C as C
        assert compat.has_compiled_ops(), C
        assert C.box_iou_rotated(1, 2) == "compiled"
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_importing_smallbn_d2_compat_has_no_side_effects():
    """The module alone (loaded from its file, without the package) changes no import machinery
    and imports neither Detectron2 nor NumPy."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        before = list(sys.meta_path)
        spec = importlib.util.spec_from_file_location("compat_alone", {compat.__file__!r})
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print(sys.meta_path == before, sorted(m for m in ("detectron2", "numpy", "PIL") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "True []", (proc.stdout, proc.stderr[-2000:])


def test_numpy_and_pillow_aliases():
    assert np.int is int and np.float is float
    assert np.zeros(2).astype(np.bool).dtype == bool  # NumPy 2 has np.bool again (numpy.bool_)
    assert Image.LINEAR == Image.BILINEAR


def test_detectron2_code_paths_that_use_removed_aliases():
    """v0.6's mask decoding uses np.bool; its ExtentTransform defaults to Image.LINEAR."""
    from detectron2.data.transforms import ExtentTransform
    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
    assert mask.dtype == bool and mask[1:4, 1:4].all() and not mask[5].any()
    t = ExtentTransform((0, 0, 4, 4), (2, 2))
    assert t.interp == Image.BILINEAR
    assert importlib.import_module("detectron2.model_zoo")  # pkg_resources (setuptools < 81)


@pytest.mark.slow
@pytest.mark.integration
def test_retinanet_with_gn_builds_and_runs():
    """compat.get_norm_channels: Detectron2 v0.6's RetinaNetHead probes get_norm("GN", 1) only for
    the layer's type; with the fix the head builds GN layers of the real width (32 groups of 256
    channels) and a training step runs. Without the fix v0.6 fails with GroupNorm's error."""
    from detectron2.utils.events import EventStorage
    from torch import nn

    from helpers import coco_batches, tiny_cfg

    assert compat.get_norm_channels("GN", 1) == 32
    assert [compat.get_norm_channels(n, c) for n, c in (("GN", 64), ("BN", 1), ("FrozenBN", 1))] == [64, 1, 1]
    cfg = tiny_cfg("retinanet", "GN", where=("retinanet_head",))
    model = smallbn_d2.build_model(cfg)
    gns = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 2 * cfg.MODEL.RETINANET.NUM_CONVS
    assert all((m.num_groups, m.num_channels) == (32, model.head.cls_subnet[0].out_channels) for m in gns)
    model.train()
    with EventStorage(0):
        losses = model(coco_batches(cfg, 1)[0])
    assert torch.isfinite(sum(losses.values()))
