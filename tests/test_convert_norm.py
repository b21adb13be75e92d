"""smallbn_d2.convert_norm: CBN and MABN in any PyTorch model (torchvision's ResNet-18 here).

References: the BN layers' own values before the conversion (affine, population statistics; for
MABN running_chi2 = running_var + running_mean^2 computed in float64), the converted model's own
eval output before its conversion to FrozenBatchNorm2d, and, for the skip report, models built
so that each BN has one known reason not to be converted. Training runs on real COCO images.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallbn_d2
from smallbn_d2.layers import (
    CrossIterationBatchNorm2d,
    IterationNormBase,
    MovingAverageBatchNorm2d,
    is_weight_centralized,
)

torchvision = pytest.importorskip("torchvision")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_IMAGES = os.path.join(REPO, "smallbn_d2", "data", "coco_2017_sample", "train2017")
SHARED_IMAGES = os.path.join(REPO, "..", "shared", "datasets", "coco", "train2017")
SIZE = 64  # pixels: small images keep the test fast


def _coco_batches(num_batches: int, per_batch: int = 2):
    """``num_batches`` (images (N, 3, SIZE, SIZE), labels (N,)) of real COCO images, dummy labels."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    folder = next((f for f in (SAMPLE_IMAGES, SHARED_IMAGES) if os.path.isdir(f)), None)
    if folder is None:
        pytest.skip(f"needs real COCO images: neither {SAMPLE_IMAGES} nor {SHARED_IMAGES} exists")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))[: num_batches * per_batch]
    if len(files) < num_batches * per_batch:
        pytest.skip(f"needs {num_batches * per_batch} images in {folder}, found {len(files)}")
    images = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            x = TF.to_tensor(im.convert("RGB"))
        x = TF.resize(x, [SIZE, SIZE], antialias=True)
        images.append(TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    images = torch.stack(images)
    labels = torch.arange(len(files)) % 10
    return [(images[i:i + per_batch], labels[i:i + per_batch]) for i in range(0, len(files), per_batch)]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and population statistics in every BN (so copying is tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.eps = 1e-3  # not the layers' default: the BN's eps must be carried over


def _bn_snapshot(model: nn.Module):
    return {name: copy.deepcopy(m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _check_carried_over(model: nn.Module, bns, layer_class) -> None:
    modules = dict(model.named_modules())
    assert len(bns) == 20
    for name, bn in bns.items():
        layer = modules[name]
        assert type(layer) is layer_class, name
        torch.testing.assert_close(layer.weight, bn.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, bn.bias, rtol=0, atol=0)
        assert layer.eps == bn.eps
        assert layer.training == bn.training
        if layer_class is MovingAverageBatchNorm2d:
            chi2 = bn.running_var.double() + bn.running_mean.double() ** 2  # float64 reference
            torch.testing.assert_close(layer.running_chi2.double(), chi2, rtol=1e-7, atol=0)
        else:
            torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-7, atol=0)


def _check_attached(model: nn.Module, report) -> None:
    modules = dict(model.named_modules())
    for entry in report.converted:
        layer = modules[entry.name]
        # the producing conv is the one torchvision's code applies right before the norm
        expected = entry.name.replace("bn", "conv") if "downsample" not in entry.name else entry.name[:-1] + "0"
        assert entry.conv == expected
        assert layer.conv is modules[expected]


def test_readme_example_resnet18_cbn(one_thread):
    """The README's "Any PyTorch model" example, line for line, with checks in between."""
    torch.manual_seed(0)
    batches = _coco_batches(4)
    losses = []

    # ---- README example ("Any PyTorch model"), identical code --------------------------
    model = torchvision.models.resnet18(weights=None, num_classes=10)  # or your pretrained model
    _randomize_bn(model)  # test only
    bns = _bn_snapshot(model)  # test only
    example = torch.zeros(2, 3, 64, 64)  # one input that reaches every BN
    model, report = smallbn_d2.convert_norm(model, "CBN", example, window_size=4, burn_in=2)
    print(report)  # converted and skipped layers, with reasons
    assert len(report.converted) == 20 and not report.skipped, report  # test only
    _check_carried_over(model, bns, CrossIterationBatchNorm2d)  # test only
    _check_attached(model, report)  # test only

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # built after the conversion
    model.train()
    for iteration, (images, labels) in enumerate(batches):  # images (N, 3, H, W), labels (N,)
        smallbn_d2.set_norm_iteration(model, iteration)  # before every step: the 0-based iteration
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # test only

    model.eval()
    layer = model.bn1  # test only
    images = batches[0][0]  # test only
    with torch.no_grad():  # test only
        before = model(images)  # test only
    model = smallbn_d2.convert_to_frozen_bn(model)  # FrozenBatchNorm2d: the same outputs at BN's cost
    # ---- end of the README example ----------------------------------------------------------

    assert all(torch.isfinite(torch.tensor(losses))), losses
    # the window (k - 1 = 3 entries) holds the statistics of the last three iterations
    assert sorted(layer.window_iters.tolist()) == [1, 2, 3]
    assert not any(isinstance(m, IterationNormBase) for m in model.modules())
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_resnet18_mabn(one_thread):
    torch.manual_seed(0)
    batches = _coco_batches(4)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    _randomize_bn(model)
    bns = _bn_snapshot(model)
    model, report = smallbn_d2.convert_norm(model, "MABN", torch.zeros(2, 3, 64, 64), buffer_size=2)
    assert len(report.converted) == 20 and not report.skipped, report
    _check_carried_over(model, bns, MovingAverageBatchNorm2d)
    _check_attached(model, report)
    modules = dict(model.named_modules())
    assert all(is_weight_centralized(modules[e.conv]) for e in report.converted)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for iteration, (images, labels) in enumerate(batches):
        smallbn_d2.set_norm_iteration(model, iteration)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # the simple moving averages were filled by the training steps (iterations 0-based, the last tags)
    assert int(modules["bn1"].chi2_iters.max()) == len(batches) - 1
    model.eval()
    images = batches[0][0]
    with torch.no_grad():
        before = model(images)
    model = smallbn_d2.convert_to_frozen_bn(model)
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


# ------------------------------------------------------------------------------ skip report
class _Mixed(nn.Module):
    """One BN per reason of the report (names say which), plus one BN that converts."""

    def __init__(self):
        super().__init__()
        self.conv_ok = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_ok = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(8)
        self.conv_two = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_two_a = nn.BatchNorm2d(8)
        self.bn_two_b = nn.BatchNorm2d(8)
        self.bn_after_add = nn.BatchNorm2d(8)
        self.conv_reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.bn_reflect = nn.BatchNorm2d(8)
        self.conv_inplace = nn.Conv2d(8, 8, 1)
        self.bn_inplace = nn.BatchNorm2d(8)
        self.conv_shared = nn.Conv2d(8, 8, 1)
        self.bn_shared = nn.BatchNorm2d(8)
        self.bn_unused = nn.BatchNorm2d(8)
        self.bn_1d = nn.BatchNorm1d(8)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv_no_stats = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.bn_ok(self.conv_ok(x))
        x = self.bn_after_pool(self.pool(x))
        y = self.conv_two(x)
        x = self.bn_two_a(y) + self.bn_two_b(y)
        x = self.bn_after_add(x + 1)
        x = self.bn_reflect(self.conv_reflect(x))
        y = self.conv_inplace(x)
        y.relu_()
        x = self.bn_inplace(y)
        x = self.bn_shared(self.conv_shared(x)) + self.bn_shared(self.conv_shared(x))
        x = self.bn_no_stats(self.conv_no_stats(x))
        return self.bn_1d(x.mean((2, 3)))


SKIP_REASONS = {
    "bn_after_pool": "'pool' (MaxPool2d), not from an nn.Conv2d",
    "bn_after_add": "not the output of a module",
    "bn_inplace": "conv 'conv_inplace' was modified in place",
    "bn_shared": "called 2 times in one forward",
    "bn_unused": "not reached by the example forward",
    "bn_1d": "BatchNorm1d is not handled",
    "bn_no_stats": "track_running_stats=False",
}


def test_skip_report_cbn(one_thread):
    torch.manual_seed(0)
    model = _Mixed()
    model, report = smallbn_d2.convert_norm(model, "CBN", torch.randn(2, 3, 16, 16), window_size=2)
    skipped = {e.name: e.reason for e in report.skipped}
    assert [e.name for e in report.converted] == ["bn_ok"]
    assert report.converted[0].conv == "conv_ok"
    assert isinstance(model.bn_ok, CrossIterationBatchNorm2d) and model.bn_ok.conv is model.conv_ok
    expected = dict(SKIP_REASONS,
                    bn_two_a="conv 'conv_two' feeds several norms (bn_two_a, bn_two_b)",
                    bn_two_b="conv 'conv_two' feeds several norms (bn_two_a, bn_two_b)",
                    bn_reflect="unsupported conv: CBN cannot follow")
    assert set(skipped) == set(expected), report
    for name, words in expected.items():
        assert words in skipped[name], (name, skipped[name])
        assert type(getattr(model, name)) in (nn.BatchNorm2d, nn.BatchNorm1d), name  # left as it was
    assert "padding_mode = 'reflect'" in skipped["bn_reflect"]
    assert not is_weight_centralized(model.conv_two)
    # the converted model trains: the one CBN layer gets its conv's input
    model.train()
    smallbn_d2.set_norm_iteration(model, 0)
    model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_skip_report_mabn_conv_feeding_two_norms(one_thread):
    """MABN does not capture its conv's input: a conv feeding two norms (both centralize the one
    conv) and a conv that CBN cannot differentiate are fine; the other reasons stay."""
    torch.manual_seed(0)
    model = _Mixed()
    model, report = smallbn_d2.convert_norm(model, "MABN", torch.randn(2, 3, 16, 16))
    assert sorted(e.name for e in report.converted) == ["bn_ok", "bn_reflect", "bn_two_a", "bn_two_b"]
    assert model.bn_two_a.conv is model.conv_two and model.bn_two_b.conv is model.conv_two
    assert is_weight_centralized(model.conv_two) and is_weight_centralized(model.conv_reflect)
    assert {e.name for e in report.skipped} == set(SKIP_REASONS)
    model.train()
    smallbn_d2.set_norm_iteration(model, 0)
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


def test_conv_running_again_before_its_norm(one_thread):
    """CBN uses the input of the conv's latest call: a conv called again before the norm of its
    first output is reported; one call per norm, each followed by its norm, converts."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn_late = nn.BatchNorm2d(4)
            self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            first, second = self.conv(x), self.conv(x * 2)
            y = self.bn_late(first) + second
            return y + self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))

    model, report = smallbn_d2.convert_norm(Net(), "CBN", torch.randn(2, 3, 8, 8))
    assert sorted(e.name for e in report.converted) == ["bn_a", "bn_b"]
    assert [e.name for e in report.skipped] == ["bn_late"]
    assert "'conv' ran again" in report.skipped[0].reason
    model.train()
    smallbn_d2.set_norm_iteration(model, 0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()


@pytest.mark.integration
def test_detectron2_norms(one_thread):
    """Detectron2's Conv2d(..., norm=...) applies the norm inside the conv's forward: the conv is the
    producer. FrozenBatchNorm2d converts only with include_detectron2=True."""
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    def build():
        torch.manual_seed(0)
        frozen = FrozenBatchNorm2d(4)
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.uniform_(-1, 1)
        return nn.Sequential(Conv2d(3, 4, 3, padding=1, norm=frozen), Conv2d(4, 4, 1, norm=nn.BatchNorm2d(4)))

    model, report = smallbn_d2.convert_norm(build(), "MABN", torch.randn(2, 3, 8, 8))
    assert [e.name for e in report.converted] == ["1.norm"]
    assert [(e.name, e.source) for e in report.skipped] == [("0.norm", "FrozenBatchNorm2d")]
    assert "include_detectron2=True" in report.skipped[0].reason

    reference = build()
    model, report = smallbn_d2.convert_norm(build(), "MABN", torch.randn(2, 3, 8, 8), include_detectron2=True)
    assert [(e.name, e.conv) for e in report.converted] == [("0.norm", "0"), ("1.norm", "1")]
    layer, frozen = model[0].norm, reference[0].norm
    assert isinstance(layer, MovingAverageBatchNorm2d) and layer.conv is model[0]
    torch.testing.assert_close(layer.weight.detach(), frozen.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.detach(), frozen.bias, rtol=0, atol=0)
    assert layer.weight.requires_grad  # FrozenBN becomes a trainable layer
    chi2 = frozen.running_var.double() + frozen.running_mean.double() ** 2
    torch.testing.assert_close(layer.running_chi2.double(), chi2, rtol=1e-7, atol=0)
    assert layer.eps == frozen.eps


# ------------------------------------------------------------------------------ bad input
def test_unknown_norm_lists_allowed_names():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(ValueError, match="norm = 'BatchNormX' is invalid") as info:
        smallbn_d2.convert_norm(model, "BatchNormX", torch.zeros(1, 3, 32, 32))
    for name in ("CBN", "NaiveCBN", "MABN"):
        assert repr(name) in str(info.value)
    assert isinstance(model.bn1, nn.BatchNorm2d)


@pytest.mark.parametrize("kwargs, words", [
    ({"window_size": 0}, "window_size = 0 is invalid"),
    ({"windowsize": 4}, "windowsize = 4 is not a hyperparameter of CBN"),
    ({"num_features": 8}, "num_features = 8 cannot be given"),
    ({"burn_in": -1}, "burn_in = -1 is invalid"),
])
def test_bad_hyperparameter_named(kwargs, words):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(ValueError, match=words):
        smallbn_d2.convert_norm(model, "CBN", torch.zeros(1, 3, 32, 32), **kwargs)
    assert not any(isinstance(m, IterationNormBase) for m in model.modules())


def test_naive_cbn_and_modes_kept(one_thread):
    """NaiveCBN too; the BN's training flag and the model's module flags are kept (the tracing
    forward runs in eval mode and restores them)."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    model.layer1.eval()
    model, report = smallbn_d2.convert_norm(model, "NaiveCBN", torch.zeros(1, 3, 32, 32), window_size=3)
    assert len(report.converted) == 20 and not report.skipped
    assert model.training and model.bn1.training and model.conv1.training
    assert not model.layer1[0].bn1.training and not model.layer1[0].conv1.training
    assert model.bn1.window_size == 3 and model.bn1.compensate is False


def test_conv_feeding_a_norm_and_an_unconvertible_bn(one_thread):
    """A conv whose output also goes to a BN that stays BN (no running statistics) still gets its
    CBN: the BN does not take the conv's captured input."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.bn_no_stats(y)

    model, report = smallbn_d2.convert_norm(Net(), "CBN", torch.randn(2, 3, 8, 8))
    assert [e.name for e in report.converted] == ["bn"]
    assert [e.name for e in report.skipped] == ["bn_no_stats"]
    model.train()
    smallbn_d2.set_norm_iteration(model, 0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
