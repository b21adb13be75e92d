"""CBN and MABN in Detectron2's Python configs (LazyConfig), and the LazyConfig training flow.

Detectron2's LazyConfig files describe the model as a tree of ``LazyCall`` nodes
(``model = L(GeneralizedRCNN)(backbone=L(FPN)(..., norm="CBN"), ...)``) that
``detectron2.config.instantiate`` builds bottom-up. ``norm="CBN"``, ``"NaiveCBN"`` or ``"MABN"``
works there as in YAML configs (importing this module teaches Detectron2's ``get_norm`` these
names); what a lazy model needs in addition is what :func:`smallbn_d2.build_model` does for
YAML configs: the hyperparameters in force while the layers are built, and each layer attached
to its producing conv afterwards. :func:`build_lazy_model` does both.

The ``smallbn`` field of a LazyConfig
-------------------------------------
A config that uses these norms has, next to Detectron2's ``model``, ``dataloader``,
``optimizer``, ``lr_multiplier`` and ``train``, a field ``smallbn`` (every key optional)::

    smallbn = dict(
        # constructor arguments of the layers, per norm name (family); others keep their defaults
        norms=dict(CBN=dict(window_size=8, burn_in=21987), MABN=dict(buffer_size=32)),
        # arguments that differ inside the box, mask and RetinaNet heads (merged over ``norms``)
        head_norms=dict(MABN=dict(warmup_iters=10000)),
        # PreciseBN for BN, CBN and MABN after training and every train.eval_period iterations
        precise_norm=dict(enabled=False, num_iter=200),
        # first iteration trained with frozen norm statistics; -1: never
        freeze_norm_stats_iter=-1,
    )

The arguments are those of :class:`~smallbn_d2.CrossIterationBatchNorm2d` (CBN, NaiveCBN) and
:class:`~smallbn_d2.MovingAverageBatchNorm2d` (MABN), checked against the layers'
``HYPERPARAMETERS`` when the config is used; an error names the field
(``smallbn.norms.CBN.window_size = 0 is invalid; allowed: an integer >= 1``).

Units: every count is in trainer iterations. A CBN burn-in in epochs (the YAML key
``MODEL.CBN.BURN_IN_EPOCHS``) has no lazy field, because building a lazy model reads no data:
convert it in the config file with :func:`burn_in_iterations` (epochs x training images /
images per iteration). A burn-in until the first learning-rate step (the YAML key
``MODEL.CBN.BURN_IN_UNTIL_LR_STEP``, the CBN authors' released recipe) is
:func:`burn_in_until_first_lr_step` of the config's ``lr_multiplier``.
Nothing rescales the iteration counts when the number of GPUs changes
(Detectron2's LazyConfig flow has no ``auto_scale_workers``): with another total batch size,
change ``dataloader.train.total_batch_size``, the schedule and these counts together.

Training: :func:`do_train` is Detectron2's LazyConfig training loop (``SimpleTrainer`` or
``AMPTrainer``, ``train.*`` keys of Detectron2's ``common/train.py``) with
:class:`~smallbn_d2.engine.NormIterationHook` as the first hook, the freezing and PreciseBN
hooks of ``smallbn``, and :class:`~smallbn_d2.checkpoint.NormCheckpointer` (BN checkpoints load
into CBN/MABN models). ``tools/lazyconfig_train_net.py`` is its command line. A LazyConfig
with CBN/MABN trained by Detectron2's own ``tools/lazyconfig_train_net.py`` fails at the first
step (no producing conv, no iteration): use this flow, or :func:`build_lazy_model` and
``NormIterationHook`` in your own script.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .modeling import NORM_FAMILIES, norm_hyperparameters, place_norms, prepare_norms

__all__ = [
    "SMALLBN_KEYS",
    "model_zoo_config",
    "mask_rcnn_fpn_1x_with_norm",
    "burn_in_iterations",
    "burn_in_until_first_lr_step",
    "check_norm_arguments",
    "check_smallbn_field",
    "build_lazy_model",
    "build_model_from_lazy_config",
    "norm_hooks",
    "do_test",
    "do_train",
]

logger = logging.getLogger(__name__)

#: The keys a LazyConfig's ``smallbn`` field may hold (see the module docstring).
SMALLBN_KEYS = ("norms", "head_norms", "precise_norm", "freeze_norm_stats_iter")
_PRECISE_NORM_KEYS = ("enabled", "num_iter")


# ----------------------------------------------------------------------------- config helpers
def model_zoo_config(path: str):
    """A LazyConfig of Detectron2's model zoo, e.g. ``"common/models/mask_rcnn_fpn.py"``.

    ``detectron2.model_zoo.get_config(path)`` with a clear error when the installed Detectron2
    lacks its model-zoo configs.

    Returns:
        the loaded ``omegaconf.DictConfig``.
    Raises:
        FileNotFoundError: ``path`` is not among the installed Detectron2's configs; the message
            says where they were looked for.
    """
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config(path)
    except RuntimeError as e:  # v0.6 and main: "<path> not available in Model Zoo!"
        root = os.path.join(os.path.dirname(model_zoo.__file__), "configs")
        where = root if os.path.isdir(root) else f"{root} (missing: the installed Detectron2 has no model-zoo configs)"
        raise FileNotFoundError(
            f"Detectron2 model-zoo config {path!r} not found under {where}. Detectron2 installs its "
            "configs with its package; tools/install.sh does so for Detectron2 v0.6.") from e


def mask_rcnn_fpn_1x_with_norm(norm: str):
    """Detectron2's model-zoo ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` with ``norm``
    in the FPN, a 4conv1fc box head and the mask head (the CBN paper's "normalized heads"), the
    pretrained backbone kept FrozenBN, and the model zoo's COCO evaluation (pycocotools' COCOeval
    where Detectron2's compiled extension is absent: same AP; the environment's start-up module
    sees to it).

    Args:
        norm: a norm name (e.g. "CBN", "MABN", "GN").
    Returns:
        the config (``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``).
    Raises:
        FileNotFoundError: as :func:`model_zoo_config`.
    """
    cfg = model_zoo_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
    cfg.model.backbone.norm = norm  # FPN lateral and output convs
    cfg.model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc box head
    cfg.model.roi_heads.box_head.fc_dims = [1024]
    cfg.model.roi_heads.box_head.conv_norm = norm
    cfg.model.roi_heads.mask_head.conv_norm = norm
    return cfg


def burn_in_iterations(epochs: float, num_images: int, images_per_iteration: int) -> int:
    """A CBN burn-in in epochs converted to trainer iterations, for a LazyConfig's
    ``smallbn.norms.CBN.burn_in``.

    ``round(epochs * num_images / images_per_iteration)``, the conversion the YAML trainer does
    for ``MODEL.CBN.BURN_IN_EPOCHS`` (:func:`smallbn_d2.config.cbn_burn_in_iters`).

    Args:
        epochs: burn-in length in epochs, a finite number >= 0 (the CBN paper: 3 on COCO).
        num_images: training images after Detectron2's filtering (COCO train2017 without
            images lacking annotations: 117266), integer >= 0.
        images_per_iteration: images per trainer iteration over all GPUs
            (``dataloader.train.total_batch_size``), integer >= 1.
    Returns:
        iterations, integer >= 0.
    Raises:
        ValueError: a value outside these ranges (the message names it).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"epochs = {epochs!r} is invalid; allowed: a finite number >= 0")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images = {num_images!r} is invalid; allowed: an integer >= 0 (images)")
    if isinstance(images_per_iteration, bool) or not isinstance(images_per_iteration, int) or images_per_iteration < 1:
        raise ValueError(f"images_per_iteration = {images_per_iteration!r} is invalid; allowed: an integer >= 1")
    return int(round(epochs * num_images / images_per_iteration))


def burn_in_until_first_lr_step(lr_multiplier) -> int:
    """A CBN burn-in that lasts until the first learning-rate step, for a LazyConfig's
    ``smallbn.norms.CBN.burn_in`` (the YAML key ``MODEL.CBN.BURN_IN_UNTIL_LR_STEP``).

    The CBN authors' released COCO configs keep k = 1 until the learning rate first drops
    (``burnin=8`` of 12 epochs, steps at epochs 8 and 11). This reads the first milestone, in
    trainer iterations, of a LazyConfig's ``lr_multiplier`` node (not instantiated): a
    ``WarmupParamScheduler`` whose ``scheduler`` is a ``MultiStepParamScheduler``, as in
    Detectron2's ``common/coco_schedule.py``, or a ``MultiStepParamScheduler`` node itself.
    Without ``num_updates`` the last milestone is the end of training (fvcore's convention), not
    a step. It is evaluated when the config file runs: after changing ``lr_multiplier.scheduler.milestones`` (for example on the command
    line), set ``smallbn.norms.CBN.burn_in`` to the new first milestone as well.

    Args:
        lr_multiplier: the config's ``lr_multiplier`` (a ``LazyCall`` node or a dict).
    Returns:
        the smallest milestone before the end of training, in iterations (>= 0).
    Raises:
        ValueError: no milestones found, or not integers >= 0 (the message names what was given
            and what is allowed).
    """
    def field(node, name):
        return node.get(name) if isinstance(node, Mapping) or hasattr(node, "get") else None

    node = field(lr_multiplier, "scheduler")
    node = lr_multiplier if node is None else node
    milestones = field(node, "milestones")
    steps = [] if milestones is None else list(milestones)
    if field(node, "num_updates") is None:  # fvcore: the last milestone is then the end of training
        steps = steps[:-1]
    if not steps or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps):
        raise ValueError(
            f"lr_multiplier has no learning-rate step: milestones = {milestones!r} (num_updates = "
            f"{field(node, 'num_updates')!r}); allowed: "
            "a LazyCall MultiStepParamScheduler node with at least one milestone before the end of training, "
            "in iterations (integers >= 0), alone or as the scheduler of a WarmupParamScheduler node")
    return int(min(steps))


def _plain(value: Any) -> Any:
    """An omegaconf node as plain Python containers, interpolations resolved (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, SCMode

    if isinstance(value, (DictConfig, ListConfig)):
        # structured configs (Detectron2 main stores dataclasses such as ShapeSpec so) as the dataclass
        return OmegaConf.to_container(value, resolve=True, structured_config_mode=SCMode.INSTANTIATE)
    return value


def _constructor_arguments(layer_class: type) -> List[str]:
    """The keyword arguments of ``layer_class(num_features, ...)``: its signature's, and those of its
    ``HYPERPARAMETERS`` table (passed on through ``**kwargs`` by e.g. NaiveCBN)."""
    params = list(inspect.signature(layer_class.__init__).parameters.values())[2:]  # self, num_features
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names + [n for n in getattr(layer_class, "HYPERPARAMETERS", {}) if n not in names]


def check_norm_arguments(norms: Optional[Mapping[str, Mapping[str, Any]]],
                         where: str = "smallbn.norms") -> Dict[str, Dict[str, Any]]:
    """Check a ``{norm name: {constructor argument: value}}`` mapping of a LazyConfig.

    Args:
        norms: e.g. ``{"CBN": {"window_size": 8, "burn_in": 120}}`` (a dict or an omegaconf
            node), or None (empty).
        where: the field's name, for the messages.
    Returns:
        the mapping as plain dicts, each value converted as the layer's constructor does.
    Raises:
        KeyError: an unknown norm name (the message lists smallbn_d2's names).
        TypeError: ``norms`` or an entry is not a mapping, or an argument the layer does not
            take (the message lists the allowed ones).
        ValueError: a value outside the layer's allowed range (``HYPERPARAMETERS``; the message
            names the field, e.g. ``smallbn.norms.CBN.window_size``).
    """
    norms = _plain(norms)
    if norms is None:
        return {}
    if not isinstance(norms, Mapping):
        raise TypeError(f"{where} = {norms!r} is invalid; allowed: a dict {{norm name: {{argument: value}}}}")
    out: Dict[str, Dict[str, Any]] = {}
    for name, kwargs in norms.items():
        if name not in NORM_FAMILIES:
            raise KeyError(f"{where}.{name}: unknown norm name {name!r}; allowed: {', '.join(NORM_FAMILIES)}")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{where}.{name} = {kwargs!r} is invalid; allowed: a dict {{argument: value}}")
        layer_class = NORM_FAMILIES[name].layer_class
        allowed = _constructor_arguments(layer_class)
        checked = {}
        for arg, value in kwargs.items():
            if arg not in allowed:
                raise TypeError(f"{where}.{name}.{arg}: {layer_class.__name__} has no argument {arg!r}; "
                                f"allowed: {', '.join(allowed)}")
            rng = layer_class.HYPERPARAMETERS.get(arg)
            checked[arg] = rng.check(value, f"{where}.{name}.{arg}") if rng is not None else value
        out[name] = checked
    return out


# ----------------------------------------------------------------------------- building
def build_lazy_model(model: Any, norms: Optional[Mapping[str, Mapping[str, Any]]] = None,
                     head_norms: Optional[Mapping[str, Mapping[str, Any]]] = None) -> nn.Module:
    """Instantiate a LazyConfig model with CBN/MABN hyperparameters in force, then wire the layers.

    The LazyConfig counterpart of :func:`smallbn_d2.build_model`, by the same steps:
    ``instantiate(model)`` runs inside :func:`~smallbn_d2.norm_hyperparameters` (``norms``), then
    :func:`~smallbn_d2.modeling.place_norms` rebuilds the layers inside the box, mask and
    RetinaNet heads with ``norms`` merged with ``head_norms`` where those differ (and RetinaNet's
    per-level layers), and :func:`~smallbn_d2.prepare_norms` attaches every layer to its
    producing conv. ``model`` is not
    changed. Reads no data.

    Args:
        model: the lazy model node (``cfg.model``: an omegaconf node or dict with ``_target_``).
        norms: ``{norm name: {constructor argument: value}}`` (``cfg.smallbn.norms``); names not
            given, and arguments not given, keep the layers' defaults.
        head_norms: the same, for the arguments that differ inside the heads
            (``cfg.smallbn.head_norms``; MABN's longer warm-up there, ``warmup_iters``).
    Returns:
        the model (on the CPU unless the lazy config places it elsewhere).
    Raises:
        TypeError: ``model`` is no lazy node; or as :func:`check_norm_arguments`.
        KeyError, ValueError: as :func:`check_norm_arguments`.
        NormNotWiredError: a CBN/MABN layer that does not directly follow a conv.
    """
    from detectron2.config import instantiate

    tree = _plain(model)
    if not isinstance(tree, Mapping) or "_target_" not in tree:
        raise TypeError(f"build_lazy_model needs a lazy model node (cfg.model, with '_target_'), got "
                        f"{type(model).__name__}")
    body = check_norm_arguments(norms, "smallbn.norms")
    heads = check_norm_arguments(head_norms, "smallbn.head_norms")
    with norm_hyperparameters(body, heads):
        built = instantiate(tree)
        if not isinstance(built, nn.Module):
            raise TypeError(f"the lazy model node builds a {type(built).__name__}, not an nn.Module")
        place_norms(built)
    return prepare_norms(built)


def check_smallbn_field(cfg) -> Dict[str, Any]:
    """Check the ``smallbn`` field of a LazyConfig (module docstring) before anything is built.

    Args:
        cfg: the loaded LazyConfig; a config without ``smallbn`` gets the defaults.
    Returns:
        the field as plain dicts, ``norms``/``head_norms`` checked (:func:`check_norm_arguments`).
    Raises:
        KeyError: an unknown key or norm name (the message lists the allowed ones).
        TypeError: a field of the wrong kind, or an argument a layer does not take.
        ValueError: a value outside its range; the message names the field.
    """
    field = _plain(cfg.get("smallbn", None)) if hasattr(cfg, "get") else None
    field = {} if field is None else field
    if not isinstance(field, Mapping):
        raise TypeError(f"smallbn = {field!r} is invalid; allowed: a dict with keys {', '.join(SMALLBN_KEYS)}")
    unknown = sorted(set(field) - set(SMALLBN_KEYS))
    if unknown:
        raise KeyError(f"smallbn: unknown keys {unknown}; allowed: {', '.join(SMALLBN_KEYS)}")
    out = dict(field)
    out["norms"] = check_norm_arguments(field.get("norms"), "smallbn.norms")
    out["head_norms"] = check_norm_arguments(field.get("head_norms"), "smallbn.head_norms")
    precise = field.get("precise_norm") or {}
    if not isinstance(precise, Mapping):
        raise TypeError(f"smallbn.precise_norm = {precise!r} is invalid; allowed: a dict with keys "
                        f"{', '.join(_PRECISE_NORM_KEYS)}")
    unknown = sorted(set(precise) - set(_PRECISE_NORM_KEYS))
    if unknown:
        raise KeyError(f"smallbn.precise_norm: unknown keys {unknown}; allowed: {', '.join(_PRECISE_NORM_KEYS)}")
    if not isinstance(precise.get("enabled", False), bool):
        raise ValueError(f"smallbn.precise_norm.enabled = {precise['enabled']!r} is invalid; allowed: True or False")
    num_iter = precise.get("num_iter", 200)
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"smallbn.precise_norm.num_iter = {num_iter!r} is invalid; allowed: an integer >= 1 "
                         "(iterations)")
    out["precise_norm"] = {"enabled": precise.get("enabled", False), "num_iter": num_iter}
    freeze = field.get("freeze_norm_stats_iter", -1)
    if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < -1:
        raise ValueError(f"smallbn.freeze_norm_stats_iter = {freeze!r} is invalid; allowed: -1 (off) or an "
                         "integer >= 0 (iterations)")
    out["freeze_norm_stats_iter"] = freeze
    return out


def build_model_from_lazy_config(cfg) -> nn.Module:
    """The model of a whole LazyConfig (the counterpart of :func:`smallbn_d2.build_model`, which
    takes a YACS ``CfgNode``): :func:`build_lazy_model` of ``cfg.model`` with
    ``cfg.smallbn.norms``/``head_norms``, moved to ``cfg.train.device``.

    Raises:
        as :func:`check_smallbn_field` and :func:`build_lazy_model`.
    """
    field = check_smallbn_field(cfg)
    model = build_lazy_model(cfg.model, field["norms"], field["head_norms"])
    logger.info("Model:\n{}".format(model))
    return model.to(torch.device(cfg.train.device))


# ----------------------------------------------------------------------------- training flow
def norm_hooks(cfg) -> list:
    """The hooks that drive the norms, to register *before* any other hook: ``NormIterationHook``
    and, when ``cfg.smallbn.freeze_norm_stats_iter >= 0``, ``FreezeNormStatsHook``.

    Raises:
        as :func:`check_smallbn_field`.
    """
    from .engine import FreezeNormStatsHook, NormIterationHook

    freeze = check_smallbn_field(cfg)["freeze_norm_stats_iter"]
    hooks = [NormIterationHook()]
    if freeze >= 0:
        hooks.append(FreezeNormStatsHook(freeze))
    return hooks


def do_test(cfg, model: nn.Module) -> Optional[dict]:
    """Evaluate ``model`` with ``cfg.dataloader.test`` and ``cfg.dataloader.evaluator``
    (Detectron2's ``inference_on_dataset``); returns its results. Without an evaluator (no
    ``dataloader.evaluator``, or ``dataloader.evaluator=null`` on the command line) nothing
    runs and the result is None."""
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if cfg.dataloader.get("evaluator", None) is None:
        logger.info("No dataloader.evaluator: evaluation skipped")
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def do_train(cfg, resume: bool = False) -> None:
    """Train a LazyConfig model: Detectron2's LazyConfig training loop with smallbn_d2's norms.

    ``cfg`` has Detectron2's fields (``model``, ``dataloader.train/test/evaluator``,
    ``optimizer``, ``lr_multiplier``, ``train`` as in Detectron2's ``common/train.py``) and
    optionally ``smallbn`` (module docstring). Hooks, in order: :func:`norm_hooks`, iteration
    timer, LR scheduler, PreciseBN for BN/CBN/MABN (:class:`~smallbn_d2.engine.PreciseNorm`,
    when ``smallbn.precise_norm.enabled``; period ``train.eval_period``), averaging of the
    population statistics over the processes before each checkpoint and evaluation
    (:class:`~smallbn_d2.engine.AveragePopulationStatistics`), periodic checkpointer (main
    process), evaluation every ``train.eval_period`` iterations and after the last, metric
    writers every ``train.log_period`` iterations.

    Args:
        cfg: the loaded LazyConfig (``cfg.optimizer.params.model`` is set to the model, as
            Detectron2 does).
        resume: continue from the last checkpoint in ``train.output_dir`` (else load
            ``train.init_checkpoint``, if any, and start at iteration 0).
    Raises:
        as :func:`build_model_from_lazy_config`.
    """
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.utils import comm

    from .checkpoint import NormCheckpointer
    from .engine import AveragePopulationStatistics, PreciseNorm
    from .engine.launch import create_ddp_model

    first = norm_hooks(cfg)  # checks the field before anything is built
    model = build_model_from_lazy_config(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **_plain(cfg.train.ddp))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = NormCheckpointer(model, cfg.train.output_dir, trainer=trainer)

    precise = check_smallbn_field(cfg)["precise_norm"]
    precise_hook = None
    if precise["enabled"]:
        loader_cfg = cfg.dataloader.train.copy()
        loader_cfg.num_workers = 0  # as Detectron2 does for PreciseBN
        precise_hook = PreciseNorm(cfg.train.eval_period, model, instantiate(loader_cfg), precise["num_iter"])
    trainer.register_hooks(first + [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        precise_hook,
        AveragePopulationStatistics((_plain(cfg.train.checkpointer).get("period", 0), cfg.train.eval_period)),
        hooks.PeriodicCheckpointer(checkpointer, **_plain(cfg.train.checkpointer)) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # the checkpoint holds the iteration that finished last
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
