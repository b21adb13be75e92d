"""Detectron2's builtin dataset names keep Detectron2's rule ($DETECTRON2_DATASETS, else ./datasets):
smallbn_d2 sets nothing on import; missing files are reported with where they were looked for."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, env_update, cwd):
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_import_sets_no_datasets_root_and_registers_no_sample(tmp_path):
    (tmp_path / "datasets").mkdir()  # a folder smallbn_d2 used to pick up by itself
    proc = run("""
        import os, smallbn_d2
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from smallbn_d2.data import check_datasets_exist
        print(os.environ.get("DETECTRON2_DATASETS"))
        print(MetadataCatalog.get("coco_2017_val").json_file)
        print("coco_2017_sample_val" in DatasetCatalog.list())
        try:
            check_datasets_exist(["coco_2017_sample_val"])
        except KeyError as e:
            print("KeyError:", e)
        """, {}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env, json_file, sample_registered, error = proc.stdout.splitlines()
    assert env == "None"
    assert json_file == os.path.join("datasets", "coco", "annotations", "instances_val2017.json")  # Detectron2's default
    assert sample_registered == "False"  # registered by the tools, not on import
    assert "coco_2017_sample_val" in error and "register_coco_sample()" in error


@pytest.mark.slow
def test_env_var_is_the_root_and_missing_data_names_file_root_and_remedy(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run("""
        import smallbn_d2
        from detectron2.data import MetadataCatalog
        from smallbn_d2.data import check_datasets_exist
        print(MetadataCatalog.get("coco_2017_train").json_file, flush=True)
        check_datasets_exist(["coco_2017_train"])
        """, {"DETECTRON2_DATASETS": str(missing)}, tmp_path)
    assert proc.stdout.strip() == os.path.join(str(missing), "coco", "annotations", "instances_train2017.json")
    assert proc.returncode != 0
    assert "DatasetsNotFoundError" in proc.stderr
    assert str(missing) in proc.stderr and "instances_train2017.json" in proc.stderr
    assert "DETECTRON2_DATASETS" in proc.stderr and "coco_2017_sample_train" in proc.stderr


def test_coco_subset_skip_reason_names_what_is_missing(tmp_path, monkeypatch):
    import conftest

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    reason = conftest.builtin_coco_missing()
    assert reason and str(tmp_path) in reason and "coco/annotations/instances_train2017.json" in reason
    for rel in conftest.BUILTIN_COCO_FILES:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if not rel.endswith(".json") else path.write_text("{}")
    assert conftest.builtin_coco_missing() is None


@pytest.mark.coco_subset
def test_builtin_names_resolve_to_the_test_subset():
    """In the test process, tests/conftest.py points $DETECTRON2_DATASETS at the shared subset when
    it exists and the variable is unset."""
    from detectron2.data import MetadataCatalog

    root = os.environ["DETECTRON2_DATASETS"]
    json_file = MetadataCatalog.get("coco_2017_val").json_file
    assert json_file == os.path.join(root, "coco", "annotations", "instances_val2017.json")
    assert os.path.isfile(json_file)
