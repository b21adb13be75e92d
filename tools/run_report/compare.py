"""The Markdown tables (GitHub, ``tabulate``) and PNG plots (matplotlib, Agg: no display) of
tools/compare_runs.py, from runs read by :mod:`.run_metrics`. See docs/MODEL_ZOO.md, "Comparing runs".
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .published import published_for
from .run_metrics import METRICS, TASKS, Run

__all__ = ["TASK_TITLES", "HEADERS", "comparison_markdown", "plot_ap", "plot_losses"]

TASK_TITLES = {"bbox": "Box AP (bbox)", "segm": "Mask AP (segm)"}
_COST = ["train s/iter", "peak mem (MB)", "inference s/img"]
#: Columns of every table; AP metrics in percent, as Detectron2 reports them.
HEADERS = ["run", "model", "norm", "img/GPU x GPUs", "schedule"] + list(METRICS) + _COST
_MISSING = "-"
_NOTES = [
    "img/GPU x GPUs: images per process per iteration x processes (from config.yaml and log.txt).",
    "schedule: iterations trained (published rows: their setting).",
    "train s/iter: median of Detectron2's per-iteration time; peak mem: GPU = torch.cuda.max_memory_allocated, "
    "CPU RSS = peak resident set of the process; inference s/img: model forward time per image per process "
    "(first 5 calls left out).",
]


def _num(value: Optional[float], fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return _MISSING
    return format(value, fmt)


def _row(label: str, item, schedule: str, results: Dict[str, float], cost: List[str]) -> List[str]:
    """A table row of a :class:`~.run_metrics.Run` or a :class:`~.published.PublishedResult`."""
    ipg = _MISSING if item.images_per_gpu is None else format(item.images_per_gpu, "g")
    gpus = _MISSING if item.num_gpus is None else item.num_gpus
    return ([label, item.model, item.norm, f"{ipg} x {gpus}", schedule]
            + [_num(results.get(m), ".3f") for m in METRICS] + cost)


def _task_rows(runs: Sequence[Run], task: str, published: bool) -> List[List[str]]:
    """The runs that report ``task`` (for "bbox" every run, so that runs without evaluation still
    show their cost), then with ``published`` the published rows of the runs' model families."""
    rows = []
    for r in runs:
        if task == "bbox" or task in r.results:
            mem = _MISSING if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f} ({r.peak_memory_kind})"
            cost = [_num(r.train_s_per_iter, ".3g"), mem, _num(r.inference_s_per_image, ".3g")]
            schedule = _MISSING if r.iterations is None else f"{r.iterations} iterations"
            rows.append(_row(r.name, r, schedule, r.results.get(task, {}), cost))
    if published:
        for family in dict.fromkeys(r.family for r in runs):
            rows += [_row(f"published: {p.source}", p, p.setting, p.results[task], [_MISSING] * len(_COST))
                     for p in published_for(family, task)]
    return rows


def comparison_markdown(runs: Sequence[Run], published: bool = False) -> str:
    """One Markdown section per task (:data:`TASKS`) that some run reports, a table under
    :data:`HEADERS` each, then notes on the columns; ``published`` adds the published rows."""
    out = []
    for task in TASKS:
        rows = _task_rows(runs, task, published)
        if any(not r[0].startswith("published:") for r in rows):
            table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
            out.append(f"### {TASK_TITLES[task]}\n\n{table}\n")
    notes = list(_NOTES)
    if published:
        notes.append("published: numbers copied from the papers / released README (full R50 models, full COCO); "
                     "they are references, not runs of this project.")
        without = sorted({r.family for r in runs if not published_for(r.family, "bbox")})
        if without:
            notes.append(f"No published numbers for: {', '.join(without)}.")
    return "\n".join(out) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _plot_panels(path: str, panels: list, cols: int, panel_size: tuple) -> str:
    """Save ``panels`` ``(title, x label, y label, {run name: [(x, y)]})`` as a PNG grid; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, xlabel, ylabel, by_run) in zip(axes.flat, panels):
        for name, points in by_run.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, label=name)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ap(runs: Sequence[Run], path: str, tasks: Sequence[str] = TASKS) -> str:
    """Write a PNG of AP (%) against iterations trained, one panel per task some run evaluated (a
    run evaluated once is one marker). Returns ``path``.

    Raises:
        ValueError: no run has an AP curve in metrics.json.
    """
    panels = [(TASK_TITLES[t], "iterations trained", "AP (%)", {r.name: r.ap_curve(t) for r in runs}) for t in tasks]
    panels = [p for p in panels if any(p[3].values())]
    if not panels:
        raise ValueError("No run has evaluation results in metrics.json: no AP curve to plot "
                         "(train with TEST.EVAL_PERIOD > 0 or let the final evaluation run)")
    return _plot_panels(path, panels, len(panels), (6, 4.5))


def plot_losses(runs: Sequence[Run], path: str) -> str:
    """Write a PNG of ``total_loss`` and each ``loss_*`` (a panel per loss, a line per run, values
    as metrics.json holds them: medians over Detectron2's 20-iteration window). Returns ``path``.

    Raises:
        ValueError: no run has a loss in metrics.json.
    """
    by_key: Dict[str, Dict[str, list]] = {}
    for run in runs:
        for key, points in run.loss_curves().items():
            by_key.setdefault(key, {})[run.name] = points
    if not by_key:
        raise ValueError("No run has losses in metrics.json: nothing to plot")
    keys = sorted(by_key, key=lambda k: (k != "total_loss", k))
    return _plot_panels(path, [(k, "iteration", "", by_key[k]) for k in keys], min(3, len(keys)), (5, 3.6))
