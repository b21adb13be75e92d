"""CBN and MABN in Detectron2's LazyConfig (Python) configs: smallbn_d2.lazy, configs/lazy, the
tiny lazy test config and tools/lazyconfig_train_net.py.

References: the values written in the config files and the layers' constructor defaults (every
checked value differs from its default, so a field that is not applied fails), Detectron2's
own structure of the model (which module holds which norm), and the training run's own
records (metrics.json, the model printed in log.txt).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import smallbn_d2
from detectron2.layers import FrozenBatchNorm2d
from smallbn_d2 import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from smallbn_d2.lazy import burn_in_iterations, build_lazy_model, build_model_from_lazy_config, check_smallbn_field

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = {"CBN": os.path.join(REPO, "configs/lazy/mask_rcnn_R_50_FPN_CBN.py"),
        "MABN": os.path.join(REPO, "configs/lazy/mask_rcnn_R_50_FPN_MABN.py")}
TINY = os.path.join(REPO, "configs/test/tiny_mask_rcnn_CBN_lazy.py")
LAYER = {"CBN": CrossIterationBatchNorm2d, "MABN": MovingAverageBatchNorm2d}


def _model_zoo_missing():
    from detectron2 import model_zoo

    try:
        model_zoo.get_config_file("common/models/mask_rcnn_fpn.py")
    except RuntimeError:
        return ("Detectron2's model-zoo LazyConfigs are not installed (tools/install.sh installs them; "
                "tests/test_detectron2_env.py checks the install)")
    return None


needs_model_zoo = pytest.mark.skipif(_model_zoo_missing() is not None, reason=str(_model_zoo_missing()))


def _load(path):
    from detectron2.config import LazyConfig

    return LazyConfig.load(path)


def _norm_places(model):
    """(name, conv, its norm) of every conv of the FPN and of the box / mask heads, by Detectron2's
    module names: FPN lateral/output convs, box head conv1..4, mask head mask_fcn1..4."""
    out = []
    for name, module in model.named_modules():
        in_fpn = name.startswith("backbone.fpn_")
        in_heads = name.startswith(("roi_heads.box_head.conv", "roi_heads.mask_head.mask_fcn"))
        if (in_fpn or in_heads) and isinstance(module, nn.Conv2d):
            out.append((name, module, module.norm))
    return out


# ----------------------------------------------------------------------------- helpers
def test_burn_in_iterations_is_epochs_times_images_over_batch():
    assert burn_in_iterations(3.0, 117266, 16) == round(3 * 117266 / 16) == 21987
    assert burn_in_iterations(0, 117266, 16) == 0
    assert burn_in_iterations(1, 5, 2) == 2  # round(2.5), Python's rounding, as the YAML trainer
    with pytest.raises(ValueError, match="images_per_iteration = 0"):
        burn_in_iterations(3, 100, 0)
    with pytest.raises(ValueError, match="epochs = -1"):
        burn_in_iterations(-1, 100, 2)
    with pytest.raises(ValueError, match="num_images = 2.5"):
        burn_in_iterations(1, 2.5, 2)


def test_smallbn_field_errors_name_the_field():
    def field(**kw):
        return {"smallbn": kw}

    assert check_smallbn_field({})["norms"] == {}
    with pytest.raises(ValueError, match=r"smallbn\.norms\.CBN\.window_size = 0 is invalid; allowed: an integer >= 1"):
        check_smallbn_field(field(norms={"CBN": {"window_size": 0}}))
    with pytest.raises(ValueError, match=r"smallbn\.head_norms\.MABN\.r_max = 0.5"):
        check_smallbn_field(field(head_norms={"MABN": {"r_max": 0.5}}))
    with pytest.raises(TypeError, match=r"smallbn\.norms\.MABN\.window_size: .*allowed: buffer_size"):
        check_smallbn_field(field(norms={"MABN": {"window_size": 4}}))
    with pytest.raises(KeyError, match="unknown norm name 'BN'.*CBN, NaiveCBN, MABN"):
        check_smallbn_field(field(norms={"BN": {}}))
    with pytest.raises(KeyError, match="unknown keys.*'norm'"):
        check_smallbn_field(field(norm={"CBN": {}}))
    with pytest.raises(ValueError, match=r"smallbn\.precise_norm\.num_iter = 0"):
        check_smallbn_field(field(precise_norm={"enabled": True, "num_iter": 0}))
    with pytest.raises(ValueError, match=r"smallbn\.freeze_norm_stats_iter = -2"):
        check_smallbn_field(field(freeze_norm_stats_iter=-2))
    # NaiveCBN passes CBN's arguments on through **kwargs: they are allowed
    assert check_smallbn_field(field(norms={"NaiveCBN": {"window_after_burn_in": "grow"}}))["norms"] == \
        {"NaiveCBN": {"window_after_burn_in": "grow"}}


def test_model_zoo_config_names_a_missing_file():
    from smallbn_d2.lazy import model_zoo_config

    with pytest.raises(FileNotFoundError, match="'common/no_such_config.py' not found under"):
        model_zoo_config("common/no_such_config.py")


def test_norm_hooks_come_first_and_follow_the_field():
    from smallbn_d2.engine import FreezeNormStatsHook, NormIterationHook
    from smallbn_d2.lazy import norm_hooks

    hooks = norm_hooks({})
    assert [type(h) for h in hooks] == [NormIterationHook]
    hooks = norm_hooks({"smallbn": {"freeze_norm_stats_iter": 5}})
    assert [type(h) for h in hooks] == [NormIterationHook, FreezeNormStatsHook] and hooks[1].start_iter == 5


# ----------------------------------------------------------------------------- R50 configs
@needs_model_zoo
@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_r50_lazy_config_builds_configured_wired_layers(norm):
    cfg = _load(LAZY[norm])
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "smallbn"} <= set(cfg.keys())
    assert cfg.dataloader.train.total_batch_size == 16  # 2 images per GPU on 8 GPUs
    assert "SyncBN" not in str(cfg.model)
    cfg.train.device = "cpu"
    torch.manual_seed(0)
    model = build_model_from_lazy_config(cfg)

    places = _norm_places(model)
    assert len(places) == 8 + 4 + 4  # FPN 4 lateral + 4 output convs, 4conv box head, 4-conv mask head
    for name, conv, layer in places:
        assert type(layer) is LAYER[norm], name
        assert layer.conv is conv, f"{name}: the layer is not attached to its producing conv"
        in_head = name.startswith("roi_heads")
        if norm == "CBN":  # values of the config file (defaults: window_size=4, burn_in=0)
            assert layer.window_size == 8
            assert layer.burn_in == round(3.0 * 117266 / 16)
        else:  # defaults: buffer_size=16, momentum=0.98, warmup_iters=0
            assert layer.buffer_size == 32
            assert math.isclose(layer.momentum, 0.98)
            assert layer.warmup_iters == (10000 if in_head else 0), name
    # the pretrained backbone keeps Detectron2's FrozenBN, the first two stages frozen
    bottom_up = model.backbone.bottom_up
    assert all(not isinstance(m, LAYER[norm]) for m in bottom_up.modules())
    assert isinstance(bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in bottom_up.res2.parameters())
    assert sum(isinstance(m, smallbn_d2.layers.IterationNormBase) for m in model.modules()) == len(places)


@needs_model_zoo
def test_lazy_model_node_is_not_changed_and_head_arguments_stay_in_heads():
    cfg = _load(TINY)
    before = str(cfg.model)
    model = build_lazy_model(cfg.model, norms={"MABN": {"buffer_size": 3}, "CBN": {"window_size": 2}},
                             head_norms={"CBN": {"window_size": 5}})
    assert str(cfg.model) == before
    for name, conv, layer in _norm_places(model):
        assert layer.window_size == (5 if name.startswith("roi_heads") else 2), name
    with pytest.raises(TypeError, match="lazy model node"):
        build_lazy_model(model)


# ----------------------------------------------------------------------------- training command
@needs_model_zoo
def test_tiny_lazy_config_trains_two_iterations_through_the_command(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", TINY,
           "train.max_iter=2", f"train.output_dir={out}", "dataloader.evaluator=null",
           # MABN in the heads next to CBN in the FPN: both layers in one run
           "model.roi_heads.box_head.conv_norm=MABN", "model.roi_heads.mask_head.conv_norm=MABN",
           "smallbn.norms.CBN.window_size=3", "smallbn.norms.MABN.buffer_size=3",
           "smallbn.head_norms.MABN.warmup_iters=1",
           "smallbn.precise_norm.enabled=true", "smallbn.precise_norm.num_iter=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    log = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]

    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}
    assert sorted(losses) == [0, 1]
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert (out / "model_final.pth").is_file()

    # the model as built (printed in log.txt): the command line's hyperparameters, in their places
    text = (out / "log.txt").read_text()
    assert text.count("CrossIterationBatchNorm2d(32, window_size=3, burn_in=0") == 8  # FPN
    assert text.count("MovingAverageBatchNorm2d(32, buffer_size=3, momentum=0.98, eps=1e-05, warmup_iters=1,") == 8
    assert "wired {'CrossIterationBatchNorm2d': 8, 'MovingAverageBatchNorm2d': 8}" in text
    assert "Computing precise statistics for 16 CBN/MABN layers over 1 iterations" in text  # after the last step


@needs_model_zoo
def test_command_refuses_invalid_smallbn_field_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazyconfig_train_net",
                                                  os.path.join(REPO, "tools", "lazyconfig_train_net.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "launch", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(sys, "argv", ["lazyconfig_train_net.py", "--config-file", TINY,
                                      f"train.output_dir={tmp_path / 'run'}", "smallbn.norms.CBN.window_size=0"])
    with pytest.raises(SystemExit) as exit_info:
        tool.cli()
    assert "smallbn.norms.CBN.window_size = 0 is invalid; allowed: an integer >= 1" in str(exit_info.value.code)
    assert not (tmp_path / "run").exists()


@needs_model_zoo
def test_command_warns_of_overrides_that_add_keys(tmp_path, monkeypatch, capsys):
    """LazyConfig accepts an override of a key the config lacks: a misspelt train.max_itr would be
    read by nothing. The tool warns of it with the closest key, not of real keys, arguments added to
    a LazyCall node, or the optional smallbn field."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazyconfig_train_net",
                                                  os.path.join(REPO, "tools", "lazyconfig_train_net.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    launched = []
    monkeypatch.setattr(tool, "launch", lambda *a, **k: launched.append(1))
    fine = ["train.max_iter=3", "model.roi_heads.box_head.extra_argument=1", "smallbn.norms.MABN.buffer_size=4"]
    monkeypatch.setattr(sys, "argv", ["lazyconfig_train_net.py", "--config-file", TINY,
                                      f"train.output_dir={tmp_path / 'run'}", "train.max_itr=5", "nosuch.key=1"] + fine)
    tool.cli()
    assert launched == [1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "lazyconfig_train_net.py: warning: override train.max_itr=5 adds train.max_itr, which the config does not "
        "have; did you mean train.max_iter?",
        "lazyconfig_train_net.py: warning: override nosuch.key=1 adds nosuch.key, which the config does not have"]


@needs_model_zoo
def test_command_refuses_to_evaluate_another_model_in_a_training_run_folder(tmp_path, monkeypatch):
    """As tools/train_net.py: --eval-only of a checkpoint from elsewhere must not write into a
    training run's folder (it would replace its config.yaml); its own checkpoints are allowed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazyconfig_train_net",
                                                  os.path.join(REPO, "tools", "lazyconfig_train_net.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_final.pth")
    launched = []
    monkeypatch.setattr(tool, "launch", lambda *a, **k: launched.append(1))
    base = ["lazyconfig_train_net.py", "--eval-only", "--config-file", TINY, f"train.output_dir={run}"]
    monkeypatch.setattr(sys, "argv", base + [f"train.init_checkpoint={tmp_path / 'other' / 'model.pth'}"])
    with pytest.raises(SystemExit) as exit_info:
        tool.cli()
    assert "OutputDirExistsError" in str(exit_info.value.code) and str(run) in str(exit_info.value.code)
    assert not launched
    monkeypatch.setattr(sys, "argv", base + [f"train.init_checkpoint={run / 'model_final.pth'}"])
    tool.cli()
    assert launched == [1]


# ----------------------------------------------------------------------------- checks before writing
def _run_tool(tmp_path, *overrides, env=None):
    """tools/lazyconfig_train_net.py on the tiny config in a subprocess: (exit code, stderr)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", TINY,
           f"train.output_dir={tmp_path / 'run'}", "train.max_iter=1", *overrides]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def _error_line(stderr):
    """The tool's error: the last line of stderr, which must be the only line from the tool (no
    traceback; Python's own warnings may come before it)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


@needs_model_zoo
def test_missing_dataset_is_refused_before_anything_is_written_and_again_the_same(tmp_path):
    """Detectron2's builtin COCO names under a missing root: one line naming the file and the
    variable, no output folder; the same command then fails the same way (it must not be refused
    as an existing run, since nothing ran)."""
    env = {"DETECTRON2_DATASETS": str(tmp_path / "no_datasets")}
    for attempt in range(2):
        code, err = _run_tool(tmp_path, "dataloader.train.dataset.names=coco_2017_train", env=env)
        line = _error_line(err)
        assert code == 1, err[-3000:]
        assert line.startswith("lazyconfig_train_net.py: error: DatasetsNotFoundError: Dataset 'coco_2017_train': "
                               f"json_file '{tmp_path / 'no_datasets'}/coco/annotations/instances_train2017.json' "
                               "does not exist"), (attempt, line)
        assert "DETECTRON2_DATASETS" in line and "coco_2017_sample_train" in line
        assert not (tmp_path / "run").exists(), attempt


@needs_model_zoo
@pytest.mark.parametrize("override,line", [
    ("model.backbone.norm=CBM", "ConfigValueError: model.backbone.norm = 'CBM' is invalid; allowed: 'BN', "),
    ("model.roi_heads.mask_head.conv_norm=mabn", "ConfigValueError: model.roi_heads.mask_head.conv_norm = 'mabn' is "
                                                 "invalid; allowed: "),
    ("dataloader.test.dataset.names=coco_2017_sample_vol", "DatasetNotRegisteredError: Dataset "
                                                           "'coco_2017_sample_vol' is not registered."),
])
def test_unknown_norm_or_dataset_name_is_one_line_and_writes_nothing(tmp_path, override, line):
    code, err = _run_tool(tmp_path, override)
    assert code == 1
    got = _error_line(err)
    assert got.startswith("lazyconfig_train_net.py: error: " + line), got
    if "norm" in override:
        assert "'CBN', 'NaiveCBN', 'MABN'" in got and "'' (no norm)" in got
    assert not (tmp_path / "run").exists()


@needs_model_zoo
def test_lazy_checks_read_the_norm_fields_and_the_datasets_the_run_reads():
    from detectron2.config import LazyConfig

    from smallbn_d2.lazy import lazy_dataset_names, lazy_norm_fields

    cfg = LazyConfig.apply_overrides(_load(TINY), ["model.roi_heads.box_head.conv_norm=MABN"])
    fields = lazy_norm_fields(cfg)
    # the config's own values: FPN and heads CBN/MABN, the R18 stem and stages FrozenBN
    assert fields["model.backbone.norm"] == "CBN"
    assert fields["model.roi_heads.box_head.conv_norm"] == "MABN"
    assert fields["model.roi_heads.mask_head.conv_norm"] == "CBN"
    assert fields["model.backbone.bottom_up.stem.norm"] == "FrozenBN"
    assert lazy_dataset_names(cfg) == ["coco_2017_sample_train", "coco_2017_sample_val"]
    assert lazy_dataset_names(cfg, eval_only=True) == ["coco_2017_sample_val"]
    cfg.dataloader.evaluator = None  # nothing evaluated: the test set is not read
    assert lazy_dataset_names(cfg) == ["coco_2017_sample_train"]
