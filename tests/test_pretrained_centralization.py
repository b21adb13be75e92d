"""Loaded weights and MABN's weight centralization: the report and the warning logged once per model.

References: the relative norm of the removed per-channel means computed by formula for weights
built as w = w0 + 0.5 with w0 zero-mean per output channel (||w - center(w)|| = 0.5 sqrt(numel),
||w||^2 = ||w0||^2 + 0.25 numel), and the centralized weight the conv actually uses.
"""
import logging
import math

import pytest
import torch
from torch import nn

import smallbn_d2
from smallbn_d2.layers import MovingAverageBatchNorm2d, centralize_conv_weight
from smallbn_d2.layers.weight_centralization import centralization_report
from smallbn_d2.pretrained import check_loaded_weight_centralization

LOGGER = "smallbn_d2.pretrained"


def _zero_mean(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    return w0 - w0.mean(dim=tuple(range(1, len(shape))), keepdim=True)


def _expected(w0: torch.Tensor, offset: float) -> float:
    n = w0.numel()
    return offset * math.sqrt(n) / math.sqrt(float(w0.square().sum()) + offset ** 2 * n)


class _Net(nn.Module):
    """Two convs that feed MABN layers (the first with loaded shifted weights), one plain conv."""

    def __init__(self):
        super().__init__()
        self.shifted = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(16)
        self.fresh = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(16)
        self.plain = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.plain(self.norm2(self.fresh(self.norm1(self.shifted(x)))))


def _loaded_net():
    torch.manual_seed(0)
    net = _Net()
    w0 = _zero_mean(net.shifted.weight.shape, seed=1)
    state = net.state_dict()
    state["shifted.weight"] = (w0 + 0.5).float()  # a "checkpoint" trained without centralization
    net.load_state_dict(state)
    return net, w0


def test_report_by_formula():
    net, w0 = _loaded_net()
    for conv in (net.shifted, net.fresh):
        centralize_conv_weight(conv)
    report = {e.name: e for e in centralization_report(net)}
    assert sorted(report) == ["fresh", "shifted"]  # only centralized convs
    entry = report["shifted"]
    assert entry.shape == (16, 8, 3, 3)
    assert entry.relative_norm == pytest.approx(_expected(w0, 0.5), rel=1e-6)
    assert entry.random_level == pytest.approx(1 / math.sqrt(8 * 9), rel=1e-12)
    # the same number from what the conv actually computes with: ||W - conv.weight|| / ||W||
    for name, conv in (("shifted", net.shifted), ("fresh", net.fresh)):
        raw = conv.parametrizations.weight.original.detach().double()
        removed = (raw - conv.weight.detach().double()).norm() / raw.norm()
        assert report[name].relative_norm == pytest.approx(float(removed), rel=1e-6)
    # a random initialization sits near its random level (E[relative_norm^2] = 1 / D)
    assert report["fresh"].relative_norm == pytest.approx(report["fresh"].random_level, rel=0.5)
    assert centralization_report(nn.Sequential(nn.Conv2d(1, 1, 1))) == []


def test_warning_logged_once_per_model(caplog):
    net, w0 = _loaded_net()
    for conv in (net.shifted, net.fresh):
        centralize_conv_weight(conv)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        affected = check_loaded_weight_centralization(net)
        again = check_loaded_weight_centralization(net)
    assert [e.name for e in affected] == ["shifted"]  # the fresh conv is at its random level
    assert [e.name for e in again] == ["shifted"]
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "changes 1 of the 2 convs that feed MABN layers" in message
    assert f"shifted {_expected(w0, 0.5):.1%}" in message
    assert "not trained with weight centralization" in message
    assert "pretrained with weight centralization" in message


def test_fresh_or_unloaded_convs_not_reported(caplog):
    net, _ = _loaded_net()
    for conv in (net.shifted, net.fresh):
        centralize_conv_weight(conv)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        # only the fresh conv's weight was "loaded": nothing is affected, one info line
        assert check_loaded_weight_centralization(net, loaded_keys=["fresh.weight", "plain.weight"]) == []
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "1 convs feed MABN layers" in records[0].getMessage()


def test_convert_norm_to_mabn_warns_for_loaded_weights(caplog):
    net, w0 = _loaded_net()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        net, report = smallbn_d2.convert_norm(net, "MABN", torch.randn(2, 8, 8, 8))
    assert [e.name for e in report.converted] == ["norm1", "norm2"]
    assert isinstance(net.norm1, MovingAverageBatchNorm2d)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"shifted {_expected(w0, 0.5):.1%}" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        check_loaded_weight_centralization(net)  # e.g. the checkpointer's call afterwards
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_convert_norm_to_cbn_reports_nothing(caplog):
    net, _ = _loaded_net()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        smallbn_d2.convert_norm(net, "CBN", torch.randn(2, 8, 8, 8))
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert centralization_report(net) == []


@pytest.mark.parametrize("kwargs, words", [
    ({"threshold": 1.5}, "threshold = 1.5 is invalid"),
    ({"random_factor": -1}, "random_factor = -1 is invalid"),
    ({"top": 0}, "top = 0 is invalid"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        check_loaded_weight_centralization(nn.Conv2d(1, 1, 1), **kwargs)


def test_info_on_fresh_model_does_not_silence_a_later_warning(caplog):
    """convert_norm on a freshly initialized model logs the info line; loading shifted weights
    afterwards (what the checkpointer does) still gives the warning, once, for those weights."""
    torch.manual_seed(0)
    net, _ = smallbn_d2.convert_norm(_Net(), "MABN", torch.randn(2, 8, 8, 8))
    source, w0 = _loaded_net()
    state = source.state_dict()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        check_loaded_weight_centralization(net)  # again: nothing new
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
        check_loaded_weight_centralization(net, loaded_keys=state.keys())
        check_loaded_weight_centralization(net, loaded_keys=state.keys())
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING], [r.getMessage() for r in records]
    assert f"shifted {_expected(w0, 0.5):.1%}" in records[0].getMessage()
