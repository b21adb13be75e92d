"""Bad input end to end: a clear error naming the bad value and what is allowed, before training
starts (issue 7, item 2).

Through ``tools/train_net.py`` (its ``cli()`` in this process, and one real subprocess for the
datasets root, which Detectron2 reads at import), the Trainer and the checkpointer. The unknown
norm through a subprocess and the refused second run into a non-empty OUTPUT_DIR are in
test_train_net_e2e.py.
"""
import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import smallbn_d2  # noqa: I001  (first: Detectron2 v0.6 compatibility fixes)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from helpers import REPO, SAMPLE_ARGS, tiny_cfg
from smallbn_d2.checkpoint import NormCheckpointer, NormStateShapeError
from smallbn_d2.engine import Trainer
from smallbn_d2.layers import NormNotWiredError

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
_spec = importlib.util.spec_from_file_location("smallbn_train_net", TRAIN_NET)
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)


def run_cli(monkeypatch, tmp_path, opts, extra_args=()):
    """Run tools/train_net.py's cli() in this process, on the shipped COCO sample; return (exit
    message, output dir)."""
    out = tmp_path / "out"
    argv = ["train_net.py", "--config-file", TINY, *extra_args, "SOLVER.MAX_ITER", "1", *SAMPLE_ARGS,
            "OUTPUT_DIR", str(out), *opts]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        train_net.cli()
    return str(exc.value.code), out


# ------------------------------------------------------------------ config values
BAD_VALUES = [
    ("MODEL.RESNETS.NORM", "CBM", ["'CBN'", "'MABN'", "'NaiveCBN'", "'BN'", "'GN'", "'FrozenBN'"]),
    ("MODEL.ROI_MASK_HEAD.NORM", "mabn", ["'MABN'"]),
    ("MODEL.CBN.WINDOW_SIZE", "0", ["an integer >= 1"]),
    ("MODEL.MABN.BUFFER_SIZE", "0", ["an integer >= 1"]),
    ("MODEL.CBN.MOMENTUM", "0.0", ["(0, 1]"]),
    ("MODEL.CBN.MOMENTUM", "1.5", ["(0, 1]"]),
    ("MODEL.MABN.MOMENTUM", "-0.98", ["(0, 1]"]),
    ("MODEL.CBN.EPS", "0.0", ["> 0"]),
    ("MODEL.MABN.EPS", "-1e-05", ["> 0"]),
    ("MODEL.CBN.BURN_IN_ITERS", "-1", [">= 0"]),
    ("MODEL.CBN.BURN_IN_EPOCHS", "-0.5", [">= 0"]),
    ("MODEL.MABN.WARMUP_ITERS", "-1", [">= 0"]),
    ("MODEL.MABN.HEAD_WARMUP_ITERS", "-10", [">= 0"]),
    ("MODEL.MABN.RENORM_WARMUP_ITERS", "-1", [">= 0"]),
]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_config_value_is_refused_by_train_net_before_training(key, value, allowed, monkeypatch, tmp_path):
    msg, out = run_cli(monkeypatch, tmp_path, [key, value])
    assert msg.startswith("train_net.py: error: ConfigValueError:"), msg
    shown = repr(ast.literal_eval(value)) if value[-1].isdigit() else repr(value)  # as the config holds it
    assert f"{key} = {shown} is invalid" in msg, msg
    for text in allowed:
        assert text in msg, (text, msg)
    assert "\n" not in msg  # one line
    assert not out.exists()  # refused before anything was written


def test_cuda_only_syncbn_with_two_cpu_processes_is_refused(monkeypatch, tmp_path):
    msg, out = run_cli(monkeypatch, tmp_path, ["MODEL.FPN.NORM", "SyncBN"], extra_args=["--num-gpus", "2"])
    assert "MODEL.FPN.NORM = 'SyncBN'" in msg and "'naiveSyncBN'" in msg
    assert not out.exists()


# ------------------------------------------------------------------ YACS keys and types
YACS_ERRORS = [
    # (overrides, error type, texts the one line must hold)
    (["MODEL.CBN.WINDOW_SZ", "3"], "ConfigKeyError",
     ["MODEL.CBN.WINDOW_SZ (on the command line) is not a config key", "Did you mean MODEL.CBN.WINDOW_SIZE?",
      "Keys of MODEL.CBN: AGGREGATION, BURN_IN_EPOCHS"]),
    (["MODEL.WEIGHT", "model.pth"], "ConfigKeyError", ["MODEL.WEIGHT (on the command line)", "MODEL.WEIGHTS?"]),
    (["MODEL.CBN.WINDOW_SIZE", "2.5"], "ConfigValueError",
     ["MODEL.CBN.WINDOW_SIZE = 2.5 (on the command line) is invalid; allowed: an integer", "default 4"]),
    (["MODEL.CBN.MOMENTUM", "1"], "ConfigValueError",
     ["MODEL.CBN.MOMENTUM = 1 ", "allowed: a float, written with a decimal point", "default 0.1"]),
    (["MODEL.CBN", "2"], "ConfigValueError", ["MODEL.CBN = 2 ", "a group of keys", "WINDOW_SIZE"]),
    (["SOLVER.MAX_ITER"], "ConfigValueError", ["KEY VALUE pairs"]),
]


@pytest.mark.parametrize("opts,kind,texts", YACS_ERRORS, ids=[" ".join(o) for o, _, _ in YACS_ERRORS])
def test_yacs_key_and_type_errors_are_one_line(opts, kind, texts, monkeypatch, tmp_path):
    """A misspelt key or a value of another type than the key's default: the project's one-line
    error (the key, the closest key or the allowed type), no traceback, nothing written."""
    msg, out = run_cli(monkeypatch, tmp_path, opts)
    assert msg.startswith(f"train_net.py: error: {kind}: "), msg
    for text in texts:
        assert text in msg, (text, msg)
    assert "\n" not in msg
    assert not out.exists()


def test_misspelt_key_in_a_config_file_names_the_file(monkeypatch, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f"_BASE_: {TINY}\nMODEL:\n  MABN:\n    BUFER_SIZE: 8\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--config-file", str(config), *SAMPLE_ARGS, "OUTPUT_DIR", str(out)])
    with pytest.raises(SystemExit) as exc:
        train_net.cli()
    msg = str(exc.value.code)
    assert msg.startswith(f"train_net.py: error: ConfigKeyError: MODEL.MABN.BUFER_SIZE (in {config}) is not a config key. "
                          "Did you mean MODEL.MABN.BUFFER_SIZE?"), msg
    assert not out.exists()


# ------------------------------------------------------------------ datasets root
@pytest.mark.slow
def test_missing_datasets_root_is_reported_with_the_places_looked_at(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS="/nonexistent/datasets")
    out = tmp_path / "out"
    builtin = ["DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)"]  # Detectron2's names
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config-file", TINY, *builtin, "OUTPUT_DIR", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr
    assert "train_net.py: error: DatasetsNotFoundError:" in err, err[-3000:]
    assert "/nonexistent/datasets" in err and "coco_2017_train" in err and "DETECTRON2_DATASETS" in err
    assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------ a norm without producing conv
@BACKBONE_REGISTRY.register()
class _FPNWithLooseNorm(Backbone):
    """Detectron2's R-FPN backbone plus a norm layer (from MODEL.RESNETS.NORM) that no conv feeds."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        self.fpn = build_resnet_fpn_backbone(cfg, input_shape)
        from detectron2.layers import get_norm

        self.loose = get_norm(cfg.MODEL.RESNETS.NORM, 3)

    def forward(self, x):  # pragma: no cover - never reached: the build fails
        return self.fpn(x)

    def output_shape(self):
        return self.fpn.output_shape()

    @property
    def size_divisibility(self):
        return self.fpn.size_divisibility


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_norm_without_producing_conv_fails_when_the_trainer_is_built(norm, tmp_path):
    cfg = tiny_cfg("mask_rcnn", norm, where=["backbone"],
                   opts=["MODEL.BACKBONE.NAME", "_FPNWithLooseNorm", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(NormNotWiredError, match=r"at 'backbone\.loose' has no producing conv"):
        Trainer(cfg)


# ------------------------------------------------------------------ checkpoint shapes
def _save(model, tmp_path, name):
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save(name)
    return str(tmp_path / f"{name}.pth")


@pytest.mark.slow
def test_cbn_window_of_another_size_is_refused_on_resume(tmp_path):
    """A run resumed with another MODEL.CBN.WINDOW_SIZE than its checkpoint's: error, nothing loaded."""
    old = smallbn_d2.build_model(tiny_cfg("mask_rcnn", "CBN", opts=["MODEL.CBN.WINDOW_SIZE", 4]))
    _save(old, tmp_path, "model_0000009")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    trainer = Trainer(tiny_cfg("mask_rcnn", "CBN", opts=["MODEL.CBN.WINDOW_SIZE", 2, "OUTPUT_DIR", str(tmp_path)]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NormStateShapeError) as exc:
        trainer.resume_or_load(resume=True)
    msg = str(exc.value)
    m = re.match(r"Checkpoint entry '([\w.]+)\.(window_\w+)' has shape \((\d+),[^)]*\) but the model's "
                 r"CrossIterationBatchNorm2d has shape \((\d+),", msg)
    assert m, msg
    assert m.group(1) in dict(trainer.model.named_modules()) and m.group(3, 4) == ("3", "1")
    assert "k = 4 in the checkpoint" not in msg and "k = 4" in msg and "k = 2" in msg
    assert "MODEL.CBN.WINDOW_SIZE 4" in msg
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint must load nothing"
    assert trainer.start_iter == 0


@pytest.mark.slow
def test_mabn_buffer_of_another_size_is_refused(tmp_path):
    old = smallbn_d2.build_model(tiny_cfg("mask_rcnn", "MABN", where=["fpn"], opts=["MODEL.MABN.BUFFER_SIZE", 16]))
    path = _save(old, tmp_path, "mabn")
    new = smallbn_d2.build_model(tiny_cfg("mask_rcnn", "MABN", where=["fpn"], opts=["MODEL.MABN.BUFFER_SIZE", 8]))
    with pytest.raises(NormStateShapeError) as exc:
        NormCheckpointer(new).load(path)
    msg = str(exc.value)
    assert "'backbone.fpn_" in msg and "(16, 32)" in msg and "(8, 32)" in msg and "MODEL.MABN.BUFFER_SIZE 16" in msg


def test_evaluating_another_model_never_writes_into_a_training_run(tmp_path):
    """--eval-only of a model that is not one of the run's checkpoints (e.g. a converted one) is
    refused in a training run's directory; the run's own checkpoints may be evaluated there."""
    from smallbn_d2.engine import OutputDirExistsError, check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_final.pth")
    (run / "model_final.pth").write_bytes(b"")
    converted = tmp_path / "model_final_frozen.pth"
    with pytest.raises(OutputDirExistsError, match="holds a training run"):
        check_output_dir(str(run), eval_only=True, weights=str(converted))
    check_output_dir(str(run), eval_only=True, weights=str(run / "model_final.pth"))  # its own model
    check_output_dir(str(run), eval_only=True, weights=str(converted), allow_existing=True)
    check_output_dir(str(tmp_path / "fresh"), eval_only=True, weights=str(converted))  # a new folder
    with pytest.raises(OutputDirExistsError, match="--resume"):
        check_output_dir(str(run))  # a new training run there


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"smallbn_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_output_guard_for_named_files_and_every_tool(tmp_path, capsys):
    """The tools that write named files (convert_for_inference, export_model, compare_runs) share
    check_output_dir's rules with the training tools: the folder's other content is left alone,
    an existing output file is refused unless overwriting is asked for, a file where the folder
    should be (or a folder where a file should be) is refused in any case; nothing is written."""
    from smallbn_d2.engine import OutputDirExistsError, check_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    names = ["m.pth", "m.yaml"]
    check_output_dir(str(out), files=names)  # other files in the folder: fine
    (out / "m.yaml").write_text("old")
    with pytest.raises(OutputDirExistsError, match=r"m\.yaml' exists; refusing to overwrite it\. Choose another "
                                                   r"output, or pass --overwrite\.$"):
        check_output_dir(str(out), files=names, way_out="--overwrite")
    check_output_dir(str(out), files=names, allow_existing=True)
    assert (out / "m.yaml").read_text() == "old" and sorted(os.listdir(out)) == ["m.yaml", "notes.txt"]
    (out / "m.pth").mkdir()
    with pytest.raises(OutputDirExistsError, match="a folder where a file is to be written"):
        check_output_dir(str(out), files=names, allow_existing=True)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for kwargs in ({}, {"allow_existing": True}, {"files": names, "allow_existing": True}):
        with pytest.raises(OutputDirExistsError, match="is a file"):
            check_output_dir(str(a_file), **kwargs)

    # each tool refuses before it reads anything (the inputs named here do not exist)
    with pytest.raises(SystemExit, match="is a file"):
        _load_tool("compare_runs").main([str(tmp_path / "no_run"), "--output-dir", str(a_file), "--overwrite"])
    assert _load_tool("export_model").main(["--config-file", "none.yaml", "--output", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    convert = ["--config-file", "none.yaml", "--weights", "none.pth", "--output", str(out / "m.pth"), "--overwrite"]
    assert _load_tool("convert_for_inference").main(convert) == 2
    assert "a folder where a file is to be written" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and sorted(os.listdir(out)) == ["m.pth", "m.yaml", "notes.txt"]
