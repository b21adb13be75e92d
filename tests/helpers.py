"""Shared test utilities: tiny detector configs and real COCO batches.

The data of the tiny configs is the COCO 2017 sample shipped with the package
(``coco_2017_sample_train`` / ``coco_2017_sample_val``: 24 + 24 real images, <= 320 px, registered
by tests/conftest.py), so that the suite runs on a clone without any other data. The YAML files
of configs/test keep Detectron2's builtin names (``coco_2017_train`` / ``coco_2017_val``):
:func:`tiny_cfg` replaces them with the sample
(:data:`SAMPLE_OPTS`), and tests that pass a tiny YAML file to a tool add :data:`SAMPLE_ARGS`."""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
import torch

import smallbn_d2  # noqa: F401
from smallbn_d2.engine import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "mask_rcnn": os.path.join(REPO, "configs/test/tiny-mask_rcnn.yaml"),
    "faster_rcnn": os.path.join(REPO, "configs/test/tiny-mask_rcnn.yaml"),
    "retinanet": os.path.join(REPO, "configs/test/tiny-retinanet.yaml"),
}
#: The shipped COCO 2017 sample as the datasets of a config (tiny_cfg applies it first).
SAMPLE_TRAIN, SAMPLE_VAL = "coco_2017_sample_train", "coco_2017_sample_val"
SAMPLE_OPTS = ["DATASETS.TRAIN", (SAMPLE_TRAIN,), "DATASETS.TEST", (SAMPLE_VAL,)]
#: The same as command-line overrides (``KEY VALUE`` strings) of tools/train_net.py and the like;
#: those tools register the sample themselves.
SAMPLE_ARGS = ["DATASETS.TRAIN", f"('{SAMPLE_TRAIN}',)", "DATASETS.TEST", f"('{SAMPLE_VAL}',)"]
NORM_KEYS = {
    "backbone": "MODEL.RESNETS.NORM",
    "fpn": "MODEL.FPN.NORM",
    "box_head": "MODEL.ROI_BOX_HEAD.NORM",
    "mask_head": "MODEL.ROI_MASK_HEAD.NORM",
    "retinanet_head": "MODEL.RETINANET.NORM",
}


def tiny_cfg(arch: str = "mask_rcnn", norm: str = "BN", where: Sequence[str] = tuple(NORM_KEYS), opts=()):
    """A tiny CPU config of ``arch`` with ``norm`` at the places in ``where`` (keys of NORM_KEYS),
    on the shipped COCO sample (:data:`SAMPLE_OPTS`; ``opts`` may name other datasets)."""
    overrides: List = list(SAMPLE_OPTS)
    for place in where:
        overrides += [NORM_KEYS[place], norm]
    if arch == "faster_rcnn":
        overrides += ["MODEL.MASK_ON", False]
    cfg = load_config(TINY[arch], overrides + list(opts))
    return cfg


_BATCHES = {}


def coco_batches(cfg, n: int, seed: int = 0):
    """``n`` training batches (lists of dataset dicts, SOLVER.IMS_PER_BATCH images each) from the
    cfg's first training dataset (the shipped COCO sample for :func:`tiny_cfg` configs; images
    without a non-crowd annotation left out, as Detectron2's training loader does, and reused
    cyclically when ``n`` batches need more images than there are), mapped by Detectron2's
    DatasetMapper at the cfg's image size. Deterministic for a given ``seed`` (the image order,
    and the mapper's random flips: numpy's global RNG is seeded for the mapping and then restored;
    torch's global RNG is left seeded with ``seed``); cached per (dataset, image size, batch size,
    n, seed, mask_on)."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    key = (cfg.DATASETS.TRAIN[0], cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.SOLVER.IMS_PER_BATCH, n, seed,
           cfg.MODEL.MASK_ON)
    if key not in _BATCHES:
        dicts = [d for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]) if any(not a.get("iscrowd", 0) for a in d["annotations"])]
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dicts), generator=g).tolist()
        mapper = DatasetMapper(cfg, is_train=True)
        torch.manual_seed(seed)
        numpy_state = np.random.get_state()
        np.random.seed(seed)  # Detectron2's augmentations (RandomFlip) draw from numpy's global RNG
        try:
            bs = cfg.SOLVER.IMS_PER_BATCH
            _BATCHES[key] = [[mapper(dicts[order[(i * bs + j) % len(dicts)]]) for j in range(bs)] for i in range(n)]
        finally:
            np.random.set_state(numpy_state)
    return _BATCHES[key]


def train_steps(model, batches, start_iter: int = 0, lr: float = 0.005):
    """Run SGD steps on ``batches`` with the trainer iteration set; return the list of loss dicts."""
    from detectron2.utils.events import EventStorage

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    out = []
    with EventStorage(start_iter):
        for i, batch in enumerate(batches):
            smallbn_d2.set_norm_iteration(model, start_iter + i)
            losses = model(batch)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            out.append({k: v.item() for k, v in losses.items()})
    return out
