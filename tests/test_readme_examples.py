"""Every Python and bash code block of README.md and of the docs pages it hands over to
(:data:`PAGES`) runs as printed on a clone.

The blocks are read from the pages themselves, so the test and the pages cannot drift apart. Each
block runs in a fresh working directory that holds the repository's ``configs/`` and ``tools/``
(links) and ``.venv`` (a link to the running environment), so that relative paths resolve as from
the repository root and the outputs (``output/...``) land in a temporary folder: a Python block as
a script of the running interpreter, a bash block with ``bash -e`` and the environment's ``bin/``
first on ``PATH`` (so that ``python`` is the environment's). After the block, a check reads what it
produced (the trained model's layers, its output files). Blocks that install software or need GPUs
or the full COCO are not run: :data:`NOT_RUN` names each with the reason, and a block that is
neither run nor listed fails the test. The deployment and export blocks work on the main job's
own ``output/main_job/model_final.pth``: a set-up step (not part of the block) trains the main
job's config for 2 iterations to produce it, once per test session, and copies it into the
block's folder.
"""
import os
import re
import shutil
import subprocess
import sys
from typing import List, Tuple

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The pages whose blocks are run: README.md and the pages that took over its longer sections.
PAGES = ("README.md", "docs/INSTALL.md", "docs/TRAINING.md", "docs/CONVERT_NORM.md", "docs/TESTING.md")

#: Blocks that are not run, each identified by a text it contains, with the reason.
NOT_RUN = {
    "bash tools/install.sh && .venv/bin/python tools/train_net.py":
        "the two commands: install, the full main job (about 5 min) and the whole test suite; CI runs them",
    "VENV=$CONDA_PREFIX bash tools/install.sh": "installs into another environment",
    "git -C ~/detectron2 archive": "needs a checkout of Detectron2 main and runs the integration suite against it "
                                   "(CI does)",
    "configs/lazy/mask_rcnn_R_50_FPN_CBN.py --num-gpus 8": "needs 8 GPUs and COCO 2017",
    ".venv/bin/python tools/train_net.py --num-gpus 8 \\\n    --config-file": "needs 8 GPUs and COCO 2017",
    "for norm in SyncBN GN CBN MABN": "needs 8 GPUs and COCO 2017 (four 1x trainings)",
    "-m pytest tests -m": "runs (part of) the test suite itself",
}

#: Text of a block that works on the main job's outputs: it runs after the set-up step.
NEEDS_MAIN_JOB = "output/main_job/model_final.pth"
#: The set-up step: the main job's config, trained briefly, without evaluation (not in any block).
MAIN_JOB_SETUP = ["tools/train_net.py", "--config-file", "configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml",
                  "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"]

_BLOCK = re.compile(r"^```(python|bash)[ \t]*\n(.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> List[Tuple[int, str, str]]:
    """``(line, language, code)`` of every fenced ```python / ```bash block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def _page(name: str) -> str:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def _not_run_reason(code: str):
    reasons = [reason for key, reason in NOT_RUN.items() if key in code]
    return reasons[0] if reasons else None


BLOCKS = [(f"{page}:{line}", lang, code) for page in PAGES for line, lang, code in readme_blocks(_page(page))]
RUN = [(where, lang, code) for where, lang, code in BLOCKS if _not_run_reason(code) is None]


def test_block_reader_finds_python_and_bash_blocks_only():
    text = "a\n```python\nprint(1)\n```\n```yaml\nA: 1\n```\n```bash\necho x\n```\n```\nplain\n```\n"
    assert readme_blocks(text) == [(2, "python", "print(1)\n"), (8, "bash", "echo x\n")]


def test_every_exclusion_names_one_block():
    """A stale entry of NOT_RUN (its block changed or is gone) would silently stop excluding."""
    for key in NOT_RUN:
        hits = [where for where, _, code in BLOCKS if key in code]
        assert len(hits) == 1, f"NOT_RUN key {key!r} matches the blocks at {hits}"
    assert len(RUN) >= 8, f"only {len(RUN)} blocks are run"
    readme_run = [where for where, _, _ in RUN if where.startswith("README.md:")]
    assert len(readme_run) >= 4, f"only {readme_run} of README.md are run"


def _workdir(tmp_path):
    """A folder that looks like the repository root to the examples."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("configs", "tools", "projects"):
        os.symlink(os.path.join(REPO, name), work / name)
    os.symlink(sys.prefix, work / ".venv")  # .venv/bin/python: the running environment
    return work


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


@pytest.fixture(scope="session")
def main_job_output(tmp_path_factory):
    """``output/main_job/`` of a 2-iteration run of the main job's config (the set-up step)."""
    work = _workdir(tmp_path_factory.mktemp("main_job"))
    proc = subprocess.run([sys.executable] + MAIN_JOB_SETUP, cwd=str(work), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"set-up step failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = work / "output" / "main_job"
    assert (out / "model_final.pth").is_file()
    return out


# Checks of what a block produced: (text the block contains, check(workdir, stdout) -> None).
def _check_detectron2_trainer(work, out):
    assert "CHECK OK" in out, out[-2000:]
    assert (work / "output" / "my_detectron2_trainer" / "model_final.pth").is_file()


def _check_trainer(work, out):
    run = work / "output" / "my_trainer"
    assert (run / "model_final.pth").is_file()
    metrics = (run / "metrics.json").read_text()
    assert '"coco_2017_sample_val/bbox/AP"' in metrics and '"total_loss"' in metrics
    assert "== Summary ==" not in out  # the API prints no tool summary


def _check_convert_norm(work, out):
    assert "CHECK OK" in out, out[-2000:]


def _check_lazy_config(work, out):
    assert "CHECK OK" in out, out[-2000:]


def _check_collect_env(work, out):
    assert "torch" in out.lower() and "detectron2" in out.lower()


def _check_tiny_lazy(work, out):
    run = work / "output" / "tiny_lazy"
    assert (run / "model_final.pth").is_file() and "CrossIterationBatchNorm2d(32, window_size=3" in (
        run / "log.txt").read_text()


def _check_deploy(work, out):
    for name in ("main_job_frozen", "main_job_folded"):
        assert (work / "deploy" / f"{name}.pth").is_file() and (work / "deploy" / f"{name}.yaml").is_file()
    # the eval-only of the folded checkpoint: Detectron2's COCO table on the sample's val images
    results = work / "deploy" / "main_job_folded_eval" / "inference"
    found = sorted(p.parent.name for p in results.rglob("coco_instances_results.json"))
    assert found == ["coco_2017_sample_train", "coco_2017_sample_val"], found


def _check_export(work, out):
    assert (work / "exported" / "model.ts").is_file()


CHECKS = [
    ("--output deploy/main_job_folded.pth --fold", _check_deploy, ""),
    ("--format torchscript --fold --output exported/", _check_export, ""),
    ("class MyTrainer(DefaultTrainer)", _check_detectron2_trainer, (
        "\nfrom smallbn_d2.layers import CrossIterationBatchNorm2d\n"
        "layers = [m for m in trainer.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]\n"
        "assert trainer.iter == cfg.SOLVER.MAX_ITER == 10 and len(layers) > 20\n"
        "assert all(m.iteration == 9 for m in layers), 'the layers did not follow the trainer iteration'\n"
        "assert all(m.burn_in == 360 and m.window_size == 8 for m in layers)  # until the first LR step\n"
        "print('CHECK OK')\n")),
    ("trainer = Trainer(cfg)", _check_trainer, ""),
    ("smallbn_d2.convert_norm(model, \"CBN\"", _check_convert_norm, (
        "\nlayers = [m for m in model.modules() if type(m).__name__ == 'FrozenBatchNorm2d']\n"
        "assert len(layers) == 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())\n"
        "print('CHECK OK')\n")),
    ("model_zoo_config(\"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py\")", _check_lazy_config, (
        "\nassert model.backbone.norm == 'CBN' and smallbn['norms']['CBN']['burn_in'] == 21987\n"
        "print('CHECK OK')\n")),
    ("tools/collect_env.py", _check_collect_env, ""),
    ("configs/test/tiny_mask_rcnn_CBN_lazy.py", _check_tiny_lazy, ""),
]


def _check_for(code):
    found = [(check, extra) for key, check, extra in CHECKS if key in code]
    assert len(found) == 1, f"no (or several) checks for the README block:\n{code}"
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("where,lang,code", RUN, ids=[where for where, _, _ in RUN])
def test_readme_block_runs_as_printed(where, lang, code, tmp_path, request):
    check, extra = _check_for(code)
    work = _workdir(tmp_path)
    if NEEDS_MAIN_JOB in code:
        shutil.copytree(request.getfixturevalue("main_job_output"), work / "output" / "main_job")
    env = _env()
    if lang == "python":
        script = tmp_path / "example.py"
        script.write_text(code + extra)
        cmd = [sys.executable, str(script)]
    else:
        assert not extra
        cmd = ["bash", "-e", "-c", code]
    proc = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    check(work, proc.stdout)
