"""CBN and MABN for any PyTorch model: :func:`convert_norm` replaces the BatchNorm2d layers that
directly follow a conv, in the spirit of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Torch only.

Producing convs are found by ONE eval-mode forward of an example input with hooks on every module:
a BN's producing conv is the ``nn.Conv2d`` whose output tensor is the BN's input tensor, unmodified
(version counter unchanged), or the Detectron2 ``Conv2d`` holding it as ``conv.norm``. Hooks and not
``torch.fx``: they work on any eager model (Python control flow, list-of-dict inputs) and tensor
identity is exact. Modules called through ``module.forward(...)`` fire no hooks. See docs/CONVERT_NORM.md.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .compat import tensor_version, torch_batch_norm_base
from .layers import IterationNormBase
from .layers.weight_centralization import is_weight_centralized
from .families import NORM_FAMILIES, NormFamily
from .pretrained import check_loaded_weight_centralization

__all__ = ["convert_norm", "ConversionReport", "ConversionEntry"]

logger = logging.getLogger(__name__)

#: Constructor arguments that each BN determines (not hyperparameters of the conversion).
_FROM_BN = ("num_features", "affine")


@dataclass(frozen=True)
class ConversionEntry:
    """One BN layer in a :class:`ConversionReport`: its qualified ``name``, its ``source`` class
    (``"BatchNorm2d"``, ...), ``channels`` C, its producing ``conv``'s qualified name (None if none
    was found) and the ``reason`` it was not converted ("" if it was)."""

    name: str
    source: str
    channels: int
    conv: Optional[str] = None
    reason: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert_norm` did: the family it converted to (``norm``), the BN layers
    ``converted`` (each with its producing conv) and those ``skipped`` (each with the reason)."""

    norm: str
    converted: List[ConversionEntry] = field(default_factory=list)
    skipped: List[ConversionEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert_norm to {self.norm}: {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  converted {e.name} ({e.source}, C={e.channels}) after conv {e.conv}" for e in self.converted]
        lines += [f"  skipped   {e.name} ({e.source}, C={e.channels}): {e.reason}" for e in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ tracing
@dataclass
class _Call:
    """The input of one call of a BN: what produced it."""

    kind: str  # "conv", "module" (another module), "op" (no module), "inplace" (conv output modified)
    producer: Optional[str] = None  # module name
    producer_type: str = ""
    conv_call: int = 0  # which call of the producing conv (1-based)
    stale: bool = False  # the conv ran again between producing the input and the BN
    shape: Tuple[int, ...] = ()


def _detectron2_frozen_bn():
    try:
        from detectron2.layers import FrozenBatchNorm2d
    except ImportError as e:  # pragma: no cover - detectron2 is a dependency of the package
        raise ImportError(f"convert_norm(include_detectron2=True) needs Detectron2: {e}") from e
    return FrozenBatchNorm2d


def _trace(module: nn.Module, names: Dict[int, str], watched: Dict[int, str], structural: Dict[int, str],
           example_inputs: Any) -> Dict[str, List[_Call]]:
    """Run one eval-mode forward with hooks; return, per watched BN name, the producers of its calls."""
    outputs: Dict[int, Tuple[str, nn.Module, "weakref.ref", int, int]] = {}
    conv_calls: Dict[str, int] = {}
    calls: Dict[str, List[_Call]] = {name: [] for name in watched.values()}
    handles = []

    def pre_hook(mod, args):
        name = names[id(mod)]
        if isinstance(mod, nn.Conv2d):
            conv_calls[name] = conv_calls.get(name, 0) + 1
        if id(mod) not in watched:
            return
        x = args[0] if args else None
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
        if id(mod) in structural:
            conv = structural[id(mod)]
            calls[name].append(_Call("conv", conv, "", conv_calls.get(conv, 0), shape=shape))
            return
        rec = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        if rec is None or rec[2]() is not x:
            calls[name].append(_Call("op", shape=shape))
            return
        pname, pmod, _, version, call = rec
        if not isinstance(pmod, nn.Conv2d):
            calls[name].append(_Call("module", pname, type(pmod).__name__, shape=shape))
        elif version != tensor_version(x):
            calls[name].append(_Call("inplace", pname, type(pmod).__name__, call, shape=shape))
        else:
            calls[name].append(_Call("conv", pname, type(pmod).__name__, call,
                                     stale=conv_calls[pname] != call, shape=shape))

    def hook(mod, args, out):
        if not isinstance(out, torch.Tensor):
            return
        rec = outputs.get(id(out))
        if rec is not None and rec[2]() is out:
            return  # an enclosing module returning the same tensor: the innermost producer counts
        name = names[id(mod)]
        outputs[id(out)] = (name, mod, weakref.ref(out), tensor_version(out), conv_calls.get(name, 0))

    modes = {m: m.training for m in module.modules()}
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(hook))
        module.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return calls


# ------------------------------------------------------------------------------ conversion
def _validate(norm: Any, hyperparameters: Dict[str, Any]) -> NormFamily:
    if not isinstance(norm, str) or norm not in NORM_FAMILIES:
        raise ValueError(f"norm = {norm!r} is invalid; allowed: {sorted(NORM_FAMILIES)}")
    family = NORM_FAMILIES[norm]
    cls = family.layer_class
    allowed = sorted(cls.HYPERPARAMETERS)
    for key in hyperparameters:
        if key in _FROM_BN:
            raise ValueError(f"{key} = {hyperparameters[key]!r} cannot be given: it comes from each BN layer; "
                             f"allowed hyperparameters of {norm} ({cls.__name__}): {allowed}")
        if key not in cls.HYPERPARAMETERS:
            raise ValueError(f"{key} = {hyperparameters[key]!r} is not a hyperparameter of {norm} "
                             f"({cls.__name__}); allowed: {allowed}")
    cls(1, **hyperparameters)  # the constructor checks every value (ValueError naming the argument)
    return family


def _uses_conv_input(family: NormFamily, hyperparameters: Dict[str, Any]) -> bool:
    """Whether the family's layer works through its conv in training (CBN: captures the conv's
    input, one consumer per conv call), asked of the layer's interface (``mode_dependents``)."""
    probe, conv = family.layer_class(1, **hyperparameters), nn.Conv2d(1, 1, 1)
    probe.attach_conv(conv)
    uses = conv in probe.mode_dependents()
    probe.release_conv()
    return uses


def _source_kind(m: nn.Module, frozen_cls) -> Optional[str]:
    """"" for a BN this function converts, the reason for a BN-like layer it only reports, None else."""
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or (frozen_cls is not None and isinstance(m, frozen_cls)):
        return ""
    if type(m).__name__ == "FrozenBatchNorm2d":
        return "Detectron2's FrozenBatchNorm2d is converted only with include_detectron2=True"
    if isinstance(m, torch_batch_norm_base()):
        return (f"{type(m).__name__} is not handled: CBN and MABN normalize the (N, C, H, W) output of an "
                "nn.Conv2d (BatchNorm2d)")
    return None


def _new_layer(bn: nn.Module, family: NormFamily, hyperparameters: Dict[str, Any]) -> IterationNormBase:
    """The family's layer with ``bn``'s eps (unless given), affine parameters and population statistics."""
    affine = getattr(bn, "affine", True)  # FrozenBatchNorm2d: always affine (buffers)
    kwargs = dict(hyperparameters)
    kwargs.setdefault("eps", float(bn.eps))
    ref = bn.weight if affine and bn.weight is not None else bn.running_mean
    layer = family.layer_class(bn.num_features, affine=bool(affine), **kwargs).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if affine:
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias)
            if isinstance(bn.weight, nn.Parameter):  # a BN's frozen affine stays frozen
                layer.weight.requires_grad_(bn.weight.requires_grad)
                layer.bias.requires_grad_(bn.bias.requires_grad)
        mean = bn.running_mean.detach().to(torch.float64)
        sq_mean = bn.running_var.detach().to(torch.float64) + mean * mean
        layer.set_population_statistics(mean, sq_mean)
    layer.train(bn.training)
    return layer


def _skip_reason(bn: nn.Module, calls: List[_Call], family: NormFamily, uses_conv_input: bool,
                 consumers: Optional[Dict[Tuple[str, int], List[str]]]) -> Optional[str]:
    """Why ``bn`` cannot be converted, or None. ``consumers``: (conv, call) -> the norms it feeds
    that are convertible otherwise; None leaves that rule out."""
    if not calls:
        return "not reached by the example forward (only what the example input runs is converted)"
    if len(calls) > 1:
        return (f"called {len(calls)} times in one forward (a norm shared by several inputs): CBN and MABN keep "
                "one window / buffer entry per trainer iteration, so the other calls' statistics would be lost")
    call = calls[0]
    if len(call.shape) != 4:
        return f"its input has shape {call.shape}; allowed: (N, C, H, W)"
    if getattr(bn, "track_running_stats", True) is False or bn.running_mean is None:
        return ("track_running_stats=False: its eval mode normalizes with batch statistics, which no CBN/MABN "
                "eval mode (population statistics) reproduces")
    if not family.needs_producing_conv:
        return None
    if call.kind == "op":
        return ("its input is not the output of a module (an operation such as +, torch.cat or a functional "
                "call produced it): CBN and MABN must directly follow an nn.Conv2d")
    if call.kind == "module":
        return f"its input comes from {call.producer!r} ({call.producer_type}), not from an nn.Conv2d"
    if call.kind == "inplace":
        return (f"the output of conv {call.producer!r} was modified in place (e.g. by an in-place activation) "
                "before reaching this norm, so the norm's input is not the conv's output")
    if uses_conv_input:
        if call.stale:
            return (f"conv {call.producer!r} ran again between producing this norm's input and the norm: "
                    f"{family.name} uses the input of the conv's latest call")
        sharing = [] if consumers is None else consumers.get((call.producer, call.conv_call), [])
        if len(sharing) > 1:
            return (f"conv {call.producer!r} feeds several norms ({', '.join(sharing)}): {family.name} takes the "
                    "conv's input captured at each call, which only one layer can take")
    return None


def convert_norm(module: nn.Module, norm: str, example_inputs: Any, *, include_detectron2: bool = False,
                 **hyperparameters: Any) -> Tuple[nn.Module, ConversionReport]:
    """Replace, in place, the BN layers of ``module`` that directly follow a conv by CBN / NaiveCBN / MABN.

    Converted: every ``nn.BatchNorm2d`` (subclasses included) and ``nn.SyncBatchNorm``, and with
    ``include_detectron2=True`` Detectron2's ``FrozenBatchNorm2d`` (which becomes trainable), that
    the example forward (module docstring) calls once with a (N, C, H, W) input produced by an
    ``nn.Conv2d``. Each becomes ``NORM_FAMILIES[norm].layer_class(C, affine=..., **hyperparameters)``
    with the BN's eps (unless given; never its momentum: MABN's weights the old value, BN's the
    new), affine (a frozen one stays frozen), device, dtype and training flag, and its population
    statistics through ``set_population_statistics(E[x], E[x^2])`` with E[x^2] = running_var +
    running_mean^2 in float64; it is attached to its producing conv (``attach_conv``; MABN's
    centralization changes the conv's output for all its consumers, and the weights it changes are
    reported once: :func:`smallbn_d2.pretrained.check_loaded_weight_centralization`). CBN's eval
    mode computes what the BN's did; MABN's does not. Training then needs
    ``smallbn_d2.set_norm_iteration(model, iteration)`` before every step (docs/CONVERT_NORM.md).

    Args:
        module: the model (modified in place; a model that is itself a BN is not converted).
        norm: ``"CBN"``, ``"NaiveCBN"`` or ``"MABN"`` (a key of ``NORM_FAMILIES``).
        example_inputs: a tuple of the model's positional arguments, or one argument (e.g. a
            (N, 3, H, W) tensor; a list of dicts for Detectron2 models) reaching every BN to convert;
            run in eval mode under ``torch.no_grad()``, random state restored (no statistics change).
        include_detectron2: also convert Detectron2's ``FrozenBatchNorm2d`` (imports Detectron2).
        **hyperparameters: constructor arguments of the layer class (e.g. ``window_size=4`` for
            CBN, ``buffer_size=16`` for MABN), checked before the model is touched.
    Returns:
        ``(module, report)``: ``module`` itself, and a :class:`ConversionReport` naming every
        converted BN with its conv and every BN-like layer left as it was with the reason (the
        reasons are listed in docs/CONVERT_NORM.md, "What is not converted").
    Raises:
        ValueError: ``norm`` is not a registered family (the message lists the allowed names), a
            hyperparameter is unknown, given for ``num_features``/``affine``, or out of its range
            (the message names it); ``include_detectron2`` is not a bool.
        Exception: whatever the model's forward raises for ``example_inputs`` (nothing converted).
    """
    family = _validate(norm, hyperparameters)
    if not isinstance(include_detectron2, bool):
        raise ValueError(f"include_detectron2 = {include_detectron2!r} is invalid; allowed: True or False")
    frozen_cls = _detectron2_frozen_bn() if include_detectron2 else None
    uses_conv_input = _uses_conv_input(family, hyperparameters)

    names: Dict[int, str] = {}
    parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
        for child_name, child in m.named_children():
            parents.setdefault(id(child), []).append((m, child_name))
    found = {id(m): (m, refusal) for m in module.modules() if (refusal := _source_kind(m, frozen_cls)) is not None}
    structural = {id(m.norm): names[id(m)] for m in module.modules()
                  if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), nn.Module)}
    watched = {i: names[i] for i, (m, refusal) in found.items() if refusal == ""}
    calls = _trace(module, names, watched, structural, example_inputs)

    convs = dict(module.named_modules())
    consumers: Dict[Tuple[str, int], List[str]] = {}  # among the norms convertible otherwise
    for i, name in watched.items():
        cs = calls[name]
        if (len(cs) == 1 and cs[0].kind == "conv"
                and _skip_reason(found[i][0], cs, family, uses_conv_input, None) is None):
            consumers.setdefault((cs[0].producer, cs[0].conv_call), []).append(name)

    report = ConversionReport(norm)
    for i, (bn, refusal) in found.items():
        name = names[i]
        entry = dict(name=name, source=type(bn).__name__, channels=int(getattr(bn, "num_features", -1)))
        if refusal:
            report.skipped.append(ConversionEntry(**entry, reason=refusal))
            continue
        if bn is module:
            report.skipped.append(ConversionEntry(**entry, reason="the model itself is the BN: nothing holds it"))
            continue
        cs = calls[name]
        conv_name = cs[0].producer if len(cs) == 1 and cs[0].kind == "conv" else None
        reason = _skip_reason(bn, cs, family, uses_conv_input, consumers)
        if reason is not None:
            report.skipped.append(ConversionEntry(**entry, conv=conv_name, reason=reason))
            continue
        layer = _new_layer(bn, family, hyperparameters)
        if conv_name is not None:
            try:
                layer.attach_conv(convs[conv_name])
            except (ValueError, TypeError) as e:
                report.skipped.append(ConversionEntry(**entry, conv=conv_name, reason=f"unsupported conv: {e}"))
                continue
        for parent, child_name in parents.get(i, []):
            setattr(parent, child_name, layer)  # nn.Module.__setattr__: replaces the child
        report.converted.append(ConversionEntry(**entry, conv=conv_name))

    logger.info(f"convert_norm: {len(report.converted)} BN layers converted to {norm}, {len(report.skipped)} skipped")
    if report.skipped:
        logger.warning("convert_norm: not converted: "
                       + "; ".join(f"{e.name} ({e.source}): {e.reason}" for e in report.skipped))
    if any(e.conv is not None and is_weight_centralized(convs[e.conv]) for e in report.converted):
        check_loaded_weight_centralization(module)
    return module, report
