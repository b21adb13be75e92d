"""tools/collect_env.py's datasets lines follow Detectron2's rule and say what exists."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("collect_env", os.path.join(REPO, "tools", "collect_env.py"))
collect_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect_env)


def _datasets_lines(lines):
    return [l for l in lines if not l.startswith("dataset coco_2017_sample")]  # the shipped sample, if any


def test_unset_and_missing_root_is_said_clearly(tmp_path):
    lines = _datasets_lines(collect_env.datasets_report(environ={}, cwd=str(tmp_path)))
    assert lines[0] == "DETECTRON2_DATASETS: not set; Detectron2 uses ./datasets in the working directory"
    assert lines[1].startswith(f"datasets root in use: {tmp_path / 'datasets'} (does NOT exist): no datasets root found")
    assert "set DETECTRON2_DATASETS" in lines[1]
    assert len(lines) == 2


def test_set_root_lists_each_coco_file(tmp_path):
    root = tmp_path / "data"
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "annotations" / "instances_val2017.json").write_text("{}")
    (root / "coco" / "val2017").mkdir()
    lines = _datasets_lines(collect_env.datasets_report(environ={"DETECTRON2_DATASETS": str(root)}, cwd="/"))
    assert lines == [
        f"DETECTRON2_DATASETS: {root}",
        f"datasets root in use: {root} (exists)",
        "  coco/annotations/instances_train2017.json: missing",
        "  coco/annotations/instances_val2017.json: present",
        "  coco/train2017: missing",
        "  coco/val2017: present",
    ]


def test_relative_root_resolves_against_the_working_directory(tmp_path):
    (tmp_path / "d").mkdir()
    lines = collect_env.datasets_report(environ={"DETECTRON2_DATASETS": "d"}, cwd=str(tmp_path))
    assert lines[1] == f"datasets root in use: {tmp_path / 'd'} (exists)"
