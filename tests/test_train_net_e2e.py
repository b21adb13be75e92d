"""End-to-end: tools/train_net.py trains and evaluates on the shared real COCO subset."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")


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
            "TEST.DETECTIONS_PER_IMAGE", "20", "OUTPUT_DIR", str(out)]
    proc = run_train_net(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, args, proc


def test_losses_finite_and_outputs_written(trained_run):
    out, _, _ = trained_run
    for name in ("log.txt", "metrics.json", "last_checkpoint", "config.yaml", "model_final.pth",
                 os.path.join("inference", "coco_instances_results.json")):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


def test_box_and_mask_ap_are_finite_numbers(trained_run):
    out, _, proc = trained_run
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    final = [r for r in rows if "bbox/AP" in r]
    assert final, "no evaluation results in metrics.json"
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = final[-1][f"{task}/{metric}"]
            assert isinstance(value, float) and math.isfinite(value), (task, metric, value)
    # the AP tables were printed
    assert "Evaluation results for bbox" in proc.stdout + proc.stderr
    assert "Evaluation results for segm" in proc.stdout + proc.stderr


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
