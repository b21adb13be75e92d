"""configs/reproduce/: the authors' released recipes, tied to the translation tables of
docs/REPRODUCE.md; the CBN burn-in "until the first learning-rate step"; gradient clipping over
the whole model ("full_model", mmdetection's grad_clip).

The tables are the reference: every row's value must be what the config loads, every key a
config file sets must appear in a row that covers it, and every config must be covered. The
burn-in and clipping are checked against numbers computed here by hand (not by the code under
test)."""
import fnmatch
import glob
import math
import os
import re

import pytest
import torch
import yaml
from torch import nn

import smallbn_d2  # noqa: F401 (first: Detectron2 compatibility fixes)
from detectron2.engine import DefaultTrainer
from detectron2.layers import FrozenBatchNorm2d

from helpers import REPO, tiny_cfg
from smallbn_d2 import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from smallbn_d2.config import ConfigValueError, cbn_burn_in_iters, resolve_burn_in, scale_norm_iterations
from smallbn_d2.engine import load_config

pytestmark = pytest.mark.integration

DOC = os.path.join(REPO, "docs", "REPRODUCE.md")
CONFIG_ROOT = os.path.join(REPO, "configs", "reproduce")
LEAVES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(CONFIG_ROOT, "*", "*.yaml")))


# ----------------------------------------------------------------------------- the tables
def parse_tables(text):
    """[(globs, [(key, value_literal), ...])] from the ``reproduce-table`` blocks of the page."""
    tables = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"<!-- reproduce-table: (.+) -->$", lines[i].strip())
        i += 1
        if not m:
            continue
        rows = []
        while i < len(lines) and not lines[i].startswith("|"):
            i += 1
        while i < len(lines) and lines[i].startswith("|"):
            cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            key = re.fullmatch(r"`([A-Z0-9_.]+)`", cells[0])
            value = re.fullmatch(r"`(.*)`", cells[1])
            if key and value:
                rows.append((key.group(1), value.group(1)))
            i += 1
        tables.append((m.group(1).split(), rows))
    return tables


def rows_for(config, tables):
    """{key: value literal} of every table whose globs match ``config`` (a path under REPO)."""
    out = {}
    for globs, rows in tables:
        if any(fnmatch.fnmatch(config, g) for g in globs):
            for key, value in rows:
                assert key not in out or out[key] == value, f"{config}: {key} given twice, {out[key]} and {value}"
                out[key] = value
    return out


def get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def same(loaded, expected):
    if isinstance(loaded, (list, tuple)):
        return isinstance(expected, (list, tuple)) and len(loaded) == len(expected) and all(
            same(a, b) for a, b in zip(loaded, expected))
    if isinstance(loaded, bool) or isinstance(expected, bool) or loaded is None or expected is None:
        return loaded is expected or loaded == expected and type(loaded) is type(expected)
    if isinstance(loaded, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(loaded, expected, rel_tol=1e-12, abs_tol=0.0)
    return loaded == expected


def keys_set_in(path):
    """Dotted keys a config file and its _BASE_ files inside configs/reproduce set."""
    keys = set()
    while path.startswith(CONFIG_ROOT):
        with open(path) as f:
            data = yaml.safe_load(f)

        def walk(node, prefix):
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, prefix + k + ".")
                else:
                    keys.add(prefix + k)
        base = data.pop("_BASE_", None)
        walk(data, "")
        if base is None:
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    return keys


@pytest.fixture(scope="module")
def tables():
    with open(DOC) as f:
        return parse_tables(f.read())


def test_the_page_lists_and_covers_every_reproduction_config(tables):
    assert len(LEAVES) == 13, LEAVES  # 8 CBN-release rows, 5 MABN-release rows
    with open(DOC) as f:
        text = f.read()
    for leaf in LEAVES:
        assert os.path.relpath(leaf, "configs") in text, f"{leaf} is not in the table of configs"
        assert rows_for(leaf, tables), f"no translation table covers {leaf}"
    for globs, rows in tables:
        assert rows, globs
        for g in globs:
            assert any(fnmatch.fnmatch(leaf, g) for leaf in LEAVES), f"table pattern {g} matches no config"


@pytest.mark.parametrize("leaf", LEAVES)
def test_config_loads_with_every_translated_value(leaf, tables):
    cfg = load_config(os.path.join(REPO, leaf))
    rows = rows_for(leaf, tables)
    for key, literal in rows.items():
        expected = yaml.safe_load(literal)
        assert same(get(cfg, key), expected), f"{leaf}: {key} = {get(cfg, key)!r}, the page says {literal}"
    # every key the reproduction files set is translated on the page
    missing = sorted(keys_set_in(os.path.join(REPO, leaf)) - set(rows))
    assert not missing, f"{leaf} sets keys that docs/REPRODUCE.md does not list: {missing}"


def test_a_drifted_value_is_caught(tables):
    """The check above is not vacuous: change one value of the page and it fails."""
    leaf = "configs/reproduce/cbn_release/mask_rcnn_R_50_FPN_CBN_1x.yaml"
    cfg = load_config(os.path.join(REPO, leaf))
    rows = rows_for(leaf, tables)
    assert same(get(cfg, "SOLVER.STEPS"), yaml.safe_load(rows["SOLVER.STEPS"]))
    assert not same(get(cfg, "SOLVER.STEPS"), [58640, 80631])
    assert not same(get(cfg, "MODEL.CBN.WINDOW_SIZE"), 8)
    assert not same(get(cfg, "SOLVER.WEIGHT_DECAY_BIAS"), 0.0)  # None (follows WEIGHT_DECAY) is not 0


def test_schedules_are_the_released_epochs_and_iterations():
    """Independent arithmetic: mmdetection's epochs at 7330 iterations (117266 images / 16 per
    iteration, rounded up), maskrcnn-benchmark's iterations at 16 images."""
    cbn = load_config(os.path.join(REPO, "configs/reproduce/cbn_release/faster_rcnn_R_50_FPN_CBN_1x.yaml"))
    epoch = 7330
    assert math.ceil(117266 / 16) == epoch
    assert cbn.SOLVER.MAX_ITER == 12 * epoch and tuple(cbn.SOLVER.STEPS) == (8 * epoch, 11 * epoch)
    assert cbn.SOLVER.IMS_PER_BATCH // cbn.SOLVER.REFERENCE_WORLD_SIZE == 4
    mabn = load_config(os.path.join(REPO, "configs/reproduce/mabn_release/mask_rcnn_R_50_FPN_MABN_2x_scratch.yaml"))
    assert mabn.SOLVER.IMS_PER_BATCH // mabn.SOLVER.REFERENCE_WORLD_SIZE == 2
    assert (mabn.SOLVER.MAX_ITER, tuple(mabn.SOLVER.STEPS)) == (180000, (120000, 160000))


# ----------------------------------------------------------------------------- models
def _modules_at(model):
    m = model
    return {
        "res3": type(m.backbone.bottom_up.res3[0].conv1.norm),
        "stem": type(m.backbone.bottom_up.stem.conv1.norm),
        "fpn_lateral": type(m.backbone.fpn_lateral2.norm) if m.backbone.fpn_lateral2.norm is not None else None,
        "fpn_output": type(m.backbone.fpn_output5.norm) if m.backbone.fpn_output5.norm is not None else None,
        "box_head": type(m.roi_heads.box_head.conv1.norm) if m.roi_heads.box_head.conv1.norm is not None else None,
        "mask_head": type(m.roi_heads.mask_head.mask_fcn1.norm) if m.roi_heads.mask_head.mask_fcn1.norm is not None
        else None,
    }


@pytest.mark.parametrize("leaf, expected", [
    ("configs/reproduce/cbn_release/mask_rcnn_R_50_FPN_CBN_1x.yaml",
     dict(stem=FrozenBatchNorm2d, res3=FrozenBatchNorm2d, fpn_lateral=CrossIterationBatchNorm2d,
          fpn_output=CrossIterationBatchNorm2d, box_head=CrossIterationBatchNorm2d,
          mask_head=CrossIterationBatchNorm2d)),
    ("configs/reproduce/mabn_release/mask_rcnn_R_50_FPN_MABN_2x_scratch.yaml",
     dict(stem=MovingAverageBatchNorm2d, res3=MovingAverageBatchNorm2d, fpn_lateral=MovingAverageBatchNorm2d,
          fpn_output=MovingAverageBatchNorm2d, box_head=MovingAverageBatchNorm2d,
          mask_head=MovingAverageBatchNorm2d)),
], ids=["cbn_release", "mabn_release"])
def test_one_model_per_family_builds_with_the_released_norms(leaf, expected):
    """Full R50-FPN on CPU: the norm at every place and the layers' settings."""
    cfg = load_config(os.path.join(REPO, leaf), ["MODEL.DEVICE", "cpu"])
    cfg = resolve_burn_in(cfg, None) if cfg.MODEL.CBN.BURN_IN_UNTIL_LR_STEP else cfg
    model = smallbn_d2.build_model(cfg)
    assert _modules_at(model) == expected
    cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    mabn = [m for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
    if cbn:
        assert {(m.window_size, m.burn_in, m.aggregation, m.window_after_burn_in) for m in cbn} == {
            (4, 58640, "drop_invalid", "grow")}
    if mabn:
        assert {(m.buffer_size, m.warmup_iters, m.renorm_warmup_iters) for m in mabn} == {(16, 100, 1000)}


# ----------------------------------------------------------------------------- burn-in
def _trainer_resolution(cfg, num_workers):
    """What smallbn_d2's Trainer does to the config before building (engine/trainer.py)."""
    cfg = scale_norm_iterations(cfg, num_workers)
    cfg = DefaultTrainer.auto_scale_workers(cfg, num_workers)
    return resolve_burn_in(cfg, None)


@pytest.mark.parametrize("workers, expected", [(4, 58640), (8, 29320), (1, 234560), (3, 78187), (16, 14660)])
def test_burn_in_until_first_lr_step_follows_detectron2s_rescaled_steps(workers, expected):
    """Expected: 58640 x 4 / workers, rounded by hand (58640 x 4 / 3 = 78186.67)."""
    cfg = load_config(os.path.join(REPO, "configs/reproduce/cbn_release/mask_rcnn_R_50_FPN_CBN_1x.yaml"))
    out = _trainer_resolution(cfg, workers)
    assert out.MODEL.CBN.BURN_IN_ITERS == expected
    assert out.SOLVER.STEPS[0] == expected  # the window starts where the LR drops
    assert out.MODEL.CBN.BURN_IN_UNTIL_LR_STEP is False and out.MODEL.CBN.BURN_IN_EPOCHS is None


def test_burn_in_until_first_lr_step_in_the_trainer_reaches_the_layers(tmp_path):
    """Real Trainer on the shipped sample: REFERENCE_WORLD_SIZE 2 in one process doubles the steps
    (13, 17) -> (26, 34); every CBN layer then has burn_in 26, k = 1 before it, k after it."""
    from smallbn_d2.engine import Trainer

    cfg = tiny_cfg("mask_rcnn", "CBN", opts=[
        "MODEL.CBN.BURN_IN_ITERS", None, "MODEL.CBN.BURN_IN_UNTIL_LR_STEP", True, "MODEL.CBN.WINDOW_SIZE", 3,
        "SOLVER.STEPS", (13, 17), "SOLVER.MAX_ITER", 40, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.REFERENCE_WORLD_SIZE", 2,
        "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    assert tuple(trainer.cfg.SOLVER.STEPS) == (26, 34)
    layers = [m for m in trainer.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert layers and {m.burn_in for m in layers} == {26}
    assert [layers[0].effective_window_size(t) for t in (25, 26)] == [1, 3]


def test_burn_in_until_first_lr_step_needs_a_step_and_excludes_the_other_keys():
    path = os.path.join(REPO, "configs/reproduce/cbn_release/faster_rcnn_R_50_FPN_CBN_1x.yaml")
    cfg = load_config(path, ["SOLVER.STEPS", ()])
    with pytest.raises(ConfigValueError, match=r"BURN_IN_UNTIL_LR_STEP = True needs a learning-rate step, but "
                                               r"SOLVER.STEPS = \(\) is empty"):
        cbn_burn_in_iters(cfg)
    for key, value in (("MODEL.CBN.BURN_IN_ITERS", 5), ("MODEL.CBN.BURN_IN_EPOCHS", 3.0)):
        with pytest.raises(ConfigValueError, match=rf"BURN_IN_UNTIL_LR_STEP = True and {key} = "):
            load_config(path, [key, value])
    with pytest.raises(ConfigValueError, match=r"BURN_IN_UNTIL_LR_STEP = yes \(on the command line\) is invalid; "
                                               r"allowed: True or False"):
        load_config(path, ["MODEL.CBN.BURN_IN_UNTIL_LR_STEP", "yes"])


def test_lazy_burn_in_until_first_lr_step_reads_the_first_milestone():
    from smallbn_d2.lazy import burn_in_until_first_lr_step, model_zoo_config

    cfg = model_zoo_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
    # Detectron2's 1x schedule: LR x0.1 at 60000 and 80000 of 90000 iterations
    assert burn_in_until_first_lr_step(cfg.lr_multiplier) == 60000
    cfg.lr_multiplier.scheduler.milestones = [30000, 45000, 50000]  # the last one is the end (fvcore)
    assert burn_in_until_first_lr_step(cfg.lr_multiplier) == 30000
    assert burn_in_until_first_lr_step(dict(milestones=[7, 9], num_updates=12)) == 7
    cfg.lr_multiplier.scheduler.milestones = [90000]
    with pytest.raises(ValueError, match=r"lr_multiplier has no learning-rate step: milestones = \[90000\]"):
        burn_in_until_first_lr_step(cfg.lr_multiplier)


# ----------------------------------------------------------------------------- gradient clipping
def _clip_cfg(clip_type, max_norm=1.0):
    cfg = load_config("", ["SOLVER.BASE_LR", 0.5, "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0,
                           "SOLVER.WEIGHT_DECAY_NORM", 0.0, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
                           "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
                           "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", max_norm, "SOLVER.CLIP_GRADIENTS.NORM_TYPE", 2.0])
    return cfg


def _step(clip_type, grads, max_norm=1.0):
    from smallbn_d2.engine import Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    opt = Trainer.build_optimizer(_clip_cfg(clip_type, max_norm), model)
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    return before, [p.detach() for p in model.parameters()]


def test_full_model_clipping_scales_all_gradients_by_the_total_norm():
    """Reference by hand: total = sqrt(sum of all squared gradient entries) = 13 here; every
    gradient is scaled by 1 / 13 (max_norm 1), then SGD with LR 0.5."""
    grads = [torch.full((2, 3), 2.0), torch.full((2,), 3.0), torch.full((1, 2), 4.0), torch.full((1,), 6.0)]
    total = math.sqrt(6 * 4 + 2 * 9 + 2 * 16 + 36)  # 110 ** 0.5
    assert math.isclose(total, 110 ** 0.5)
    before, after = _step("full_model", grads)
    for b, a, g in zip(before, after, grads):
        torch.testing.assert_close(a, b - 0.5 * g / (total + 1e-6), rtol=0, atol=1e-6)
    # Detectron2's "norm" clips each parameter alone: a different step (the last one: |6| -> 1)
    before, after = _step("norm", grads)
    torch.testing.assert_close(after[3], before[3] - 0.5 * torch.ones(1), rtol=0, atol=1e-6)
    assert not torch.allclose(after[0], before[0] - 0.5 * grads[0] / (total + 1e-6), atol=1e-4)


def test_full_model_clipping_leaves_small_gradients_and_rejects_bad_values():
    grads = [torch.full((2, 3), 0.01), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1)]
    before, after = _step("full_model", grads, max_norm=35.0)
    torch.testing.assert_close(after[0], before[0] - 0.5 * grads[0], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"CLIP_VALUE = -1.0 is invalid for CLIP_TYPE 'full_model'; allowed"):
        _step("full_model", grads, max_norm=-1.0)
