"""The end-of-run summary of tools/train_net.py (tools/run_report/summary.py)."""
import json
import os
import sys

from detectron2.config import CfgNode

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))  # run_report/ lives beside the tools, not in the package
from run_report.summary import (FIT_CHECK_LABEL, eval_summary, final_results, format_duration,  # noqa: E402
                                format_summary, loss_trend, run_summary)

VAL, TRAIN = "coco_2017_sample_val", "coco_2017_sample_train"


def test_final_results_reads_prefixed_keys_of_several_test_sets_from_the_last_evaluation():
    rows = [
        {"iteration": 9, f"{VAL}/bbox/AP": 1.0, f"{TRAIN}/bbox/AP": 2.0},
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 20, f"{VAL}/bbox/AP": 0.5, f"{VAL}/segm/AP": 0.25, f"{TRAIN}/bbox/AP": 4.0,
         f"{TRAIN}/segm/AP50": 8.0, "lr": 0.02},
    ]
    assert final_results(rows, [VAL, TRAIN]) == {
        VAL: {"bbox": {"AP": 0.5}, "segm": {"AP": 0.25}},
        TRAIN: {"bbox": {"AP": 4.0}, "segm": {"AP50": 8.0}},
    }


def test_final_results_with_one_test_set_uses_unprefixed_keys():
    rows = [{"iteration": 5, "bbox/AP": 1.5, "segm/APl": 2.5}, {"iteration": 6, "total_loss": 1.0}]
    assert final_results(rows, [VAL]) == {VAL: {"bbox": {"AP": 1.5}, "segm": {"APl": 2.5}}}
    assert final_results(rows[1:], [VAL]) == {}


def test_format_duration():
    assert format_duration(291.4) == "4 min 51 s"
    assert format_duration(3725) == "1 h 02 min 05 s"
    assert format_duration(42.04) == "42.0 s"


def test_summary_labels_the_training_set_as_fit_check_and_gives_every_number():
    results = {VAL: {"bbox": {"AP": 0.1234}, "segm": {"AP": 0.0456}},
               TRAIN: {"bbox": {"AP": 12.5}, "segm": {"AP": float("nan")}}}
    text = format_summary(results, [VAL, TRAIN], [TRAIN], 301.0, "output/main_job", "PY compare output/main_job X")
    lines = text.splitlines()
    val_line = next(line for line in lines if VAL in line)
    fit_line = next(line for line in lines if TRAIN in line)
    assert val_line.startswith("Validation") and "box AP 0.123" in val_line and "mask AP 0.046" in val_line
    assert FIT_CHECK_LABEL not in val_line.lower()
    assert FIT_CHECK_LABEL in fit_line.lower() and "box AP 12.500" in fit_line and "mask AP nan" in fit_line
    assert "Wall time: 5 min 01 s" in text
    assert "output/main_job" in text and "PY compare output/main_job X" in text


def test_summary_without_results_or_test_sets_says_so():
    assert "no results" in format_summary({}, [VAL], [TRAIN], 1.0, "o", "c")
    assert "DATASETS.TEST is empty" in format_summary({}, [], [TRAIN], 1.0, "o", "c")


def test_run_summary_reads_metrics_json_and_names_the_compare_tool(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"iteration": 19, "total_loss": 2.0}, {"iteration": 39, "total_loss": 1.5},
            {"iteration": 39, f"{VAL}/bbox/AP": 0.7, f"{VAL}/segm/AP": 0.3, f"{TRAIN}/bbox/AP": 9.0,
             f"{TRAIN}/segm/AP": 6.0}]
    (out / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CfgNode({"OUTPUT_DIR": str(out), "DATASETS": {"TRAIN": (TRAIN,), "TEST": (VAL, TRAIN)}})
    tool = os.path.join(REPO, "tools", "compare_runs.py")
    text = run_summary(cfg, 12.0, "/usr/bin/python3", tool)
    assert "box AP 0.700, mask AP 0.300" in text and "box AP 9.000, mask AP 6.000" in text
    assert "2.000 after 20 iterations, 1.500 after 40" in text
    assert f"/usr/bin/python3 {os.path.relpath(tool)} {out} OTHER_OUTPUT_DIR" in text
    assert os.path.isfile(tool)


def test_loss_trend_takes_the_first_and_last_finite_logged_loss_and_the_last_write_of_an_iteration():
    rows = [{"iteration": 19, "total_loss": 5.0}, {"iteration": 39, "total_loss": float("nan")},
            {"iteration": 39, "total_loss": 3.0}, {"iteration": 59, "bbox/AP": 1.0},
            {"iteration": 59, "total_loss": 2.5}, {"iteration": 59, "total_loss": 2.0}]
    assert loss_trend(rows) == (19, 5.0, 59, 2.0)
    assert loss_trend(rows[:1]) == (19, 5.0, 19, 5.0)  # a run of <= 20 iterations logs once
    assert loss_trend([{"iteration": 3, "bbox/AP": 1.0}]) is None
    infinite_first = [{"iteration": 5, "total_loss": float("inf")}, {"iteration": 9, "total_loss": 1.0}]
    assert loss_trend(infinite_first) == (9, 1.0, 9, 1.0)


def test_summary_gives_the_loss_trend_in_one_based_iteration_counts():
    text = format_summary({}, [VAL], [TRAIN], 1.0, "o", "c", losses=(19, 4.95, 479, 2.0123))
    assert "Training loss (total_loss as logged): 4.950 after 20 iterations, 2.012 after 480" in text
    assert "Training loss" not in format_summary({}, [VAL], [TRAIN], 1.0, "o", "c")
    once = format_summary({}, [VAL], [TRAIN], 1.0, "o", "c", losses=(19, 4.95, 19, 4.95))
    assert "Training loss (total_loss as logged): 4.950 after 20 iterations (logged once)" in once


def test_eval_summary_reads_the_results_of_one_or_several_test_sets():
    cfg = CfgNode({"OUTPUT_DIR": "out/eval", "MODEL": {"WEIGHTS": "run/model_final.pth"},
                   "DATASETS": {"TRAIN": (TRAIN,), "TEST": (VAL,)}})
    text = eval_summary(cfg, {"bbox": {"AP": 1.25, "AP50": 3.0}, "segm": {"AP": 0.5}}, 12.0)  # DefaultTrainer.test
    assert "Evaluated: run/model_final.pth" in text
    assert f"Validation ({VAL}): box AP 1.250, mask AP 0.500 (COCO AP, %)" in text
    assert "Wall time: 12.0 s (evaluation)" in text and "Outputs: out/eval" in text
    cfg.DATASETS.TEST = (VAL, TRAIN)
    text = eval_summary(cfg, {VAL: {"bbox": {"AP": 1.0}}, TRAIN: {"bbox": {"AP": 7.0}}}, 1.0)
    assert f"Validation ({VAL}): box AP 1.000" in text and f"({TRAIN}): box AP 7.000" in text
    assert "not accuracy" in text.splitlines()[-3]
