"""Several training processes on CPU (gloo), with Detectron2's ``launch`` semantics.

Detectron2 v0.6's ``launch`` always initializes NCCL and asserts CUDA, and its ``create_ddp_model``
passes ``device_ids``, which ``DistributedDataParallel`` rejects for a CPU model. :func:`launch`
keeps Detectron2's for CUDA and spawns gloo processes itself for ``device="cpu"``. Semantics,
per-process statistics and their averaging: docs/RELIABILITY.md, section 5.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import CfgNode
from detectron2.engine.launch import DEFAULT_TIMEOUT

from ..config import ConfigValueError, norm_keys
from ..layers.hyperparameters import INT_AT_LEAST_1

__all__ = ["launch", "create_ddp_model", "install_cpu_ddp", "check_cpu_distributed"]

logger = logging.getLogger(__name__)


def check_cpu_distributed(cfg: CfgNode, world_size: int) -> None:
    """Refuse, before any process starts, what cannot run with ``world_size`` CPU processes.

    Raises:
        ConfigValueError: ``MODEL.DEVICE`` is "cpu", ``world_size`` > 1 and a norm key is "SyncBN" /
            "nnSyncBN" (``torch.nn.SyncBatchNorm`` is CUDA-only); the message names the key and the
            CPU alternative "naiveSyncBN".
    """
    from ..modeling.norms import cuda_only_norms

    if world_size <= 1 or not str(cfg.MODEL.DEVICE).startswith("cpu"):
        return
    for key, value in norm_keys(cfg).items():
        if value in cuda_only_norms():
            raise ConfigValueError(
                f"{key} = {value!r} is invalid with {world_size} CPU processes: torch.nn.SyncBatchNorm runs only "
                "on CUDA; allowed on CPU: 'naiveSyncBN' (Detectron2's NaiveSyncBatchNorm, all-reduces with gloo), "
                "or per-process norms ('BN', 'CBN', 'NaiveCBN', 'MABN', 'GN', 'FrozenBN')"
            )


def create_ddp_model(model: torch.nn.Module, **kwargs):
    """Detectron2's ``create_ddp_model`` (``model`` itself with one process), with ``device_ids=None``
    for a model on CPU."""
    from detectron2.engine import defaults

    d2_create = getattr(defaults, "_smallbn_d2_create_ddp_model", defaults.create_ddp_model)
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu" and "device_ids" not in kwargs:
        kwargs["device_ids"] = None
    return d2_create(model, **kwargs)


def install_cpu_ddp() -> None:
    """Make ``DefaultTrainer`` use :func:`create_ddp_model` (idempotent)."""
    from detectron2.engine import defaults

    if "_smallbn_d2_create_ddp_model" not in defaults.__dict__:
        defaults._smallbn_d2_create_ddp_model = defaults.create_ddp_model
        defaults.create_ddp_model = create_ddp_model


def _cpu_worker(local_rank: int, main_func: Callable, world_size: int, num_per_machine: int, machine_rank: int,
                dist_url: str, args: Sequence, timeout: timedelta) -> None:
    from detectron2.utils import comm

    from ..compat import set_local_process_group

    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout)
    for i in range(world_size // num_per_machine):  # Detectron2's per-machine group (comm.get_local_rank)
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            set_local_process_group(group)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))  # no oversubscribed cores
    install_cpu_ddp()
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func: Callable, num_processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = None, args: Sequence = (), timeout: timedelta = DEFAULT_TIMEOUT,
           device: str = "cuda") -> None:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes per machine.

    Arguments as Detectron2's ``launch`` (``dist_url="auto"``: a free local port, one machine only).
    With ``device`` (``cfg.MODEL.DEVICE``) "cpu": gloo processes, Detectron2's local process group,
    ``cores // N`` threads each and :func:`install_cpu_ddp`; otherwise Detectron2's ``launch``.

    Raises:
        ValueError: ``dist_url="auto"`` with several machines, or a process count < 1.
        Whatever ``main_func`` raises (from a child process: ``torch.multiprocessing``'s
        ``ProcessRaisedException`` carrying its traceback).
    """
    if not str(device).startswith("cpu"):
        from detectron2.engine import launch as d2_launch

        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    INT_AT_LEAST_1.check(num_processes_per_machine, "num_processes_per_machine")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("dist_url = 'auto' is invalid with several machines; allowed: a tcp:// URL of machine 0")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a free local port
            sock.bind(("127.0.0.1", 0))
            dist_url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    logger.info(f"Launching {num_processes_per_machine} CPU processes (gloo, {dist_url})")
    mp.spawn(_cpu_worker, nprocs=num_processes_per_machine, daemon=False,
             args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args), timeout))
