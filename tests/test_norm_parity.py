"""Norm parity: Detectron2 treats every registered norm family exactly as it treats BatchNorm.

The same tiny detector is built with "BN" and with each family of ``NORM_FAMILIES`` (iterated, so
a family registered later is covered without editing this file), from YAML and from a
LazyConfig, and compared place by place with the BN model as the reference:

* optimizer hyperparameters of every parameter (Detectron2's ``build_optimizer``, smallbn_d2's
  ``Trainer.build_optimizer``, the model zoo's ``common/optim.py`` SGD, a direct call with every
  rule: ``weight_decay_norm``, ``base_lr``, bias rules, main's ``lr_factor_func``);
* frozen stages (``FREEZE_AT`` / ``freeze_at``) hold ``FrozenBatchNorm2d`` at BN's places with BN's
  checkpoint keys, computing the layer's eval-mode output; BN checkpoints load into them as into
  BN's; PreciseNorm and the freezing of statistics reach the layers at BN's places; eval mode is
  a per-channel affine; checkpoints round-trip.

docs/NORM_PARITY.md names the test of each row.
"""
import copy
import inspect
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from helpers import REPO, coco_batches, tiny_cfg
from smallbn_d2.layers import IterationNormBase
from smallbn_d2.modeling import NORM_FAMILIES, iteration_norms, set_norm_iteration

from detectron2.layers import FrozenBatchNorm2d  # noqa: E402  (after smallbn_d2)

pytestmark = pytest.mark.integration

FAMILIES = list(NORM_FAMILIES)
EVERYWHERE = ("backbone", "fpn", "box_head", "mask_head")
# distinct values, so that a parameter given the wrong rule gets a different number
SOLVER = ["SOLVER.WEIGHT_DECAY", 1e-4, "SOLVER.WEIGHT_DECAY_NORM", 7e-6, "SOLVER.BIAS_LR_FACTOR", 2.0,
          "SOLVER.WEIGHT_DECAY_BIAS", 3e-6, "SOLVER.BASE_LR", 0.01]


def _cfg(norm, arch="mask_rcnn", freeze_at=2):
    where = ("backbone", "fpn", "retinanet_head") if arch == "retinanet" else EVERYWHERE
    return tiny_cfg(arch, norm, where, opts=SOLVER + ["MODEL.BACKBONE.FREEZE_AT", freeze_at])


def _build(cfg, seed=0):
    from smallbn_d2 import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


def _plain_name(name):
    # MABN's weight centralization moves a conv's weight to <conv>.parametrizations.weight.original
    return name.replace(".parametrizations.weight.original", ".weight")


def _hyperparameters(groups, model):
    """{parameter name (plain): {hyperparameter: value}} for every parameter in the groups."""
    names = {id(p): _plain_name(n) for n, p in model.named_parameters()}
    out = {}
    for group in groups:
        for p in group["params"]:
            out[names[id(p)]] = {k: v for k, v in group.items() if k != "params"}
    return out


def _norm_param_names(model, kind):
    return {f"{n}.{pn}" for n, m in model.named_modules() if isinstance(m, kind)
            for pn, _ in m.named_parameters(recurse=False)}


def _assert_same_hyperparameters(ours, bn, model, bn_model, cfg_norm_wd=7e-6, cfg_wd=1e-4):
    assert set(ours) == set(bn), set(ours) ^ set(bn)
    norm_params = _norm_param_names(model, IterationNormBase)
    assert norm_params, "the model holds no CBN/MABN parameter: nothing compared"
    assert norm_params <= _norm_param_names(bn_model, nn.BatchNorm2d)  # the same places as BN's
    for name in sorted(bn):
        assert ours[name] == bn[name], (name, ours[name], bn[name])
    # not vacuous: BN's gamma gets WEIGHT_DECAY_NORM, a conv weight WEIGHT_DECAY
    gamma = next(n for n in sorted(norm_params) if n.endswith(".weight"))
    assert bn[gamma]["weight_decay"] == cfg_norm_wd
    conv = next(n for n in sorted(bn) if n.endswith("conv1.weight"))
    assert bn[conv]["weight_decay"] == cfg_wd


# ------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("builder", ["detectron2", "trainer"])
@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
@pytest.mark.parametrize("norm", FAMILIES)
def test_yaml_optimizer_gives_norm_parameters_bn_hyperparameters(norm, arch, builder):
    from detectron2.solver import build_optimizer

    from smallbn_d2.engine import Trainer

    build = build_optimizer if builder == "detectron2" else Trainer.build_optimizer
    models, groups = {}, {}
    for n in ("BN", norm):
        cfg = _cfg(n, arch, freeze_at=0)
        models[n] = _build(cfg)
        groups[n] = _hyperparameters(build(cfg, models[n]).param_groups, models[n])
    _assert_same_hyperparameters(groups[norm], groups["BN"], models[norm], models["BN"])


def _lazy_cfg(norm, freeze_at=2):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(REPO, "configs/test/tiny_mask_rcnn_CBN_lazy.py"))
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.stem.norm = norm
    bottom_up.stages.norm = norm
    bottom_up.freeze_at = freeze_at
    cfg.model.backbone.norm = norm
    cfg.model.roi_heads.box_head.conv_norm = norm
    cfg.model.roi_heads.mask_head.conv_norm = norm
    return cfg


def _build_lazy(cfg, seed=0):
    from smallbn_d2.lazy import build_lazy_model

    torch.manual_seed(seed)
    return build_lazy_model(cfg.model)


@pytest.mark.parametrize("norm", FAMILIES)
def test_lazyconfig_model_zoo_sgd_gives_norm_parameters_bn_hyperparameters(norm):
    """Detectron2's common/optim.py SGD: L(get_default_optimizer_params)(weight_decay_norm=0.0)."""
    from detectron2.config import instantiate

    models, groups = {}, {}
    for n in ("BN", norm):
        cfg = _lazy_cfg(n, freeze_at=0)
        assert cfg.optimizer.params._target_.__qualname__ == "get_default_optimizer_params"
        models[n] = _build_lazy(cfg)
        cfg.optimizer.params.model = models[n]
        groups[n] = _hyperparameters(instantiate(cfg.optimizer).param_groups, models[n])
    _assert_same_hyperparameters(groups[norm], groups["BN"], models[norm], models["BN"], cfg_norm_wd=0.0,
                                 cfg_wd=1e-4)


@pytest.mark.parametrize("norm", FAMILIES)
def test_every_rule_of_get_default_optimizer_params_and_shared_parameters(norm):
    """A direct call with every argument the installed Detectron2 takes (main's lr_factor_func
    included: it sees the same names); a CBN/MABN parameter shared with a conv gets what a
    shared BN parameter gets (the first holder decides)."""
    from detectron2.solver import get_default_optimizer_params as d2_params

    kwargs = dict(base_lr=0.1, weight_decay=1e-4, weight_decay_norm=7e-6, bias_lr_factor=2.0,
                  weight_decay_bias=3e-6)
    if "lr_factor_func" in inspect.signature(d2_params).parameters:  # Detectron2 main
        kwargs["lr_factor_func"] = lambda name: 0.5 if ".fpn_" in name else 1.0
    models, groups = {}, {}
    for n in ("BN", norm):
        models[n] = _build(_cfg(n, freeze_at=0))
        groups[n] = _hyperparameters(d2_params(models[n], **copy.deepcopy(kwargs)), models[n])
    _assert_same_hyperparameters(groups[norm], groups["BN"], models[norm], models["BN"])
    if "lr_factor_func" in kwargs:
        assert groups[norm]["backbone.fpn_lateral2.norm.weight"]["lr"] == 0.05

    def shared(n):  # a module listed before the first norm holds that norm's gamma too
        torch.manual_seed(0)
        layers = [NORM_FAMILIES[n].layer_class(4) if n in NORM_FAMILIES else nn.BatchNorm2d(4) for _ in range(2)]
        first = nn.Module()
        first.gamma = layers[0].weight
        return nn.Sequential(first, nn.Conv2d(3, 4, 1, bias=False), layers[0], nn.Conv2d(4, 4, 1, bias=False),
                             layers[1])

    a, b = shared(norm), shared("BN")
    for wrap in (lambda m: m, nn.DataParallel):  # a wrapper (as DDP) adds "module." to every name
        got = [{k: v for k, v in g.items() if k != "params"} for g in d2_params(wrap(a), **copy.deepcopy(kwargs))]
        want = [{k: v for k, v in g.items() if k != "params"} for g in d2_params(wrap(b), **copy.deepcopy(kwargs))]
        assert got == want and len(got) == 3  # conv weights and the shared gamma; the other gamma; betas


def test_installed_function_keeps_detectron2_identity():
    """LazyConfig files name it by Detectron2's path; its signature and docstring are Detectron2's."""
    from detectron2.config.lazy import _convert_target_to_string
    from detectron2.solver import build, get_default_optimizer_params

    f = build.get_default_optimizer_params
    assert f is get_default_optimizer_params
    assert (f.__module__, f.__qualname__) == ("detectron2.solver.build", "get_default_optimizer_params")
    assert _convert_target_to_string(f).startswith("detectron2.solver")
    assert list(inspect.signature(f).parameters)[:4] == ["model", "base_lr", "weight_decay", "weight_decay_norm"]
    assert "weight_decay_norm" in f.__doc__
    import smallbn_d2.modeling.norms as norms

    norms.install()  # idempotent: still one redirection, still BN's treatment
    cbn = NORM_FAMILIES[FAMILIES[0]].layer_class(4)
    (group,) = f(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), cbn), weight_decay=1.0, weight_decay_norm=0.0)[1:]
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 2


# ------------------------------------------------------------------------------ frozen stages
def _frozen_places(model):
    return {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def _stage_keys(model, prefixes=("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")):
    return {k for k in model.state_dict() if k.startswith(prefixes)}


@pytest.mark.parametrize("flow", ["yaml", "lazy"])
@pytest.mark.parametrize("norm", FAMILIES)
def test_frozen_stages_hold_frozen_bn_like_bn(norm, flow):
    import logging

    build = (lambda n: _build(_cfg(n, freeze_at=2))) if flow == "yaml" else (lambda n: _build_lazy(_lazy_cfg(n, 2)))
    bn = build("BN")
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("smallbn_d2.modeling.wiring")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        ours = build(norm)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = [r.getMessage() for r in records if "frozen stages" in r.getMessage()]
    assert len(said) == 1 and "FrozenBatchNorm2d" in said[0], said
    assert (flow == "yaml") == ("FREEZE_AT = 2" in said[0])
    places = _frozen_places(bn)
    assert places and all(p.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")) for p in places)
    assert _frozen_places(ours) == places
    assert _stage_keys(ours) == _stage_keys(bn)  # BN's checkpoint keys there (main: num_batches_tracked too)
    assert not any(n.startswith(("backbone.bottom_up.stem", "backbone.bottom_up.res2")) for n, _ in iteration_norms(ours))
    assert any(n.startswith("backbone.bottom_up.res3") for n, _ in iteration_norms(ours))  # the rest trains
    for name, conv in ours.named_modules():  # a frozen stage's convs are plain: no centralization, no capture
        if name.startswith(("backbone.bottom_up.stem", "backbone.bottom_up.res2")) and isinstance(conv, nn.Conv2d):
            assert not parametrize.is_parametrized(conv) and not conv._forward_pre_hooks, name
            assert not any(p.requires_grad for p in conv.parameters()), name


def _randomize_statistics(model, steps=2):
    """Training-mode steps of the backbone on random images (population statistics move), then
    random gamma/beta: a model state no freshly built layer has."""
    set_norm_iteration(model, 0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for i in range(steps):
        set_norm_iteration(model, i)
        out = model.backbone(torch.randn(2, 3, 64, 64) * 50)  # 64 px: the smallest input of P6
        sum(o.square().mean() for o in out.values()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, (IterationNormBase, nn.BatchNorm2d)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("norm", FAMILIES)
def test_freezing_a_trained_stage_keeps_its_eval_output(norm):
    """Detectron2's own ResNet.freeze on a wired, trained model: the stage's CBN/MABN layers become
    FrozenBatchNorm2d with the same eval-mode output, their convs released (MABN: centralization
    baked into a plain weight)."""
    model = _build(_cfg(norm, freeze_at=0))
    _randomize_statistics(model)
    bottom_up = model.backbone.bottom_up
    x = torch.randn(2, 3, 64, 64) * 20
    bottom_up.eval()
    with torch.no_grad():
        before = bottom_up(x)
    layers = [m for n, m in iteration_norms(bottom_up) if n.startswith(("stem", "res2"))]
    assert layers
    bottom_up.freeze(2)
    assert not any(n.startswith(("stem", "res2")) for n, _ in iteration_norms(bottom_up))
    assert isinstance(bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert all(layer.conv is None or not parametrize.is_parametrized(layer.conv) for layer in layers)
    assert not bottom_up.stem.conv1._forward_pre_hooks
    with torch.no_grad():
        after = bottom_up(x)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A BN model (nothing frozen) with moved statistics, saved by Detectron2's checkpointer."""
    from detectron2.checkpoint import DetectionCheckpointer

    bn = _build(_cfg("BN", freeze_at=0), seed=1)
    _randomize_statistics(bn)
    folder = str(tmp_path_factory.mktemp("bn_checkpoint"))
    DetectionCheckpointer(bn, save_dir=folder).save("bn")
    return os.path.join(folder, "bn.pth")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointer", ["detectron2", "smallbn_d2"])
@pytest.mark.parametrize("norm", FAMILIES)
def test_bn_checkpoint_loads_into_frozen_stages_as_into_bn(norm, checkpointer, bn_checkpoint):
    from detectron2.checkpoint import DetectionCheckpointer

    from smallbn_d2.checkpoint import NormCheckpointer

    path = bn_checkpoint
    Checkpointer = DetectionCheckpointer if checkpointer == "detectron2" else NormCheckpointer
    loaded = {}
    for n in ("BN", norm):
        loaded[n] = _build(_cfg(n, freeze_at=2), seed=2)
        Checkpointer(loaded[n]).load(path)
    saved = torch.load(path, map_location="cpu")["model"]
    bn_sd, our_sd = loaded["BN"].state_dict(), loaded[norm].state_dict()
    for key in _stage_keys(loaded["BN"]):
        torch.testing.assert_close(our_sd[key], bn_sd[key], rtol=0, atol=0)
        if key.endswith(("running_mean", "running_var", "norm.weight", "norm.bias")):
            torch.testing.assert_close(our_sd[key], saved[key].to(our_sd[key].dtype))  # the checkpoint's values
    x = torch.randn(1, 3, 64, 64) * 20
    outs = {}
    for n, model in loaded.items():
        bottom_up = model.backbone.bottom_up.eval()
        with torch.no_grad():
            outs[n] = bottom_up.res2(bottom_up.stem(x))
    torch.testing.assert_close(outs[norm], outs["BN"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ hooks, eval, checkpoints
def _bn_places(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.slow
@pytest.mark.parametrize("norm", FAMILIES)
def test_precise_norm_and_freezing_reach_every_layer_at_bn_places(norm):
    from smallbn_d2.engine.freeze import freeze_norm_statistics, statistics_layers
    from smallbn_d2.engine.precise_norm import update_norm_stats

    cfg = _cfg(norm, freeze_at=2)
    bn, ours = _build(_cfg("BN", freeze_at=2)), _build(cfg)
    places = _bn_places(bn)
    assert {n for n, _ in iteration_norms(ours)} == places
    assert len(statistics_layers(ours)) == len(statistics_layers(bn)) == len(places)
    ours.train()
    set_norm_iteration(ours, 0)
    before = {n: copy.deepcopy(m.state_dict()) for n, m in iteration_norms(ours)}
    counts = update_norm_stats(ours, coco_batches(cfg, 1), num_iters=1)
    assert set(counts) == places and all(c > 0 for c in counts.values())
    for n, m in iteration_norms(ours):  # every layer's population statistics were recomputed
        changed = [k for k in m.population_state_keys() if not torch.equal(m.state_dict()[k], before[n][k])]
        assert changed, n
    assert freeze_norm_statistics(ours) == len(places)
    assert not any(m.training for _, m in iteration_norms(ours))


@pytest.mark.slow
@pytest.mark.parametrize("norm", FAMILIES)
def test_eval_mode_is_a_per_channel_affine(norm):
    model = _build(_cfg(norm, freeze_at=0))
    _randomize_statistics(model)
    for name, layer in iteration_norms(model):
        layer.eval()
        C = layer.num_features
        x = torch.randn(3, C, 5, 4, dtype=torch.float64) * 3 + 1
        f = lambda t: layer.double()(t)  # noqa: E731
        with torch.no_grad():
            y0 = f(torch.zeros(1, C, 1, 1, dtype=torch.float64))
            slope = f(torch.ones(1, C, 1, 1, dtype=torch.float64)) - y0
            torch.testing.assert_close(f(x), x * slope + y0)
            mean, var, eps, gamma, beta = layer.eval_affine()
            g = torch.ones(C) if gamma is None else gamma
            b = torch.zeros(C) if beta is None else beta
            scale = g.double() / torch.sqrt(var.double() + eps)
            torch.testing.assert_close(slope.flatten(), scale)
            torch.testing.assert_close(y0.flatten(), b.double() - mean.double() * scale)
        layer.float()


@pytest.mark.slow
@pytest.mark.parametrize("norm", FAMILIES)
def test_checkpoint_round_trip(norm, tmp_path):
    from detectron2.utils.events import EventStorage

    from smallbn_d2.checkpoint import NormCheckpointer

    cfg = _cfg(norm, freeze_at=2)
    model = _build(cfg)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    with EventStorage(0):
        for it, batch in enumerate(coco_batches(cfg, 2)):  # two real training steps
            set_norm_iteration(model, it)
            sum(model(batch).values()).backward()
            opt.step()
            opt.zero_grad()
    NormCheckpointer(model, save_dir=str(tmp_path)).save("model_0000001")
    fresh = _build(cfg, seed=5)
    NormCheckpointer(fresh).load(os.path.join(str(tmp_path), "model_0000001.pth"))
    want, got = model.state_dict(), fresh.state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    model.eval()
    fresh.eval()
    x = torch.randn(1, 3, 64, 64) * 20
    with torch.no_grad():
        a, b = model.backbone(x), fresh.backbone(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


# ------------------------------------------------------------------------------ torch and fvcore
def _conv_norm(norm):
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(8) if norm == "BN" else NORM_FAMILIES[norm].layer_class(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), layer)
    if norm != "BN":
        from smallbn_d2 import prepare_norms

        prepare_norms(model)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("norm", FAMILIES)
def test_torch_and_fvcore_norm_places(norm):
    """The rows of docs/NORM_PARITY.md for torch and fvcore, as they stand."""
    from fvcore.nn import FlopCountAnalysis, parameter_count
    from fvcore.nn.precise_bn import get_bn_modules

    from smallbn_d2 import convert_to_frozen_bn

    bn, ours = _conv_norm("BN"), _conv_norm(norm)
    x = torch.randn(2, 3, 12, 12)
    # SyncBatchNorm conversion: deliberately not (per-process statistics are the methods' design)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    assert type(synced[1]) is type(ours[1])
    # fvcore: PreciseBN's BN list does not see them (smallbn_d2's PreciseNorm does); same parameters
    assert len(get_bn_modules(bn.train())) == 1 and len(get_bn_modules(ours.train())) == 0
    bn.eval()
    ours.eval()
    assert parameter_count(ours)[""] == parameter_count(bn)[""]
    conv_flops = FlopCountAnalysis(bn, x).unsupported_ops_warnings(False).by_operator()["conv"]
    flops = FlopCountAnalysis(ours, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert flops.by_operator()["conv"] == conv_flops
    # conv-BN fusion: torch.ao's fuser refuses them; smallbn_d2 folds FrozenBN made from them
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(ours), [["0", "1"]])
    with torch.no_grad():
        want = ours(x)
        folded = convert_to_frozen_bn(copy.deepcopy(ours), fold=True)
        assert not any(isinstance(m, (IterationNormBase, FrozenBatchNorm2d)) for m in folded.modules())
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)


def test_every_test_named_in_the_parity_table_exists():
    """docs/NORM_PARITY.md names a test per row (``file.py::test`` or ``::test`` for the file before)."""
    import ast
    import re

    with open(os.path.join(REPO, "docs", "NORM_PARITY.md")) as f:
        text = f.read()
    named, current = [], None
    for file, test in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", text):
        current = file or current
        named.append((current, test))
    assert len(named) >= 15
    for file, test in named:
        with open(os.path.join(REPO, "tests", file)) as f:
            tree = ast.parse(f.read())
        assert test in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{file}::{test}"
