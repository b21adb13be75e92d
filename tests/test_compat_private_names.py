"""smallbn_d2.compat's private-name functions do, on the installed Detectron2 and torch, what their
docstrings say (each is checked against Detectron2 v0.6 and main: tools/test_detectron2_main.sh runs
this file's integration tests against main). References: the public behaviour each private name
stands for (a layer's output, a state dict's keys, an optimizer's step), never the private name."""
import argparse

import pytest
import torch
from torch import nn

import smallbn_d2  # noqa: F401,I001  (first: Detectron2 v0.6 compatibility fixes)
from smallbn_d2 import compat

pytestmark = pytest.mark.integration


def test_cycle_position_is_the_level_applied_next():
    from detectron2.layers import CycleBatchNormList

    torch.manual_seed(0)
    cycle = CycleBatchNormList(length=3, bn_class=nn.BatchNorm2d, num_features=2, affine=False).eval()
    for i, bn in enumerate(cycle):
        bn.running_mean.fill_(float(i))  # level i subtracts i
    x = torch.zeros(1, 2, 2, 2)
    cycle(x)
    assert compat.cycle_position(cycle) == 1
    compat.set_cycle_position(cycle, 2)
    expected = cycle[2](x)
    assert torch.equal(cycle(x), expected) and compat.cycle_position(cycle) == 0
    assert not compat.cycle_has_affine(cycle)
    assert compat.cycle_has_affine(CycleBatchNormList(length=2, bn_class=nn.BatchNorm2d, num_features=2))


def test_retinanet_head_levels_is_the_number_of_input_levels():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    cfg = get_cfg()
    shapes = [ShapeSpec(channels=8, stride=s) for s in (8, 16, 32)]
    head = RetinaNetHead(cfg, shapes)
    assert compat.retinanet_head_levels(head) == 3 == len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])


def test_tensor_version_counts_in_place_changes():
    t = torch.zeros(3)
    before = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == before + 1
    t + 1  # out of place: unchanged
    assert compat.tensor_version(t) == before + 1


def test_state_dict_hook_may_drop_entries_and_is_removable():
    bn = nn.BatchNorm2d(2)

    def drop(module, state_dict, prefix, local_metadata):
        state_dict.pop(prefix + "running_var")

    handle = compat.register_state_dict_hook(bn, drop)
    outer = nn.Sequential(bn)
    assert sorted(outer.state_dict()) == ["0.bias", "0.num_batches_tracked", "0.running_mean", "0.weight"]
    handle.remove()
    assert "0.running_var" in outer.state_dict()


def test_load_pre_hook_runs_before_loading_and_both_hooks_are_removed_by_function():
    def save_as_w(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "w"] = state_dict.pop(prefix + "weight")

    def load_from_w(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")

    def other_save_hook(module, state_dict, prefix, local_metadata):  # not ours: must stay
        state_dict[prefix + "marker"] = torch.zeros(())

    lin = nn.Linear(2, 2, bias=False)
    compat.register_state_dict_hook(lin, other_save_hook)
    compat.register_state_dict_hook(lin, save_as_w)
    compat.register_load_state_dict_pre_hook(lin, load_from_w)
    outer = nn.Sequential(lin)
    assert sorted(outer.state_dict()) == ["0.marker", "0.w"]
    fresh = nn.Linear(2, 2, bias=False)
    compat.register_load_state_dict_pre_hook(fresh, load_from_w)
    nn.Sequential(fresh).load_state_dict({"0.w": torch.full((2, 2), 3.0)})  # strict: "w" became "weight"
    assert torch.equal(fresh.weight, torch.full((2, 2), 3.0))

    compat.remove_state_dict_hooks(lin, save_as_w, load_from_w)
    assert sorted(outer.state_dict()) == ["0.marker", "0.weight"]
    result = outer.load_state_dict({"0.w": torch.zeros(2, 2)}, strict=False)  # no longer renamed
    assert (result.missing_keys, result.unexpected_keys) == (["0.weight"], ["0.w"])


def test_state_dict_metadata_is_copied():
    from collections import OrderedDict

    source = nn.BatchNorm2d(2).state_dict()
    target = OrderedDict(source)
    assert not hasattr(target, "_metadata")
    compat.copy_state_dict_metadata(source, target)
    assert target._metadata[""]["version"] == source._metadata[""]["version"]
    compat.copy_state_dict_metadata({}, target)  # a plain dict has none: nothing changes
    assert target._metadata[""]["version"] == source._metadata[""]["version"]


def test_argument_parser_actions_find_detectron2s_overrides_argument():
    from detectron2.engine import default_argument_parser

    actions = compat.argument_parser_actions(default_argument_parser())
    assert all(isinstance(a, argparse.Action) for a in actions)
    assert [a.nargs for a in actions if a.dest == "opts"] == [argparse.REMAINDER]


def test_gradient_clipping_optimizer_class_clips_before_the_step():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    optimizer = torch.optim.SGD([p], lr=1.0)
    optimizer.__class__ = compat.gradient_clipping_optimizer_class(
        torch.optim.SGD, global_clipper=lambda params: torch.nn.utils.clip_grad_norm_(list(params), 1.0))
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))


def test_inner_trainer_and_hooks_and_checkpoint_loading_of_a_real_trainer(tmp_path):
    from detectron2.engine import SimpleTrainer
    from detectron2.engine import hooks as d2_hooks

    from helpers import tiny_cfg
    from smallbn_d2.engine import Trainer

    cfg = tiny_cfg("mask_rcnn", "CBN", where=["fpn"])
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = Trainer(cfg)
    inner = compat.inner_trainer(trainer)
    assert isinstance(inner, SimpleTrainer) and inner.model is trainer.model
    hooks = compat.registered_hooks(trainer)
    assert hooks and [type(h) for h in hooks] == [type(h) for h in trainer.build_hooks() if h is not None]
    assert any(isinstance(h, d2_hooks.PeriodicCheckpointer) and h.checkpointer is trainer.checkpointer for h in hooks)
    # fvcore's load reaches the checkpointer's load_model_state, which loads through Detectron2's
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.checkpointer.save("model_test")
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.zero_()
    trainer.checkpointer.load(str(tmp_path / "model_test.pth"))
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
