"""tools/compare_runs.py on real runs, and the run reader it is built on.

End to end: two shrunk Mask R-CNN runs (BN and CBN everywhere) are trained for a few iterations
by tools/train_net.py on the shipped COCO 2017 sample and evaluated on its 24 val images; the tool's
table and plots are checked against the runs' own files (metrics.json, log.txt) read directly.
"""
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, SAMPLE_ARGS
from smallbn_d2.engine import load_config

sys.path.insert(0, os.path.join(REPO, "tools"))  # run_report/ lives beside the tools, not in the package
from run_report.run_metrics import (  # noqa: E402
    RunNotFoundError,
    describe_norms,
    images_per_gpu,
    load_run,
    read_metrics,
    results_from_log,
)

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _compare_runs_module():
    spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(REPO, "tools", "compare_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train and evaluate the BN and the CBN run side by side (one thread each: 2 CPU cores)."""
    root = tmp_path_factory.mktemp("compare")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for norm in ("BN", "CBN"):
        args = [sys.executable, TRAIN_NET, "--config-file", TINY, "SOLVER.MAX_ITER", "3",
                "MODEL.CBN.WINDOW_SIZE", "2", "MODEL.CBN.BURN_IN_ITERS", "1",
                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
                *SAMPLE_ARGS, "OUTPUT_DIR", str(root / norm)]
        for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"):
            args += [key, norm]
        procs[norm] = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for norm, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{norm} run failed:\n{out[-5000:]}"
    return root


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compare_out") / "cmp"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_runs.py"), str(runs / "BN"),
                           str(runs / "CBN"), "--published", "--out-dir", str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out_dir


def _table(markdown, title):
    """Rows (dicts by header) of the Markdown table under the heading ``title``."""
    section = markdown.split(f"### {title}")[1].split("###")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _direct_rows(run_dir):
    with open(run_dir / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("task,title", [("bbox", "Box AP (bbox)"), ("segm", "Mask AP (segm)")])
def test_table_has_both_runs_with_their_numbers(compared, runs, task, title):
    markdown, _ = compared
    rows = {r["run"]: r for r in _table(markdown, title)}
    assert {"BN", "CBN"} <= set(rows)
    for norm in ("BN", "CBN"):
        row = rows[norm]
        direct = _direct_rows(runs / norm)
        final = [r for r in direct if f"{task}/AP" in r][-1]
        for metric in METRICS:  # AP breakdown: finite, equal to metrics.json (printed with 3 decimals)
            value = float(row[metric])
            assert math.isfinite(value) and re.fullmatch(r"\d+\.\d{3}", row[metric])
            assert value == pytest.approx(final[f"{task}/{metric}"], abs=5.1e-4)
        assert row["norm"] == f"all: {norm}"
        assert row["model"] == "Mask R-CNN R18-FPN"
        assert row["img/GPU x GPUs"] == "2 x 1"
        assert row["schedule"] == "3 iterations"
        times = [r["time"] for r in direct if "time" in r]
        assert float(row["train s/iter"]) == pytest.approx(statistics.median(times), rel=1e-2)
        peak = max(r["peak_memory/cpu_rss_mb"] for r in direct if "peak_memory/cpu_rss_mb" in r)
        mem = re.fullmatch(r"(\d+) \(CPU RSS\)", row["peak mem (MB)"])
        assert mem and abs(int(mem.group(1)) - peak) <= 1 and peak > 50
        # inference s/image vs Detectron2's own "pure compute time" log line (same forward calls)
        log = (runs / norm / "log.txt").read_text()
        d2 = float(re.findall(r"pure compute time: \S+ \(([\d.]+) s / iter per device", log)[-1])
        assert float(row["inference s/img"]) == pytest.approx(d2, rel=0.1)
    published = [r for r in rows if r.startswith("published:")]
    assert published and all(rows[r]["model"] == "Mask R-CNN R50-FPN" for r in published)


@pytest.mark.slow
def test_plots_are_written_as_png(compared):
    import matplotlib.image

    _, out_dir = compared
    for name in ("ap_vs_iter.png", "loss_curves.png"):
        path = out_dir / name
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(str(path))
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert (out_dir / "comparison.md").read_text().startswith("### Box AP (bbox)")


@pytest.mark.slow
def test_existing_plots_are_not_overwritten(compared, runs, capsys):
    _, out_dir = compared
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    with pytest.raises(SystemExit) as exc:
        _compare_runs_module().main([str(runs / "BN"), "--out-dir", str(out_dir)])
    assert "refusing to overwrite" in str(exc.value) and "--overwrite" in str(exc.value)
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


@pytest.mark.slow
def test_results_in_the_log_match_metrics_json(runs):
    """--eval-only runs write no results to metrics.json; the reader then takes the log's
    "copypaste:" lines, which must agree with metrics.json where both exist."""
    run = load_run(str(runs / "BN"))
    log = results_from_log(str(runs / "BN" / "log.txt"))
    for task in ("bbox", "segm"):
        assert log[task] == pytest.approx(run.results[task], abs=1e-4)
    assert run.eval_iteration == 3 and run.ap_curve("bbox")[-1][0] == 3


# ----------------------------------------------------------------------------- reader units
def _cfg(path, opts=()):
    return yaml.safe_load(load_config(path, list(opts)).dump())


def test_norm_description_names_every_place():
    zoo = os.path.join(REPO, "configs")
    cbn_1x = _cfg(os.path.join(zoo, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_CBN_1x.yaml"))
    assert describe_norms(cbn_1x) == "FPN+heads: CBN, backbone: FrozenBN"
    gn_scratch = _cfg(os.path.join(zoo, "COCO-Detection", "retinanet_R_50_FPN_GN_scratch_3x.yaml"))
    assert describe_norms(gn_scratch) == "all: GN"
    mixed = _cfg(TINY, ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.FPN.NORM", "GN",
                        "MODEL.ROI_BOX_HEAD.NORM", "MABN", "MODEL.ROI_MASK_HEAD.NORM", "CBN"])
    assert describe_norms(mixed) == "box head: MABN, mask head: CBN, backbone: BN (stem+res2 frozen: FrozenBN), FPN: GN"
    two_fc = _cfg(TINY, ["MODEL.ROI_BOX_HEAD.NUM_CONV", 0, "MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.MASK_ON", False])
    assert describe_norms(two_fc) == "FPN+heads: none, backbone: FrozenBN"  # a 2fc box head has no norm


def test_images_per_gpu_from_config_before_auto_scaling():
    zoo = {"SOLVER": {"IMS_PER_BATCH": 16, "REFERENCE_WORLD_SIZE": 8}}
    assert images_per_gpu(zoo, 1) == (2, 1)  # Detectron2 scaled the run to 2 images on 1 GPU
    assert images_per_gpu(zoo, 8) == (2, 8)
    plain = {"SOLVER": {"IMS_PER_BATCH": 16, "REFERENCE_WORLD_SIZE": 0}}
    assert images_per_gpu(plain, 4) == (4, 4)
    assert images_per_gpu(plain, None) == (None, None)


def test_metrics_reader_merges_resumed_lines_and_names_corrupt_lines(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 19, "total_loss": 2.0}\n{"iteration": 39, "total_loss": 1.5}\n'
                    '{"iteration": 39, "total_loss": 1.4, "time": 0.5}\n{"iteration": 59, "tot')
    rows = read_metrics(str(path))  # resumed run re-wrote iteration 39; the last line was cut off
    assert rows == [{"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.4, "time": 0.5}]
    path.write_text('{"iteration": 19}\nnot json\n{"iteration": 39}\n')
    with pytest.raises(ValueError, match=r"metrics.json:2 is not a JSON object"):
        read_metrics(str(path))


def test_missing_or_foreign_directory_is_refused(tmp_path):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_run(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(RunNotFoundError, match=r"no config.yaml.*x\.txt"):
        load_run(str(tmp_path))


def test_inference_timer_counts_images_and_leaves_out_warmup_and_training(tmp_path, monkeypatch):
    import torch

    from smallbn_d2.engine import resources

    clock = iter(range(0, 1000, 1))  # every perf_counter() call advances 1 s: each call lasts 1 s
    monkeypatch.setattr(resources.time, "perf_counter", lambda: float(next(clock)))
    model = torch.nn.Linear(1, 1)
    model.forward = lambda inputs: inputs  # Detectron2 models take a list of dataset dicts
    with resources.InferenceTimer(model, warmup_calls=2) as timer:
        model.train()
        model([{}] * 3)  # training call: not timed
        model.eval()
        for n in (1, 1, 2, 2, 2):
            model([{}] * n)
    model([{}])  # after the context: not timed
    assert [n for n, _ in timer.calls] == [1, 1, 2, 2, 2]
    assert timer.num_images == 6 and timer.seconds_per_image == pytest.approx(3 / 6)
    record = resources.append_inference_time(str(tmp_path), timer, ["coco_2017_val"], "cpu", 1, 7)
    lines = (tmp_path / "inference" / "inference_time.json").read_text().splitlines()
    assert json.loads(lines[-1]) == record and record["iteration"] == 7


# ----------------------------------------------------------------------------- LazyConfig runs
@pytest.mark.slow
def test_compare_runs_reads_a_lazyconfig_run_folder(tmp_path):
    """A folder written by tools/lazyconfig_train_net.py (its config.yaml holds Detectron2 objects
    under !!python tags): the table describes the run from the config's own fields and shows the
    AP of its metrics.json."""
    run = tmp_path / "lazy_run"
    lazy_config = os.path.join(REPO, "configs", "test", "tiny_mask_rcnn_CBN_lazy.py")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"),
                           "--config-file", lazy_config, "train.max_iter=2", f"train.output_dir={run}",
                           "model.roi_heads.mask_head.conv_norm=MABN",  # the table must read the override
                           "model.roi_heads.box_predictor.test_score_thresh=0.0"],  # real detections: finite AP
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "!!python/object" in (run / "config.yaml").read_text()  # what yaml.safe_load refuses

    out_dir = tmp_path / "cmp"
    _compare_runs_module().main([str(run), "--output-dir", str(out_dir)])
    markdown = (out_dir / "comparison.md").read_text()
    row = {r["run"]: r for r in _table(markdown, "Box AP (bbox)")}["lazy_run"]
    assert row["model"] == "Mask R-CNN R18-FPN"
    assert row["norm"] == "FPN+box head: CBN, mask head: MABN, backbone: FrozenBN"
    assert row["img/GPU x GPUs"] == "2 x 1"  # dataloader.train.total_batch_size 2, one process
    assert row["schedule"] == "2 iterations"
    final = [r for r in _direct_rows(run) if "bbox/AP" in r][-1]
    assert math.isfinite(final["bbox/AP"])
    for metric in METRICS:  # APs/APm/APl are NaN when the val images have no object of that size
        if math.isfinite(final[f"bbox/{metric}"]):
            assert float(row[metric]) == pytest.approx(final[f"bbox/{metric}"], abs=5.1e-4)
        else:
            assert row[metric] == "-"
    assert (out_dir / "loss_curves.png").stat().st_size > 1000
