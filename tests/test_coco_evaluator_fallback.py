"""Every ``COCOEvaluator`` evaluates where Detectron2 has no compiled ``_C`` (issue 18, item 3).

Detectron2's ``COCOEvaluator`` evaluates with ``fast_eval_api.COCOeval_opt`` by default
(``use_fast_impl=True``), whose kernels live in ``detectron2._C``. Where the environment serves
the stub ``_C`` (Detectron2 installed by tools/install_detectron2.py), the start-up module
``smallbn_d2_detectron2_compat`` replaces ``COCOeval_opt`` by pycocotools' ``COCOeval`` as that
module is imported; with a compiled ``_C`` it leaves it alone. Checked here:

* (a) Detectron2's own model-zoo LazyConfig files (``common/models/retinanet.py`` with ``"MABN"``
  in the head, ``common/models/mask_rcnn_fpn.py`` with ``"CBN"``; ``common/data/coco.py``, whose
  evaluator is ``L(COCOEvaluator)(dataset_name=...)``), shrunk to a CPU size and given the
  ``smallbn`` field README describes, train two iterations with tools/lazyconfig_train_net.py on
  the shipped COCO sample and print their COCO AP tables;
* (b) in a program that never imports smallbn_d2 (a user's or Detectron2's own tool), a plain
  ``COCOEvaluator(dataset)`` gives exactly the AP dict of ``use_fast_impl=False`` on the same
  predictions, and both equal pycocotools' COCOeval run directly on the written results;
* (c) with a compiled ``_C`` (simulated by a module that the normal import system finds first),
  ``COCOeval_opt`` is Detectron2's own and the default evaluator calls into ``_C``.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

import smallbn_d2  # noqa: F401
from smallbn_d2.compat import has_compiled_ops
from smallbn_d2.data.sample import coco_sample_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK_LOG = "COCO evaluation uses pycocotools' COCOeval instead of the fast COCOeval_opt"
VAL_JSON, VAL_IMAGES = coco_sample_files()["coco_2017_sample_val"]

# Shared by both model-zoo configs: the shipped COCO sample at 128-192 px, 2 images per
# iteration, CPU, 2 iterations, every detection kept (a barely trained model scores below
# Detectron2's default test threshold, and an empty result list would skip COCOeval).
_DATA_AND_TRAIN = """
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train

dataloader.train.dataset.names = "coco_2017_sample_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=192)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "coco_2017_sample_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192)]
dataloader.test.num_workers = 0
train.device = "cpu"
train.max_iter = 2
train.log_period = 1
"""

_HEADER = """
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

"""

MODEL_ZOO_CONFIGS = {
    # RetinaNet R18-FPN, 32 channels, 2 head convs with MABN (one layer per FPN level)
    "retinanet_MABN": _HEADER + """
model = model_zoo.get_config("common/models/retinanet.py").model
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # a bottleneck option; BasicBlock has none
model.backbone.out_channels = 32
model.backbone.top_block.in_channels = 512
model.head.input_shape = [ShapeSpec(channels=32)] * 5
model.head.conv_dims = [32, 32]
model.head.norm = "MABN"
model.test_score_thresh = 0.0
model.test_topk_candidates = 100

smallbn = dict(
    norms=dict(MABN=dict(buffer_size=2, renorm_warmup_iters=0)),
    head_norms=dict(MABN=dict(warmup_iters=0)),
    precise_norm=dict(enabled=False, num_iter=200),
    freeze_norm_stats_iter=-1,
)
""" + _DATA_AND_TRAIN,
    # Mask R-CNN R18-FPN, 32 channels, CBN in the FPN and in the 4conv1fc box and mask heads
    "mask_rcnn_CBN": _HEADER + """
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1
model.backbone.out_channels = 32
model.backbone.norm = "CBN"
model.proposal_generator.head.in_channels = 32
model.proposal_generator.pre_nms_topk = (100, 100)
model.proposal_generator.post_nms_topk = (50, 50)
model.roi_heads.batch_size_per_image = 16
model.roi_heads.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
model.roi_heads.box_head.conv_dims = [32] * 4
model.roi_heads.box_head.fc_dims = [64]
model.roi_heads.box_head.conv_norm = "CBN"
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
model.roi_heads.box_predictor.test_score_thresh = 0.0
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [32] * 5
model.roi_heads.mask_head.conv_norm = "CBN"

smallbn = dict(
    norms=dict(CBN=dict(window_size=2, burn_in=0)),
    head_norms=dict(),
    precise_norm=dict(enabled=False, num_iter=200),
    freeze_norm_stats_iter=-1,
)
""" + _DATA_AND_TRAIN,
}


def _needs_model_zoo():
    from detectron2 import model_zoo

    try:
        model_zoo.get_config("common/models/retinanet.py")
    except RuntimeError as e:
        pytest.skip(f"the installed Detectron2 has no model-zoo LazyConfigs: {e}")


@pytest.mark.parametrize("name", list(MODEL_ZOO_CONFIGS))
def test_model_zoo_lazy_config_trains_and_prints_its_coco_ap_table(name, tmp_path):
    _needs_model_zoo()
    config = tmp_path / f"{name}.py"
    config.write_text(MODEL_ZOO_CONFIGS[name])
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", str(config),
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    log = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert "MissingExtensionError" not in log
    assert (out / "model_final.pth").is_file()
    tasks = ["bbox", "segm"] if name.startswith("mask_rcnn") else ["bbox"]
    for task in tasks:
        assert f"Evaluation results for {task}:" in log, log[-4000:]
        assert f"copypaste: Task: {task}" in log
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == len(tasks)
    # the AP row is numbers (the table, not "No predictions")
    rows = [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]
    ap_rows = [rows[i + 1] for i, r in enumerate(rows) if r.startswith("AP,AP50")]
    assert all(len([float(v) for v in r.split(",")]) == 6 for r in ap_rows), ap_rows
    # which COCOeval ran: pycocotools' (logged once) without a compiled _C, Detectron2's fast one with it
    assert log.count(FALLBACK_LOG) == (0 if has_compiled_ops() else 1), log[-4000:]


# Run in a fresh interpreter that never imports smallbn_d2: predictions made from the sample's
# ground truth (boxes jittered by 10 % of their size, 20 % of the labels wrong, random scores,
# the masks of the annotations, plus 2 random boxes per image), evaluated three ways.
_EVALUATE = """
import json, os, sys
import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
import detectron2.evaluation.fast_eval_api as fast_eval_api
from detectron2.structures import Boxes, BoxMode, Instances

json_file, image_root, out = sys.argv[1:4]
register_coco_instances("fallback_sample_val", {}, json_file, image_root)
dicts = DatasetCatalog.get("fallback_sample_val")
rng = np.random.default_rng(0)
inputs, outputs = [], []
for d in dicts:
    h, w = d["height"], d["width"]
    boxes, classes, masks = [], [], []
    for a in d["annotations"]:
        if a.get("iscrowd", 0):
            continue
        box = np.array(BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS), dtype=np.float64)
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        boxes.append(box + rng.normal(0, 0.1, 4) * size)
        classes.append(a["category_id"] if rng.random() > 0.2 else int(rng.integers(80)))
        seg = a["segmentation"]
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        masks.append(mask_util.decode(rle).astype(bool))
    for _ in range(2):
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        boxes.append(np.array([x0, y0, x0 + rng.uniform(8, w / 2), y0 + rng.uniform(8, h / 2)]))
        classes.append(int(rng.integers(80)))
        m = np.zeros((h, w), dtype=bool)
        b = boxes[-1].astype(int)
        m[b[1]:b[3], b[0]:b[2]] = True
        masks.append(m)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor(np.array(boxes), dtype=torch.float32))
    inst.scores = torch.tensor(rng.random(len(boxes)), dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.pred_masks = torch.tensor(np.array(masks))
    inputs.append({"image_id": d["image_id"], "file_name": d["file_name"], "height": h, "width": w})
    outputs.append({"instances": inst})

def evaluate(folder, **kwargs):
    evaluator = COCOEvaluator("fallback_sample_val", output_dir=os.path.join(out, folder), **kwargs)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()

results = {"default": evaluate("default"), "official": evaluate("official", use_fast_impl=False)}
# independent reference: pycocotools directly on the results file the default evaluator wrote
# (for masks without the "bbox" field, so that areas are mask areas, as Detectron2 does)
with open(os.path.join(out, "default", "coco_instances_results.json")) as f:
    written = json.load(f)
gt = COCO(json_file)
reference = {}
for task in ("bbox", "segm"):
    dets = [{k: v for k, v in r.items() if not (task == "segm" and k == "bbox")} for r in written]
    ev = COCOeval(gt, gt.loadRes(dets), task)
    ev.evaluate(); ev.accumulate(); ev.summarize()
    reference[task] = [float(s) * 100 for s in ev.stats[:6]]
results["pycocotools"] = reference
results["num_detections"] = len(written)
results["COCOeval_opt"] = [fast_eval_api.COCOeval_opt.__module__, fast_eval_api.COCOeval_opt.__qualname__]
results["smallbn_d2_imported"] = "smallbn_d2" in sys.modules
print(json.dumps(results))
"""


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (per-category AP of categories without ground truth)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_plain_coco_evaluator_gives_the_official_ap_in_a_program_without_smallbn_d2(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _EVALUATE, VAL_JSON, VAL_IMAGES, str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not r["smallbn_d2_imported"]
    assert r["num_detections"] > 100
    if not has_compiled_ops():
        assert r["COCOeval_opt"] == ["smallbn_d2_detectron2_compat", "PycocotoolsCOCOeval"]
    default, official = r["default"], r["official"]
    assert set(default) == {"bbox", "segm"}
    assert _same(default, official), (default, official)
    for task in ("bbox", "segm"):
        summary = [default[task][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert summary == pytest.approx(r["pycocotools"][task], abs=1e-9), task
        assert 10 < default[task]["AP"] < 90, default[task]  # a non-trivial AP, so equality means something


_COMPILED = """
import importlib.abc, importlib.machinery, json, sys, types

class FakeCompiledExtension(Exception):
    pass

class Compiled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a detectron2._C that the normal import system finds, as it finds a compiled extension
    def find_spec(self, name, path=None, target=None):
        if name == "detectron2._C":
            return importlib.machinery.ModuleSpec(name, self, origin="compiled.so")
    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        def InstanceAnnotation(*args):
            raise FakeCompiledExtension("InstanceAnnotation of the compiled _C called")
        m.InstanceAnnotation = InstanceAnnotation
        return m
    def exec_module(self, m):
        pass

sys.meta_path.insert(0, Compiled())
import torch
from pycocotools.cocoeval import COCOeval
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
import detectron2.evaluation.coco_evaluation as coco_evaluation
import detectron2.evaluation.fast_eval_api as fast_eval_api
from detectron2.structures import Boxes, Instances

json_file, image_root = sys.argv[1:3]
register_coco_instances("fallback_sample_val", {}, json_file, image_root)
evaluator = COCOEvaluator("fallback_sample_val", tasks=("bbox",))
inst = Instances((100, 100))
inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 50.0]]))
inst.scores = torch.tensor([0.9])
inst.pred_classes = torch.tensor([0])
from detectron2.data import DatasetCatalog
image_id = DatasetCatalog.get("fallback_sample_val")[0]["image_id"]
evaluator.reset()
evaluator.process([{"image_id": image_id}], [{"instances": inst}])
try:
    evaluator.evaluate()
    called = None
except FakeCompiledExtension as e:
    called = str(e)
print(json.dumps({
    "C_file": sys.modules["detectron2._C"].__spec__.origin,
    "opt": [fast_eval_api.COCOeval_opt.__module__, fast_eval_api.COCOeval_opt.__qualname__],
    "evaluator_binds_it": coco_evaluation.COCOeval_opt is fast_eval_api.COCOeval_opt,
    "own_evaluate": fast_eval_api.COCOeval_opt.evaluate is not COCOeval.evaluate,
    "use_fast_impl": evaluator._use_fast_impl,
    "compiled_called": called,
}))
"""


def test_with_a_compiled_extension_the_fast_path_is_left_unchanged(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _COMPILED, VAL_JSON, VAL_IMAGES],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == {"C_file": "compiled.so", "opt": ["detectron2.evaluation.fast_eval_api", "COCOeval_opt"],
                 "evaluator_binds_it": True, "own_evaluate": True, "use_fast_impl": True,
                 "compiled_called": "InstanceAnnotation of the compiled _C called"}, r


def test_fast_eval_api_keeps_its_own_loader_and_source():
    """The loader wrapper leaves no trace: ``__loader__``/``__spec__.loader`` are the real loader
    (``inspect.getsource`` and friends work as without the fix)."""
    import inspect

    import detectron2.evaluation.fast_eval_api as fast_eval_api

    assert type(fast_eval_api.__loader__).__name__ == "SourceFileLoader"
    assert fast_eval_api.__spec__.loader is fast_eval_api.__loader__
    assert "class COCOeval_opt" in inspect.getsource(fast_eval_api)
