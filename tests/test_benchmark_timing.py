"""The benchmarks' shared inference timing (benchmarks.children.time_inference) and
their Timer: every model runs once per (repeat, image) in a rotated order, the timer's sync runs
around each call, and each model's first-image detections are counted untimed."""
import sys

from helpers import REPO

sys.path.insert(0, REPO)  # benchmarks/ is not installed (setup.py ships smallbn_d2 only)
from benchmarks.children import time_inference  # noqa: E402
from benchmarks.measure import Timer  # noqa: E402


class _Model:
    def __init__(self, name, n_det, log):
        self.name, self.n_det, self.log = name, n_det, log

    def __call__(self, batch):
        assert len(batch) == 1
        self.log.append((self.name, batch[0]["id"]))
        return [{"instances": list(range(self.n_det))}]


def test_time_inference_interleaves_in_rotated_order_and_counts_first_image_detections():
    log, syncs = [], []
    models = {"a|eval": _Model("a", 3, log), "b|eval": _Model("b", 0, log), "c|converted": _Model("c", 7, log)}
    images = [{"id": 0}, {"id": 1}]
    times, detections = time_inference(models, images, repeats=2, timer=lambda: Timer("wall", sync=lambda: syncs.append(1)))
    assert detections == {"a|eval": 3, "b|eval": 0, "c|converted": 7}
    untimed, timed = log[:3], log[3:]
    assert untimed == [("a", 0), ("b", 0), ("c", 0)]
    # step s runs the models rotated left by s, on image s % 2
    expected = []
    for step in range(4):
        order = ["a", "b", "c"][step % 3:] + ["a", "b", "c"][:step % 3]
        expected += [(m, step % 2) for m in order]
    assert timed == expected
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())
    assert len(syncs) == 2 * len(timed)  # before and after every timed call


def test_timer_syncs_before_reading_the_clock():
    events = []
    clock = iter([10.0, 12.5])
    timer = Timer("wall", sync=lambda: events.append("sync"))
    timer.clock = lambda: events.append("clock") or next(clock)
    with timer as t:
        events.append("work")
    assert events == ["sync", "clock", "work", "sync", "clock"] and t.s == 2.5
