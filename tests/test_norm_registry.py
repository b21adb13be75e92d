"""Detectron2 integration: norm names in ``get_norm``, config validation, layers built configured,
and model wiring."""
import functools
import importlib

import pytest
import torch
from torch import nn

import smallbn_d2
from helpers import tiny_cfg
from smallbn_d2 import (
    ConfigValueError,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NaiveCrossIterationBatchNorm2d,
    NormNotWiredError,
    validate_smallbn_config,
)
from smallbn_d2.config import MissingConfigError, cbn_burn_in_iters, resolve_burn_in
from smallbn_d2.layers import is_weight_centralized
from smallbn_d2.modeling import NormFamily, detectron2_norm_names

import detectron2.layers  # noqa: E402  (after smallbn_d2: compat fixes)
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d  # noqa: E402

pytestmark = pytest.mark.integration

OURS = {"CBN": CrossIterationBatchNorm2d, "NaiveCBN": NaiveCrossIterationBatchNorm2d,
        "MABN": MovingAverageBatchNorm2d}
# every Detectron2 module that builds norms holds its own reference to get_norm
D2_MODULES = [
    "detectron2.layers",
    "detectron2.layers.batch_norm",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
    "detectron2.modeling.meta_arch.semantic_seg",
]


# ------------------------------------------------------------------------------------ norm names
@pytest.mark.parametrize("module", D2_MODULES)
def test_our_names_in_every_get_norm(module):
    get_norm = importlib.import_module(module).get_norm
    for name, cls in OURS.items():
        layer = get_norm(name, 8)
        assert type(layer) is cls and layer.num_features == 8


def test_detectron2_names_unchanged():
    get_norm = detectron2.layers.get_norm
    assert type(get_norm("BN", 8)) is detectron2.layers.BatchNorm2d
    gn = get_norm("GN", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32 and gn.num_channels == 64
    assert type(get_norm("FrozenBN", 8)) is FrozenBatchNorm2d
    assert type(get_norm("SyncBN", 8)) is nn.SyncBatchNorm
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    factory = get_norm(lambda c: nn.LayerNorm(c), 8)  # callables still work
    assert type(factory) is nn.LayerNorm


def test_unknown_name_lists_every_supported_name():
    with pytest.raises(KeyError) as info:
        detectron2.layers.get_norm("CrossBN", 8)
    msg = str(info.value)
    assert "CrossBN" in msg
    for name in ["BN", "SyncBN", "FrozenBN", "GN", "CBN", "NaiveCBN", "MABN"] + smallbn_d2.supported_norms():
        assert name in msg, name
    # also when it comes from a config
    cfg = tiny_cfg("mask_rcnn", "NoSuchNorm", where=("fpn",))
    with pytest.raises(KeyError, match="MABN"):
        smallbn_d2.build_model(cfg)


def test_register_norm_refuses_taken_names():
    for name in ("CBN", "MABN", "BN", "GN"):
        with pytest.raises(ValueError, match=name):
            smallbn_d2.register_norm(NormFamily(name, CrossIterationBatchNorm2d))
    with pytest.raises(TypeError, match="NormFamily"):
        smallbn_d2.register_norm(lambda c: nn.BatchNorm2d(c))
    assert type(detectron2.layers.get_norm("CBN", 4)) is CrossIterationBatchNorm2d  # unchanged


def test_every_name_of_the_installed_detectron2_keeps_working():
    """The names are read from the installed Detectron2 (v0.6: 7 names; main adds "LN"), not copied."""
    from smallbn_d2.modeling import norms

    original = norms._original_get_norm()
    names = detectron2_norm_names()
    assert {"BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N"} <= set(names)
    assert not set(names) & {"CBN", "NaiveCBN", "MABN"}
    for name in names:  # each is accepted by Detectron2's own function and served unchanged
        ours = detectron2.layers.get_norm(name, 32)
        assert type(ours) is type(original(name, 32)), name
    with pytest.raises(KeyError):
        original("NoSuchNorm", 32)  # and the original function really rejects other names
    if hasattr(detectron2.layers, "LayerNorm"):  # Detectron2 main
        assert "LN" in names and type(detectron2.layers.get_norm("LN", 32)) is detectron2.layers.LayerNorm
    assert smallbn_d2.supported_norms() == list(names) + ["CBN", "NaiveCBN", "MABN"]


def _names_in_detectron2_source():
    """The keys of the dict literal in the installed Detectron2's get_norm, read from its source
    (independent of smallbn_d2's table, which asks get_norm itself)."""
    import ast
    import inspect
    import textwrap

    from smallbn_d2.modeling import norms

    tree = ast.parse(textwrap.dedent(inspect.getsource(norms._original_get_norm())))
    return {k.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
            for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def test_detectron2_names_table_matches_the_installed_detectron2():
    """DETECTRON2_NORM_NAMES holds every name the installed Detectron2 accepts (v0.6 and main,
    tools/test_detectron2_main.sh), and detectron2_norm_names() finds exactly those."""
    from smallbn_d2.modeling.norms import DETECTRON2_NORM_NAMES

    in_source = _names_in_detectron2_source()
    assert {"BN", "GN", "FrozenBN"} <= in_source
    assert in_source <= set(DETECTRON2_NORM_NAMES), in_source - set(DETECTRON2_NORM_NAMES)
    assert set(detectron2_norm_names()) == in_source


def test_config_without_smallbn_keys_names_add_smallbn_config():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.FPN.NORM = "CBN"
    with pytest.raises(MissingConfigError, match="add_smallbn_config"):
        smallbn_d2.build_model(cfg)


# ------------------------------------------------------------------------------ config validation
INVALID = [
    ("MODEL.CBN.WINDOW_SIZE", 0),
    ("MODEL.CBN.WINDOW_SIZE", 2.5),
    ("MODEL.CBN.BURN_IN_ITERS", -1),
    ("MODEL.CBN.BURN_IN_EPOCHS", -0.5),
    ("MODEL.CBN.EPS", 0.0),
    ("MODEL.CBN.EPS", -1e-5),
    ("MODEL.CBN.MOMENTUM", 0.0),
    ("MODEL.CBN.MOMENTUM", 1.5),
    ("MODEL.CBN.AGGREGATION", "mean"),
    ("MODEL.MABN.BUFFER_SIZE", 0),
    ("MODEL.MABN.MOMENTUM", 0.0),
    ("MODEL.MABN.MOMENTUM", 1.01),
    ("MODEL.MABN.EPS", 0.0),
    ("MODEL.MABN.WARMUP_ITERS", -1),
    ("MODEL.MABN.RENORM_WARMUP_ITERS", -1),
    ("MODEL.MABN.HEAD_WARMUP_ITERS", -1),
    ("MODEL.MABN.R_MAX", 0.5),
]


def _set(cfg, key, value):
    node = cfg
    *path, last = key.split(".")
    for p in path:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize("key,value", INVALID)
def test_invalid_config_value_names_key(key, value):
    cfg = tiny_cfg("mask_rcnn", "BN")
    validate_smallbn_config(cfg)  # the base config is valid
    _set(cfg, key, value)
    with pytest.raises(ConfigValueError) as info:
        validate_smallbn_config(cfg)
    assert key in str(info.value) and repr(value) in str(info.value)


def test_invalid_config_rejected_at_load_and_build_time():
    with pytest.raises(ConfigValueError, match="MODEL.CBN.WINDOW_SIZE"):
        tiny_cfg("mask_rcnn", "CBN", opts=["MODEL.CBN.WINDOW_SIZE", 0])
    cfg = tiny_cfg("mask_rcnn", "CBN")
    cfg.MODEL.CBN.MOMENTUM = 2.0
    with pytest.raises(ConfigValueError, match="MODEL.CBN.MOMENTUM"):
        smallbn_d2.build_model(cfg)


def test_both_burn_in_keys_set():
    cfg = tiny_cfg("mask_rcnn", "BN")
    cfg.MODEL.CBN.BURN_IN_ITERS = 10
    cfg.MODEL.CBN.BURN_IN_EPOCHS = 1.0
    with pytest.raises(ConfigValueError) as info:
        validate_smallbn_config(cfg)
    assert "MODEL.CBN.BURN_IN_ITERS" in str(info.value) and "MODEL.CBN.BURN_IN_EPOCHS" in str(info.value)


def test_burn_in_conversion():
    cfg = tiny_cfg("mask_rcnn", "BN")
    cfg.MODEL.CBN.BURN_IN_ITERS = 7
    assert cbn_burn_in_iters(cfg, dataset_size=1000) == 7
    cfg.MODEL.CBN.BURN_IN_ITERS = None
    cfg.MODEL.CBN.BURN_IN_EPOCHS = 3.0
    cfg.SOLVER.IMS_PER_BATCH = 2
    assert cbn_burn_in_iters(cfg, dataset_size=80) == 120  # 3 * 80 / 2
    cfg.MODEL.CBN.BURN_IN_EPOCHS = 0.5
    cfg.SOLVER.IMS_PER_BATCH = 4
    assert cbn_burn_in_iters(cfg, dataset_size=81) == 10  # round(10.125)
    cfg.MODEL.CBN.BURN_IN_EPOCHS = None  # neither set: 3 epochs (paper's COCO setting)
    assert cbn_burn_in_iters(cfg, dataset_size=80) == 60


def test_burn_in_epochs_on_the_real_training_set():
    """On the shipped COCO sample (the tiny configs' training set); the image count comes from its
    annotation file, read directly."""
    import json

    from detectron2.data import DatasetCatalog

    from smallbn_d2.data import coco_sample_files
    from smallbn_d2.engine.trainer import training_set_size

    cfg = tiny_cfg("mask_rcnn", "BN")
    cfg.MODEL.CBN.BURN_IN_ITERS = None
    cfg.MODEL.CBN.BURN_IN_EPOCHS = 1.5
    cfg.SOLVER.IMS_PER_BATCH = 2
    assert cfg.DATASETS.TRAIN == ("coco_2017_sample_train",)
    with open(coco_sample_files()["coco_2017_sample_train"][0]) as f:
        coco = json.load(f)
    # Detectron2 drops images without a non-crowd annotation from training
    n = len({a["image_id"] for a in coco["annotations"] if not a["iscrowd"]})
    assert 0 < n <= len(coco["images"]) == len(DatasetCatalog.get("coco_2017_sample_train")) == 24
    assert cbn_burn_in_iters(cfg) is None  # epochs, and no data read here
    assert training_set_size(cfg) == n
    resolved = resolve_burn_in(cfg, n)
    assert resolved.MODEL.CBN.BURN_IN_ITERS == round(1.5 * n / 2) and resolved.MODEL.CBN.BURN_IN_EPOCHS is None
    assert cfg.MODEL.CBN.BURN_IN_EPOCHS == 1.5  # not modified


def test_model_builds_without_data_and_burn_in_in_epochs_needs_resolving():
    """Building never reads a dataset: DATASETS.TRAIN may name nothing registered. The burn-in in
    epochs stays unknown until converted, and training then says how to convert it."""
    cfg = tiny_cfg("mask_rcnn", "CBN", opts=["MODEL.CBN.BURN_IN_ITERS", None, "MODEL.CBN.BURN_IN_EPOCHS", 2.0,
                                             "DATASETS.TRAIN", ("no_such_dataset_registered",)])
    model = smallbn_d2.build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert layers and all(layer.burn_in is None for layer in layers)
    layer = layers[0]
    layer.set_iteration(0)
    model.train()
    with pytest.raises(NormNotWiredError, match="BURN_IN_ITERS"):
        layer(layer.conv(torch.randn(2, layer.conv.in_channels, 8, 8)))
    resolved = resolve_burn_in(cfg, dataset_size=10)  # 2 epochs x 10 images / 2 per batch
    model = smallbn_d2.build_model(resolved)
    assert {m.burn_in for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)} == {10}


def test_each_layer_is_constructed_once_with_its_hyperparameters(monkeypatch):
    """No layer is built with defaults and reconfigured: every construction during the build has the
    config's values, and every constructed layer ends up in the model."""
    built = []
    original = CrossIterationBatchNorm2d.__init__

    @functools.wraps(original)
    def counting_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(CrossIterationBatchNorm2d, "__init__", counting_init)
    cfg = tiny_cfg("mask_rcnn", "CBN", opts=["MODEL.CBN.WINDOW_SIZE", 3, "MODEL.CBN.BURN_IN_ITERS", 4,
                                             "MODEL.CBN.COMPENSATE_BIAS", False,
                                             "MODEL.CBN.WINDOW_AFTER_BURN_IN", "grow"])
    model = smallbn_d2.build_model(cfg)
    in_model = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(built) == len(in_model) > 0 and {id(m) for m in built} == {id(m) for m in in_model}
    assert all((m.window_size, m.burn_in, m.compensate_bias, m.window_after_burn_in) == (3, 4, False, "grow")
               for m in built)
    assert not hasattr(CrossIterationBatchNorm2d, "configure") and not hasattr(MovingAverageBatchNorm2d, "configure")


# ------------------------------------------------------------------------------------ wiring
def test_mask_rcnn_cbn_everywhere_is_wired_and_configured():
    cfg = tiny_cfg("mask_rcnn", "CBN", opts=[
        "MODEL.CBN.WINDOW_SIZE", 3, "MODEL.CBN.BURN_IN_ITERS", 5, "MODEL.CBN.MOMENTUM", 0.2,
        "MODEL.CBN.EPS", 1e-4, "MODEL.CBN.AGGREGATION", "drop_invalid"])
    model = smallbn_d2.build_model(cfg)
    layers = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}
    owners = {}
    for name, module in model.named_modules():
        norm = getattr(module, "norm", None)
        if isinstance(norm, CrossIterationBatchNorm2d):
            assert isinstance(module, nn.Conv2d)
            assert norm.conv is module, name
            owners[id(norm)] = name
    assert owners.keys() == layers.keys()  # every CBN is the .norm of the conv it is attached to
    names = [n for n, _ in layers.values()]
    for place in ("backbone.bottom_up.stem", "backbone.bottom_up.res2", "backbone.bottom_up.res5",
                  "backbone.fpn_lateral", "backbone.fpn_output", "roi_heads.box_head", "roi_heads.mask_head"):
        assert any(n.startswith(place) for n in names), place
    for _, layer in layers.values():
        assert (layer.window_size, layer.burn_in, layer.momentum, layer.eps, layer.aggregation) == \
            (3, 5, 0.2, 1e-4, "drop_invalid")
        assert layer.window_mu_grad.shape[0] == 2 and layer.window_nu_grad.shape[1:] == layer.conv.weight.shape


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_retinanet_head_has_one_layer_per_level(norm):
    from detectron2.utils.events import EventStorage

    from helpers import coco_batches

    cfg = tiny_cfg("retinanet", norm, where=("retinanet_head",))
    model = smallbn_d2.build_model(cfg)
    num_levels = len(cfg.MODEL.RETINANET.IN_FEATURES)
    assert num_levels == 5
    cls = OURS[norm]
    seen = []
    for subnet in (model.head.cls_subnet, model.head.bbox_subnet):
        lists = [(i, m) for i, m in enumerate(subnet) if isinstance(m, CycleBatchNormList)]
        assert len(lists) == cfg.MODEL.RETINANET.NUM_CONVS
        assert not any(isinstance(m, cls) for m in subnet)  # no shared layer left
        for i, cycle in lists:
            assert len(cycle) == num_levels
            assert isinstance(subnet[i - 1], nn.Conv2d)
            for layer in cycle:
                assert type(layer) is cls and layer.conv is subnet[i - 1]
                seen.append(layer)
    assert len({id(x) for x in seen}) == len(seen) == 2 * cfg.MODEL.RETINANET.NUM_CONVS * num_levels
    # one training step: every per-level layer normalizes exactly one level
    model.train()
    smallbn_d2.set_norm_iteration(model, 0)
    with EventStorage(0):
        losses = model(coco_batches(cfg, 1)[0])
    sum(losses.values()).backward()
    for layer in seen:
        if norm == "CBN":
            assert int(layer.num_batches_tracked) == 1
        else:
            assert sorted(int(v) for v in layer.chi2_iters if v >= 0) == [0]  # iteration 0
    # the per-level statistics differ (the levels have different feature statistics)
    stat = (lambda l: l.running_var) if norm == "CBN" else (lambda l: l.running_chi2)
    first = model.head.cls_subnet[1]
    assert not torch.allclose(stat(first[0]), stat(first[4]))


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_mabn_warmups_and_weight_centralization(arch):
    where = ("backbone", "fpn", "retinanet_head") if arch == "retinanet" else \
        ("backbone", "fpn", "box_head", "mask_head")
    cfg = tiny_cfg(arch, "MABN", where=where, opts=[
        "MODEL.MABN.WARMUP_ITERS", 2, "MODEL.MABN.HEAD_WARMUP_ITERS", 7, "MODEL.MABN.BUFFER_SIZE", 4,
        "MODEL.MABN.RENORM_WARMUP_ITERS", 11, "MODEL.MABN.R_MAX", 3.0, "MODEL.MABN.MOMENTUM", 0.9,
        "MODEL.MABN.EPS", 1e-4])
    model = smallbn_d2.build_model(cfg)
    head_prefixes = ("head.",) if arch == "retinanet" else ("roi_heads.box_head.", "roi_heads.mask_head.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MovingAverageBatchNorm2d)]
    n_head = 0
    for name, layer in layers:
        in_head = name.startswith(head_prefixes)
        n_head += in_head
        assert layer.warmup_iters == (7 if in_head else 2), name
        assert (layer.buffer_size, layer.renorm_warmup_iters, layer.r_max, layer.momentum, layer.eps) == \
            (4, 11, 3.0, 0.9, 1e-4)
    assert 0 < n_head < len(layers)

    # exactly the convs that feed an MABN layer are weight-centralized
    feeding = set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), MovingAverageBatchNorm2d):
            feeding.add(id(module))
        if isinstance(module, nn.Sequential):
            for prev, cur in zip(list(module)[:-1], list(module)[1:]):
                if isinstance(cur, CycleBatchNormList) and isinstance(cur[0], MovingAverageBatchNorm2d):
                    feeding.add(id(prev))
    assert all(id(layer.conv) in feeding for _, layer in layers) and len(feeding) > 0
    n_plain = 0
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        assert is_weight_centralized(conv) == (id(conv) in feeding), name
        if id(conv) in feeding:
            w = conv.weight  # the weight the conv uses: centered per output channel, nothing else
            v = conv.parametrizations.weight.original
            torch.testing.assert_close(w, v - v.mean(dim=(1, 2, 3), keepdim=True), rtol=0, atol=1e-6)
            assert v.mean(dim=(1, 2, 3)).abs().max() > 1e-6, name
        else:
            n_plain += 1
    assert n_plain > 0  # e.g. the RPN conv and the predictors

    # HEAD_WARMUP_ITERS below WARMUP_ITERS: heads keep the longer warm-up
    cfg.MODEL.MABN.HEAD_WARMUP_ITERS = 1
    model = smallbn_d2.build_model(cfg)
    assert all(m.warmup_iters == 2 for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d))


@pytest.mark.parametrize("norm", ["CBN", "NaiveCBN", "MABN"])
def test_norm_not_following_a_conv_fails_at_build(norm):
    cfg = tiny_cfg("mask_rcnn", "BN")
    get_norm = detectron2.layers.get_norm
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), get_norm(norm, 8))
    with pytest.raises(NormNotWiredError, match="conv"):
        smallbn_d2.prepare_norms(model, cfg)
    # the same layer right after the conv is wired
    ok = nn.Sequential(nn.Conv2d(3, 8, 3), get_norm(norm, 8), nn.ReLU())
    smallbn_d2.prepare_norms(ok, cfg)
    assert ok[1].conv is ok[0]
