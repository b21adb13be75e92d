"""The installed Detectron2 works on its own, without importing smallbn_d2.

Every check runs in a fresh subprocess of this interpreter (``.venv/bin/python`` when the suite
runs as README says), so nothing that this test process or smallbn_d2 has patched leaks in:

* the start-up fix (``smallbn_d2_detectron2_compat.pth``, installed with Detectron2 by
  ``tools/install_detectron2.py``) imports nothing at start-up and applies its fixes when
  ``detectron2`` is first imported: ``import detectron2.layers`` works, the stub ``_C`` raises a
  clear error per op, a compiled ``_C`` wins;
* every model-zoo config resolves (``model_zoo.get_config_file``) and loads (``get_config``);
* Detectron2's own training flow (``default_argument_parser``, ``DefaultTrainer``) trains a tiny
  BN Mask R-CNN for 2 iterations on the COCO 2017 sample shipped with smallbn_d2 (its files
  only, registered with Detectron2's ``register_coco_instances``);
* importing smallbn_d2 before or after ``detectron2.modeling`` gives the same registries and
  ``get_norm`` outputs, and leaves Detectron2's own norm names as plain Detectron2 builds them.

The checks of the stub ``_C`` are skipped when the imported Detectron2 has a compiled ``_C``.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from smallbn_d2.data import SAMPLE_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = str(SAMPLE_ROOT)  # Detectron2's COCO layout: annotations/instances_train2017.json, train2017/
COMPAT = "smallbn_d2_detectron2_compat"


def run_python(code: str, *args: str, env=None, timeout: int = 300, extra_flags=()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one's executable and environment)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *extra_flags, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def run_json(code: str, *args: str, **kwargs):
    """Run ``code`` (which prints one JSON line last) and return the decoded object."""
    proc = run_python(code, *args, **kwargs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env_info():
    """Which Detectron2 a fresh interpreter imports, whether its ``_C`` is compiled, and whether
    the start-up fix is installed."""
    return run_json(
        """
        import importlib.metadata, importlib.util, json, os, sys
        import detectron2, detectron2._C as C
        try:
            dist = importlib.metadata.distribution("pb1-detectron2")
            ours = any(os.path.realpath(dist.locate_file(f)) == os.path.realpath(detectron2.__file__)
                       for f in dist.files or ())
        except importlib.metadata.PackageNotFoundError:
            ours = False
        print(json.dumps({
            "detectron2": detectron2.__file__,
            "ours": ours,
            "compiled": not getattr(C, "__smallbn_stub__", False),
            "startup_fix": importlib.util.find_spec("smallbn_d2_detectron2_compat") is not None,
            "smallbn_d2_imported": "smallbn_d2" in sys.modules,
        }))
        """
    )


def skip_unless_stub_in_use(env_info):
    """Skip unless the imported Detectron2 gets the stub ``_C`` of the start-up fix."""
    if env_info["compiled"]:
        pytest.skip(f"detectron2 at {env_info['detectron2']} has a compiled _C: the stub is not used")
    if not env_info["startup_fix"]:
        pytest.skip(f"{COMPAT} is not installed (detectron2 not installed by tools/install_detectron2.py)")


def skip_unless_our_build(env_info):
    """Skip unless the imported Detectron2 is the _C-less v0.6 build of tools/install_detectron2.py."""
    if not env_info["ours"]:
        pytest.skip(f"detectron2 at {env_info['detectron2']} is not the pb1-detectron2 build of "
                    "tools/install_detectron2.py")
    skip_unless_stub_in_use(env_info)


def test_fresh_interpreter_does_not_import_smallbn_d2(env_info):
    assert not env_info["smallbn_d2_imported"], env_info


def test_startup_fix_imports_nothing_until_detectron2_is_imported(env_info):
    """At start-up the fix only inserts its hook: no NumPy, no Pillow, no module of its own."""
    if not env_info["startup_fix"]:
        pytest.skip(f"{COMPAT} is not installed (detectron2 not installed by tools/install_detectron2.py)")
    proc = run_python(
        """
        import json, sys
        print(json.dumps({"finders": [type(f).__name__ for f in sys.meta_path],
                          "loaded": sorted(m for m in ("numpy", "PIL", "detectron2", "torch") if m in sys.modules)}))
        """,
        extra_flags=("-X", "importtime"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Detectron2ImportHook" in out["finders"], out
    assert "ExtensionFallbackFinder" not in out["finders"], "the _C fallback is added only on import of detectron2"
    assert out["loaded"] == [], out
    # -X importtime: "import time: self [us] | cumulative | name"; equal = it imported no module.
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith(f" {COMPAT}")]
    self_us, cumulative_us = (int(x) for x in line.split(":", 1)[1].split("|")[:2])
    assert self_us == cumulative_us, f"{COMPAT} imports other modules at start-up: {line}"


def test_detectron2_works_without_smallbn_d2(env_info):
    """Data, layers, evaluation and model zoo import; the code paths of v0.6 that use the removed
    NumPy and Pillow aliases run (mask rasterization: np.bool; ExtentTransform: Image.LINEAR)."""
    out = run_json(
        """
        import json, sys
        import numpy as np
        from PIL import Image
        import detectron2.data, detectron2.evaluation, detectron2.layers, detectron2.model_zoo
        from detectron2.data.transforms import ExtentTransform
        from detectron2.structures.masks import polygons_to_bitmask

        mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
        print(json.dumps({
            "mask_rows": mask.sum(axis=1).tolist(),
            "mask_dtype": str(mask.dtype),
            "interp_is_bilinear": ExtentTransform((0, 0, 4, 4), (2, 2)).interp == Image.BILINEAR,
            "smallbn_d2_imported": "smallbn_d2" in sys.modules,
        }))
        """
    )
    assert not out["smallbn_d2_imported"]
    # The square (0,0)-(4,4) covers pixel centres 0.5..3.5 in rows 0-3, none in rows 4-5.
    assert out["mask_dtype"] == "bool" and out["mask_rows"] == [4, 4, 4, 4, 0, 0], out
    assert out["interp_is_bilinear"]


def test_stub_extension_reports_itself_and_each_op_fails_clearly(env_info):
    """Ops that Detectron2 calls through ``detectron2._C`` (all of v0.6's) raise
    ``MissingExtensionError`` naming the op. (Detectron2 main calls its rotated ops through
    ``torch.ops.detectron2``, which then fails with PyTorch's AttributeError naming the op.)"""
    skip_unless_stub_in_use(env_info)
    out = run_json(
        """
        import json, sys, torch
        import detectron2._C as C
        from detectron2.layers import ROIAlignRotated
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated
        from detectron2.utils.collect_env import collect_env_info

        def error(fn):
            try:
                fn()
            except Exception as e:
                return [type(e).__name__, type(e).__module__, str(e)]
            return None

        def smallbn_d2_view(C):
            from smallbn_d2.compat import MissingExtensionError, has_compiled_ops
            try:
                C.box_iou_rotated(None, None)
            except MissingExtensionError:
                return {"has_compiled_ops": has_compiled_ops(), "error_class": "MissingExtensionError"}

        boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
        pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=0)
        import inspect
        print(json.dumps({  # main calls its rotated ops through torch.ops.detectron2, v0.6 through _C
            "via_C": ["torch.ops.detectron2." not in inspect.getsource(sys.modules["detectron2.layers." + m])
                      for m in ("rotated_boxes", "roi_align_rotated")],
            "iou": error(lambda: pairwise_iou_rotated(boxes, boxes)),
            "roi_align": error(lambda: pooler(torch.randn(1, 1, 8, 8), torch.tensor([[0.0, 4.0, 4.0, 2.0, 2.0, 0.0]]))),
            "deform": error(lambda: C.deform_conv_forward()),
            "info": [C.get_compiler_version(), C.get_cuda_version(), C.has_cuda()],
            "collect_env": "smallbn_d2_detectron2_compat" in collect_env_info(),
            "dunder": error(lambda: C.__wrapped__),
            "smallbn_d2_imported": "smallbn_d2" in sys.modules,
            # last: what smallbn_d2 (imported only now) sees of the stub
            "smallbn_d2.compat": smallbn_d2_view(C),
        }))
        """
    )
    for key, op, via_C in (("iou", "box_iou_rotated", out["via_C"][0]),
                           ("roi_align", "roi_align_rotated_forward", out["via_C"][1]),
                           ("deform", "deform_conv_forward", True)):
        name, module, message = out[key]
        if via_C:
            assert (name, module) == ("MissingExtensionError", COMPAT), out[key]
            assert f"detectron2._C.{op} is not available" in message and "C++ extension" in message, message
        else:
            assert op.split("_forward")[0] in message, out[key]
    compiler, cuda, has_cuda = out["info"]
    assert "stub" in compiler and "stub" in cuda and has_cuda is False
    assert out["collect_env"]
    assert out["dunder"][0] == "AttributeError"  # dunder lookups (copy, pickle, inspect) are not ops
    assert not out["smallbn_d2_imported"]
    assert out["smallbn_d2.compat"] == {"has_compiled_ops": False, "error_class": "MissingExtensionError"}


def test_without_the_startup_fix_detectron2_needs_a_compiled_extension(env_info):
    """The fix is what makes the _C-less v0.6 install importable."""
    skip_unless_our_build(env_info)
    proc = run_python("import detectron2.layers",
                      env={"SMALLBN_D2_DETECTRON2_COMPAT": "0"})
    assert proc.returncode != 0 and "_C" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_compiled_extension_wins_over_the_stub(env_info, tmp_path):
    """A ``_C`` that the normal import system finds (here a module in the package path, as a
    compiled extension would be) is used untouched; smallbn_d2.compat then reports compiled ops."""
    if not env_info["startup_fix"]:
        pytest.skip(f"{COMPAT} is not installed (detectron2 not installed by tools/install_detectron2.py)")
    (tmp_path / "_C.py").write_text("def box_iou_rotated(a, b):\n    return 'compiled'\n")
    out = run_json(
        """
        import json, sys
        import detectron2
        detectron2.__path__.insert(0, sys.argv[1])
        import detectron2._C as C
        import detectron2.layers
        from smallbn_d2.compat import has_compiled_ops
        print(json.dumps({"result": C.box_iou_rotated(1, 2), "file": C.__file__,
                          "stub": getattr(C, "__smallbn_stub__", False), "has_compiled_ops": has_compiled_ops()}))
        """,
        str(tmp_path),
    )
    assert out == {"result": "compiled", "file": str(tmp_path / "_C.py"), "stub": False, "has_compiled_ops": True}


def test_every_model_zoo_config_resolves_and_loads():
    """Every YAML config of the installed model zoo loads with ``get_config``; so does every
    entry of the model zoo's own catalogue of trained models (``_ModelZooUrls``), which names
    the configs independently of the files installed. LazyConfig ``.py`` configs load too (all
    of v0.6's and main's do; one that imports a package that is not installed would be excused)."""
    out = run_json(
        """
        import glob, json, os
        from detectron2 import model_zoo
        from detectron2.model_zoo.model_zoo import _ModelZooUrls

        root = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
        files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.*"), recursive=True))
        result = {}
        for rel in [f for f in files if f.endswith((".yaml", ".py"))]:
            try:
                path = model_zoo.get_config_file(rel)
                cfg = model_zoo.get_config(rel)
                if rel.endswith(".yaml"):
                    summary = cfg.MODEL.META_ARCHITECTURE
                else:
                    summary = sorted(k for k in ("model", "dataloader", "optimizer", "train", "lr_multiplier")
                                     if k in cfg) or sorted(cfg.keys())
                result[rel] = {"ok": os.path.isfile(path), "summary": summary}
            except Exception as e:
                result[rel] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                               "missing_module": getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None}
        print(json.dumps({"root": root, "result": result, "catalogue": sorted(_ModelZooUrls.CONFIG_PATH_TO_URL_SUFFIX)}))
        """,
        timeout=600,
    )
    result = out["result"]
    yaml = {k: v for k, v in result.items() if k.endswith(".yaml")}
    # v0.6 ships 92 YAML configs (Detectron2 main keeps them all); none is missing or fails.
    assert len(yaml) >= 92, f"only {len(yaml)} YAML configs under {out['root']}"
    failed = {k: v["error"] for k, v in yaml.items() if not v["ok"]}
    assert not failed, failed
    assert yaml["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"]["summary"] == "GeneralizedRCNN"
    assert yaml["COCO-Detection/retinanet_R_50_FPN_1x.yaml"]["summary"] == "RetinaNet"
    assert len(out["catalogue"]) >= 60
    # catalogue names have no extension: "COCO-Detection/faster_rcnn_R_50_FPN_1x" (.yaml or .py)
    assert [c for c in out["catalogue"]
            if not any(result.get(c + ext, {}).get("ok") for ext in (".yaml", ".py"))] == []
    py = {k: v for k, v in result.items() if k.endswith(".py")}
    assert py["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py"]["summary"] == [
        "dataloader", "lr_multiplier", "model", "optimizer", "train"]
    assert py["new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"]["ok"]
    unloadable = {k: v["error"] for k, v in py.items() if not v["ok"]
                  and not (v["missing_module"] and importlib.util.find_spec(v["missing_module"].split(".")[0]) is None)}
    assert not unloadable, unloadable


TRAIN_SCRIPT = """
import json, os, sys
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch


def main(args):
    coco = args.coco
    register_coco_instances("env_test_coco_train", {}, os.path.join(coco, "annotations", "instances_train2017.json"),
                            os.path.join(coco, "train2017"))
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    bn = [type(m).__name__ for m in trainer.model.modules() if "BatchNorm" in type(m).__name__]
    print(json.dumps({"iter": trainer.iter, "bn_layers": len(bn), "bn_types": sorted(set(bn)),
                      "smallbn_d2_imported": "smallbn_d2" in sys.modules}))


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--coco", required=True)
    args = parser.parse_args()
    launch(main, args.num_gpus, args=(args,))
"""


def test_default_trainer_trains_a_tiny_bn_model_on_coco(tmp_path):
    """Detectron2's own train_net flow: 2 iterations of a tiny R18-FPN Mask R-CNN with BN in
    the backbone, FPN and heads, from scratch on the train images of the shipped COCO sample."""
    from_zoo = run_python("from detectron2 import model_zoo; print(model_zoo.get_config_file('Base-RCNN-FPN.yaml'))")
    assert from_zoo.returncode == 0, from_zoo.stderr[-2000:]
    config = tmp_path / "tiny_bn.yaml"
    config.write_text(textwrap.dedent(f"""\
        _BASE_: "{from_zoo.stdout.strip()}"
        MODEL:
          DEVICE: cpu
          WEIGHTS: ""
          MASK_ON: True
          RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, STEM_OUT_CHANNELS: 16, NORM: BN, STRIDE_IN_1X1: False}}
          BACKBONE: {{FREEZE_AT: 0}}
          FPN: {{OUT_CHANNELS: 32, NORM: BN}}
          RPN: {{PRE_NMS_TOPK_TRAIN: 100, POST_NMS_TOPK_TRAIN: 50, BATCH_SIZE_PER_IMAGE: 64}}
          ROI_HEADS: {{BATCH_SIZE_PER_IMAGE: 16, NUM_CLASSES: 80}}
          ROI_BOX_HEAD: {{NUM_CONV: 2, NUM_FC: 1, CONV_DIM: 32, FC_DIM: 64, NORM: BN}}
          ROI_MASK_HEAD: {{NUM_CONV: 2, CONV_DIM: 32, NORM: BN}}
        DATASETS:
          TRAIN: ("env_test_coco_train",)
          TEST: ()
        DATALOADER: {{NUM_WORKERS: 0}}
        INPUT:
          MIN_SIZE_TRAIN: (128,)
          MAX_SIZE_TRAIN: 192
        SOLVER: {{IMS_PER_BATCH: 2, BASE_LR: 0.005, MAX_ITER: 2, WARMUP_ITERS: 0, CHECKPOINT_PERIOD: 100}}
        TEST: {{EVAL_PERIOD: 0}}
        """))
    out_dir = tmp_path / "output"
    proc = run_python(TRAIN_SCRIPT, "--config-file", str(config), "--coco", COCO,
                      "OUTPUT_DIR", str(out_dir), "SEED", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # BN layers: ResNet-18 stem 1 + 8 blocks x 2 convs + 4 shortcuts (res2 too: 16 -> 64
    # channels) = 21; FPN 4 lateral + 4 output = 8; box head 2 convs; mask head 2 convs.
    assert out == {"iter": 2, "bn_layers": 33, "bn_types": ["BatchNorm2d"], "smallbn_d2_imported": False}, out
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    logged = [m for m in metrics if "total_loss" in m]
    assert logged and logged[-1]["iteration"] == 1, metrics  # the writer logs the last iteration
    assert all(0 < m["total_loss"] < 100 for m in logged), logged
    assert (out_dir / "model_final.pth").is_file()


PROBE = """
import json, sys
import torch

order = sys.argv[1]
if order == "smallbn_d2 first":
    import smallbn_d2.modeling  # the integration floor: extends get_norm
import detectron2.modeling
if order == "smallbn_d2 after detectron2.modeling":
    import smallbn_d2.modeling
from fvcore.common.registry import Registry
import detectron2.layers
from detectron2.layers import batch_norm
from detectron2.modeling.backbone import fpn, resnet
from detectron2.modeling.meta_arch import retinanet
from detectron2.modeling.roi_heads import box_head, mask_head

registries = {}
for name, module in sorted(sys.modules.items()):
    if name.startswith("detectron2") and module is not None:
        for value in list(vars(module).values()):
            if isinstance(value, Registry):
                registries[value._name] = sorted(value._obj_map)

NAMES = ["BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN",
         "CBN", "NaiveCBN", "MABN", "", "NoSuchNorm"]


def describe(get_norm, name):
    torch.manual_seed(0)
    try:
        m = get_norm(name, 64)
    except Exception as e:
        return {"error": type(e).__name__}
    if m is None:
        return None
    return {"type": type(m).__module__ + "." + type(m).__qualname__,
            "state": {k: [list(v.shape), str(v.dtype), float(v.double().sum())] for k, v in m.state_dict().items()},
            "attrs": {k: repr(v) for k, v in sorted(vars(m).items())
                      if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None)))}}


bindings = {"detectron2.layers": detectron2.layers.get_norm, "batch_norm": batch_norm.get_norm,
            "resnet": resnet.get_norm, "fpn": fpn.get_norm, "box_head": box_head.get_norm,
            "mask_head": mask_head.get_norm, "retinanet": retinanet.get_norm}
norms = {where: {n: describe(f, n) for n in NAMES} for where, f in bindings.items()}
print(json.dumps({"registries": registries, "norms": norms}))
"""


@pytest.fixture(scope="module")
def import_orders():
    return {order: run_json(PROBE, order) for order in
            ("smallbn_d2 first", "smallbn_d2 after detectron2.modeling", "detectron2 only")}


def test_import_order_of_smallbn_d2_does_not_matter(import_orders):
    first, after = import_orders["smallbn_d2 first"], import_orders["smallbn_d2 after detectron2.modeling"]
    assert first["registries"] == after["registries"]
    for where in first["norms"]:
        assert first["norms"][where] == after["norms"][where], where
    assert "error" not in first["norms"]["resnet"]["CBN"] and "error" not in first["norms"]["fpn"]["MABN"]


def test_smallbn_d2_leaves_detectron2s_own_names_and_registries_unchanged(import_orders):
    plain = import_orders["detectron2 only"]
    assert plain["norms"]["resnet"]["BN"]["type"].endswith("BatchNorm2d")  # the probe itself works
    for order in ("smallbn_d2 first", "smallbn_d2 after detectron2.modeling"):
        ours = import_orders[order]
        for registry, names in plain["registries"].items():
            assert set(names) <= set(ours["registries"][registry]), (order, registry)
        for where, by_name in plain["norms"].items():
            d2_names = [n for n, d in by_name.items() if d is None or "error" not in d]
            assert {n: ours["norms"][where][n] for n in d2_names} == {n: by_name[n] for n in d2_names}, (order, where)
