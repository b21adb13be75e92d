"""The short summary ``tools/train_net.py`` prints at the end of a training run.

It gives, from the run's ``metrics.json`` (Detectron2's ``COCOEvaluator`` results of the final
evaluation, AP in percent): box and mask AP of every test set; a test set that is also a training
set is labelled as a *fit check* (evaluation on the training images: it shows that the model
learns, it is not an accuracy figure); how the training loss went (``total_loss`` early and late in
the run: from scratch, a detector's loss falls well before its AP leaves zero); the wall time;
where the outputs are; and the command that compares runs (``tools/compare_runs.py``).
"""
from __future__ import annotations

import math
import os
import re
import shlex
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .run_metrics import read_metrics

__all__ = ["FIT_CHECK_LABEL", "final_results", "format_duration", "format_summary", "loss_trend", "run_summary",
           "results_by_dataset", "eval_summary"]

FIT_CHECK_LABEL = "fit check on the training images, not accuracy"
_KEY = re.compile(r"^(?:(?P<dataset>.+)/)?(?P<task>bbox|segm)/(?P<metric>AP|AP50|AP75|APs|APm|APl)$")
_TASK_NAMES = (("bbox", "box AP"), ("segm", "mask AP"))


def final_results(rows: Sequence[Mapping], test_sets: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The last evaluation in metrics.json rows, per test set: dataset -> task -> metric -> value.

    Detectron2 writes ``bbox/AP`` with one test set and ``<dataset>/bbox/AP`` with several.

    Args:
        rows: metrics.json rows (:func:`smallbn_d2.utils.run_metrics.read_metrics`).
        test_sets: ``cfg.DATASETS.TEST``.
    Returns:
        the results of the last row that has any (empty if there is none).
    """
    for row in reversed(list(rows)):
        out: Dict[str, Dict[str, Dict[str, float]]] = {}
        for key, value in row.items():
            m = _KEY.match(key)
            if not m or not isinstance(value, (int, float)):
                continue
            dataset = m.group("dataset")
            if dataset is None:
                if len(test_sets) != 1:
                    continue
                dataset = test_sets[0]
            out.setdefault(dataset, {}).setdefault(m.group("task"), {})[m.group("metric")] = float(value)
        if out:
            return out
    return {}


def loss_trend(rows: Sequence[Mapping]) -> Optional[Tuple[int, float, int, float]]:
    """``(first_iteration, first_loss, last_iteration, last_loss)``: the first and the last finite
    ``total_loss`` in metrics.json rows (Detectron2 writes, every 20 iterations by default, the
    median over the last 20 iterations; iterations 0-based as written). With one such row (a run
    of at most 20 iterations) first and last are that row; None when no row has one. A resumed
    run's repeated iteration counts: the row written last wins.

    Args:
        rows: metrics.json rows (:func:`smallbn_d2.utils.run_metrics.read_metrics`).
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
    """``"4 min 51 s"``, ``"1 h 02 min 05 s"`` or ``"42.0 s"`` for a duration in seconds (>= 0)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def _ap(results: Mapping[str, Mapping[str, float]], task: str) -> Optional[str]:
    value = results.get(task, {}).get("AP")
    if value is None:
        return None
    return "nan" if math.isnan(value) else f"{value:.3f}"


def format_summary(results: Mapping[str, Mapping[str, Mapping[str, float]]], test_sets: Sequence[str],
                   train_sets: Sequence[str], wall_s: float, output_dir: str, compare_command: str,
                   losses: Optional[Tuple[int, float, int, float]] = None) -> str:
    """The summary text (several lines, no trailing newline).

    Args:
        results: dataset -> task (``bbox``, ``segm``) -> metric -> value in percent (:func:`final_results`).
        test_sets, train_sets: ``cfg.DATASETS.TEST`` and ``cfg.DATASETS.TRAIN``; a test set that is
            also a training set is labelled :data:`FIT_CHECK_LABEL`.
        wall_s: wall time of the run in seconds.
        output_dir: where the outputs are.
        compare_command: the command line that compares this run with others.
        losses: :func:`loss_trend` of the run, or None (no line).
    """
    lines: List[str] = ["", "== Summary =="]
    if not test_sets:
        lines.append("No evaluation: DATASETS.TEST is empty.")
    for name in test_sets:
        res = results.get(name)
        label = f"{FIT_CHECK_LABEL[0].upper()}{FIT_CHECK_LABEL[1:]}" if name in train_sets else "Validation"
        if not res:
            lines.append(f"{label} ({name}): no results in metrics.json")
            continue
        aps = [f"{title} {_ap(res, task)}" for task, title in _TASK_NAMES if _ap(res, task) is not None]
        lines.append(f"{label} ({name}): {', '.join(aps) or 'no box or mask AP'} (COCO AP, %)")
    if losses is not None:
        first_it, first, last_it, last = losses
        if first_it == last_it:  # logged once
            lines.append(f"Training loss (total_loss as logged): {first:.3f} after {first_it + 1} iterations "
                         "(logged once)")
        else:
            lines.append(f"Training loss (total_loss as logged): {first:.3f} after {first_it + 1} iterations, "
                         f"{last:.3f} after {last_it + 1}")
    lines.append(f"Wall time: {format_duration(wall_s)} (training and evaluation)")
    lines.append(f"Outputs: {output_dir} (log.txt, metrics.json, config.yaml, model_final.pth, inference/)")
    lines.append(f"Compare with other runs: {compare_command}")
    return "\n".join(lines)


def _short_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run_summary(cfg, wall_s: float, python: str, compare_tool: str) -> str:
    """:func:`format_summary` of a finished run of ``cfg`` (reads ``cfg.OUTPUT_DIR/metrics.json``).

    Args:
        cfg: the run's config (``OUTPUT_DIR``, ``DATASETS.TRAIN``, ``DATASETS.TEST``).
        wall_s: wall time in seconds.
        python: the Python interpreter; compare_tool: path of ``tools/compare_runs.py``. Both are
            shown relative to the working directory when they are inside it.
    """
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    rows = read_metrics(path) if os.path.isfile(path) else []
    test_sets, train_sets = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN)
    command = " ".join(shlex.quote(p) for p in (_short_path(python), _short_path(compare_tool), cfg.OUTPUT_DIR))
    command += " OTHER_OUTPUT_DIR ..."
    return format_summary(final_results(rows, test_sets), test_sets, train_sets, wall_s, cfg.OUTPUT_DIR, command,
                          losses=loss_trend(rows))


def results_by_dataset(results: Mapping, test_sets: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """What ``DefaultTrainer.test`` returns, as dataset -> task -> metric -> value.

    Detectron2 returns ``{task: {metric: value}}`` for one test set and ``{dataset: {task:
    {metric: value}}}`` for several; values that are not numbers are left out.
    """
    def tasks(res: Mapping) -> Dict[str, Dict[str, float]]:
        return {task: {m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))}
                for task, metrics in res.items() if isinstance(metrics, Mapping)}

    if len(test_sets) == 1 and test_sets[0] not in results:
        return {test_sets[0]: tasks(results)}
    return {name: tasks(results[name]) for name in test_sets if isinstance(results.get(name), Mapping)}


def eval_summary(cfg, results: Mapping, wall_s: float) -> str:
    """The summary of an ``--eval-only`` run: the model evaluated (``MODEL.WEIGHTS``), box and mask
    AP of every test set (:func:`format_summary`'s lines; a test set that is also a training set
    is labelled a fit check), the wall time and where the outputs are.

    Args:
        cfg: the run's config (``MODEL.WEIGHTS``, ``OUTPUT_DIR``, ``DATASETS.TRAIN``/``TEST``).
        results: what ``Trainer.test`` returned (:func:`results_by_dataset`).
        wall_s: wall time in seconds.
    """
    test_sets, train_sets = list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN)
    text = format_summary(results_by_dataset(results or {}, test_sets), test_sets, train_sets, wall_s,
                          cfg.OUTPUT_DIR, "")
    lines = [line for line in text.splitlines() if not line.startswith(("Outputs:", "Compare with"))]
    lines.insert(2, f"Evaluated: {cfg.MODEL.WEIGHTS or '(no weights: the initialization)'}")
    lines = [line.replace("no results in metrics.json", "no results").replace("(training and evaluation)",
                                                                             "(evaluation)") for line in lines]
    lines.append(f"Outputs: {cfg.OUTPUT_DIR} (log.txt, config.yaml, inference/)")
    return "\n".join(lines)
