"""Markdown tables and PNG plots comparing runs read by :mod:`smallbn_d2.utils.run_metrics`.

Used by ``tools/compare_runs.py``. Tables are GitHub Markdown (``tabulate``), plots matplotlib
(Agg backend: no display needed).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .published import PublishedResult, published_for
from .run_metrics import METRICS, TASKS, Run

__all__ = ["TASK_TITLES", "HEADERS", "task_rows", "markdown_table", "comparison_markdown", "plot_ap",
           "plot_losses"]

TASK_TITLES = {"bbox": "Box AP (bbox)", "segm": "Mask AP (segm)"}
_COST = ["train s/iter", "peak mem (MB)", "inference s/img"]
#: Columns of every table; AP metrics in percent, as Detectron2 reports them.
HEADERS = ["run", "model", "norm", "img/GPU x GPUs", "schedule"] + list(METRICS) + _COST
_MISSING = "-"


def _num(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _MISSING
    return format(value, fmt)


def _batch(images_per_gpu: Optional[float], gpus: Optional[int]) -> str:
    ipg = _MISSING if images_per_gpu is None else format(images_per_gpu, "g")
    return f"{ipg} x {_MISSING if gpus is None else gpus}"


def _schedule(run: Run) -> str:
    return _MISSING if run.iterations is None else f"{run.iterations} iterations"


def _run_row(run: Run, task: str) -> List[str]:
    res = run.results.get(task, {})
    mem = _MISSING if run.peak_memory_mb is None else f"{run.peak_memory_mb:.0f} ({run.peak_memory_kind})"
    return ([run.name, run.model, run.norm, _batch(run.images_per_gpu, run.num_gpus), _schedule(run)]
            + [_num(res.get(m), ".3f") for m in METRICS]
            + [_num(run.train_s_per_iter, ".3g"), mem, _num(run.inference_s_per_image, ".3g")])


def _published_row(p: PublishedResult, task: str) -> List[str]:
    res = p.results[task]
    return ([f"published: {p.source}", p.model, p.norm, _batch(p.images_per_gpu, p.num_gpus), p.setting]
            + [_num(res.get(m), ".3f") for m in METRICS] + [_MISSING] * len(_COST))


def task_rows(runs: Sequence[Run], task: str, published: bool = False) -> List[List[str]]:
    """Rows of the ``task`` table: the runs that report ``task`` (for "bbox": every run, so that
    runs without evaluation still show their cost), then, with ``published``, the published rows
    of the runs' model families.

    Raises:
        ValueError: ``task`` not in :data:`~smallbn_d2.utils.run_metrics.TASKS`.
    """
    if task not in TASKS:
        raise ValueError(f"task = {task!r} is invalid; allowed: {', '.join(TASKS)}")
    rows = [_run_row(r, task) for r in runs if task == "bbox" or task in r.results]
    if published:
        families = list(dict.fromkeys(r.family for r in runs))
        for family in families:
            if family in ("Faster R-CNN", "Mask R-CNN", "RetinaNet"):
                rows += [_published_row(p, task) for p in published_for(family, task)]
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    """GitHub Markdown table of ``rows`` under :data:`HEADERS`."""
    return tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)


def comparison_markdown(runs: Sequence[Run], published: bool = False) -> str:
    """One Markdown section per task with at least one run row, plus notes on the columns."""
    out = []
    for task in TASKS:
        rows = task_rows(runs, task, published)
        if not any(not r[0].startswith("published:") for r in rows):
            continue
        out.append(f"### {TASK_TITLES[task]}\n\n{markdown_table(rows)}\n")
    notes = ["img/GPU x GPUs: images per process per iteration x processes (from config.yaml and log.txt).",
             "schedule: iterations trained (published rows: their setting).",
             "train s/iter: median of Detectron2's per-iteration time; peak mem: GPU = "
             "torch.cuda.max_memory_allocated, CPU RSS = peak resident set of the process; inference "
             "s/img: model forward time per image per process (first 5 calls left out)."]
    if published:
        notes.append("published: numbers copied from the papers / released README (full R50 models, full COCO); "
                     "they are references, not runs of this project.")
    families_without = sorted({r.family for r in runs} - {"Faster R-CNN", "Mask R-CNN"})
    if published and families_without:
        notes.append(f"No published numbers for: {', '.join(families_without)}.")
    return "\n".join(out) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ap(runs: Sequence[Run], path: str, tasks: Sequence[str] = TASKS) -> str:
    """Write a PNG of AP against iteration, one panel per task that some run evaluated.

    A run evaluated once appears as a single marker. Returns ``path``.
    Raises:
        ValueError: no run has an AP curve in metrics.json (nothing to plot).
    """
    curves = {t: {r.name: r.ap_curve(t) for r in runs} for t in tasks}
    curves = {t: c for t, c in curves.items() if any(c.values())}
    if not curves:
        raise ValueError("No run has evaluation results in metrics.json: no AP curve to plot "
                         "(train with TEST.EVAL_PERIOD > 0 or let the final evaluation run)")
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (task, by_run) in zip(axes[0], curves.items()):
        for name, points in by_run.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_title(TASK_TITLES[task])
        ax.set_xlabel("iterations trained")
        ax.set_ylabel("AP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(runs: Sequence[Run], path: str) -> str:
    """Write a PNG of the loss curves (``total_loss`` and each ``loss_*``; one panel per loss, one
    line per run, values as metrics.json holds them: medians over Detectron2's 20-iteration window).

    Returns ``path``. Raises: ValueError: no run has a loss in metrics.json.
    """
    by_key: Dict[str, Dict[str, list]] = {}
    for run in runs:
        for key, points in run.loss_curves().items():
            by_key.setdefault(key, {})[run.name] = points
    if not by_key:
        raise ValueError("No run has losses in metrics.json: nothing to plot")
    keys = sorted(by_key, key=lambda k: (k != "total_loss", k))
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, points in by_key[key].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 20 else None,
                    label=name)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
