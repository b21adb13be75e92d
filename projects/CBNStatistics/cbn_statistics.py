#!/usr/bin/env python
"""How well do BN, Naive CBN and CBN estimate the window statistics under the current weights?

A diagnostic in the spirit of Figures 3 and 6 of Yao et al., "Cross-Iteration Batch
Normalization", CVPR 2021 (METHODS.md, "CBN", items 1-3 and 8). It trains a small Detectron2
detector (default: the tiny Mask R-CNN R18-FPN of ``configs/test``, BN in backbone, FPN and
heads) with SGD on the COCO 2017 sample shipped with smallbn_d2 (24 images; ``--dataset`` names
another), 2 images per iteration, and at *probe iterations* t compares, for chosen conv layers
and window sizes k = 1..K, four estimates of the statistics of the conv output x (the input of
the norm) over the window of iterations t-k+1..t with the *current* weights theta_t:

* ``BN``: the current batch only: mu_t, sigma_t^2.
* ``Naive``: Naive CBN (item 8): the stored statistics of the k-1 previous batches, computed
  under the weights of their own iterations, averaged with the current batch's.
* ``CBN``: the stored statistics compensated to theta_t by the first-order Taylor expansion in
  the layer's own conv weight (items 2-3), aggregated with the paper's ``max(nu, mu^2)`` rule.
  The gradients g_mu = d mu / d theta and g_nu = d nu / d theta come from
  :func:`smallbn_d2.layers.cbn_grad.stat_grads_closed_form` (item 5).
* ``Own-conv``: the previous batches' *stored conv inputs* re-run through the layer's current
  conv weight: the best any compensation restricted to the layer's own conv can do. Its gap to
  the truth is the part CBN ignores by design (weight changes of earlier layers, the assumption
  the paper checks in Figure 6); CBN's gap to it is the Taylor remainder (zero for the mean,
  which is linear in theta; second order for nu).

The *truth* re-runs the whole network (no grad, same RNG state as the original forward, so the
same random RoI sampling where the proposals agree) on the previous k-1 batches with theta_t.

Estimators are implemented here, from stored per-iteration records (mu, nu, g_mu, g_nu, the
conv weight and bias, and the conv input), not by running CBN layers, so this is an
independent check of the formulas of METHODS.md; the model itself trains with BN.

All statistics are per channel; window statistics weight each iteration equally (as CBN does):
mu_win = (1/k) sum_tau mu_{t-tau}, nu_win = (1/k) sum_tau nu_{t-tau}, var_win = nu_win - mu_win^2.
Relative error of an estimate ``e`` of a (C,) statistic ``s``: ||e - s||_2 / ||s||_2 over the
channels, averaged over the probe iterations. With k = 1 all estimators equal the truth.

Outputs (in ``--output-dir``): ``cbn_statistics.md`` (Markdown tables, also printed: averaged over
the probes per (layer, k), and per probe at k = K), ``cbn_statistics.png`` (error vs k per
estimator), ``cbn_statistics.json`` (all numbers per probe). A non-empty ``--output-dir`` is
refused unless ``--overwrite`` is given. The training set-up, the command line and the output
handling shared with MABNStatistics are in ``projects/diagnostics_common.py``.

Usage (from the repository root)::

    python projects/CBNStatistics/cbn_statistics.py --output-dir output/cbn_statistics
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smallbn_d2.layers.cbn_grad import check_supported_conv, stat_grads_closed_form
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
#: A backbone conv (ResNet res3), an FPN output conv and a box-head conv (4conv1fc).
DEFAULT_LAYERS = ("backbone.bottom_up.res3.0.conv1", "backbone.fpn_output3", "roi_heads.box_head.conv2")
ESTIMATORS = ("BN", "Naive", "CBN", "Own-conv")
OUTPUT_FILES = ("cbn_statistics.md", "cbn_statistics.png", "cbn_statistics.json")

logger = logging.getLogger("cbn_statistics")

__all__ = ["ConvRecorder", "window_estimates", "relative_error", "run", "format_table", "format_probe_table", "plot", "main"]


# ---------------------------------------------------------------------------------- recording
class ConvRecorder:
    """Captures the input of one ``nn.Conv2d`` during forwards run inside :meth:`capture`.

    Args:
        name: the conv's qualified name in the model (for messages).
        conv: the conv; it must use zero padding (see ``check_supported_conv``).
    Raises:
        ValueError: unsupported padding.
        RuntimeError (from :meth:`take`): the conv ran a number of times other than once in the
            captured forward (a conv shared across FPN levels, e.g. the RPN head, cannot be probed).
    """

    def __init__(self, name: str, conv: nn.Conv2d):
        check_supported_conv(conv)
        self.name, self.conv = name, conv
        self.inputs: List[torch.Tensor] = []
        self.active = False
        self._handle = conv.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.active:
            self.inputs.append(args[0].detach())

    def take(self) -> torch.Tensor:
        """The single input (N, C_in, H, W) of the last captured forward."""
        inputs, self.inputs = self.inputs, []
        if len(inputs) != 1:
            raise RuntimeError(f"conv {self.name!r} ran {len(inputs)} times in one forward; allowed: exactly once "
                               "(choose a conv that is not shared across FPN levels or skipped)")
        return inputs[0]

    def remove(self) -> None:
        self._handle.remove()


def conv_stats(conv: nn.Conv2d, u: torch.Tensor, weight=None, bias=None, grads: bool = False,
               grad_subsample: int = 1) -> Dict:
    """Per-channel mu = E[x], nu = E[x^2] of x = conv(u) in float64, optionally with their gradients.

    Args:
        conv: gives stride, padding, dilation, groups (and weight/bias unless given).
        u: conv input (N, C_in, H, W).
        weight, bias: the parameters to use (default: the conv's current ones).
        grads: also return ``g_mu`` (G, C_in/G, kh, kw) and ``g_nu`` (C, C_in/G, kh, kw) from
            :func:`stat_grads_closed_form` (METHODS.md CBN item 5).
        grad_subsample: its ``subsample`` (1: exact; s > 1: d nu / d theta from about 1/s of the
            output positions, ``MODEL.CBN.GRAD_SUBSAMPLE``).
    Returns:
        dict with float64 ``mu``, ``nu`` (C,) [and ``g_mu``, ``g_nu``].
    """
    w = (conv.weight if weight is None else weight).detach().double()
    b = conv.bias if bias is None else bias
    b = None if b is None else b.detach().double()
    with torch.no_grad():
        u64 = u.double()
        x = F.conv2d(u64, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        out = {"mu": x.mean(dim=(0, 2, 3)), "nu": x.pow(2).mean(dim=(0, 2, 3))}
        if grads:
            g = stat_grads_closed_form(conv, u64, x, subsample=grad_subsample)
            out["g_mu"], out["g_nu"] = g.mu_weight, g.nu_weight
    return out


# ---------------------------------------------------------------------------------- estimators
def _compensate(rec: Dict, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """First-order Taylor compensation of one stored entry to the current conv parameters
    (METHODS.md CBN item 2). rec holds mu, nu (C,), g_mu (G, D...), g_nu (C, D...), weight, bias."""
    C = rec["mu"].shape[0]
    G = rec["g_mu"].shape[0]
    dw = (weight.double() - rec["weight"]).reshape(G, C // G, -1)
    mu = rec["mu"] + torch.einsum("gd,gcd->gc", rec["g_mu"].reshape(G, -1), dw).reshape(C)
    nu = rec["nu"] + (rec["g_nu"].reshape(C, -1) * dw.reshape(C, -1)).sum(1)
    if bias is not None:
        db = bias.double() - rec["bias"]
        mu = mu + db
        nu = nu + 2.0 * rec["mu"] * db
    return mu, nu


def window_estimates(current: Dict, previous: Sequence[Dict], truth_prev: Sequence[Dict],
                     own_prev: Sequence[Dict], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Dict:
    """Window statistics (mean, variance; (C,) float64 each) for k = 1 .. 1 + len(previous).

    Args:
        current: stats of the current batch under the current weights (``mu``, ``nu``).
        previous: records of iterations t-1, t-2, ... (newest first): ``mu``, ``nu`` under their
            own weights, ``g_mu``, ``g_nu``, ``weight``, ``bias`` (float64).
        truth_prev: ``mu``, ``nu`` of the same batches re-run through the whole current network.
        own_prev: ``mu``, ``nu`` of their stored conv inputs through the current conv.
        weight, bias: the current conv parameters theta_t.
    Returns:
        ``{k: {"truth"|"BN"|"Naive"|"CBN"|"Own-conv": (mean, var)}}``. Aggregation of CBN (item 3):
        mean of mu, mean of max(nu, mu^2), var = nu_bar - mu_bar^2; the other estimators average
        exact (nu >= mu^2) per-batch statistics.
    """
    if not (len(previous) == len(truth_prev) == len(own_prev)):
        raise ValueError(f"previous/truth_prev/own_prev lengths differ: {len(previous)}, {len(truth_prev)}, "
                         f"{len(own_prev)}")
    comp = [_compensate(r, weight, bias) for r in previous]

    def agg(mus, nus, clamp=False):
        mu = torch.stack(mus).mean(0)
        nus = [torch.maximum(n, m * m) for m, n in zip(mus, nus)] if clamp else nus
        nu = torch.stack(nus).mean(0)
        return mu, nu - mu * mu

    cur_mu, cur_nu = current["mu"], current["nu"]
    out = {}
    for k in range(1, len(previous) + 2):
        j = k - 1
        out[k] = {
            "truth": agg([cur_mu] + [r["mu"] for r in truth_prev[:j]], [cur_nu] + [r["nu"] for r in truth_prev[:j]]),
            "BN": agg([cur_mu], [cur_nu]),
            "Naive": agg([cur_mu] + [r["mu"] for r in previous[:j]], [cur_nu] + [r["nu"] for r in previous[:j]]),
            "CBN": agg([cur_mu] + [c[0] for c in comp[:j]], [cur_nu] + [c[1] for c in comp[:j]], clamp=True),
            "Own-conv": agg([cur_mu] + [r["mu"] for r in own_prev[:j]], [cur_nu] + [r["nu"] for r in own_prev[:j]]),
        }
    return out


# ---------------------------------------------------------------------------------- training
def resolve_convs(model: nn.Module, names: Sequence[str]) -> List[ConvRecorder]:
    """Recorders for the convs ``names`` of ``model``.

    Raises:
        KeyError: a name is not a conv of the model (the message lists some that are).
    """
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    out = []
    for name in names:
        if not isinstance(modules.get(name), nn.Conv2d):
            raise KeyError(f"layer {name!r} is not an nn.Conv2d of the model; allowed: one of {len(convs)} convs, "
                           f"e.g. {', '.join(convs[:3] + convs[-3:])}")
        out.append(ConvRecorder(name, modules[name]))
    return out


def run(config_file: str = DEFAULT_CONFIG, layers: Sequence[str] = DEFAULT_LAYERS, iters: int = 60,
        probe_every: int = 10, max_window: int = 8, lr: Optional[float] = 0.02, seed: int = 0,
        opts: Sequence[str] = (), grad_subsample: int = 1, dataset: str = DEFAULT_DATASET) -> Dict:
    """Train and probe (see the module docstring).

    Args:
        config_file: Detectron2/smallbn_d2 YAML config of a GeneralizedRCNN detector.
        layers: qualified names of convs that run exactly once per forward.
        iters: training iterations (SGD steps, SOLVER.IMS_PER_BATCH images each), >= max_window.
        probe_every: probe at iterations t = probe_every, 2*probe_every, ... <= iters-1 with
            t >= max_window-1 (so that the window is full).
        max_window: K, the largest window size k (k = 1..K), >= 1.
        lr: SGD base learning rate (None: the config's SOLVER.BASE_LR); the config's warm-up and
            steps (those below ``iters``) apply.
        seed: torch/numpy seed and data order seed.
        opts: further ``KEY VALUE`` config overrides.
        dataset: the training set (``DATASETS.TRAIN``; default the shipped COCO sample).
        grad_subsample: s of CBN's d nu / d theta (1: exact; see :func:`conv_stats`).
    Returns:
        dict with ``config``, ``layers``, ``probes`` (iteration numbers), ``losses`` (total loss
        per iteration), ``errors[layer][estimator]["mean"|"var"]`` = list over k of the relative
        error averaged over probes, and ``per_probe`` (the same per probe).
    Raises:
        ValueError: invalid ``iters``, ``probe_every``, ``max_window``, ``lr`` (naming the value).
        FloatingPointError: the training loss became non-finite.
    """
    from detectron2.utils.events import EventStorage

    if not isinstance(max_window, int) or max_window < 1:
        raise ValueError(f"max_window = {max_window!r} is invalid; allowed: an integer >= 1")
    if not isinstance(iters, int) or iters < max_window:
        raise ValueError(f"iters = {iters!r} is invalid; allowed: an integer >= max_window ({max_window})")
    if not isinstance(probe_every, int) or probe_every < 1:
        raise ValueError(f"probe_every = {probe_every!r} is invalid; allowed: an integer >= 1")
    probes = [t for t in range(probe_every, iters, probe_every) if t >= max_window - 1]
    if not probes:
        raise ValueError(f"no probe iteration: probe_every = {probe_every} and max_window = {max_window} leave none "
                         f"below iters = {iters}; allowed: probe_every < iters and iters > max_window")

    cfg, model, optimizer, scheduler = setup_training(config_file, iters, lr, seed, opts, dataset)
    recorders = resolve_convs(model, layers)
    data = iter(train_loader(cfg, cfg.SOLVER.IMS_PER_BATCH, seed))

    def forward(batch, rng_state=None):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for r in recorders:
            r.active = True
        try:
            losses = model(batch)
        finally:
            for r in recorders:
                r.active = False
        return losses, [r.take() for r in recorders]

    history = deque(maxlen=max_window - 1)  # newest last: {"batch", "rng", "layers": [record per layer]}
    per_probe = []
    loss_log = []
    start = time.perf_counter()
    with EventStorage(0) as storage:
        for t in range(iters):
            storage.iter = t
            batch = next(data)
            rng = torch.get_rng_state()
            losses, inputs = forward(batch)
            total = sum(losses.values())
            check_finite_loss(total, t)
            records = []
            for r, u in zip(recorders, inputs):
                rec = conv_stats(r.conv, u, grads=max_window > 1, grad_subsample=grad_subsample)
                rec["weight"] = r.conv.weight.detach().double().clone()
                rec["bias"] = None if r.conv.bias is None else r.conv.bias.detach().double().clone()
                rec["input"] = u
                records.append(rec)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if t in probes:  # after backward (BN's backward checks its buffers' versions), before the step
                after = torch.get_rng_state()
                per_probe.append(_probe(t, model, recorders, records, list(history), forward))
                torch.set_rng_state(after)  # the probe's forwards leave the training's randomness unchanged
            optimizer.step()
            scheduler.step()
            loss_log.append(float(total.detach()))
            if max_window > 1:
                history.append({"batch": batch, "rng": rng, "layers": records})
            log_progress(logger, t, iters, loss_log[-1], optimizer, start)
    for r in recorders:
        r.remove()

    errors = {name: {e: {s: [sum(p["errors"][name][e][s][k] for p in per_probe) / len(per_probe)
                             for k in range(max_window)] for s in ("mean", "var")} for e in ESTIMATORS}
              for name in layers}
    return {"config": config_file, "opts": list(opts), "layers": list(layers), "iters": iters, "probes": probes,
            "max_window": max_window, "seed": seed, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "base_lr": cfg.SOLVER.BASE_LR, "losses": loss_log, "errors": errors, "per_probe": per_probe,
            "seconds": time.perf_counter() - start}


def _probe(t, model, recorders, current_records, history, forward) -> Dict:
    """Re-run the previous batches with the current weights and compute every estimator's error."""
    truth = []  # per previous iteration (newest first): list over layers of {"mu","nu"}
    with preserved_buffers(model), torch.no_grad():
        for entry in reversed(history):
            _, inputs = forward(entry["batch"], entry["rng"])
            truth.append([conv_stats(r.conv, u) for r, u in zip(recorders, inputs)])
    out = {"iteration": t, "errors": {}}
    for i, r in enumerate(recorders):
        previous = [entry["layers"][i] for entry in reversed(history)]
        own = [conv_stats(r.conv, rec["input"]) for rec in previous]
        est = window_estimates(current_records[i], previous, [tr[i] for tr in truth], own,
                               r.conv.weight.detach(), None if r.conv.bias is None else r.conv.bias.detach())
        out["errors"][r.name] = {
            e: {"mean": [relative_error(est[k][e][0], est[k]["truth"][0]) for k in sorted(est)],
                "var": [relative_error(est[k][e][1], est[k]["truth"][1]) for k in sorted(est)]}
            for e in ESTIMATORS
        }
    return out


# ---------------------------------------------------------------------------------- reporting
def format_table(result: Dict) -> str:
    """Markdown table: one row per (layer, k); relative errors of the mean and the variance."""
    from tabulate import tabulate

    headers = ["layer", "k"] + [f"mean {e}" for e in ESTIMATORS] + [f"var {e}" for e in ESTIMATORS]
    rows = []
    for name in result["layers"]:
        err = result["errors"][name]
        for k in range(1, result["max_window"] + 1):
            rows.append([name, k] + [f"{err[e]['mean'][k - 1]:.4f}" for e in ESTIMATORS]
                        + [f"{err[e]['var'][k - 1]:.4f}" for e in ESTIMATORS])
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def format_probe_table(result: Dict) -> str:
    """Markdown table at the largest window k = K: one row per (probe iteration, layer).

    Early probes show the effect of fast-changing weights (what CBN's burn-in avoids)."""
    from tabulate import tabulate

    K = result["max_window"]
    headers = ["iteration", "layer"] + [f"mean {e}" for e in ESTIMATORS] + [f"var {e}" for e in ESTIMATORS]
    rows = []
    for p in result["per_probe"]:
        for name in result["layers"]:
            err = p["errors"][name]
            rows.append([p["iteration"], name] + [f"{err[e]['mean'][K - 1]:.4f}" for e in ESTIMATORS]
                        + [f"{err[e]['var'][K - 1]:.4f}" for e in ESTIMATORS])
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def plot(result: Dict, path: str) -> None:
    """Save a PNG: rows mean/variance, one column per layer, relative error vs k per estimator."""
    plt = pyplot()
    layers = result["layers"]
    ks = list(range(1, result["max_window"] + 1))
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.5), squeeze=False)
    styles = {"BN": "k:o", "Naive": "r--s", "CBN": "b-^", "Own-conv": "g-.x"}
    for j, name in enumerate(layers):
        for i, stat in enumerate(("mean", "var")):
            ax = axes[i][j]
            for e in ESTIMATORS:
                ax.plot(ks, result["errors"][name][e][stat], styles[e], label=e, markersize=4)
            ax.set_xticks(ks)
            ax.set_xlabel("window size k (iterations)")
            ax.set_ylabel(f"relative error of the {'mean' if stat == 'mean' else 'variance'}")
            ax.set_title(name, fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Window statistics vs. truth under current weights ({len(result['probes'])} probes, "
                 f"{result['ims_per_batch']} images/iteration)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: Dict, output_dir: str) -> str:
    """Write the tables, plot and JSON (:data:`OUTPUT_FILES`) to ``output_dir``; return the tables."""
    K = result["max_window"]
    table = (f"Relative errors averaged over the probes at iterations {result['probes']}:\n\n" + format_table(result)
             + f"\n\nPer probe iteration, window size k = {K}:\n\n" + format_probe_table(result))
    save_outputs(result, output_dir, "cbn_statistics", table,
                 lambda d: plot(result, os.path.join(d, "cbn_statistics.png")))
    return table


def parse_args(argv=None):
    """The command line (``--help``)."""
    p = diagnostic_parser(__doc__.split("\n\n")[0], DEFAULT_CONFIG, DEFAULT_LAYERS,
                          "comma-separated qualified names of convs to probe")
    p.add_argument("--probe-every", type=int, default=10, help="probe every this many iterations")
    p.add_argument("--max-window", type=int, default=8, help="largest window size k")
    add_common_options(p, "output/cbn_statistics")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    """Command-line entry point; returns the result dict (see :func:`run`).

    Raises:
        OutputDirExistsError: ``--output-dir`` is not empty and ``--overwrite`` was not given.
    """
    args = parse_args(argv)
    result = run_and_write(args, lambda a: run(a.config_file, a.layers, a.iters, a.probe_every, a.max_window, a.lr,
                                               a.seed, a.opts, dataset=a.dataset),
                           write_outputs, os.path.relpath(__file__, REPO), argv)
    print(f"\nprobes at iterations {result['probes']}; {result['seconds']:.0f} s; outputs in {args.output_dir}")
    return result


if __name__ == "__main__":
    main()
