#!/usr/bin/env python
"""How noisy are BN's four batch statistics at 2 images, and does an SMA over m iterations help?

A diagnostic in the spirit of Figures 2-4 of Yan et al., "Towards Stabilizing Batch Statistics
in Backward Propagation of Batch Normalization" (MABN), ICLR 2020 (METHODS.md, "MABN", items 1,
3 and 4). It trains a small Detectron2 detector with plain BN (default: the tiny Mask R-CNN
R18-FPN of ``configs/test``, BN in backbone, FPN and heads) with SGD on the COCO 2017 sample
shipped with smallbn_d2 (24 images; ``--dataset`` names another), 2 images per iteration, and
records, for chosen BN layers, at every iteration and per channel:

* forward: mu = E[x], sigma^2 = Var[x] (BN's statistics) and chi^2 = E[x^2] (MABN's);
* backward, with g_hat = dL/dy_hat = gamma * dL/dy (the gradient reaching the normalized
  value): g = E[g_hat] and Psi = E[y_hat * g_hat] (BN's, y_hat = (x - mu) / sqrt(sigma^2 + eps))
  and psi = E[z * g_hat] (MABN's, z = x / sqrt(chi^2 + eps)). The model normalizes with BN, so
  psi is MABN's backward statistic evaluated on BN's gradients (the paper's Figure 3 used a model
  with the modified normalization).

E[.] is the mean over the N x H x W positions of the batch. Detectron2's losses are means over
images (anchors, RoIs), so dL/dy shrinks as 1/N; the backward statistics are therefore reported
for the loss *summed* over images (dL/dy multiplied by the number of images), which puts batches
of 2 and 16 images on the same scale.

At *probe iterations* (every ``--probe-every`` iterations once m iterations have been recorded)
a large batch of 16 other training images is run forward and backward with the same weights,
without an optimizer step (BN buffers restored afterwards): its statistics are the reference.
Compared with it, per statistic: the small-batch value of that iteration, and the simple moving
average (SMA, MABN's SMAS) of the small-batch values of the last m iterations (current one
included). Relative error ||s - s_large||_2 / ||s_large||_2 over channels, averaged over probes.

Outputs (in ``--output-dir``): ``mabn_statistics.md`` (Markdown table, also printed),
``mabn_statistics.png`` (the norm ||s||_2 of each statistic over iterations: small batch, SMA,
large batch; as the paper's figures), ``mabn_statistics_error.png`` (relative errors at the
probes), ``mabn_statistics.json``. A non-empty ``--output-dir`` is refused unless ``--overwrite``.
The training set-up, the command line and the output handling shared with CBNStatistics are in
``projects/diagnostics_common.py``.

Usage (from the repository root)::

    python projects/MABNStatistics/mabn_statistics.py --output-dir output/mabn_statistics
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

# projects/ (the folder above this script's) holds what both diagnostics share; a script run as
# ``python projects/X/x.py`` has only its own folder on sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diagnostics_common import (  # noqa: E402
    DEFAULT_DATASET,
    add_common_options,
    check_finite_loss,
    diagnostic_parser,
    log_progress,
    preserved_buffers,
    pyplot,
    relative_error,
    run_and_write,
    save_outputs,
    setup_training,
    train_loader,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")
#: The analogue of the paper's layer1.0.bn1 (first block of res2), an FPN output norm and a
#: box-head norm (4conv1fc).
DEFAULT_LAYERS = ("backbone.bottom_up.res2.0.conv1.norm", "backbone.fpn_output3.norm", "roi_heads.box_head.conv2.norm")
STATISTICS = ("mu", "sigma2", "chi2", "g", "Psi", "psi")
FORWARD = ("mu", "sigma2", "chi2")
LABELS = {"mu": "mu = E[x]", "sigma2": "sigma^2 = Var[x]", "chi2": "chi^2 = E[x^2]", "g": "g = E[g_hat]",
          "Psi": "Psi = E[y_hat g_hat]", "psi": "psi = E[z g_hat]"}
OUTPUT_FILES = ("mabn_statistics.md", "mabn_statistics.png", "mabn_statistics_error.png", "mabn_statistics.json")

logger = logging.getLogger("mabn_statistics")

__all__ = ["NormRecorder", "batch_statistics", "relative_error", "run", "format_table", "plot", "main"]


# ---------------------------------------------------------------------------------- recording
class NormRecorder:
    """Captures the input x and the output gradient dL/dy of one ``nn.BatchNorm2d``.

    Active only inside forwards/backwards run while ``active`` is True.

    Args:
        name: the layer's qualified name (for messages).
        norm: an ``nn.BatchNorm2d`` in training mode.
    Raises:
        TypeError: ``norm`` is not an ``nn.BatchNorm2d``.
        RuntimeError (from :meth:`take`): the layer ran other than once in the captured step.
    """

    def __init__(self, name: str, norm: nn.Module):
        if not isinstance(norm, nn.BatchNorm2d):
            raise TypeError(f"layer {name!r} is a {type(norm).__name__}; allowed: an nn.BatchNorm2d (the model "
                            "trains with plain BN)")
        self.name, self.norm = name, norm
        self.active = False
        self.inputs: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []
        self._handles = [norm.register_forward_pre_hook(self._pre), norm.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.active:
            self.inputs.append(args[0].detach())

    def _post(self, module, args, output):
        if self.active and output.requires_grad:
            output.register_hook(lambda grad: self.grads.append(grad.detach()))

    def take(self):
        """(x, dL/dy) of the last captured step, each (N, C, H, W)."""
        inputs, grads = self.inputs, self.grads
        self.inputs, self.grads = [], []
        if len(inputs) != 1 or len(grads) != 1:
            raise RuntimeError(f"layer {self.name!r} ran forward {len(inputs)} and backward {len(grads)} times in one "
                               "step; allowed: exactly once (a layer shared across FPN levels cannot be probed)")
        return inputs[0], grads[0]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def batch_statistics(x: torch.Tensor, grad_y: torch.Tensor, gamma: torch.Tensor, eps: float,
                     num_images: int) -> Dict[str, torch.Tensor]:
    """The six per-channel batch statistics of a BN layer, float64, each of shape (C,).

    Args:
        x: the layer input (N, C, H, W).
        grad_y: dL/dy at its output, same shape, for Detectron2's (per-image mean) loss.
        gamma: the BN weight (C,) (None: ones).
        eps: BN's eps.
        num_images: images in the batch; grad_y is multiplied by it (loss summed over images).
    Returns:
        ``{"mu", "sigma2", "chi2", "g", "Psi", "psi"}`` (see the module docstring).
    Raises:
        ValueError: x has no elements or its shape differs from grad_y's.
    """
    if x.numel() == 0 or x.shape != grad_y.shape:
        raise ValueError(f"x {tuple(x.shape)} and grad_y {tuple(grad_y.shape)} must be equal and non-empty")
    dims = (0, 2, 3)
    x = x.double()
    g_hat = grad_y.double() * float(num_images)
    if gamma is not None:
        g_hat = g_hat * gamma.detach().double()[None, :, None, None]
    sigma2, mu = torch.var_mean(x, dim=dims, unbiased=False)
    chi2 = x.pow(2).mean(dim=dims)
    y_hat = (x - mu[None, :, None, None]) * torch.rsqrt(sigma2 + eps)[None, :, None, None]
    z = x * torch.rsqrt(chi2 + eps)[None, :, None, None]
    return {"mu": mu, "sigma2": sigma2, "chi2": chi2, "g": g_hat.mean(dim=dims),
            "Psi": (y_hat * g_hat).mean(dim=dims), "psi": (z * g_hat).mean(dim=dims)}


# ---------------------------------------------------------------------------------- training
def resolve_norms(model: nn.Module, names: Sequence[str]) -> List[NormRecorder]:
    """Recorders for the BN layers ``names`` (a conv's name selects its ``.norm``).

    Raises:
        KeyError: a name is not a module of the model (the message lists some BN layers).
        TypeError: the module is not an ``nn.BatchNorm2d``.
    """
    modules = dict(model.named_modules())
    bns = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    out = []
    for name in names:
        if name not in modules:
            raise KeyError(f"layer {name!r} is not a module of the model; allowed: one of {len(bns)} BN layers, "
                           f"e.g. {', '.join(bns[:3] + bns[-3:])}")
        module = modules[name]
        if not isinstance(module, nn.BatchNorm2d) and isinstance(getattr(module, "norm", None), nn.Module):
            name, module = name + ".norm", module.norm
        out.append(NormRecorder(name, module))
    return out


def run(config_file: str = DEFAULT_CONFIG, layers: Sequence[str] = DEFAULT_LAYERS, iters: int = 60,
        buffer_size: int = 16, probe_every: int = 5, large_batch: int = 16, lr: Optional[float] = 0.02,
        seed: int = 0, opts: Sequence[str] = (), dataset: str = DEFAULT_DATASET) -> Dict:
    """Train with the small batch, record, and compare with large batches (module docstring).

    Args:
        config_file: Detectron2/smallbn_d2 YAML config of a GeneralizedRCNN detector;
            SOLVER.IMS_PER_BATCH is the small batch (2 in the shipped configs).
        layers: qualified names of BN layers (or of convs holding one as ``.norm``) that run once
            per step.
        iters: training iterations (SGD steps).
        buffer_size: m, iterations in the SMA (MABN's SMAS), >= 1.
        probe_every: a large batch every this many iterations, from iteration m-1 on.
        large_batch: images in the reference batch (> SOLVER.IMS_PER_BATCH).
        lr: SGD base learning rate (None: the config's SOLVER.BASE_LR); the config's warm-up and
            steps (those below ``iters``) apply.
        seed: seed of torch/numpy and of the data order.
        opts: further ``KEY VALUE`` config overrides.
        dataset: the training set (``DATASETS.TRAIN``; default the shipped COCO sample).
    Returns:
        dict with ``layers``, ``iterations`` (0..iters-1), ``small`` and ``sma``
        (``[layer][stat]`` = list over iterations of ||s||_2; SMA None before m iterations),
        ``large`` (``[layer][stat]`` = list over probes of ||s||_2), ``probes``,
        ``errors[layer][stat]["small"|"sma"]`` (list over probes) and ``mean_errors``
        (``[layer][stat]["small"|"sma"]`` averaged over all probes, ``"small_late"|"sma_late"``
        over the probes in the second half of training, t >= iters // 2).
    Raises:
        ValueError: invalid arguments (naming the value and the allowed range).
        FloatingPointError: the training loss became non-finite.
    """
    from detectron2.utils.events import EventStorage

    if not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size = {buffer_size!r} is invalid; allowed: an integer >= 1")
    if not isinstance(probe_every, int) or probe_every < 1:
        raise ValueError(f"probe_every = {probe_every!r} is invalid; allowed: an integer >= 1")
    probes = list(range(buffer_size - 1, iters, probe_every))
    if not probes:
        raise ValueError(f"iters = {iters!r} is invalid; allowed: an integer >= buffer_size ({buffer_size})")

    cfg, model, optimizer, scheduler = setup_training(config_file, iters, lr, seed, opts, dataset)
    small = cfg.SOLVER.IMS_PER_BATCH
    if not isinstance(large_batch, int) or large_batch <= small:
        raise ValueError(f"large_batch = {large_batch!r} is invalid; allowed: an integer > SOLVER.IMS_PER_BATCH ({small})")
    recorders = resolve_norms(model, layers)
    names = [r.name for r in recorders]
    small_data = iter(train_loader(cfg, small, seed))
    large_data = iter(train_loader(cfg, large_batch, seed + 1))

    def step(batch):
        """Forward + backward with capture; returns (total loss, per-layer statistics)."""
        for r in recorders:
            r.active = True
        try:
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
        finally:
            for r in recorders:
                r.active = False
        stats = []
        for r in recorders:
            x, gy = r.take()
            stats.append(batch_statistics(x, gy, r.norm.weight, r.norm.eps, len(batch)))
        return total.detach(), stats

    norm_log = {n: {s: [] for s in STATISTICS} for n in names}
    sma_log = {n: {s: [] for s in STATISTICS} for n in names}
    large_log = {n: {s: [] for s in STATISTICS} for n in names}
    errors = {n: {s: {"small": [], "sma": []} for s in STATISTICS} for n in names}
    window = deque(maxlen=buffer_size)
    losses = []
    start = time.perf_counter()
    with EventStorage(0) as storage:
        for t in range(iters):
            storage.iter = t
            large_stats = None
            if t in probes:  # the reference: same weights, no optimizer step, BN buffers restored
                with preserved_buffers(model):
                    _, large_stats = step(next(large_data))
            total, stats = step(next(small_data))
            check_finite_loss(total, t)
            optimizer.step()
            scheduler.step()
            losses.append(float(total))
            window.append(stats)
            full = len(window) == buffer_size
            for i, n in enumerate(names):
                for s in STATISTICS:
                    norm_log[n][s].append(float(stats[i][s].norm()))
                    sma = torch.stack([w[i][s] for w in window]).mean(0) if full else None
                    sma_log[n][s].append(None if sma is None else float(sma.norm()))
                    if large_stats is not None:
                        ref = large_stats[i][s]
                        large_log[n][s].append(float(ref.norm()))
                        errors[n][s]["small"].append(relative_error(stats[i][s], ref))
                        errors[n][s]["sma"].append(relative_error(sma, ref))
            log_progress(logger, t, iters, float(total), optimizer, start)
    for r in recorders:
        r.remove()
    late = [i for i, t in enumerate(probes) if t >= iters // 2]

    def mean(v):
        return sum(v) / len(v) if v else math.nan

    mean_errors = {n: {s: {"small": mean(errors[n][s]["small"]), "sma": mean(errors[n][s]["sma"]),
                           "small_late": mean([errors[n][s]["small"][i] for i in late]),
                           "sma_late": mean([errors[n][s]["sma"][i] for i in late])}
                       for s in STATISTICS} for n in names}
    return {"config": config_file, "opts": list(opts), "layers": names, "iters": iters, "buffer_size": buffer_size,
            "ims_per_batch": small, "large_batch": large_batch, "base_lr": cfg.SOLVER.BASE_LR, "seed": seed,
            "probes": probes, "losses": losses, "small": norm_log, "sma": sma_log, "large": large_log,
            "errors": errors, "mean_errors": mean_errors, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------- reporting
def format_table(result: Dict) -> str:
    """Markdown table: per (layer, statistic), relative error of the small batch and of the SMA,
    averaged over all probes and over those of the second half of training."""
    from tabulate import tabulate

    m = result["buffer_size"]
    half = result["iters"] // 2
    small = f"small batch ({result['ims_per_batch']} img)"
    headers = ["layer", "statistic", "pass", small, f"SMA (m={m})", "SMA / small", f"{small}, t >= {half}",
               f"SMA, t >= {half}", f"SMA / small, t >= {half}"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b > 0 else "nan"

    rows = []
    for n in result["layers"]:
        for s in STATISTICS:
            e = result["mean_errors"][n][s]
            rows.append([n, LABELS[s], "forward" if s in FORWARD else "backward", f"{e['small']:.4f}",
                         f"{e['sma']:.4f}", ratio(e["sma"], e["small"]), f"{e['small_late']:.4f}",
                         f"{e['sma_late']:.4f}", ratio(e["sma_late"], e["small_late"])])
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def plot(result: Dict, path: str, error_path: str) -> None:
    """Save the two PNGs: norms over iterations (statistic x layer grid) and errors at the probes."""
    plt = pyplot()
    names, iters, probes, m = result["layers"], list(range(result["iters"])), result["probes"], result["buffer_size"]
    fig, axes = plt.subplots(len(STATISTICS), len(names), figsize=(4.2 * len(names), 2.3 * len(STATISTICS)),
                             squeeze=False, sharex=True)
    for j, n in enumerate(names):
        for i, s in enumerate(STATISTICS):
            ax = axes[i][j]
            ax.plot(iters, result["small"][n][s], color="tab:blue", lw=0.8,
                    label=f"small batch ({result['ims_per_batch']} img)")
            sma = [(t, v) for t, v in zip(iters, result["sma"][n][s]) if v is not None]
            ax.plot([t for t, _ in sma], [v for _, v in sma], color="tab:green", lw=1.2, label=f"SMA (m={m})")
            ax.plot(probes, result["large"][n][s], "o-", color="tab:orange", ms=3, lw=1,
                    label=f"large batch ({result['large_batch']} img)")
            ax.set_ylabel(f"||{s}||", fontsize=8)
            if i == 0:
                ax.set_title(n, fontsize=8)
            if i == len(STATISTICS) - 1:
                ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Norm over channels of BN's batch statistics during training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    colors = dict(zip(STATISTICS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    for j, n in enumerate(names):
        ax = axes[0][j]
        for s in STATISTICS:
            ax.plot(probes, result["errors"][n][s]["small"], ":", color=colors[s], marker=".")
            ax.plot(probes, result["errors"][n][s]["sma"], "-", color=colors[s], label=s)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error vs large batch")
        ax.set_title(n, fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, title=f"solid: SMA (m={m}); dotted: small batch", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(error_path, dpi=100)
    plt.close(fig)


def write_outputs(result: Dict, output_dir: str) -> str:
    """Write the table, the two plots and the JSON (:data:`OUTPUT_FILES`) to ``output_dir``;
    return the table."""
    table = (f"Relative error vs. the large batch ({result['large_batch']} images), averaged over the probes at "
             f"iterations {result['probes']}:\n\n" + format_table(result))
    save_outputs(result, output_dir, "mabn_statistics", table,
                 lambda d: plot(result, os.path.join(d, "mabn_statistics.png"),
                                os.path.join(d, "mabn_statistics_error.png")))
    return table


def parse_args(argv=None):
    """The command line (``--help``)."""
    p = diagnostic_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, DEFAULT_LAYERS,
                          "comma-separated qualified names of BN layers (or of convs holding one as .norm)")
    p.add_argument("--buffer-size", type=int, default=16, help="m, iterations in the SMA")
    p.add_argument("--probe-every", type=int, default=5, help="a large batch every this many iterations")
    p.add_argument("--large-batch", type=int, default=16, help="images in the reference batch")
    add_common_options(p, "output/mabn_statistics")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    """Command-line entry point; returns the result dict (see :func:`run`).

    Raises:
        OutputDirExistsError: ``--output-dir`` is not empty and ``--overwrite`` was not given.
    """
    args = parse_args(argv)
    result = run_and_write(args, lambda a: run(a.config_file, a.layers, a.iters, a.buffer_size, a.probe_every,
                                               a.large_batch, a.lr, a.seed, a.opts, dataset=a.dataset),
                           write_outputs, os.path.relpath(__file__, REPO), argv)
    print(f"\nlarge batches at iterations {result['probes']}; {result['seconds']:.0f} s; outputs in {args.output_dir}")
    return result


if __name__ == "__main__":
    main()
