"""The package's floors: the layers and ``convert_norm`` need only torch, and importing them changes
nothing in Detectron2; the integration floor extends Detectron2 from every documented entry point.

Each check runs in a fresh Python (``subprocess``), because what is imported and installed is
per process."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

#: Makes ``import detectron2`` / ``import fvcore`` fail, as in an environment without them.
HIDE_DETECTRON2 = """
import sys

class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("detectron2", "fvcore"):
            raise ImportError(f"{name} is not installed (hidden by the test)")
        return None

sys.meta_path.insert(0, _Hidden())
try:
    import detectron2  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("Detectron2 is still importable")
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_layers_train_without_detectron2():
    """Each layer, built after a conv, normalizes its first step as the independent reference does
    (CBN/NaiveCBN in burn-in: torch's batch norm; MABN in warm-up: x / sqrt(E[x^2] + eps) of the
    weight-centralized conv's output) and trains three steps, with Detectron2 absent."""
    out = _run(HIDE_DETECTRON2 + """
import torch
import torch.nn.functional as F
from torch import nn

import smallbn_d2.layers as L

torch.manual_seed(0)
for cls, kwargs in [(L.CrossIterationBatchNorm2d, dict(window_size=2, burn_in=1)),
                    (L.NaiveCrossIterationBatchNorm2d, dict(window_size=2, burn_in=1)),
                    (L.MovingAverageBatchNorm2d, dict(buffer_size=2, warmup_iters=1))]:
    conv, norm = nn.Conv2d(3, 8, 3, bias=False), cls(8, **kwargs)
    norm.attach_conv(conv)
    net = nn.Sequential(conv, norm, nn.ReLU())
    seen = {}
    conv.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach()))
    norm.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for it in range(3):
        norm.set_iteration(it)
        loss = net(torch.randn(4, 3, 10, 10) + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 0:
            x = seen["x"]
            if cls is L.MovingAverageBatchNorm2d:
                ref = x / (x.square().mean(dim=(0, 2, 3), keepdim=True) + norm.eps).sqrt()
            else:
                ref = F.batch_norm(x, None, None, training=True, eps=norm.eps)
            torch.testing.assert_close(seen["y"], ref, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    print(cls.__name__, "ok")
assert not any(m.split(".")[0] in ("detectron2", "fvcore") for m in sys.modules)
""")
    assert out.split() == ["CrossIterationBatchNorm2d", "ok", "NaiveCrossIterationBatchNorm2d", "ok",
                           "MovingAverageBatchNorm2d", "ok"]


def test_convert_norm_on_torchvision_resnet_without_detectron2():
    """``smallbn_d2.convert_norm`` converts every BN of a torchvision ResNet-18 (each follows a conv)
    keeping its affine and population statistics, and the model trains a step; the integration
    names fail with Detectron2's ImportError, not earlier."""
    out = _run(HIDE_DETECTRON2 + """
import torch
import torchvision
from torch import nn

import smallbn_d2

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
for m in bns.values():
    m.running_mean.uniform_(-1, 1)
ref = {n: m.running_mean.clone() for n, m in bns.items()}
model, report = smallbn_d2.convert_norm(model, "CBN", torch.randn(1, 3, 64, 64), window_size=2, burn_in=0)
layers = {n: m for n, m in model.named_modules() if isinstance(m, smallbn_d2.CrossIterationBatchNorm2d)}
assert set(layers) == set(bns) and len(layers) == 20, sorted(layers)
assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
for n, m in layers.items():
    assert torch.equal(m.running_mean, ref[n]) and m.conv is not None, n
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for it in range(2):
    for m in layers.values():
        m.set_iteration(it)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    opt.zero_grad()
    loss.backward()
    opt.step()
assert torch.isfinite(loss)
try:
    smallbn_d2.add_smallbn_config
except ImportError as e:
    assert "detectron2" in str(e), e
else:
    raise AssertionError("the integration imported without Detectron2")
assert not any(m.split(".")[0] in ("detectron2", "fvcore") for m in sys.modules)
print("converted", len(layers))
""")
    assert out.split() == ["converted", "20"]


def test_importing_the_layers_changes_nothing_in_detectron2():
    """``import smallbn_d2`` / ``smallbn_d2.layers`` / ``convert_norm`` neither import Detectron2 nor,
    when it is imported, change its ``get_norm`` ("CBN" stays unknown to it)."""
    _run("""
import sys

import smallbn_d2
import smallbn_d2.layers
from smallbn_d2 import convert_norm  # noqa: F401

assert "detectron2" not in sys.modules and "fvcore" not in sys.modules
import detectron2.layers

code = detectron2.layers.get_norm.__code__
try:
    detectron2.layers.get_norm("CBN", 8)
except KeyError:
    pass
else:
    raise AssertionError("get_norm knows CBN without the integration")
import smallbn_d2.to_cross_iteration  # noqa: F401
assert detectron2.layers.get_norm.__code__ is code
""")


ENTRY_POINTS = {
    "add_smallbn_config": "import smallbn_d2\nsmallbn_d2.add_smallbn_config",
    "config module": "from smallbn_d2.config import add_smallbn_config",
    "build_model": "import smallbn_d2\nsmallbn_d2.build_model",
    "Trainer": "from smallbn_d2.engine import Trainer",
    "LazyConfig builder": "from smallbn_d2.lazy import build_lazy_model",
}


@pytest.mark.integration
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_extends_detectron2_before_a_model_is_built(entry):
    """Each documented entry point teaches Detectron2's ``get_norm`` the names (imported
    before it: the module holds its own reference, as Detectron2's model code does)."""
    _run(f"""
import torch
from detectron2.modeling.backbone import fpn  # Detectron2 first: its own reference to get_norm

import smallbn_d2.layers
try:
    fpn.get_norm("MABN", 8)
except KeyError:
    pass
else:
    raise AssertionError("extended before the entry point")
{ENTRY_POINTS[entry]}
assert type(fpn.get_norm("MABN", 8)) is smallbn_d2.layers.MovingAverageBatchNorm2d
assert type(fpn.get_norm("BN", 8)).__name__ == "BatchNorm2d"
""")
