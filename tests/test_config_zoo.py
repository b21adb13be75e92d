"""The config zoo: 30 configs (Faster R-CNN, Mask R-CNN, RetinaNet x BN, SyncBN, GN, CBN, MABN x
1x, scratch_3x). Every config is checked against the issue's specification (the reference
below), built on CPU with shrunk sizes, inspected for the normalization module type at every
place, and trained for one step on real COCO images (the COCO 2017 sample shipped with the
package)."""
import math
import os

import pytest
import torch
import yaml

import smallbn_d2  # noqa: I001 (first: Detectron2 compatibility fixes)
from detectron2.engine import DefaultTrainer
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.layers import Conv2d as D2Conv2d
from torch import nn

from helpers import REPO, SAMPLE_OPTS, coco_batches, train_steps
from smallbn_d2 import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from smallbn_d2.engine import load_config
from smallbn_d2.engine.syncbn import warn_single_process_syncbn
from smallbn_d2.config import cbn_burn_in_iters, resolve_burn_in
from smallbn_d2.engine.trainer import training_set_size

pytestmark = pytest.mark.integration

NORMS = ("BN", "SyncBN", "GN", "CBN", "MABN")
REGIMES = ("1x", "scratch_3x")
ARCHS = {  # arch -> folder
    "faster_rcnn": "COCO-Detection",
    "mask_rcnn": "COCO-InstanceSegmentation",
    "retinanet": "COCO-Detection",
}
ZOO = [(arch, norm, regime) for arch in ARCHS for norm in NORMS for regime in REGIMES]
NORM_TYPE = {  # the module a norm name must build (exact type)
    "BN": nn.BatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
    "GN": nn.GroupNorm,
    "CBN": CrossIterationBatchNorm2d,
    "MABN": MovingAverageBatchNorm2d,
    "FrozenBN": FrozenBatchNorm2d,
}
# Shrink for CPU: R18 (basic blocks) with GN-compatible widths (multiples of 32), small FPN and
# heads, few proposals, small images; the shipped COCO sample as data (its training set size also
# converts the burn-in epochs). Norm names and the structure of each place are kept.
SHRINK = [
    *SAMPLE_OPTS, "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 32, "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 192, "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.REFERENCE_WORLD_SIZE", 0, "DATALOADER.NUM_WORKERS", 0,
]


def zoo_path(arch, norm, regime):
    return os.path.join(REPO, "configs", ARCHS[arch], f"{arch}_R_50_FPN_{norm}_{regime}.yaml")


def zoo_id(params):
    return "{}_{}_{}".format(*params)


# ----------------------------------------------------------------------------- files
def test_zoo_has_exactly_the_30_configs():
    found = set()
    for folder in set(ARCHS.values()):
        found |= {os.path.join(folder, f) for f in os.listdir(os.path.join(REPO, "configs", folder))
                  if f.endswith(".yaml")}
    expected = {os.path.relpath(zoo_path(*z), os.path.join(REPO, "configs")) for z in ZOO}
    assert found == expected


@pytest.mark.parametrize("params", ZOO, ids=zoo_id)
def test_config_is_short_on_shared_bases_and_states_images_per_gpu(params):
    path = zoo_path(*params)
    with open(path) as f:
        text = f.read()
    data = yaml.safe_load(text)
    base = data["_BASE_"]
    assert os.path.basename(base).startswith("Base-") and os.path.isfile(os.path.join(os.path.dirname(path), base))
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 12, f"{path} has {len(code)} lines of settings; keep them in the _BASE_ files"
    # what a leaf may set: norms (and MASK_ON); the rest comes from the shared bases
    model = dict(data["MODEL"])
    model.pop("MASK_ON", None)
    assert set(data) == {"_BASE_", "MODEL"}
    assert all(set(v) == {"NORM"} for v in model.values()), model
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Images per GPU: 2" in comments and "REFERENCE_WORLD_SIZE 8" in comments
    if params[1] == "SyncBN":
        assert "several" in comments and "processes" in comments and "MODEL_ZOO.md" in comments
    if params[1:] == ("MABN", "1x"):
        assert "weight centralization" in comments and "MSRA R-50" in comments


ZOO_BASES = ("Base-RCNN-FPN.yaml", "Base-RCNN-R_50_FPN_1x.yaml", "Base-RCNN-R_50_FPN_scratch_3x.yaml",
             "Base-RetinaNet-R_50_FPN_1x.yaml", "Base-RetinaNet-R_50_FPN_scratch_3x.yaml")
WHOSE = ("smallbn_d2's own regime", "the paper's text", "the released code", "Detectron2's")


@pytest.mark.parametrize("path", [zoo_path(*z) for z in ZOO] + [os.path.join(REPO, "configs", b) for b in ZOO_BASES],
                         ids=lambda p: os.path.basename(p))
def test_config_header_says_whose_recipe_it_follows(path):
    """Issue 21: each zoo config says whose recipe it follows and, for CBN and MABN (the norms with
    published rows), where the authors' released recipe is (configs/reproduce/)."""
    with open(path) as f:
        header = " ".join(line[1:].strip() for line in f.read().splitlines() if line.startswith("#"))
    assert "Recipe:" in header
    recipe = header[header.index("Recipe:"):]
    assert any(w in recipe for w in WHOSE), recipe
    name = os.path.basename(path)
    if name == "Base-RCNN-R_50_FPN_1x.yaml" or (
            ("_CBN_" in name or "_MABN_" in name) and not name.startswith("retinanet")):
        assert "configs/reproduce/" in recipe and ("paper's text" in recipe or "released code" in recipe), recipe
    if "_CBN_" in name and not name.startswith("retinanet"):
        assert "k = 8" in recipe and "first LR step" in recipe or "from scratch" in recipe, recipe


def test_scratch_bases_of_rcnn_and_retinanet_agree():
    """The scratch keys are written twice (a Detectron2 config has one _BASE_): they must agree."""
    def load(name):
        with open(os.path.join(REPO, "configs", name)) as f:
            data = yaml.safe_load(f)
        data.pop("_BASE_")
        return data

    assert load("Base-RCNN-R_50_FPN_scratch_3x.yaml") == load("Base-RetinaNet-R_50_FPN_scratch_3x.yaml")


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("params", ZOO, ids=zoo_id)
def test_config_settings_follow_the_specification(params):
    arch, norm, regime = params
    cfg = load_config(zoo_path(*params))
    m, s = cfg.MODEL, cfg.SOLVER
    # model and heads
    assert m.META_ARCHITECTURE == ("RetinaNet" if arch == "retinanet" else "GeneralizedRCNN")
    assert m.MASK_ON == (arch == "mask_rcnn")
    assert m.RESNETS.DEPTH == 50 and "fpn" in m.BACKBONE.NAME
    if arch != "retinanet":
        assert (m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == (4, 1)  # 4conv1fc
        assert m.ROI_MASK_HEAD.NUM_CONV == 4
    else:
        assert m.RETINANET.NUM_CONVS == 4 and s.BASE_LR == 0.01
    # norms at each place
    head_keys = {"faster_rcnn": ["ROI_BOX_HEAD"], "mask_rcnn": ["ROI_BOX_HEAD", "ROI_MASK_HEAD"],
                 "retinanet": ["RETINANET"]}[arch]
    assert m.FPN.NORM == norm and all(m[k].NORM == norm for k in head_keys)
    # batch: 2 images per GPU on 8 GPUs, kept per GPU by Detectron2's auto-scaling
    assert s.IMS_PER_BATCH == 16 and s.REFERENCE_WORLD_SIZE == 8
    one_gpu = DefaultTrainer.auto_scale_workers(cfg, 1)
    assert one_gpu.SOLVER.IMS_PER_BATCH == 2
    assert one_gpu.SOLVER.MAX_ITER == 8 * s.MAX_ITER
    assert math.isclose(one_gpu.SOLVER.BASE_LR, s.BASE_LR / 8)
    # regime
    if regime == "1x":
        assert m.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
        assert m.RESNETS.NORM == "FrozenBN"
        assert (s.MAX_ITER, tuple(s.STEPS)) == (90000, (60000, 80000))
        assert m.RESNETS.STRIDE_IN_1X1 and list(m.PIXEL_STD) == [1.0, 1.0, 1.0]  # MSRA weights
    else:
        assert m.WEIGHTS == "" and m.BACKBONE.FREEZE_AT == 0 and m.RESNETS.NORM == norm
        assert (s.MAX_ITER, tuple(s.STEPS)) == (270000, (210000, 250000))
        assert not m.RESNETS.STRIDE_IN_1X1 and list(m.PIXEL_STD) == [57.375, 57.120, 58.395]
    # CBN: k x 2 images per GPU >= 16, burn-in 3 epochs; MABN: m 32, momentum 0.98, 10k head warm-up
    assert m.CBN.WINDOW_SIZE * 2 >= 16 and m.CBN.WINDOW_SIZE == 8
    assert m.CBN.BURN_IN_EPOCHS == 3.0 and m.CBN.BURN_IN_ITERS is None
    assert (m.MABN.BUFFER_SIZE, m.MABN.MOMENTUM, m.MABN.HEAD_WARMUP_ITERS) == (32, 0.98, 10000)


def test_cbn_burn_in_is_three_epochs_of_the_auto_scaled_batch():
    cfg = DefaultTrainer.auto_scale_workers(load_config(zoo_path("mask_rcnn", "CBN", "1x")), 1)
    # 3 epochs x 117266 COCO train2017 images with annotations / 2 images per iteration
    assert cbn_burn_in_iters(cfg, dataset_size=117266) == round(3 * 117266 / 2)


# ----------------------------------------------------------------------------- built models
def _conv_norms(module):
    """The norm of every Detectron2 Conv2d in ``module`` (None where it has none)."""
    return [(name, c.norm) for name, c in module.named_modules() if isinstance(c, D2Conv2d)]


def _assert_norm_type(norms, expected, where):
    assert norms, f"no normalization layers found in {where}"
    for name, layer in norms:
        assert type(layer) is expected, f"{where}.{name}: {type(layer).__name__}, expected {expected.__name__}"


def _place_norms(model, arch):
    """place -> [(name, norm module)] for the backbone, the FPN and each head."""
    bottom_up = model.backbone.bottom_up
    places = {
        "stem": _conv_norms(bottom_up.stem),
        "backbone blocks": [(n, c) for n, c in _conv_norms(bottom_up) if not n.startswith("stem")],
        # FPN lateral and output convs (the RetinaNet P6/P7 convs have no norm in Detectron2)
        "FPN": [(n, c) for n, c in _conv_norms(model.backbone) if n.startswith("fpn_")],
    }
    if arch == "retinanet":
        head = model.head
        seq = list(head.cls_subnet) + list(head.bbox_subnet)
        # every conv of the subnets is followed by its norm
        places["RetinaNet head"] = [(str(i), seq[i + 1]) for i, mod in enumerate(seq) if isinstance(mod, nn.Conv2d)]
    else:
        places["box head"] = [(n, c) for n, c in _conv_norms(model.roi_heads.box_head)]
        if arch == "mask_rcnn":
            places["mask head"] = [(n, c) for n, c in _conv_norms(model.roi_heads.mask_head)
                                   if n.startswith("mask_fcn")]
    return places


def _norm_buffers(model):
    return {f"{n}.{b}": t.detach().clone() for n, mod in model.named_modules()
            if isinstance(mod, tuple(NORM_TYPE.values())) for b, t in mod.named_buffers(recurse=False)
            if t.is_floating_point()}


@pytest.mark.slow
@pytest.mark.parametrize("params", ZOO, ids=zoo_id)
def test_config_builds_with_the_norm_at_every_place_and_takes_a_step(params):
    arch, norm, regime = params
    cfg = load_config(zoo_path(*params), SHRINK)
    # the burn-in is given in epochs: converted with the training set size, as the Trainer does
    cfg = resolve_burn_in(cfg, training_set_size(cfg))
    model = smallbn_d2.build_model(cfg)
    places = _place_norms(model, arch)

    backbone = "FrozenBN" if regime == "1x" else norm
    _assert_norm_type(places["stem"], NORM_TYPE[backbone], "stem")
    _assert_norm_type(places["backbone blocks"], NORM_TYPE[backbone], "backbone blocks")
    assert len(places["FPN"]) == 2 * len(cfg.MODEL.FPN.IN_FEATURES)  # lateral + output per level
    _assert_norm_type(places["FPN"], NORM_TYPE[norm], "FPN")
    for head in ("box head", "mask head"):
        if head in places:
            assert len(places[head]) == 4
            _assert_norm_type(places[head], NORM_TYPE[norm], head)
    if arch == "retinanet":
        assert len(places["RetinaNet head"]) == 2 * cfg.MODEL.RETINANET.NUM_CONVS
        if norm == "GN":
            _assert_norm_type(places["RetinaNet head"], nn.GroupNorm, "RetinaNet head")
        else:  # one norm per FPN level, shared affine (domain-specific statistics)
            _assert_norm_type(places["RetinaNet head"], CycleBatchNormList, "RetinaNet head")
            for _, cycle in places["RetinaNet head"]:
                assert len(cycle) == len(cfg.MODEL.RETINANET.IN_FEATURES)
                assert all(type(layer) is NORM_TYPE[norm] for layer in cycle)
    if norm == "GN":
        assert all(layer.num_groups == 32 for _, layer in places["FPN"])

    # one training step on real COCO images (the shipped sample)
    before = _norm_buffers(model)
    losses = train_steps(model, coco_batches(cfg, 1))[0]
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    after = _norm_buffers(model)
    frozen = {k for k in before if isinstance(model.get_submodule(k.rsplit(".", 1)[0]), FrozenBatchNorm2d)}
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # FrozenBN: statistics never move
    moving = [k for k in before if k not in frozen]
    if norm != "GN":  # BN, SyncBN, CBN, MABN update their population statistics in the step
        assert moving and any(not torch.equal(before[k], after[k]) for k in moving)


# ----------------------------------------------------------------------------- SyncBN, one process
def test_syncbn_in_one_process_is_plain_bn_and_is_warned_about():
    """Documented in docs/MODEL_ZOO.md: without several processes SyncBN computes the statistics
    of the process's own batch (torch's SyncBatchNorm falls back to batch_norm)."""
    assert not torch.distributed.is_initialized()
    cfg = load_config(zoo_path("faster_rcnn", "SyncBN", "1x"), SHRINK)
    model = smallbn_d2.build_model(cfg)
    sync = model.backbone.fpn_output2.norm
    assert type(sync) is nn.SyncBatchNorm
    bn = nn.BatchNorm2d(sync.num_features)
    bn.load_state_dict(sync.state_dict())
    x = torch.randn(2, sync.num_features, 6, 5, dtype=torch.float64)
    sync.double().train()
    bn.double().train()
    y = sync(x)
    torch.testing.assert_close(y, bn(x))
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)  # the direct formula
    torch.testing.assert_close(y, (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + sync.eps))
    torch.testing.assert_close(sync.running_mean, bn.running_mean)
    msg = warn_single_process_syncbn(model, world_size=1, images_per_process=2)
    assert msg and "single process" in msg and "plain BN" in msg and "2 images" in msg
    assert warn_single_process_syncbn(model, world_size=2, images_per_process=2) is None


def test_syncbn_with_initialized_distributed_on_cpu_fails_clearly(tmp_path):
    """With torch.distributed initialized (as by several processes), SyncBN refuses CPU tensors."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", world_size=1, rank=0)
    try:
        layer = nn.SyncBatchNorm(4).train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            layer(torch.randn(2, 4, 3, 3))
    finally:
        torch.distributed.destroy_process_group()
