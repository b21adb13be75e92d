"""Read a training run back from the files ``tools/train_net.py`` (Detectron2) leaves in OUTPUT_DIR.

* ``config.yaml``: the config as given (dumped by ``default_setup`` *before* Detectron2's
  ``auto_scale_workers``): model, norms, ``SOLVER.IMS_PER_BATCH`` and ``REFERENCE_WORLD_SIZE``.
  A LazyConfig run (``tools/lazyconfig_train_net.py``) dumps its Python config as YAML, with
  Python objects (Detectron2's ``ShapeSpec``) under ``!!python/...`` tags: they are read as plain
  data without importing or running anything (:func:`read_config`), and the fields that describe
  the run are mapped to the YACS keys above (:func:`lazy_config_as_yacs`).
* ``metrics.json``: one JSON object per line, written by Detectron2's ``JSONWriter`` every 20
  iterations and at the end: losses, ``time`` (seconds per iteration, median over the last 20),
  peak memory (:mod:`smallbn_d2.engine.resources`), and the evaluation results at the iteration
  of each evaluation under keys like ``bbox/AP`` (``<dataset>/bbox/AP`` with several test sets).
  After ``--resume`` lines are appended; a later line wins for the same iteration.
* ``log.txt``: the world size ("Rank of current process: 0. World size: N"), and the
  "copypaste:" result lines of ``--eval-only`` runs, which write no metrics.json results.
* ``inference/inference_time.json``: inference seconds per image per process
  (:func:`smallbn_d2.engine.resources.append_inference_time`).
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

__all__ = [
    "TASKS",
    "METRICS",
    "RunNotFoundError",
    "Run",
    "read_metrics",
    "world_size_from_log",
    "results_from_log",
    "images_per_gpu",
    "model_name",
    "describe_norms",
    "read_inference_time",
    "read_config",
    "is_lazy_config",
    "lazy_config_as_yacs",
    "load_run",
]

#: Evaluation tasks read (COCOEvaluator's names) and their metrics, in percent.
TASKS = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_RESULT_KEY = re.compile(r"^(?:(?P<dataset>.+)/)?(?P<task>bbox|segm)/(?P<metric>AP|AP50|AP75|APs|APm|APl)$")
_WORLD_SIZE = re.compile(r"Rank of current process: \d+\. World size: (\d+)")
_COPYPASTE = re.compile(r"copypaste: (.*)$")
_PEAK_KEYS = {"peak_memory/cuda_allocated_mb": "GPU", "peak_memory/cpu_rss_mb": "CPU RSS"}
_INFERENCE_TIME_FILE = os.path.join("inference", "inference_time.json")


class RunNotFoundError(FileNotFoundError):
    """A directory is not a finished-or-running ``tools/train_net.py`` output directory."""


@dataclass
class Run:
    """What one OUTPUT_DIR says about its run.

    Attributes:
        name: a label (the directory's name unless given).
        output_dir: the directory.
        config: ``config.yaml`` as a nested dict.
        model: e.g. "Mask R-CNN R50-FPN"; ``family``: "Faster R-CNN", "Mask R-CNN", "RetinaNet", ...
        norm: e.g. "FPN+heads: CBN, backbone: FrozenBN" (:func:`describe_norms`).
        images_per_gpu: images per process per iteration; ``num_gpus``: processes (None if unknown).
        metrics: the rows of metrics.json, one per iteration, sorted.
        results: task -> metric -> value (percent) of the last evaluation.
        eval_iteration: iteration of that evaluation (None for an --eval-only run).
        train_s_per_iter: median of ``time`` over metrics.json (None if never written).
        peak_memory_mb: the largest peak memory written, ``peak_memory_kind`` "GPU" or "CPU RSS".
        inference_s_per_image: the last recorded inference time (seconds per image per process).
    """

    name: str
    output_dir: str
    config: dict
    model: str
    family: str
    norm: str
    images_per_gpu: Optional[float]
    num_gpus: Optional[int]
    metrics: List[dict] = field(default_factory=list)
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)
    eval_iteration: Optional[int] = None
    train_s_per_iter: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    peak_memory_kind: Optional[str] = None
    inference_s_per_image: Optional[float] = None

    @property
    def iterations(self) -> Optional[int]:
        """Iterations trained (last iteration with a loss in metrics.json + 1), None without losses.
        (The final evaluation is written at iteration MAX_ITER, one past the last step.)"""
        its = [r["iteration"] for r in self.metrics if "total_loss" in r]
        return max(its) + 1 if its else None

    def ap_curve(self, task: str, metric: str = "AP") -> List[Tuple[int, float]]:
        """``(iterations trained, value)`` of every evaluation of ``task`` in metrics.json.

        Detectron2 stores a periodic evaluation after iteration i (0-based) at key i, and the
        final one at MAX_ITER: both become the number of iterations trained (i + 1, MAX_ITER).
        """
        out = []
        done = self.iterations
        for row in self.metrics:
            res = _results_of_row(row, self.config)
            if task in res and metric in res[task]:
                it = row["iteration"]
                out.append((it + 1 if done is None or it < done else it, res[task][metric]))
        return out

    def loss_curves(self) -> Dict[str, List[Tuple[int, float]]]:
        """``total_loss`` and every ``loss_*`` key -> ``(iteration, value)`` (smoothed as written)."""
        curves: Dict[str, List[Tuple[int, float]]] = {}
        for row in self.metrics:
            for key, value in row.items():
                if (key == "total_loss" or key.startswith("loss_")) and isinstance(value, (int, float)):
                    curves.setdefault(key, []).append((row["iteration"], float(value)))
        return curves


def read_metrics(path: str) -> List[dict]:
    """Rows of a Detectron2 ``metrics.json``, one per iteration (later lines win), sorted.

    An unreadable *last* line (a run killed while writing) is skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line before the last is not JSON; names the file and the line number.
    """
    with open(path) as f:
        lines = [line for line in f.read().splitlines()]
    by_iter: Dict[int, dict] = {}
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                break
            raise ValueError(f"{path}:{lineno} is not a JSON object ({e}); metrics.json has one per line") from e
        if not isinstance(row, dict) or "iteration" not in row:
            raise ValueError(f"{path}:{lineno} has no 'iteration'; not a Detectron2 metrics.json line")
        by_iter.setdefault(int(row["iteration"]), {}).update(row)
    return [by_iter[i] for i in sorted(by_iter)]


def world_size_from_log(path: str) -> Optional[int]:
    """Number of processes from Detectron2's ``default_setup`` line in ``log.txt`` (the last
    one, i.e. of the latest start or resume); None if the file or the line is missing."""
    if not os.path.isfile(path):
        return None
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            m = _WORLD_SIZE.search(line)
            if m:
                found = int(m.group(1))
    return found


def results_from_log(path: str) -> Dict[str, Dict[str, float]]:
    """The last "copypaste:" evaluation block per task in ``log.txt`` (Detectron2's
    ``print_csv_format``): task -> metric -> value. Empty if none."""
    if not os.path.isfile(path):
        return {}
    payload = []
    with open(path, errors="replace") as f:
        for line in f:
            m = _COPYPASTE.search(line.rstrip("\n"))
            if m:
                payload.append(m.group(1))
    out: Dict[str, Dict[str, float]] = {}
    for i, text in enumerate(payload[:-2]):
        if text.startswith("Task: "):
            task = text[len("Task: "):].strip()
            names, values = payload[i + 1].split(","), payload[i + 2].split(",")
            if task in TASKS and len(names) == len(values):
                try:
                    out[task] = {n: float(v) for n, v in zip(names, values) if n in METRICS}
                except ValueError:
                    continue
    return out


def _get(cfg: dict, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _results_of_row(row: dict, cfg: dict) -> Dict[str, Dict[str, float]]:
    test_sets = list(_get(cfg, "DATASETS.TEST", []) or [])
    out: Dict[str, Dict[str, float]] = {}
    for key, value in row.items():
        m = _RESULT_KEY.match(key)
        if not m or not isinstance(value, (int, float)):
            continue
        # with several test sets Detectron2 prefixes the dataset name: keep the first test set
        if m.group("dataset") is not None and test_sets and m.group("dataset") != test_sets[0]:
            continue
        out.setdefault(m.group("task"), {})[m.group("metric")] = float(value)
    return out


def images_per_gpu(cfg: dict, world_size: Optional[int]) -> Tuple[Optional[float], Optional[int]]:
    """Images per process per iteration, and the number of processes.

    ``config.yaml`` holds the config before Detectron2's auto-scaling: with
    ``SOLVER.REFERENCE_WORLD_SIZE`` R > 0 the run keeps ``IMS_PER_BATCH / R`` images per process
    on any number of processes; with R = 0 it has ``IMS_PER_BATCH / world_size``.

    Args:
        cfg: the config dict; world_size: processes of the run (:func:`world_size_from_log`),
            None if unknown.
    Returns:
        ``(images per GPU or None if unknown, world_size)``.
    """
    ims = _get(cfg, "SOLVER.IMS_PER_BATCH")
    ref = _get(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0) or 0
    if ims is None:
        return None, world_size
    if ref > 0:
        return ims / ref, world_size
    if world_size:
        return ims / world_size, world_size
    return None, None


def model_name(cfg: dict) -> Tuple[str, str]:
    """``(family, name)``, e.g. ``("Mask R-CNN", "Mask R-CNN R50-FPN")``, from MODEL.META_ARCHITECTURE,
    MODEL.MASK_ON, MODEL.RESNETS.DEPTH and MODEL.BACKBONE.NAME."""
    arch = _get(cfg, "MODEL.META_ARCHITECTURE", "?")
    if arch == "GeneralizedRCNN":
        family = "Mask R-CNN" if _get(cfg, "MODEL.MASK_ON", False) else "Faster R-CNN"
    else:
        family = arch
    backbone = str(_get(cfg, "MODEL.BACKBONE.NAME", ""))
    name = f"{family} R{_get(cfg, 'MODEL.RESNETS.DEPTH', '?')}" if "resnet" in backbone else family
    return family, name + ("-FPN" if "fpn" in backbone else "")


def describe_norms(cfg: dict) -> str:
    """Which norm sits where, e.g. "FPN+heads: CBN, backbone: FrozenBN" or "all: GN".

    Places: the backbone (MODEL.RESNETS.NORM, with the stages frozen by MODEL.BACKBONE.FREEZE_AT,
    whose BN Detectron2 turns into FrozenBN), the FPN (MODEL.FPN.NORM), and the heads: box head
    (MODEL.ROI_BOX_HEAD.NORM, only with conv layers, NUM_CONV > 0), mask head (with MASK_ON),
    RetinaNet head (MODEL.RETINANET.NORM). "none" stands for no norm. Places with the same norm
    are grouped; the heads' group comes first.
    """
    family, _ = model_name(cfg)

    def norm(key):
        return _get(cfg, key, "") or "none"

    backbone = norm("MODEL.RESNETS.NORM")
    freeze_at = int(_get(cfg, "MODEL.BACKBONE.FREEZE_AT", 0) or 0)
    if freeze_at > 0 and backbone not in ("FrozenBN", "none"):
        frozen = ["stem", "res2", "res3", "res4", "res5"][:freeze_at]
        backbone += f" ({'+'.join(frozen)} frozen: FrozenBN)"
    places = [("backbone", backbone)]
    if "fpn" in str(_get(cfg, "MODEL.BACKBONE.NAME", "")):
        places.append(("FPN", norm("MODEL.FPN.NORM")))
    heads = []
    if family in ("Faster R-CNN", "Mask R-CNN"):
        has_convs = int(_get(cfg, "MODEL.ROI_BOX_HEAD.NUM_CONV", 0) or 0) > 0
        heads.append(("box head", norm("MODEL.ROI_BOX_HEAD.NORM") if has_convs else "none"))
        if family == "Mask R-CNN":
            heads.append(("mask head", norm("MODEL.ROI_MASK_HEAD.NORM")))
    elif family == "RetinaNet":
        heads.append(("head", norm("MODEL.RETINANET.NORM")))
    if heads and len({n for _, n in heads}) == 1:
        heads = [("heads", heads[0][1])]
    places += heads  # model order: backbone, FPN, heads
    if len({n for _, n in places}) == 1:
        return f"all: {places[0][1]}"
    groups: Dict[str, List[str]] = {}
    for place, n in places:
        groups.setdefault(n, []).append(place)
    head_norms = {n for _, n in heads}
    order = sorted(groups, key=lambda n: n not in head_norms)  # stable: heads' group(s) first
    return ", ".join("+".join(groups[n]) + f": {n}" for n in order)


def read_inference_time(output_dir: str) -> Optional[float]:
    """Seconds per image (per process) of the last record in ``inference/inference_time.json``;
    None if there is none."""
    path = os.path.join(output_dir, _INFERENCE_TIME_FILE)
    if not os.path.isfile(path):
        return None
    value = None
    with open(path) as f:
        for line in f:
            try:
                value = float(json.loads(line)["seconds_per_image"])
            except (ValueError, KeyError, TypeError):
                continue
    return value


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that reads ``!!python/...`` tags (objects a LazyConfig dump holds, e.g.
    ``!!python/object/new:detectron2.layers.shape_spec.ShapeSpec [32, 7, 7, null]``) as the plain
    list, dict or string under the tag: nothing is imported or called."""


def _plain_python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain_python_tag)


def read_config(path: str) -> dict:
    """A run's ``config.yaml`` as a nested dict: a YACS dump, or a LazyConfig dump whose Python
    objects (``!!python/...`` tags) are read as plain lists/dicts (see :class:`_ConfigLoader`).

    Raises:
        ValueError: the file is not YAML, or not a mapping; the message names the file.
    """
    with open(path) as f:
        try:
            cfg = yaml.load(f, Loader=_ConfigLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not a readable config: {' '.join(str(e).split())}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a config (a YAML mapping); it holds a {type(cfg).__name__}")
    return cfg


def is_lazy_config(cfg: dict) -> bool:
    """Whether ``cfg`` (a ``config.yaml`` dict) is a LazyConfig dump: a ``model`` with a
    ``_target_`` and a ``train`` field, instead of YACS's ``MODEL``."""
    model = cfg.get("model")
    return isinstance(model, dict) and "_target_" in model and isinstance(cfg.get("train"), dict)


def _name(target) -> str:
    """The last part of a ``_target_`` ("detectron2.modeling.FPN" -> "FPN")."""
    return str(target or "").rsplit(".", 1)[-1]


def lazy_config_as_yacs(cfg: dict) -> dict:
    """The fields of a LazyConfig dump that describe a run, under the YACS keys the readers here use.

    Mapping (Detectron2's model-zoo LazyConfig structure, ``common/models/*.py``):
    ``MODEL.META_ARCHITECTURE`` from ``model._target_``; ``MODEL.MASK_ON``: ``model.roi_heads``
    has a ``mask_head``; ``MODEL.BACKBONE.NAME`` ``build_resnet_fpn_backbone`` for an FPN over a
    ResNet (``build_resnet_backbone`` for a ResNet alone); ``MODEL.RESNETS.DEPTH`` and ``NORM``
    from ``backbone.bottom_up.stages``; ``MODEL.BACKBONE.FREEZE_AT`` from ``bottom_up.freeze_at``;
    ``MODEL.FPN.NORM`` from ``backbone.norm``; box head ``conv_dims``/``conv_norm`` to
    ``ROI_BOX_HEAD.NUM_CONV``/``NORM``; ``mask_head.conv_norm`` to ``ROI_MASK_HEAD.NORM``;
    ``model.head.norm`` to ``RETINANET.NORM``; ``dataloader.train.total_batch_size`` to
    ``SOLVER.IMS_PER_BATCH`` (the total over all processes; ``REFERENCE_WORLD_SIZE`` 0: nothing
    rescales); ``dataloader.test.dataset.names`` to ``DATASETS.TEST``; ``train.max_iter`` to
    ``SOLVER.MAX_ITER``. Fields the dump lacks are left out.
    """
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    bottom_up = backbone.get("bottom_up") if isinstance(backbone.get("bottom_up"), dict) else None
    resnet = bottom_up if bottom_up is not None else (backbone if _name(backbone.get("_target_")) == "ResNet" else {})
    stages = resnet.get("stages") if isinstance(resnet.get("stages"), dict) else {}
    stem = resnet.get("stem") if isinstance(resnet.get("stem"), dict) else {}
    roi_heads = model.get("roi_heads") if isinstance(model.get("roi_heads"), dict) else {}
    box_head = roi_heads.get("box_head") if isinstance(roi_heads.get("box_head"), dict) else {}
    mask_head = roi_heads.get("mask_head") if isinstance(roi_heads.get("mask_head"), dict) else None
    head = model.get("head") if isinstance(model.get("head"), dict) else {}
    loader = cfg.get("dataloader") or {}
    train_loader = loader.get("train") if isinstance(loader.get("train"), dict) else {}
    test_loader = loader.get("test") if isinstance(loader.get("test"), dict) else {}
    test_names = (test_loader.get("dataset") or {}).get("names") if isinstance(test_loader.get("dataset"), dict) else None

    arch = _name(model.get("_target_"))
    fpn = _name(backbone.get("_target_")) == "FPN"
    backbone_name = ""
    if resnet:
        backbone_name = ("build_retinanet_resnet_fpn_backbone" if arch == "RetinaNet" else
                         "build_resnet_fpn_backbone") if fpn else "build_resnet_backbone"
    out: dict = {"MODEL": {"META_ARCHITECTURE": arch, "MASK_ON": mask_head is not None,
                           "BACKBONE": {"NAME": backbone_name}, "RESNETS": {}, "FPN": {}, "ROI_BOX_HEAD": {},
                           "ROI_MASK_HEAD": {}, "RETINANET": {}},
                 "SOLVER": {"REFERENCE_WORLD_SIZE": 0}, "DATASETS": {}}
    m = out["MODEL"]
    if "depth" in stages:
        m["RESNETS"]["DEPTH"] = stages["depth"]
    norm = stages.get("norm", stem.get("norm"))
    if isinstance(norm, str):
        m["RESNETS"]["NORM"] = norm
    if "freeze_at" in resnet:
        m["BACKBONE"]["FREEZE_AT"] = resnet["freeze_at"]
    if fpn and isinstance(backbone.get("norm", ""), str):
        m["FPN"]["NORM"] = backbone.get("norm", "")
    if box_head:
        m["ROI_BOX_HEAD"]["NUM_CONV"] = len(box_head.get("conv_dims") or [])
        m["ROI_BOX_HEAD"]["NORM"] = box_head.get("conv_norm", "") if isinstance(box_head.get("conv_norm", ""), str) else "?"
    if mask_head is not None:
        m["ROI_MASK_HEAD"]["NORM"] = mask_head.get("conv_norm", "") if isinstance(mask_head.get("conv_norm", ""),
                                                                                  str) else "?"
    if head:
        m["RETINANET"]["NORM"] = head.get("norm", "") if isinstance(head.get("norm", ""), str) else "?"
    if "total_batch_size" in train_loader:
        out["SOLVER"]["IMS_PER_BATCH"] = train_loader["total_batch_size"]
    if "max_iter" in (cfg.get("train") or {}):
        out["SOLVER"]["MAX_ITER"] = cfg["train"]["max_iter"]
    if test_names is not None:
        out["DATASETS"]["TEST"] = [test_names] if isinstance(test_names, str) else list(test_names)
    return out


def load_run(output_dir: str, name: Optional[str] = None) -> Run:
    """Read one OUTPUT_DIR of ``tools/train_net.py``.

    Args:
        output_dir: the directory (holds ``config.yaml``; ``metrics.json``, ``log.txt`` and
            ``inference/`` as far as the run got).
        name: label of the run; default the directory's name.
    Returns:
        a :class:`Run`; values the files do not give are None. For a LazyConfig run
        (``tools/lazyconfig_train_net.py``), ``Run.config`` is :func:`lazy_config_as_yacs` of its
        config.yaml.
    Raises:
        RunNotFoundError: ``output_dir`` is missing or has no ``config.yaml``.
        ValueError: a corrupt metrics.json line (see :func:`read_metrics`), or an unreadable config.yaml.
    """
    cfg_path = os.path.join(output_dir, "config.yaml")
    if not os.path.isdir(output_dir):
        raise RunNotFoundError(f"Run directory {output_dir!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise RunNotFoundError(
            f"{output_dir!r} has no config.yaml: not an output folder of tools/train_net.py or "
            "tools/lazyconfig_train_net.py "
            f"(it holds: {', '.join(sorted(os.listdir(output_dir))[:8]) or 'nothing'})"
        )
    cfg = read_config(cfg_path)
    if is_lazy_config(cfg):
        cfg = lazy_config_as_yacs(cfg)
    metrics_path = os.path.join(output_dir, "metrics.json")
    metrics = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    log_path = os.path.join(output_dir, "log.txt")
    ipg, world = images_per_gpu(cfg, world_size_from_log(log_path))
    family, model = model_name(cfg)
    run = Run(name=name or os.path.basename(os.path.normpath(output_dir)), output_dir=output_dir, config=cfg,
              model=model, family=family, norm=describe_norms(cfg), images_per_gpu=ipg, num_gpus=world,
              metrics=metrics)
    for row in reversed(metrics):
        res = _results_of_row(row, cfg)
        if res:
            run.results, run.eval_iteration = res, row["iteration"]
            break
    if not run.results:
        run.results = results_from_log(log_path)
    times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float)) and math.isfinite(r["time"])]
    run.train_s_per_iter = statistics.median(times) if times else None
    for key, kind in _PEAK_KEYS.items():
        values = [r[key] for r in metrics if isinstance(r.get(key), (int, float))]
        if values:
            run.peak_memory_mb, run.peak_memory_kind = max(values), kind
    run.inference_s_per_image = read_inference_time(output_dir)
    return run
