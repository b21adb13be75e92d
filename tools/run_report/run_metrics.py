"""Read a run back from the files tools/train_net.py or tools/lazyconfig_train_net.py leave in its
output folder: config.yaml, metrics.json, log.txt, inference/inference_time.json.

Which column of a comparison comes from which file: docs/MODEL_ZOO.md, "Comparing runs".
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import yaml

from smallbn_d2.engine.resources import CUDA_PEAK_KEY, INFERENCE_TIME_FILE, RSS_PEAK_KEY

__all__ = ["TASKS", "METRICS", "RESULT_KEY", "RunNotFoundError", "Run", "read_metrics", "row_results",
           "world_size_from_log", "results_from_log", "images_per_gpu", "model_name", "describe_norms",
           "read_inference_time", "read_config", "lazy_config_as_yacs", "load_run"]

#: Evaluation tasks (COCOEvaluator's names) and their metrics, AP in percent.
TASKS = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: A result key of metrics.json: ``bbox/AP`` with one test set, ``<dataset>/bbox/AP`` with several.
RESULT_KEY = re.compile(r"^(?:(?P<dataset>.+)/)?(?P<task>bbox|segm)/(?P<metric>AP|AP50|AP75|APs|APm|APl)$")
_WORLD_SIZE = re.compile(r"Rank of current process: \d+\. World size: (\d+)")
_COPYPASTE = re.compile(r"copypaste: (.*)$")
_PEAK_KINDS = {CUDA_PEAK_KEY: "GPU", RSS_PEAK_KEY: "CPU RSS"}


class RunNotFoundError(FileNotFoundError):
    """A folder that is not an output folder of the training tools (missing, or no config.yaml)."""


@dataclass
class Run:
    """What one output folder says about its run; None where the files do not tell.

    Attributes:
        name: the label (default: the folder's name); output_dir: the folder.
        config: config.yaml as a nested dict (a LazyConfig run's through :func:`lazy_config_as_yacs`).
        family, model: e.g. "Mask R-CNN", "Mask R-CNN R50-FPN" (:func:`model_name`).
        norm: e.g. "FPN+heads: CBN, backbone: FrozenBN" (:func:`describe_norms`).
        images_per_gpu: images per process per iteration; num_gpus: processes.
        metrics: the rows of metrics.json, one per iteration, sorted (:func:`read_metrics`).
        results: task -> metric -> AP (%) of the last evaluation of the first test set.
        eval_iteration: the metrics.json iteration of that evaluation (None: read from log.txt).
        train_s_per_iter: median of Detectron2's ``time`` (seconds per iteration).
        peak_memory_mb: the largest peak written (MB = 2**20 bytes); peak_memory_kind: "GPU" or "CPU RSS".
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
        """Iterations trained: the last metrics.json iteration with a loss + 1 (None without losses)."""
        its = [r["iteration"] for r in self.metrics if "total_loss" in r]
        return max(its) + 1 if its else None

    def ap_curve(self, task: str, metric: str = "AP") -> List[Tuple[int, float]]:
        """``(iterations trained, value)`` of every evaluation of ``task`` in metrics.json.

        Detectron2 writes an evaluation after the 0-based iteration i at key i and the final one at
        MAX_ITER: they count as i + 1 and MAX_ITER iterations trained.
        """
        out = []
        done = self.iterations
        for row in self.metrics:
            res = _first_test_set(row, self.config)
            if metric in res.get(task, {}):
                it = row["iteration"]
                out.append((it + 1 if done is None or it < done else it, res[task][metric]))
        return out

    def loss_curves(self) -> Dict[str, List[Tuple[int, float]]]:
        """``total_loss`` and every ``loss_*`` -> ``(iteration, value)``, values as written (20-iteration medians)."""
        curves: Dict[str, List[Tuple[int, float]]] = {}
        for row in self.metrics:
            for key, value in row.items():
                if (key == "total_loss" or key.startswith("loss_")) and isinstance(value, (int, float)):
                    curves.setdefault(key, []).append((row["iteration"], float(value)))
        return curves


def read_metrics(path: str) -> List[dict]:
    """The rows of a Detectron2 metrics.json, one per iteration, sorted; of the lines a resumed run
    wrote again, the later wins. An unreadable last line (a run killed while writing) is skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an earlier line is not a JSON object with an ``iteration``; names file and line.
    """
    with open(path) as f:
        numbered = [(no, line) for no, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    by_iter: Dict[int, dict] = {}
    for k, (no, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                break
            raise ValueError(f"{path}:{no} is not a JSON object ({e}); metrics.json has one per line") from e
        if not isinstance(row, dict) or "iteration" not in row:
            raise ValueError(f"{path}:{no} has no 'iteration'; not a Detectron2 metrics.json line")
        by_iter.setdefault(int(row["iteration"]), {}).update(row)
    return [by_iter[i] for i in sorted(by_iter)]


def row_results(row: Mapping) -> Dict[Optional[str], Dict[str, Dict[str, float]]]:
    """The evaluation results in one metrics.json row: dataset -> task -> metric -> value, under the
    dataset None for the unprefixed keys of a run with one test set (:data:`RESULT_KEY`)."""
    out: Dict[Optional[str], Dict[str, Dict[str, float]]] = {}
    for key, value in row.items():
        m = RESULT_KEY.match(key)
        if m and isinstance(value, (int, float)):
            out.setdefault(m.group("dataset"), {}).setdefault(m.group("task"), {})[m.group("metric")] = float(value)
    return out


def _first_test_set(row: Mapping, cfg: dict) -> Dict[str, Dict[str, float]]:
    """The results of ``row`` for the first test set of ``cfg`` (the one the tables show)."""
    by_set = row_results(row)
    test_sets = _get(cfg, "DATASETS.TEST") or [None]
    return by_set.get(None) or by_set.get(test_sets[0], {})


def _log_matches(path: str, pattern: re.Pattern) -> List[str]:
    """The first group of ``pattern`` in every line of ``path`` that has it; empty without the file."""
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        return [m.group(1) for m in map(pattern.search, f.read().splitlines()) if m]


def world_size_from_log(path: str) -> Optional[int]:
    """The number of processes in the last "World size: N" line of Detectron2's log.txt (that of the
    latest start or resume); None without the file or the line."""
    found = _log_matches(path, _WORLD_SIZE)
    return int(found[-1]) if found else None


def results_from_log(path: str) -> Dict[str, Dict[str, float]]:
    """task -> metric -> value of the last "copypaste:" block per task in log.txt (Detectron2's
    ``print_csv_format``; an ``--eval-only`` run writes its results only there); empty if none."""
    payload = _log_matches(path, _COPYPASTE)
    out: Dict[str, Dict[str, float]] = {}
    for i, text in enumerate(payload[:-2]):
        if not text.startswith("Task: "):
            continue
        task = text[len("Task: "):].strip()
        names, values = payload[i + 1].split(","), payload[i + 2].split(",")
        if task in TASKS and len(names) == len(values):
            try:
                out[task] = {n: float(v) for n, v in zip(names, values) if n in METRICS}
            except ValueError:
                continue
    return out


def _get(cfg: dict, dotted: str, default=None):
    """``cfg["A"]["B"]`` for ``"A.B"``, or ``default`` where a level is missing."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def images_per_gpu(cfg: dict, world_size: Optional[int]) -> Tuple[Optional[float], Optional[int]]:
    """``(images per process per iteration, processes)``, None where unknown.

    config.yaml holds the config before Detectron2's ``auto_scale_workers``: with
    ``SOLVER.REFERENCE_WORLD_SIZE`` R > 0 a run keeps ``IMS_PER_BATCH / R`` images per process on
    any number of processes; with R = 0 it has ``IMS_PER_BATCH / world_size``.
    ``world_size``: from :func:`world_size_from_log`, None if unknown.
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

    Places: the backbone (MODEL.RESNETS.NORM; the stages that MODEL.BACKBONE.FREEZE_AT freezes are
    FrozenBN), the FPN (MODEL.FPN.NORM), the box head (MODEL.ROI_BOX_HEAD.NORM, "none" without
    convs: NUM_CONV 0), the mask head (with MASK_ON) and RetinaNet's head (MODEL.RETINANET.NORM).
    Places with the same norm are grouped, the heads' group first; "none" means no norm.
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
    places += heads
    if len({n for _, n in places}) == 1:
        return f"all: {places[0][1]}"
    groups: Dict[str, List[str]] = {}
    for place, n in places:
        groups.setdefault(n, []).append(place)
    head_norms = {n for _, n in heads}
    order = sorted(groups, key=lambda n: n not in head_norms)  # stable: heads' group(s) first
    return ", ".join("+".join(groups[n]) + f": {n}" for n in order)


def read_inference_time(output_dir: str) -> Optional[float]:
    """Seconds per image per process of the last readable record in the folder's
    inference/inference_time.json (``smallbn_d2.engine.resources.append_inference_time``); None if none."""
    path = os.path.join(output_dir, INFERENCE_TIME_FILE)
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
    """YAML's safe loader that reads a ``!!python/...`` tag of a LazyConfig dump (e.g. Detectron2's
    ``ShapeSpec``) as the plain list, dict or string under it: nothing is imported or called."""


def _plain_python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain_python_tag)


def read_config(path: str) -> dict:
    """A run's config.yaml as a nested dict: a YACS dump, or a LazyConfig dump with its Python
    objects read as plain data (:class:`_ConfigLoader`).

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


def _sub(node, key) -> dict:
    """``node[key]`` when both are mappings, else an empty dict."""
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def _norm(node: dict, key: str, default: str = "") -> str:
    """A norm argument; "?" when the dump holds something other than a name (a callable)."""
    value = node.get(key, default)
    return value if isinstance(value, str) else "?"


def _name(target) -> str:
    """The last part of a ``_target_`` ("detectron2.modeling.FPN" -> "FPN")."""
    return str(target or "").rsplit(".", 1)[-1]


def lazy_config_as_yacs(cfg: dict) -> dict:
    """The fields of a LazyConfig dump that describe a run, under the YACS keys read here.

    From Detectron2's model-zoo LazyConfig layout (``common/models/*.py``): ``model._target_`` ->
    ``MODEL.META_ARCHITECTURE``; a ``roi_heads.mask_head`` -> ``MASK_ON``; an FPN over a ResNet ->
    ``BACKBONE.NAME`` ``build_resnet_fpn_backbone`` (``build_resnet_backbone`` without FPN);
    ``bottom_up.stages`` depth and norm -> ``RESNETS.DEPTH``/``NORM``; ``bottom_up.freeze_at`` ->
    ``BACKBONE.FREEZE_AT``; ``backbone.norm`` -> ``FPN.NORM``; box head ``conv_dims``/``conv_norm``
    -> ``ROI_BOX_HEAD.NUM_CONV``/``NORM``; ``mask_head.conv_norm`` -> ``ROI_MASK_HEAD.NORM``;
    ``model.head.norm`` -> ``RETINANET.NORM``; ``dataloader.train.total_batch_size`` (all
    processes) -> ``SOLVER.IMS_PER_BATCH`` with ``REFERENCE_WORLD_SIZE`` 0;
    ``dataloader.test.dataset.names`` -> ``DATASETS.TEST``; ``train.max_iter`` -> ``SOLVER.MAX_ITER``.
    Fields the dump lacks are left out.
    """
    model = _sub(cfg, "model")
    backbone = _sub(model, "backbone")
    resnet = _sub(backbone, "bottom_up") or (backbone if _name(backbone.get("_target_")) == "ResNet" else {})
    stages, stem = _sub(resnet, "stages"), _sub(resnet, "stem")
    roi_heads = _sub(model, "roi_heads")
    box_head, mask_head, head = _sub(roi_heads, "box_head"), roi_heads.get("mask_head"), _sub(model, "head")
    test_names = _sub(_sub(_sub(cfg, "dataloader"), "test"), "dataset").get("names")

    arch = _name(model.get("_target_"))
    fpn = _name(backbone.get("_target_")) == "FPN"
    backbone_name = ""
    if resnet:
        backbone_name = ("build_retinanet_resnet_fpn_backbone" if arch == "RetinaNet" else
                         "build_resnet_fpn_backbone") if fpn else "build_resnet_backbone"
    m = {"META_ARCHITECTURE": arch, "MASK_ON": isinstance(mask_head, dict), "BACKBONE": {"NAME": backbone_name},
         "RESNETS": {}, "FPN": {}, "ROI_BOX_HEAD": {}, "ROI_MASK_HEAD": {}, "RETINANET": {}}
    out: dict = {"MODEL": m, "SOLVER": {"REFERENCE_WORLD_SIZE": 0}, "DATASETS": {}}
    if "depth" in stages:
        m["RESNETS"]["DEPTH"] = stages["depth"]
    if "norm" in stages or "norm" in stem:
        m["RESNETS"]["NORM"] = _norm(stages, "norm", stem.get("norm"))
    if "freeze_at" in resnet:
        m["BACKBONE"]["FREEZE_AT"] = resnet["freeze_at"]
    if fpn:
        m["FPN"]["NORM"] = _norm(backbone, "norm")
    if box_head:
        m["ROI_BOX_HEAD"].update(NUM_CONV=len(box_head.get("conv_dims") or []), NORM=_norm(box_head, "conv_norm"))
    if isinstance(mask_head, dict):
        m["ROI_MASK_HEAD"]["NORM"] = _norm(mask_head, "conv_norm")
    if head:
        m["RETINANET"]["NORM"] = _norm(head, "norm")
    train_loader = _sub(_sub(cfg, "dataloader"), "train")
    if "total_batch_size" in train_loader:
        out["SOLVER"]["IMS_PER_BATCH"] = train_loader["total_batch_size"]
    if "max_iter" in _sub(cfg, "train"):
        out["SOLVER"]["MAX_ITER"] = cfg["train"]["max_iter"]
    if test_names is not None:
        out["DATASETS"]["TEST"] = [test_names] if isinstance(test_names, str) else list(test_names)
    return out


def load_run(output_dir: str, name: Optional[str] = None) -> Run:
    """Read one output folder (its config.yaml; metrics.json, log.txt and inference/ as far as the
    run got) into a :class:`Run` labelled ``name`` (default: the folder's name).

    Raises:
        RunNotFoundError: ``output_dir`` is missing or has no config.yaml.
        ValueError: a corrupt metrics.json line (:func:`read_metrics`), or an unreadable config.yaml.
    """
    if not os.path.isdir(output_dir):
        raise RunNotFoundError(f"Run directory {output_dir!r} does not exist")
    cfg_path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise RunNotFoundError(
            f"{output_dir!r} has no config.yaml: not an output folder of tools/train_net.py or "
            "tools/lazyconfig_train_net.py "
            f"(it holds: {', '.join(sorted(os.listdir(output_dir))[:8]) or 'nothing'})"
        )
    cfg = read_config(cfg_path)
    if "_target_" in _sub(cfg, "model") and isinstance(cfg.get("train"), dict):  # a LazyConfig dump, not YACS
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
        res = _first_test_set(row, cfg)
        if res:
            run.results, run.eval_iteration = res, row["iteration"]
            break
    if not run.results:
        run.results = results_from_log(log_path)
    times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float)) and math.isfinite(r["time"])]
    run.train_s_per_iter = statistics.median(times) if times else None
    for key, kind in _PEAK_KINDS.items():
        values = [r[key] for r in metrics if isinstance(r.get(key), (int, float))]
        if values:
            run.peak_memory_mb, run.peak_memory_kind = max(values), kind
    run.inference_s_per_image = read_inference_time(output_dir)
    return run
