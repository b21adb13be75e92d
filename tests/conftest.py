"""Shared fixtures; smallbn_d2 is imported once for every test module.

Test data. The suite needs nothing beside the repository: the tests that train or run detectors
use the COCO 2017 sample shipped with the package (``coco_2017_sample_train`` /
``coco_2017_sample_val``: 24 + 24 real images, <= 320 px), registered here with
``smallbn_d2.data.register_coco_sample()``; ``tests/helpers.py``'s ``tiny_cfg`` and ``SAMPLE_ARGS``
put it in the tiny configs, and the tools run by the tests (tools/train_net.py, ...) register it
themselves. Only the tests that need Detectron2's builtin names (``coco_2017_train``,
``coco_2017_val``) on real COCO 2017 files (to check the sample
against its source or how ``$DETECTRON2_DATASETS`` resolves) are marked
``@pytest.mark.coco_subset`` and skip, with the reason, when those files are missing. The builtin
names resolve under ``$DETECTRON2_DATASETS``, read once when ``detectron2.data`` is first imported:
if it is unset and a ``datasets`` folder beside the repository (``<repo>/../shared/datasets``)
exists, it is set to that folder first thing here.

Markers (``pytest.ini``; docs/TESTING.md): ``slow`` (trains a detector, runs a tool or a second
Python in a subprocess, or runs Detectron2's COCO evaluation; ``pytest -m "not slow"`` is the fast
subset), ``integration`` (runs Detectron2 itself) and ``coco_subset`` (below).

``SMALLBN_D2_EXPECT_DETECTRON2=DIR`` (set by tools/test_detectron2_main.sh) makes the run fail at
start unless the imported ``detectron2`` package is ``DIR``: a run meant for Detectron2 main
cannot silently test the installed v0.6."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATASETS = os.path.realpath(os.path.join(REPO, "..", "shared", "datasets"))
if os.path.isdir(SHARED_DATASETS):
    os.environ.setdefault("DETECTRON2_DATASETS", SHARED_DATASETS)

import pytest  # noqa: E402
import torch  # noqa: E402

import smallbn_d2  # noqa: F401, E402
from smallbn_d2.data import register_coco_sample  # noqa: E402

register_coco_sample()  # coco_2017_sample_train / _val, for every test process (idempotent)

#: What the ``coco_subset`` tests read, relative to the datasets root.
BUILTIN_COCO_FILES = ("coco/annotations/instances_train2017.json", "coco/annotations/instances_val2017.json",
                      "coco/train2017", "coco/val2017")


def builtin_coco_missing():
    """Why the builtin COCO 2017 files are unusable (a sentence), or None if they are all there."""
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS") or "datasets")
    missing = [p for p in BUILTIN_COCO_FILES if not os.path.exists(os.path.join(root, p))]
    if not missing:
        return None
    return (f"needs the COCO 2017 files of coco_2017_train/coco_2017_val under $DETECTRON2_DATASETS "
            f"(now {root!r}); missing: {', '.join(missing)}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "coco_subset: needs Detectron2's builtin coco_2017_train/val files under $DETECTRON2_DATASETS "
                   "(real COCO 2017 files; skipped with the reason when missing)")
    expected = os.environ.get("SMALLBN_D2_EXPECT_DETECTRON2")
    if expected:
        import detectron2

        found = os.path.dirname(os.path.realpath(detectron2.__file__))
        if found != os.path.realpath(expected):
            raise pytest.UsageError(f"SMALLBN_D2_EXPECT_DETECTRON2={expected}, but detectron2 was imported from {found}")


def pytest_runtest_setup(item):
    if item.get_closest_marker("coco_subset") is not None:
        reason = builtin_coco_missing()
        if reason:
            pytest.skip(reason)


@pytest.fixture
def one_thread():
    """One intra-op thread: deterministic reductions, and no oversubscription on the CI's 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="CUDA not available"))])
def device(request):
    """The device of a layer test: "cpu" always, "cuda" when a GPU is present (skipped otherwise).
    Layers and inputs go to it; float64 references may stay on the CPU. On CUDA, TF32 is off
    during the test (float32 convs and matmuls at float32 precision, as on the CPU)."""
    if request.param != "cuda":
        yield torch.device(request.param)
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
