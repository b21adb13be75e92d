"""CBN and MABN in Detectron2's Python configs (LazyConfig), and the LazyConfig training flow.

``norm="CBN"``, ``"NaiveCBN"`` or ``"MABN"`` works in a lazy model as in YAML configs; the layers'
hyperparameters come from the config's ``smallbn`` field (:data:`SMALLBN_KEYS`), and
:func:`build_lazy_model` does for a lazy model what :func:`smallbn_d2.build_model` does for a YAML
config. The field, the units and the differences from YAML configs: docs/TRAINING.md#lazyconfig.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .config import EPOCHS, FREEZE_ITER, IMAGES, walk_config
from .layers.hyperparameters import BOOLEAN, INT_AT_LEAST_0, INT_AT_LEAST_1
from .modeling import NORM_FAMILIES, norm_hyperparameters, place_norms, prepare_norms

__all__ = ["SMALLBN_KEYS", "model_zoo_config", "mask_rcnn_fpn_1x_with_norm", "burn_in_iterations",
           "burn_in_until_first_lr_step", "check_norm_arguments", "check_smallbn_field", "build_lazy_model",
           "build_model_from_lazy_config", "lazy_norm_fields", "lazy_dataset_names", "norm_hooks", "do_test",
           "do_train"]

logger = logging.getLogger(__name__)

#: The keys a LazyConfig's ``smallbn`` field may hold, each optional: ``norms`` ({norm name: {constructor
#: argument: value}}), ``head_norms`` (the same, merged over ``norms`` inside the box, mask and RetinaNet
#: heads), ``precise_norm`` (``enabled``, ``num_iter``: PreciseBN after training and every
#: ``train.eval_period``), ``freeze_norm_stats_iter`` (first iteration with frozen statistics; -1: never).
SMALLBN_KEYS = ("norms", "head_norms", "precise_norm", "freeze_norm_stats_iter")
_PRECISE_NORM_KEYS = ("enabled", "num_iter")


def model_zoo_config(path: str):
    """``detectron2.model_zoo.get_config(path)`` (e.g. ``"common/models/mask_rcnn_fpn.py"``), an
    ``omegaconf.DictConfig``.

    Raises:
        FileNotFoundError: ``path`` is not among the installed Detectron2's configs; the message says
            where they were looked for.
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
    """Detectron2's model-zoo ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` with ``norm`` (a
    norm name) in the FPN, a 4conv1fc box head and the mask head (the CBN paper's "normalized heads"),
    the pretrained backbone kept FrozenBN.

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
    """A CBN burn-in in epochs (the CBN paper: 3 on COCO) as trainer iterations for
    ``smallbn.norms.CBN.burn_in``: ``round(epochs * num_images / images_per_iteration)``, the YAML
    trainer's conversion. ``num_images``: training images after Detectron2's filtering (COCO train2017:
    117266); ``images_per_iteration``: over all GPUs (``dataloader.train.total_batch_size``).

    Raises:
        ValueError: a value outside these ranges (the message names it).
    """
    EPOCHS.check(epochs, "epochs")
    IMAGES.check(num_images, "num_images")
    INT_AT_LEAST_1.check(images_per_iteration, "images_per_iteration")
    return int(round(epochs * num_images / images_per_iteration))


def burn_in_until_first_lr_step(lr_multiplier) -> int:
    """The first learning-rate step in iterations, for ``smallbn.norms.CBN.burn_in`` (the YAML key
    ``MODEL.CBN.BURN_IN_UNTIL_LR_STEP``; docs/REPRODUCE.md#burn-in-until-the-first-learning-rate-step),
    from the config's ``lr_multiplier`` node: a ``WarmupParamScheduler`` of a ``MultiStepParamScheduler``
    (Detectron2's ``common/coco_schedule.py``) or the latter itself. Without ``num_updates`` the last
    milestone is the end of training (fvcore's convention), not a step.

    Raises:
        ValueError: no milestone before the end of training, or not integers >= 0.
    """
    def field(node, name):
        return node.get(name) if isinstance(node, Mapping) or hasattr(node, "get") else None

    node = field(lr_multiplier, "scheduler")
    node = lr_multiplier if node is None else node
    milestones = field(node, "milestones")
    steps = [] if milestones is None else list(milestones)
    if field(node, "num_updates") is None:  # fvcore: the last milestone is then the end of training
        steps = steps[:-1]
    if not steps or not all(INT_AT_LEAST_0.test(v) for v in steps):
        raise ValueError(
            f"lr_multiplier has no learning-rate step: milestones = {milestones!r} (num_updates = "
            f"{field(node, 'num_updates')!r}); allowed: "
            "a LazyCall MultiStepParamScheduler node with at least one milestone before the end of training, "
            "in iterations (integers >= 0), alone or as the scheduler of a WarmupParamScheduler node")
    return int(min(steps))


def _plain(value: Any, lenient: bool = False) -> Any:
    """An omegaconf node as plain Python containers, interpolations resolved (other values unchanged).
    With ``lenient``, a node that cannot be read so yet (a config checked before the run: an unresolved
    interpolation) is read with its raw values, dataclasses as dicts, instead of raising."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, SCMode

    if not isinstance(value, (DictConfig, ListConfig)):
        return value
    try:
        # structured configs (Detectron2 main stores dataclasses such as ShapeSpec so) as the dataclass
        return OmegaConf.to_container(value, resolve=True, structured_config_mode=SCMode.INSTANTIATE)
    except Exception:
        if not lenient:
            raise
        return OmegaConf.to_container(value, resolve=False)


def lazy_norm_fields(cfg) -> Dict[str, str]:
    """``{dotted field: name}`` of every string field called ``norm`` or ``*_norm`` in a LazyConfig's
    model (``model.backbone.norm``, ``model.roi_heads.box_head.conv_norm``, ...)."""
    model = cfg.get("model", None) if hasattr(cfg, "get") else None
    return {path: value for path, key, value in walk_config(_plain(model, lenient=True), "model")
            if (key == "norm" or key.endswith("_norm")) and isinstance(value, str)}


def lazy_dataset_names(cfg, eval_only: bool = False) -> List[str]:
    """The dataset names a LazyConfig run reads, in order without duplicates: the ``names`` fields
    under ``dataloader.train`` (unless ``eval_only``) and ``dataloader.test`` (when
    ``dataloader.evaluator`` is set)."""
    loader = cfg.get("dataloader", None) if hasattr(cfg, "get") else None
    if loader is None:
        return []
    parts = ([] if eval_only else ["train"]) + (["test"] if loader.get("evaluator", None) is not None else [])
    names: List[str] = []
    for part in parts:
        for _, key, value in walk_config(_plain(loader.get(part, None), lenient=True), f"dataloader.{part}"):
            if key == "names":
                for name in [value] if isinstance(value, str) else list(value or []):
                    if isinstance(name, str) and name not in names:
                        names.append(name)
    return names


def _constructor_arguments(layer_class: type) -> List[str]:
    """The keyword arguments of ``layer_class(num_features, ...)``: its signature's, and those of its
    ``HYPERPARAMETERS`` table (passed on through ``**kwargs`` by e.g. NaiveCBN)."""
    params = list(inspect.signature(layer_class.__init__).parameters.values())[2:]  # self, num_features
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names + [n for n in getattr(layer_class, "HYPERPARAMETERS", {}) if n not in names]


def check_norm_arguments(norms: Optional[Mapping[str, Mapping[str, Any]]],
                         where: str = "smallbn.norms") -> Dict[str, Dict[str, Any]]:
    """Check a ``{norm name: {constructor argument: value}}`` mapping (a dict, an omegaconf node or
    None); ``where`` is the field's name in the messages.

    Returns:
        the mapping as plain dicts, each value converted as the layer's constructor does.
    Raises:
        KeyError: an unknown norm name (the message lists smallbn_d2's names).
        TypeError: not a mapping, or an argument the layer does not take (the message lists them).
        ValueError: a value outside the layer's ``HYPERPARAMETERS`` range, naming the field
            (``smallbn.norms.CBN.window_size = 0 is invalid; allowed: an integer >= 1``).
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
        out[name] = {}
        for arg, value in kwargs.items():
            if arg not in allowed:
                raise TypeError(f"{where}.{name}.{arg}: {layer_class.__name__} has no argument {arg!r}; "
                                f"allowed: {', '.join(allowed)}")
            rng = layer_class.HYPERPARAMETERS.get(arg)
            out[name][arg] = rng.check(value, f"{where}.{name}.{arg}") if rng is not None else value
    return out


def build_lazy_model(model: Any, norms: Optional[Mapping[str, Mapping[str, Any]]] = None,
                     head_norms: Optional[Mapping[str, Mapping[str, Any]]] = None) -> nn.Module:
    """Instantiate a lazy model node (``cfg.model``, not changed) with the hyperparameters ``norms``
    (``cfg.smallbn.norms``) and ``head_norms`` (inside the heads) in force, then wire the layers: the
    steps of :func:`smallbn_d2.build_model`. Reads no data; the model is on the CPU unless the node
    places it elsewhere.

    Raises:
        TypeError: ``model`` is no lazy node (with ``_target_``) or builds no ``nn.Module``; or as
            :func:`check_norm_arguments`.
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


def _check_keys(name: str, value: Any, keys) -> None:
    """Raise unless ``value`` is a mapping whose keys are among ``keys``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} = {value!r} is invalid; allowed: a dict with keys {', '.join(keys)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise KeyError(f"{name}: unknown keys {unknown}; allowed: {', '.join(keys)}")


def check_smallbn_field(cfg) -> Dict[str, Any]:
    """The ``smallbn`` field of a LazyConfig (:data:`SMALLBN_KEYS`; absent: the defaults), checked
    before anything is built, as plain dicts with every key filled in.

    Raises:
        KeyError: an unknown key or norm name (the message lists the allowed ones).
        TypeError: a field of the wrong kind, or an argument a layer does not take.
        ValueError: a value outside its range; the message names the field.
    """
    field = _plain(cfg.get("smallbn", None)) if hasattr(cfg, "get") else None
    field = {} if field is None else field
    _check_keys("smallbn", field, SMALLBN_KEYS)
    precise = field.get("precise_norm") or {}
    _check_keys("smallbn.precise_norm", precise, _PRECISE_NORM_KEYS)
    return {
        "norms": check_norm_arguments(field.get("norms"), "smallbn.norms"),
        "head_norms": check_norm_arguments(field.get("head_norms"), "smallbn.head_norms"),
        "precise_norm": {
            "enabled": BOOLEAN.check(precise.get("enabled", False), "smallbn.precise_norm.enabled"),
            "num_iter": INT_AT_LEAST_1.check(precise.get("num_iter", 200), "smallbn.precise_norm.num_iter")},
        "freeze_norm_stats_iter": FREEZE_ITER.check(field.get("freeze_norm_stats_iter", -1),
                                                    "smallbn.freeze_norm_stats_iter"),
    }


def build_model_from_lazy_config(cfg) -> nn.Module:
    """The model of a whole LazyConfig (what :func:`smallbn_d2.build_model` is for a YACS config):
    :func:`build_lazy_model` of ``cfg.model`` with ``cfg.smallbn.norms``/``head_norms``, moved to
    ``cfg.train.device``.

    Raises:
        as :func:`check_smallbn_field` and :func:`build_lazy_model`.
    """
    field = check_smallbn_field(cfg)
    model = build_lazy_model(cfg.model, field["norms"], field["head_norms"])
    logger.info("Model:\n{}".format(model))
    return model.to(torch.device(cfg.train.device))


def norm_hooks(cfg) -> list:
    """The hooks that drive the norms, to register before any other: ``NormIterationHook`` and, when
    ``smallbn.freeze_norm_stats_iter >= 0``, ``FreezeNormStatsHook``. Raises as :func:`check_smallbn_field`."""
    from .engine import FreezeNormStatsHook, NormIterationHook

    freeze = check_smallbn_field(cfg)["freeze_norm_stats_iter"]
    return [NormIterationHook()] + ([FreezeNormStatsHook(freeze)] if freeze >= 0 else [])


def do_test(cfg, model: nn.Module) -> Optional[dict]:
    """Detectron2's ``inference_on_dataset`` with ``cfg.dataloader.test`` and ``cfg.dataloader.evaluator``;
    its results, or None without an evaluator (``dataloader.evaluator=null``)."""
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if cfg.dataloader.get("evaluator", None) is None:
        logger.info("No dataloader.evaluator: evaluation skipped")
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def do_train(cfg, resume: bool = False) -> None:
    """Detectron2's LazyConfig training loop (``train.*`` keys of its ``common/train.py``) with the model of
    :func:`build_model_from_lazy_config`, a :class:`~smallbn_d2.checkpoint.NormCheckpointer`, and the hooks
    :func:`norm_hooks`, iteration timer, LR scheduler, :class:`~smallbn_d2.engine.PreciseNorm`,
    :class:`~smallbn_d2.engine.AveragePopulationStatistics`, checkpointer, evaluation and writers.
    ``resume``: continue the run in ``train.output_dir``, else load ``train.init_checkpoint`` (if any).
    Raises as :func:`build_model_from_lazy_config`.
    """
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.utils import comm

    from .checkpoint import NormCheckpointer
    from .engine import AveragePopulationStatistics, PreciseNorm
    from .engine.launch import create_ddp_model

    first = norm_hooks(cfg)  # checks the field before anything is built
    precise = check_smallbn_field(cfg)["precise_norm"]
    model = build_model_from_lazy_config(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **_plain(cfg.train.ddp))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = NormCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    precise_hook = None
    if precise["enabled"]:
        loader_cfg = cfg.dataloader.train.copy()
        loader_cfg.num_workers = 0  # as Detectron2 does for PreciseBN
        precise_hook = PreciseNorm(cfg.train.eval_period, model, instantiate(loader_cfg), precise["num_iter"])
    main = comm.is_main_process()
    trainer.register_hooks(first + [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        precise_hook,
        AveragePopulationStatistics((_plain(cfg.train.checkpointer).get("period", 0), cfg.train.eval_period)),
        hooks.PeriodicCheckpointer(checkpointer, **_plain(cfg.train.checkpointer)) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if main else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # the checkpoint holds the iteration that finished last
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
