"""End-to-end: tools/train_net.py trains and evaluates on the COCO 2017 sample shipped with the
package (no other data: $DETECTRON2_DATASETS points nowhere), with the fit check on the training
images, and prints its summary."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")


SAMPLE_DATASETS = ["DATASETS.TRAIN", "('coco_2017_sample_train',)",
                   "DATASETS.TEST", "('coco_2017_sample_val', 'coco_2017_sample_train')"]


def run_train_net(args, env=None):
    return subprocess.run([sys.executable, TRAIN_NET] + args, cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    args = ["--config-file", TINY, "MODEL.RESNETS.NORM", "CBN", "MODEL.FPN.NORM", "CBN",
            "MODEL.ROI_BOX_HEAD.NORM", "CBN", "MODEL.ROI_MASK_HEAD.NORM", "CBN",
            "MODEL.CBN.WINDOW_SIZE", "2", "MODEL.CBN.BURN_IN_ITERS", "3",
            "SOLVER.MAX_ITER", "6", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "TEST.DETECTIONS_PER_IMAGE", "20", *SAMPLE_DATASETS, "OUTPUT_DIR", str(out)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path_factory.mktemp("no_datasets") / "nowhere"))
    proc = run_train_net(args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, args, proc


def test_losses_finite_and_outputs_written(trained_run):
    out, _, _ = trained_run
    for name in ("log.txt", "metrics.json", "last_checkpoint", "config.yaml", "model_final.pth"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


def test_each_test_set_keeps_its_own_predictions(trained_run):
    """Two test sets: each one's predictions go to inference/<dataset>/, and each file holds
    predictions for that dataset's images only (the second does not replace the first)."""
    from detectron2.data import DatasetCatalog

    from smallbn_d2.data import register_coco_sample

    out, _, _ = trained_run
    register_coco_sample()
    for name in ("coco_2017_sample_val", "coco_2017_sample_train"):
        path = out / "inference" / name / "coco_instances_results.json"
        assert path.exists(), path
        predicted = {p["image_id"] for p in json.loads(path.read_text())}
        images = {d["image_id"] for d in DatasetCatalog.get(name)}
        assert predicted and predicted <= images, (name, sorted(predicted - images)[:5])
    assert not (out / "inference" / "coco_instances_results.json").exists()


def test_box_and_mask_ap_are_finite_numbers(trained_run):
    out, _, proc = trained_run
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    final = [r for r in rows if "coco_2017_sample_val/bbox/AP" in r]  # <dataset>/: several test sets
    assert final, "no evaluation results in metrics.json"
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = final[-1][f"coco_2017_sample_val/{task}/{metric}"]
            assert isinstance(value, float) and math.isfinite(value), (task, metric, value)
    # the AP tables were printed
    assert "Evaluation results for bbox" in proc.stdout + proc.stderr
    assert "Evaluation results for segm" in proc.stdout + proc.stderr


def test_both_test_sets_evaluated_and_summary_printed(trained_run):
    out, _, proc = trained_run
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    final = [r for r in rows if "coco_2017_sample_val/bbox/AP" in r][-1]
    for name in ("coco_2017_sample_val", "coco_2017_sample_train"):
        for task in ("bbox", "segm"):
            assert math.isfinite(final[f"{name}/{task}/AP"]), (name, task)
    summary = proc.stdout[proc.stdout.index("== Summary =="):]
    val = f"box AP {final['coco_2017_sample_val/bbox/AP']:.3f}, mask AP {final['coco_2017_sample_val/segm/AP']:.3f}"
    fit = f"box AP {final['coco_2017_sample_train/bbox/AP']:.3f}, mask AP {final['coco_2017_sample_train/segm/AP']:.3f}"
    assert f"Validation (coco_2017_sample_val): {val}" in summary
    assert f"Fit check on the training images, not accuracy (coco_2017_sample_train): {fit}" in summary
    assert "Wall time:" in summary and str(out) in summary
    assert "tools/compare_runs.py" in summary


def test_second_run_into_same_output_dir_is_refused(trained_run):
    out, args, _ = trained_run
    before = sorted(os.listdir(out))
    mtime = (out / "model_final.pth").stat().st_mtime
    proc = run_train_net(args)
    assert proc.returncode != 0
    msg = proc.stdout + proc.stderr
    assert "is not empty" in msg and str(out) in msg and "--resume" in msg
    assert sorted(os.listdir(out)) == before
    assert (out / "model_final.pth").stat().st_mtime == mtime


def test_unknown_norm_name_is_named_in_error(tmp_path):
    proc = run_train_net(["--config-file", TINY, "MODEL.FPN.NORM", "CBM", "SOLVER.MAX_ITER", "1",
                          "OUTPUT_DIR", str(tmp_path / "bad")])
    assert proc.returncode != 0
    msg = proc.stdout + proc.stderr
    assert "'CBM'" in msg and "CBN" in msg and "MABN" in msg and "GN" in msg
