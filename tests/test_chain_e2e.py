"""The tools chained on each other's real outputs, as a user runs them (issue 20).

For CBN and MABN (YAML configs, ``tools/train_net.py``) and for the LazyConfig CBN model
(``tools/lazyconfig_train_net.py``), on the COCO 2017 sample shipped with the package:

    train (short) -> its own model_final.pth -> tools/convert_for_inference.py (plain, --fold)
    -> --eval-only of each converted config -> tools/export_model.py (TorchScript, ONNX)
    -> tools/compare_runs.py over the training and evaluation folders

Every step reads the files the previous one wrote; no state dict is made by hand. The training
and evaluation tools run as subprocesses (their command line, logging and exit status as a user
sees them); the converter, the exporter and compare_runs run in this process through their
``main(argv)`` (the same code as their command line, without another interpreter start-up).
One training run per norm is shared by all steps (module-scoped fixtures).

The independent reference of the evaluations is the training run's own final evaluation: the
converted models (FrozenBN, and folded) must give the same detections as the CBN/MABN model in
eval mode, image by image. A mis-loaded model (norms at their initial values, conv biases
dropped) gives other scores.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch

from helpers import REPO, SAMPLE_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

TOOLS = os.path.join(REPO, "tools")
TINY_YAML = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
TINY_LAZY = os.path.join(REPO, "configs", "test", "tiny_mask_rcnn_CBN_lazy.py")
UMASK = 0o027  # not the usual 022: the files must follow the user's umask, whatever it is
MODE = 0o666 & ~UMASK  # 0o640

_NORM_KEYS = ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"]
# 3 iterations: CBN's window (k = 2) and MABN's SMA buffers hold real entries, which model_final.pth
# leaves out; no periodic checkpoint (as in the main job); 5 detections per image at score >= 0
YAML_TRAIN = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100000", "MODEL.CBN.WINDOW_SIZE", "2",
              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5", *SAMPLE_ARGS]
LAZY_TRAIN = ["train.max_iter=3", "smallbn.norms.CBN.window_size=2",
              "model.roi_heads.box_predictor.test_score_thresh=0.0",
              "model.roi_heads.box_predictor.test_topk_per_image=5"]  # + the evaluator's output_dir


def _umask():
    os.umask(UMASK)


def _run_tool(tool: str, args: List[str], env=None) -> subprocess.Popen:
    """Start ``tools/<tool>`` in a subprocess under :data:`UMASK`, from the repository root."""
    return subprocess.Popen([sys.executable, os.path.join(TOOLS, tool)] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_umask)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _tool_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_chain_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_main(name: str, argv: List[str]):
    """(exit status, stdout + stderr) of ``tools/<name>.py``'s ``main(argv)``, under :data:`UMASK`."""
    out = io.StringIO()
    old = os.umask(UMASK)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = _tool_module(name).main(argv)
    finally:
        os.umask(old)
    return rc, out.getvalue()


@dataclass
class Chain:
    """The files and outputs of one chain (one norm)."""

    name: str
    lazy: bool
    config: str
    opts: List[str]  # the training overrides, given to every later tool with the config
    run: str
    train: subprocess.CompletedProcess = None
    converted: Dict[str, str] = field(default_factory=dict)  # "plain"/"fold" -> .pth
    convert_out: Dict[str, str] = field(default_factory=dict)
    evals: Dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    eval_dirs: Dict[str, str] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)


def _build_chain(tmp, name: str, lazy: bool) -> Chain:
    run = str(tmp / "run")
    if lazy:
        # Detectron2's LazyConfig COCOEvaluator writes its predictions only when given a folder
        chain = Chain(name, True, TINY_LAZY, LAZY_TRAIN + [f"dataloader.evaluator.output_dir={run}/inference"], run)
        train_args = ["--config-file", TINY_LAZY, *chain.opts, f"train.output_dir={run}"]
        tool = "lazyconfig_train_net.py"
    else:
        opts = [x for k in _NORM_KEYS for x in (k, name)] + YAML_TRAIN
        chain = Chain(name, False, TINY_YAML, opts, run)
        train_args = ["--config-file", TINY_YAML, *opts, "OUTPUT_DIR", run]
        tool = "train_net.py"
    # no data but the shipped sample: Detectron2's dataset root points nowhere
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp / "no_datasets"))
    t = time.perf_counter()
    chain.train = _finish(_run_tool(tool, train_args, env=env))
    chain.seconds["train"] = time.perf_counter() - t
    assert chain.train.returncode == 0, chain.train.stdout[-5000:]

    weights = os.path.join(run, "model_final.pth")
    t = time.perf_counter()
    for kind in ("plain", "fold"):
        out = str(tmp / "deploy" / f"{name}_{kind}.pth")
        rc, text = _call_main("convert_for_inference", ["--config-file", chain.config, "--weights", weights,
                                                        "--output", out] + (["--fold"] if kind == "fold" else [])
                              + chain.opts)
        assert rc == 0, text[-3000:]
        chain.converted[kind], chain.convert_out[kind] = out, text
    chain.seconds["convert x2"] = time.perf_counter() - t

    # both evaluations at once (one per core)
    t = time.perf_counter()
    procs = {kind: _run_tool(tool, ["--eval-only", "--config-file", os.path.splitext(path)[0] + ".yaml"], env=env)
             for kind, path in chain.converted.items()}
    for kind, proc in procs.items():
        chain.evals[kind] = _finish(proc)
        chain.eval_dirs[kind] = os.path.splitext(chain.converted[kind])[0] + "_eval"
    chain.seconds["eval-only x2"] = time.perf_counter() - t
    return chain


CHAINS = ["CBN", "MABN", "lazy-CBN"]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """One chain per entry of CHAINS, built on first use and shared by the module's tests."""
    built: Dict[str, Chain] = {}

    def get(name: str) -> Chain:
        if name not in built:
            built[name] = _build_chain(tmp_path_factory.mktemp(name), name.replace("lazy-", ""),
                                       name.startswith("lazy-"))
        return built[name]

    yield get
    for name, chain in built.items():  # the measurement, shown with -s
        print(f"\nchain {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in chain.seconds.items()))


# ----------------------------------------------------------------------------- helpers
def _cross_iteration_keys(state, norm) -> List[str]:
    suffixes = ("window_mu", "window_nu_grad", "window_iters") if norm == "CBN" else ("chi2_buffer", "psi_buffer")
    return [k for k in state if k.endswith(suffixes)]


def _predictions(folder: str) -> Dict[int, List[dict]]:
    """COCO results of an evaluation folder, per image id."""
    path = os.path.join(folder, "inference", "coco_instances_results.json")
    assert os.path.isfile(path), path
    out: Dict[int, List[dict]] = {}
    for p in json.load(open(path)):
        out.setdefault(p["image_id"], []).append(p)
    return out


def _assert_same_predictions(ref: Dict[int, List[dict]], got: Dict[int, List[dict]], what: str) -> int:
    """Same images, same number of detections per image, and every detection of ``ref`` has a twin
    in ``got``: same class, score within 1e-4, box within 0.05 px (a twin, not the same rank, so
    that float rounding may reorder near-equal scores). Returns the number of detections compared."""
    assert sorted(ref) == sorted(got), what
    compared = 0
    for image, dets in ref.items():
        other = got[image]
        assert len(dets) == len(other), (what, image)
        for d in dets:
            twins = [e for e in other if e["category_id"] == d["category_id"] and abs(e["score"] - d["score"]) < 1e-4
                     and (torch.tensor(d["bbox"]) - torch.tensor(e["bbox"])).abs().max().item() < 0.05]
            assert twins, (what, image, d)
            compared += 1
    return compared


def _holds_key(d: dict, key: str) -> bool:
    return key in d or any(isinstance(v, dict) and _holds_key(v, key) for v in d.values())


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------- the chain
@pytest.mark.parametrize("name", CHAINS)
def test_training_writes_a_final_checkpoint_without_cross_iteration_state(chains, name):
    chain = chains(name)
    final = torch.load(os.path.join(chain.run, "model_final.pth"), map_location="cpu", weights_only=False)
    # README's size note: the final checkpoint holds the optimizer state besides the model
    assert _holds_key(final, "optimizer"), sorted(final)
    assert not _cross_iteration_keys(final["model"], chain.name)  # what made conversion fail before
    assert not [f for f in os.listdir(chain.run) if f.startswith("model_0")]  # no periodic checkpoint


@pytest.mark.parametrize("name", CHAINS)
def test_files_follow_the_umask(chains, name):
    """Checkpoints, last_checkpoint and converted checkpoints get 0o666 & ~umask, as Detectron2's
    other files (log.txt, metrics.json) do; not the temporary file's 0600."""
    chain = chains(name)
    files = [os.path.join(chain.run, f) for f in ("model_final.pth", "last_checkpoint", "log.txt")]
    files += list(chain.converted.values())
    assert {f: oct(_mode(f)) for f in files} == {f: oct(MODE) for f in files}


@pytest.mark.parametrize("name", CHAINS)
def test_convert_reads_the_final_checkpoint(chains, name):
    chain = chains(name)
    for kind, text in chain.convert_out.items():
        assert "does not match" not in text and "not found" not in text, text[-2000:]
        assert "FrozenBatchNorm2d" in text and f"wrote {chain.converted[kind]}" in text
    assert "folded into conv" in chain.convert_out["fold"]
    from smallbn_d2.checkpoint import read_conversion_metadata

    assert read_conversion_metadata(chain.converted["plain"]) == {"fold": False}
    assert read_conversion_metadata(chain.converted["fold"]) == {"fold": True}


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("kind", ["plain", "fold"])
def test_eval_only_of_the_converted_config_gives_the_trained_models_detections(chains, name, kind):
    chain = chains(name)
    proc = chain.evals[kind]
    assert proc.returncode == 0, proc.stdout[-5000:]
    # no mis-loading reported and evaluated anyway
    assert "Some model parameters or buffers are not found" not in proc.stdout
    assert "not used by the model" not in proc.stdout
    if kind == "fold":
        assert "folded into their convs before loading" in proc.stdout
    assert "Evaluation results for bbox" in proc.stdout or "copypaste: Task: bbox" in proc.stdout
    ref = _predictions(chain.run)
    n = sum(len(v) for v in ref.values())
    assert n >= 20, n  # the comparison is not vacuous
    assert _assert_same_predictions(ref, _predictions(chain.eval_dirs[kind]), f"{name} {kind}") == n


@pytest.mark.parametrize("name", ["CBN", "lazy-CBN"])
def test_folded_checkpoint_into_an_unfolded_model_is_refused_with_the_way_to_evaluate_it(chains, name):
    """The folded checkpoint loaded into the training model (CBN layers, convs without bias) is an
    error naming the config that evaluates it, never a warning and a mis-loaded model."""
    from smallbn_d2.checkpoint import IncompatibleCheckpointError, NormCheckpointer
    from smallbn_d2.deploy import build_training_model, load_training_config

    chain = chains(name)
    cfg = load_training_config(chain.config, chain.opts)
    model = build_training_model(cfg)
    path = chain.converted["fold"]
    with pytest.raises(IncompatibleCheckpointError) as e:
        NormCheckpointer(model).load(path)
    msg = str(e.value)
    assert "\n" not in msg and "folded" in msg and "--eval-only --config-file" in msg
    assert os.path.splitext(path)[0] + ".yaml" in msg


@pytest.mark.parametrize("name", CHAINS)
def test_export_torchscript_from_the_final_checkpoint(chains, name, tmp_path):
    chain = chains(name)
    weights = os.path.join(chain.run, "model_final.pth")
    extra = [f"train.init_checkpoint={weights}"] if chain.lazy else ["MODEL.WEIGHTS", weights]
    rc, text = _call_main("export_model", ["--config-file", chain.config, "--format", "torchscript", "--fold",
                                           "--output", str(tmp_path)] + chain.opts + extra)
    assert rc == 0, text[-3000:]
    assert "exported vs eager on the sample image" in text and "different detections" not in text
    assert _mode(str(tmp_path / "model.ts")) == MODE


@pytest.mark.parametrize("name", ["CBN", "MABN"])
def test_export_onnx_of_the_converted_checkpoint_has_documented_names(chains, name, tmp_path):
    """ONNX of the checkpoint written by convert_for_inference: input ``image``, outputs named
    after Detectron2's Instances fields in the documented order (docs/DEPLOY.md)."""
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("the onnx package is not installed: ONNX export unavailable")
    import onnx

    chain = chains(name)
    rc, text = _call_main("export_model", ["--config-file", chain.config, "--format", "onnx", "--output",
                                           str(tmp_path)] + chain.opts + ["MODEL.WEIGHTS", chain.converted["plain"]])
    assert rc == 0, text[-3000:]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    assert _mode(str(tmp_path / "model.onnx")) == MODE
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "different detections" not in text and "exported vs eager" in text


@pytest.mark.parametrize("name", CHAINS)
def test_compare_runs_over_training_and_evaluation_folders(chains, name, tmp_path):
    chain = chains(name)
    folders = [chain.run] + [chain.eval_dirs[k] for k in ("plain", "fold")]
    rc, text = _call_main("compare_runs", folders + ["--output-dir", str(tmp_path / "cmp")])
    assert not isinstance(rc, int) or rc == 0, text[-3000:]  # main returns the runs it read
    table = open(tmp_path / "cmp" / "comparison.md").read()
    for folder in folders:
        assert f"| {os.path.basename(folder)} " in table, (folder, table)


@pytest.mark.parametrize("name", ["CBN", "MABN"])
def test_strict_loader_accepts_only_the_training_state_as_absent(chains, name, tmp_path):
    """The final checkpoint loads strictly for inference without its cross-iteration state, but
    a missing population statistic, or a layer with part of its cross-iteration state, is still
    refused (from the real model_final.pth, one entry taken out)."""
    from smallbn_d2.checkpoint import IncompatibleCheckpointError, load_checkpoint_strict
    from smallbn_d2.deploy import build_training_model, load_training_config

    chain = chains(name)
    cfg = load_training_config(chain.config, chain.opts)
    final = torch.load(os.path.join(chain.run, "model_final.pth"), map_location="cpu", weights_only=False)
    load_checkpoint_strict(build_training_model(cfg), os.path.join(chain.run, "model_final.pth"))

    stat = "running_var" if name == "CBN" else "running_chi2"
    key = next(k for k in final["model"] if k.startswith("backbone.fpn_lateral2.norm.") and k.endswith(stat))
    broken = dict(final, model={k: v for k, v in final["model"].items() if k != key})
    torch.save(broken, tmp_path / "no_stat.pth")
    with pytest.raises(IncompatibleCheckpointError, match=key.replace(".", r"\.")):
        load_checkpoint_strict(build_training_model(cfg), str(tmp_path / "no_stat.pth"))

    periodic = build_training_model(cfg).state_dict()  # the keys a periodic checkpoint has
    one = _cross_iteration_keys(periodic, name)[0]
    partial = dict(final, model=dict(final["model"], **{one: periodic[one]}))
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(IncompatibleCheckpointError, match="missing keys"):
        load_checkpoint_strict(build_training_model(cfg), str(tmp_path / "partial.pth"))
