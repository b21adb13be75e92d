"""Tests of the statistics diagnostics in projects/ (CBNStatistics, MABNStatistics).

The estimator and statistics functions are checked against independent references (a direct
recompute of the conv, torch autograd through BatchNorm and through MABN's normalization);
the scripts themselves run end to end with tiny settings on the COCO 2017 sample shipped with the
package, the scripts' default training set.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallbn_d2  # noqa: F401  (compat fixes, dataset root)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cbn_stats = _load("projects/CBNStatistics/cbn_statistics.py", "cbn_statistics")
mabn_stats = _load("projects/MABNStatistics/mabn_statistics.py", "mabn_statistics")


# ------------------------------------------------------------------------------ CBN estimators
@pytest.mark.parametrize("conv_kw", [dict(stride=2, padding=1, bias=False), dict(padding=2, dilation=2, groups=2, bias=True)])
def test_cbn_window_estimates_against_recomputed_window(conv_kw):
    """Inputs fixed, only the conv weight moves: the truth is the conv re-run on the stored inputs.
    CBN's mean is then exact (mu is linear in theta), its variance has a second-order error only,
    and Naive CBN is off by the first-order change."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **conv_kw).double()
    inputs = [torch.randn(2, 4, 9, 11, dtype=torch.float64) + 0.5 for _ in range(4)]
    previous = []
    for u in reversed(inputs[1:]):  # the stored entries of iterations t-1, t-2, t-3 (newest first)
        with torch.no_grad():
            conv.weight.mul_(1.03).add_(0.003 * torch.randn_like(conv.weight))  # each entry: other weights
            if conv.bias is not None:
                conv.bias.add_(0.01 * torch.randn_like(conv.bias))
        rec = cbn_stats.conv_stats(conv, u, grads=True)
        rec["weight"] = conv.weight.detach().clone()
        rec["bias"] = None if conv.bias is None else conv.bias.detach().clone()
        previous.append(rec)
    previous = previous[::-1]
    with torch.no_grad():
        conv.weight.copy_(1.03 * previous[0]["weight"] + 0.003 * torch.randn_like(conv.weight))  # theta_t
    current = cbn_stats.conv_stats(conv, inputs[0])
    olds = inputs[1:]  # inputs of t-1, t-2, t-3

    def direct(u):  # independent reference: the conv output under theta_t
        x = F.conv2d(u, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return {"mu": x.mean((0, 2, 3)), "nu": (x * x).mean((0, 2, 3))}

    truth = [direct(u) for u in olds]
    est = cbn_stats.window_estimates(current, previous, truth, truth, conv.weight.detach(),
                                     None if conv.bias is None else conv.bias.detach())
    assert sorted(est) == [1, 2, 3, 4]
    for e in cbn_stats.ESTIMATORS:  # k = 1: every estimator is the current batch
        torch.testing.assert_close(est[1][e][0], est[1]["truth"][0], rtol=0, atol=0)
        torch.testing.assert_close(est[1][e][1], est[1]["truth"][1], rtol=0, atol=0)
    for k in (2, 3, 4):
        # union of the window's batches, equal weight per iteration, computed directly
        xs = [direct(u) for u in [inputs[0]] + olds[:k - 1]]
        mu = torch.stack([s["mu"] for s in xs]).mean(0)
        var = torch.stack([s["nu"] for s in xs]).mean(0) - mu ** 2
        torch.testing.assert_close(est[k]["truth"][0], mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(est[k]["CBN"][0], mu, rtol=1e-10, atol=1e-10)  # exact: linear in theta
        cbn_var = cbn_stats.relative_error(est[k]["CBN"][1], var)
        naive_var = cbn_stats.relative_error(est[k]["Naive"][1], var)
        naive_mu = cbn_stats.relative_error(est[k]["Naive"][0], mu)
        print(f"k={k}: var rel. error CBN {cbn_var:.2e}, Naive {naive_var:.2e}; mean Naive {naive_mu:.2e}")
        assert naive_mu > 1e-3 and naive_var > 1e-3
        assert cbn_var < 0.1 * naive_var


def test_relative_error():
    assert cbn_stats.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])) == math.inf
    assert cbn_stats.relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert cbn_stats.relative_error(torch.tensor([0.0, 4.0]), torch.tensor([3.0, 4.0])) == pytest.approx(0.6)


# ------------------------------------------------------------------------------ MABN statistics
def test_mabn_batch_statistics_against_autograd():
    """g and Psi reproduce BN's input gradient dL/dx = (g_hat - g - y_hat Psi) / sigma, and psi
    reproduces that of the modified normalization x / sqrt(E[x^2] + eps): (g_hat - z psi) / sqrt(chi2 + eps)."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 4, 6, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    gamma = torch.rand(5, dtype=torch.float64) + 0.5
    target = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    eps = 1e-5
    bn = nn.BatchNorm2d(5, eps=eps).double()
    with torch.no_grad():
        bn.weight.copy_(gamma)
    y = bn(x)
    y.retain_grad()
    (y * target).pow(2).sum().backward()
    s = mabn_stats.batch_statistics(x.detach(), y.grad, gamma, eps, num_images=1)
    var, mu = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(s["mu"], mu)
    torch.testing.assert_close(s["sigma2"], var)
    torch.testing.assert_close(s["chi2"], (x.detach() ** 2).mean((0, 2, 3)))
    c = lambda v: v[None, :, None, None]  # noqa: E731
    g_hat = y.grad * c(gamma)
    y_hat = (x.detach() - c(mu)) / c(torch.sqrt(var + eps))
    torch.testing.assert_close(x.grad, (g_hat - c(s["g"]) - y_hat * c(s["Psi"])) / c(torch.sqrt(var + eps)),
                               rtol=1e-10, atol=1e-10)

    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2 / torch.sqrt((x2 ** 2).mean((0, 2, 3), keepdim=True) + eps) * c(gamma)
    y2.retain_grad()
    (y2 * target).pow(2).sum().backward()
    s2 = mabn_stats.batch_statistics(x2.detach(), y2.grad, gamma, eps, num_images=1)
    z = x2.detach() / c(torch.sqrt(s2["chi2"] + eps))
    torch.testing.assert_close(x2.grad, (y2.grad * c(gamma) - z * c(s2["psi"])) / c(torch.sqrt(s2["chi2"] + eps)),
                               rtol=1e-10, atol=1e-10)
    # the per-image scaling multiplies the backward statistics only
    s3 = mabn_stats.batch_statistics(x2.detach(), y2.grad, gamma, eps, num_images=4)
    torch.testing.assert_close(s3["psi"], 4 * s2["psi"])
    torch.testing.assert_close(s3["chi2"], s2["chi2"])


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("script", ["projects/CBNStatistics/cbn_statistics.py",
                                    "projects/MABNStatistics/mabn_statistics.py"])
def test_scripts_run_as_commands_from_a_checkout(script, tmp_path):
    """Run as in their READMEs (``python projects/X/x.py``, only the script's folder on sys.path)
    they find projects/diagnostics_common.py; from another working directory too."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--output-dir" in proc.stdout and "--dataset" in proc.stdout


# keep the end-to-end runs cheap; on the shipped sample, the scripts' default data
SMALL_RUN = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96"]


def test_diagnostics_train_on_the_shipped_sample_unless_told_otherwise():
    """On a clone the only data is the shipped sample: the scripts' default; --dataset names
    another registered set (e.g. Detectron2's coco_2017_train), an unknown one is refused."""
    from smallbn_d2.data import DatasetNotRegisteredError
    from diagnostics_common import build_bn_config  # projects/, put on sys.path by the scripts

    for module in (cbn_stats, mabn_stats):
        assert module.parse_args([]).dataset == "coco_2017_sample_train"
        assert module.parse_args(["--dataset", "coco_2017_train"]).dataset == "coco_2017_train"
    cfg = build_bn_config(cbn_stats.DEFAULT_CONFIG, 3)
    assert cfg.DATASETS.TRAIN == ("coco_2017_sample_train",)
    other = build_bn_config(cbn_stats.DEFAULT_CONFIG, 3, dataset="coco_2017_sample_val")
    assert other.DATASETS.TRAIN == ("coco_2017_sample_val",)
    with pytest.raises(DatasetNotRegisteredError, match="'coco_2017_smaple_train' is not registered"):
        build_bn_config(cbn_stats.DEFAULT_CONFIG, 3, dataset="coco_2017_smaple_train")


def _finite_nonneg(values):
    return all(math.isfinite(v) and v >= 0 for v in values)


@pytest.mark.slow
def test_cbn_statistics_script_end_to_end(tmp_path):
    out = str(tmp_path / "cbn")
    layers = ["backbone.bottom_up.res3.0.conv1", "roi_heads.box_head.conv2"]
    res = cbn_stats.main(["--iters", "3", "--probe-every", "2", "--max-window", "2", "--output-dir", out,
                          "--layers", ",".join(layers), *SMALL_RUN])
    for f in cbn_stats.OUTPUT_FILES:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    table = open(os.path.join(out, "cbn_statistics.md")).read()
    assert "mean CBN" in table and "var Naive" in table and "Per probe iteration" in table
    for name in layers:  # k = 1, 2 in the averaged table, then the probe at iteration 2
        assert sum(line.startswith(f"| {name} ") for line in table.splitlines()) == 2
        assert sum(line.startswith("| 2 ") and f" {name} " in line for line in table.splitlines()) == 1
    assert res["probes"] == [2]
    assert json.load(open(os.path.join(out, "cbn_statistics.json")))["layers"] == layers
    for name in layers:
        err = res["errors"][name]
        for e in cbn_stats.ESTIMATORS:
            assert _finite_nonneg(err[e]["mean"] + err[e]["var"])
            assert err[e]["mean"][0] == err[e]["var"][0] == 0.0  # k = 1: all equal the current batch
        assert err["BN"]["mean"][1] > 0 and err["BN"]["var"][1] > 0  # k = 2: another batch differs
        # compensating the mean to the current conv weight is exact, so CBN = own-conv recompute
        assert err["CBN"]["mean"][1] == pytest.approx(err["Own-conv"]["mean"][1], rel=1e-6, abs=1e-9)
        assert err["CBN"]["mean"][1] != err["Naive"]["mean"][1]  # the weights moved
    with pytest.raises(FileExistsError, match="--overwrite"):
        cbn_stats.main(["--iters", "3", "--output-dir", out])


@pytest.mark.slow
def test_mabn_statistics_script_end_to_end(tmp_path):
    out = str(tmp_path / "mabn")
    res = mabn_stats.main(["--iters", "3", "--buffer-size", "2", "--probe-every", "2", "--large-batch", "4",
                           "--output-dir", out, "--layers",
                           "backbone.bottom_up.res2.0.conv1,roi_heads.box_head.conv2.norm", *SMALL_RUN])
    for f in mabn_stats.OUTPUT_FILES:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert res["probes"] == [1]
    assert res["layers"] == ["backbone.bottom_up.res2.0.conv1.norm", "roi_heads.box_head.conv2.norm"]
    table = open(os.path.join(out, "mabn_statistics.md")).read()
    assert "SMA (m=2)" in table and "SMA, t >= 1" in table
    for name in res["layers"]:
        assert sum(line.startswith(f"| {name} ") for line in table.splitlines()) == len(mabn_stats.STATISTICS)
    assert len(set(res["losses"])) == 3  # the weights evolve
    for name in res["layers"]:
        assert len(res["small"][name]["chi2"]) == 3 and res["sma"][name]["chi2"][0] is None
        assert len(res["large"][name]["psi"]) == 1
        for s in mabn_stats.STATISTICS:
            e = res["mean_errors"][name][s]
            assert _finite_nonneg(list(e.values())) and e["small"] > 0, (name, s, e)
            assert e["small_late"] == e["small"]  # the only probe (t = 1) is in the second half
            assert all(v > 0 and math.isfinite(v) for v in res["small"][name][s])
