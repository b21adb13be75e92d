"""What a run costs, recorded for ``tools/compare_runs.py`` (Detectron2 v0.6 logs peak memory only on
CUDA and inference speed only as a log line): :class:`~smallbn_d2.engine.hooks.PeakMemoryHook` puts the
peak memory in ``metrics.json``; :class:`InferenceTimer` and :func:`append_inference_time` write
s/image to ``OUTPUT_DIR/inference/inference_time.json`` (one JSON object per line).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["CUDA_PEAK_KEY", "RSS_PEAK_KEY", "INFERENCE_TIME_FILE", "peak_memory_mb", "InferenceTimer",
           "append_inference_time"]

#: metrics.json key of the peak GPU memory allocated by tensors (torch.cuda.max_memory_allocated,
#: the number Detectron2 logs as ``max_mem``), in MB (2**20 bytes).
CUDA_PEAK_KEY = "peak_memory/cuda_allocated_mb"
#: metrics.json key of the peak resident set size of the process (getrusage ru_maxrss), in MB.
RSS_PEAK_KEY = "peak_memory/cpu_rss_mb"
#: File, relative to OUTPUT_DIR, that :func:`append_inference_time` appends to.
INFERENCE_TIME_FILE = os.path.join("inference", "inference_time.json")


def peak_memory_mb(device: torch.device | str) -> Tuple[str, float]:
    """The peak memory of this process so far in MB (2**20 bytes), and its metrics key: on CUDA,
    ``torch.cuda.max_memory_allocated`` (tensor memory, Detectron2's ``max_mem``; :data:`CUDA_PEAK_KEY`),
    otherwise the process's peak resident set size (``getrusage``; :data:`RSS_PEAK_KEY`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return CUDA_PEAK_KEY, torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return RSS_PEAK_KEY, rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class InferenceTimer:
    """Context manager timing the forward calls of ``model`` (possibly DDP-wrapped) in eval mode, e.g.
    around ``DefaultTrainer.test``: each call (after ``torch.cuda.synchronize`` on CUDA) and the images
    of its input (a list of dataset dicts). As ``inference_on_dataset``'s "pure compute time", the first
    ``min(warmup_calls, calls - 1)`` calls are left out (Detectron2: 5); data loading is not timed.

    Raises:
        ValueError: ``warmup_calls`` < 0.
    """

    def __init__(self, model: nn.Module, warmup_calls: int = 5):
        if not isinstance(warmup_calls, int) or warmup_calls < 0:
            raise ValueError(f"warmup_calls = {warmup_calls!r} is invalid; allowed: an integer >= 0")
        self.model = model
        self.warmup_calls = warmup_calls
        self.calls: List[Tuple[int, float]] = []  # (images, seconds) per forward call
        self._handles = []
        self._start: Optional[float] = None
        self._cuda = any(p.is_cuda for p in model.parameters())

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def _pre(self, module, args):
        if module.training:
            return
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        if module.training or self._start is None:
            return
        self._sync()
        images = len(args[0]) if args and isinstance(args[0], Sequence) else 1
        self.calls.append((images, time.perf_counter() - self._start))
        self._start = None

    def __enter__(self) -> "InferenceTimer":
        self._handles = [self.model.register_forward_pre_hook(self._pre),
                         self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    @property
    def timed_calls(self) -> List[Tuple[int, float]]:
        """The ``(images, seconds)`` of the calls that count (warm-up calls left out)."""
        skip = min(self.warmup_calls, max(len(self.calls) - 1, 0))
        return self.calls[skip:]

    @property
    def num_images(self) -> int:
        """Images in the timed calls."""
        return sum(n for n, _ in self.timed_calls)

    @property
    def seconds_per_image(self) -> Optional[float]:
        """Total seconds of the timed calls / their images; None if no image was timed."""
        n = self.num_images
        return sum(s for _, s in self.timed_calls) / n if n else None


def append_inference_time(output_dir: str, timer: InferenceTimer, datasets: Sequence[str],
                          device: str, world_size: int = 1, iteration: Optional[int] = None) -> Optional[dict]:
    """Append a finished ``timer``'s result as one JSON line to ``output_dir``/:data:`INFERENCE_TIME_FILE`
    (folders created), with ``datasets`` (``cfg.DATASETS.TEST``), ``device``, ``world_size`` (each
    process times its own share of the images) and the trainer ``iteration`` (None outside training).

    Returns:
        the record written (keys ``iteration``, ``datasets``, ``images``, ``seconds_per_image``,
        ``device``, ``world_size``), or None when no image was timed (nothing is written).
    """
    if timer.seconds_per_image is None:
        return None
    record = {"iteration": iteration, "datasets": list(datasets), "images": timer.num_images,
              "seconds_per_image": timer.seconds_per_image, "device": str(device), "world_size": int(world_size)}
    path = os.path.join(output_dir, INFERENCE_TIME_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
