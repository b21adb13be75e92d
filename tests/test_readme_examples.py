"""README's example for existing Detectron2 code runs: Detectron2's own get_cfg and DefaultTrainer
with the three additions, on the tiny config (the only change: the config file, shrunk for a CPU,
with the burn-in in epochs so that resolve_burn_in converts it, and trained on the COCO 2017 sample
shipped with the package, registered first with ``register_coco_sample()``)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")


def readme_block(marker: str) -> str:
    """The Python code block that follows ``<!-- example:<marker> ... -->`` in README.md."""
    text = open(os.path.join(REPO, "README.md")).read()
    match = re.search(r"<!-- example:" + re.escape(marker) + r"\b.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no example block {marker!r}"
    return match.group(1)


def test_existing_detectron2_code_example_trains(tmp_path):
    code = readme_block("existing-detectron2")
    merge = re.search(r'cfg\.merge_from_file\("[^"]+"\)', code)
    assert merge, "the example merges a config file"
    overrides = ["MODEL.RESNETS.NORM", "CBN", "MODEL.FPN.NORM", "MABN", "MODEL.ROI_BOX_HEAD.NORM", "CBN",
                 "MODEL.CBN.BURN_IN_ITERS", None, "MODEL.CBN.BURN_IN_EPOCHS", 0.1, "SOLVER.MAX_ITER", 3,
                 "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (), "DATALOADER.NUM_WORKERS", 0,
                 "DATASETS.TRAIN", ("coco_2017_sample_train",), "OUTPUT_DIR", str(tmp_path / "out")]
    code = code.replace(merge.group(0), "from smallbn_d2.data import register_coco_sample; register_coco_sample(); "
                        f"cfg.merge_from_file({TINY!r}); cfg.merge_from_list({overrides!r})")
    code += textwrap_check()
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "CHECK OK" in proc.stdout, proc.stdout[-2000:]


def textwrap_check() -> str:
    """Appended to the example: the model trained 3 iterations with configured, advancing layers."""
    return (
        "\nfrom smallbn_d2.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d\n"
        "layers = [m for m in trainer.model.modules() if isinstance(m, (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d))]\n"
        "assert trainer.iter == 3 and layers and all(m.iteration == 2 for m in layers)\n"
        "cbn = [m for m in layers if isinstance(m, CrossIterationBatchNorm2d)]\n"
        "assert cbn and all(m.burn_in is not None and m.burn_in > 0 for m in cbn)\n"
        "print('CHECK OK')\n"
    )
