"""Datasets root resolution and the error that says where it looked."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, env_update, cwd):
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_default_root_is_shared_subset_when_nothing_else(tmp_path):
    proc = run("""
        import os, smallbn_d2
        from detectron2.data import MetadataCatalog
        print(os.environ["DETECTRON2_DATASETS"]); print(MetadataCatalog.get("coco_2017_val").json_file)
        """, {}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root, json_file = proc.stdout.split()
    shared = os.path.realpath(os.path.join(REPO, "..", "shared", "datasets"))
    if not os.path.isdir(os.path.join(REPO, "datasets")):
        assert os.path.realpath(root) == shared
    assert json_file.startswith(root) and os.path.exists(json_file)


def test_cwd_datasets_folder_wins_over_shared(tmp_path):
    (tmp_path / "datasets").mkdir()
    proc = run("import os, smallbn_d2; print(os.environ['DETECTRON2_DATASETS'])", {}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.realpath(proc.stdout.strip()) == os.path.realpath(tmp_path / "datasets")


def test_env_var_wins_and_missing_data_names_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run("""
        import smallbn_d2
        from smallbn_d2.data import check_datasets_exist
        check_datasets_exist(["coco_2017_train"])
        """, {"DETECTRON2_DATASETS": str(missing)}, tmp_path)
    assert proc.returncode != 0
    assert "DatasetsNotFoundError" in proc.stderr
    assert str(missing) in proc.stderr and "instances_train2017.json" in proc.stderr


def test_nothing_found_lists_every_candidate(tmp_path, monkeypatch):
    from smallbn_d2.data import paths

    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "repo")
    candidates = paths.candidate_dataset_roots()
    assert candidates == [tmp_path / "datasets", tmp_path / "repo" / "datasets",
                          (tmp_path / "repo" / ".." / "shared" / "datasets").resolve()]
    assert paths.default_datasets_root() == candidates[0]  # none exists: the first, Detectron2's own default
