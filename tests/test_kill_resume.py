"""A training run killed with SIGKILL at any moment resumes with ``--resume``.

``tools/train_net.py`` runs in a child process that kills itself (SIGKILL, nothing runs after it)
at a chosen moment: inside the write of a checkpoint (after half of its bytes), inside a training
step, inside the final evaluation. After each kill the output directory must name a complete
checkpoint in ``last_checkpoint`` and no partial file under a checkpoint's name; ``--resume``
must continue from the newest complete checkpoint, and the run must end with the full iteration
count and a loadable final model. Data: the COCO 2017 sample shipped with the package.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import SAMPLE_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # slow: trains detectors or runs tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
MAX_ITER = 8  # checkpoints (period 2) after iterations 1, 3, 5 and model_final after 7

# Runs tools/train_net.py after arranging a SIGKILL of this very process:
#   KILL_IN_SAVE=N  -> inside the N-th torch.save, after writing half of the bytes
#   KILL_AT_ITER=I  -> inside the training step of iteration I (after the forward pass)
#   KILL_IN_EVAL=1  -> inside the evaluation, at its first image
DRIVER = textwrap.dedent('''
    import io, os, runpy, signal, sys
    import torch
    import smallbn_d2  # noqa: F401  (what train_net.py imports first anyway)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if os.environ.get("KILL_IN_SAVE"):
        target, calls, real_save = int(os.environ["KILL_IN_SAVE"]), [0], torch.save
        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] != target:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()
        torch.save = save
    if os.environ.get("KILL_AT_ITER"):
        from detectron2.engine import SimpleTrainer
        target, real_step = int(os.environ["KILL_AT_ITER"]), SimpleTrainer.run_step
        def run_step(self):
            if self.iter == target:
                self.model(next(self._data_loader_iter))
                die()
            return real_step(self)
        SimpleTrainer.run_step = run_step
    if os.environ.get("KILL_IN_EVAL"):
        from detectron2.evaluation import COCOEvaluator
        COCOEvaluator.process = lambda self, inputs, outputs: die()
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


def _run(tmp_path, out, extra_env, resume):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [sys.executable, str(driver), os.path.join(REPO, "tools", "train_net.py"), "--config-file", TINY,
            *(["--resume"] if resume else []),
            "MODEL.RESNETS.NORM", "CBN", "MODEL.FPN.NORM", "CBN", "MODEL.CBN.WINDOW_SIZE", "2",
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
            *SAMPLE_ARGS, "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILL_")}
    env.update(extra_env)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


def _state(out):
    """(last checkpoint's name, its iteration), checking it is complete, and that every
    checkpoint file under its own name loads."""
    last = (out / "last_checkpoint").read_text().strip()
    for f in out.glob("*.pth"):
        torch.load(f, map_location="cpu", weights_only=False)  # a partial file would fail here
    data = torch.load(out / last, map_location="cpu", weights_only=False)
    return last, data["iteration"]


def test_killed_run_resumes_from_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    # 1. killed inside the second checkpoint write (model_0000003): the first one stays the last
    proc = _run(tmp_path, out, {"KILL_IN_SAVE": "2"}, resume=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _state(out) == ("model_0000001.pth", 1)
    assert not (out / "model_0000003.pth").exists()
    assert list(out.glob(".model_0000003.pth.*.partial"))  # the half-written bytes, under a hidden name

    # 2. resumed, then killed inside the step of iteration 6 (after the checkpoint of iteration 5)
    proc = _run(tmp_path, out, {"KILL_AT_ITER": "6"}, resume=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "model_0000001.pth" in (out / "log.txt").read_text()  # it resumed from there
    assert _state(out) == ("model_0000005.pth", 5)

    # 3. resumed, finishes training, killed inside the final evaluation
    proc = _run(tmp_path, out, {"KILL_IN_EVAL": "1"}, resume=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _state(out) == ("model_final.pth", MAX_ITER - 1)

    # 4. resumed once more: nothing left to train, the evaluation runs to the end
    proc = _run(tmp_path, out, {}, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _state(out) == ("model_final.pth", MAX_ITER - 1)
    assert (out / "inference" / "coco_instances_results.json").exists()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert not any(k.endswith(("window_mu_grad", "window_nu_grad")) for k in final)  # small final model
