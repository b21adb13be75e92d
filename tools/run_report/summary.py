"""The short summary tools/train_net.py prints at the end of a training or an ``--eval-only`` run:
COCO AP of every test set (a test set that is also a training set is a fit check, not accuracy),
the training loss early and late, the wall time, the outputs and the command that compares runs.
See docs/TRAINING.md ("The job ends with a short summary").
"""
from __future__ import annotations

import math
import os
import shlex
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .run_metrics import read_metrics, row_results

__all__ = ["FIT_CHECK_LABEL", "final_results", "format_duration", "format_summary", "loss_trend", "run_summary",
           "eval_summary"]

FIT_CHECK_LABEL = "fit check on the training images, not accuracy"
_TASK_NAMES = (("bbox", "box AP"), ("segm", "mask AP"))

#: dataset -> task ("bbox", "segm") -> metric ("AP", ...) -> value in percent
Results = Dict[str, Dict[str, Dict[str, float]]]


def final_results(rows: Sequence[Mapping], test_sets: Sequence[str]) -> Results:
    """The last evaluation in metrics.json ``rows`` (:func:`~.run_metrics.read_metrics`), per test
    set of ``test_sets`` (``cfg.DATASETS.TEST``); empty if no row has results."""
    for row in reversed(list(rows)):
        by_set = row_results(row)
        unprefixed = by_set.pop(None, None)  # Detectron2 prefixes the dataset only with several test sets
        if unprefixed and len(test_sets) == 1:
            by_set.setdefault(test_sets[0], {}).update(unprefixed)
        if by_set:
            return by_set
    return {}


def loss_trend(rows: Sequence[Mapping]) -> Optional[Tuple[int, float, int, float]]:
    """``(first_iteration, first_loss, last_iteration, last_loss)`` of the finite ``total_loss``
    values in metrics.json ``rows`` (0-based iterations as written, every 20 iterations by default:
    the median of the last 20). A run of at most 20 iterations has one, so first = last; None
    without any. Of an iteration written twice (a resumed run), the later value counts.
    """
    by_iter: Dict[int, float] = {}
    for row in rows:
        value = row.get("total_loss")
        if isinstance(value, (int, float)) and math.isfinite(value) and "iteration" in row:
            by_iter[int(row["iteration"])] = float(value)
    if not by_iter:
        return None
    first, last = min(by_iter), max(by_iter)
    return first, by_iter[first], last, by_iter[last]


def format_duration(seconds: float) -> str:
    """``"42.0 s"``, ``"4 min 51 s"`` or ``"1 h 02 min 05 s"`` for ``seconds`` >= 0."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(int(round(seconds)), 3600)
    m, sec = divmod(rest, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def _ap(results: Mapping[str, Mapping[str, float]], task: str) -> Optional[str]:
    value = results.get(task, {}).get("AP")
    if value is None:
        return None
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _result_lines(results: Results, test_sets: Sequence[str], train_sets: Sequence[str], missing: str) -> List[str]:
    """One line per test set: box and mask AP, labelled "Validation" or a fit check."""
    if not test_sets:
        return ["No evaluation: DATASETS.TEST is empty."]
    lines = []
    for name in test_sets:
        label = FIT_CHECK_LABEL[0].upper() + FIT_CHECK_LABEL[1:] if name in train_sets else "Validation"
        res = results.get(name)
        if not res:
            lines.append(f"{label} ({name}): {missing}")
            continue
        aps = [f"{title} {_ap(res, task)}" for task, title in _TASK_NAMES if _ap(res, task) is not None]
        lines.append(f"{label} ({name}): {', '.join(aps) or 'no box or mask AP'} (COCO AP, %)")
    return lines


def format_summary(results: Results, test_sets: Sequence[str], train_sets: Sequence[str], wall_s: float,
                   output_dir: str, compare_command: str,
                   losses: Optional[Tuple[int, float, int, float]] = None) -> str:
    """The summary of a training run (several lines, no trailing newline).

    Args:
        results: :func:`final_results`.
        test_sets, train_sets: ``cfg.DATASETS.TEST``, ``cfg.DATASETS.TRAIN``.
        wall_s: wall time of the run in seconds.
        compare_command: the command line that compares this run with others.
        losses: :func:`loss_trend`, or None for no loss line.
    """
    lines = ["", "== Summary =="] + _result_lines(results, test_sets, train_sets, "no results in metrics.json")
    if losses is not None:
        first_it, first, last_it, last = losses
        line = f"Training loss (total_loss as logged): {first:.3f} after {first_it + 1} iterations"
        lines.append(line + (" (logged once)" if first_it == last_it else f", {last:.3f} after {last_it + 1}"))
    lines.append(f"Wall time: {format_duration(wall_s)} (training and evaluation)")
    lines.append(f"Outputs: {output_dir} (log.txt, metrics.json, config.yaml, model_final.pth, inference/)")
    lines.append(f"Compare with other runs: {compare_command}")
    return "\n".join(lines)


def _short_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run_summary(cfg, wall_s: float, python: str, compare_tool: str) -> str:
    """:func:`format_summary` of the finished run of ``cfg`` (reads ``cfg.OUTPUT_DIR``/metrics.json).

    ``python`` (the interpreter) and ``compare_tool`` (the path of tools/compare_runs.py) make the
    compare command; both are shown relative to the working directory when they are inside it.
    """
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    rows = read_metrics(path) if os.path.isfile(path) else []
    test_sets, train_sets = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN)
    command = " ".join(shlex.quote(p) for p in (_short_path(python), _short_path(compare_tool), cfg.OUTPUT_DIR))
    return format_summary(final_results(rows, test_sets), test_sets, train_sets, wall_s, cfg.OUTPUT_DIR,
                          command + " OTHER_OUTPUT_DIR ...", losses=loss_trend(rows))


def _results_by_dataset(results: Mapping, test_sets: Sequence[str]) -> Results:
    """``DefaultTrainer.test``'s return (``{task: {metric: v}}`` for one test set, ``{dataset: {task:
    {metric: v}}}`` for several) as :data:`Results`, values that are not numbers left out."""
    def tasks(res: Mapping) -> Dict[str, Dict[str, float]]:
        return {task: {m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))}
                for task, metrics in res.items() if isinstance(metrics, Mapping)}

    if len(test_sets) == 1 and test_sets[0] not in results:
        return {test_sets[0]: tasks(results)}
    return {name: tasks(results[name]) for name in test_sets if isinstance(results.get(name), Mapping)}


def eval_summary(cfg, results: Mapping, wall_s: float) -> str:
    """The summary of an ``--eval-only`` run: the weights evaluated (``cfg.MODEL.WEIGHTS``), the AP
    lines of :func:`format_summary`, the wall time and the outputs.

    ``results``: what ``Trainer.test`` returned; ``wall_s``: wall time in seconds.
    """
    test_sets, train_sets = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN)
    lines = ["", "== Summary ==", f"Evaluated: {cfg.MODEL.WEIGHTS or '(no weights: the initialization)'}"]
    lines += _result_lines(_results_by_dataset(results or {}, test_sets), test_sets, train_sets, "no results")
    lines.append(f"Wall time: {format_duration(wall_s)} (evaluation)")
    lines.append(f"Outputs: {cfg.OUTPUT_DIR} (log.txt, config.yaml, inference/)")
    return "\n".join(lines)
