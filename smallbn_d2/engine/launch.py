"""Several training processes on CPU (gloo), with Detectron2's ``launch`` semantics.

Detectron2 v0.6's ``detectron2.engine.launch`` always initializes NCCL and asserts that CUDA is
available, and its ``create_ddp_model`` passes ``device_ids=[local_rank]``, which PyTorch's
``DistributedDataParallel`` rejects for a CPU model. So ``--num-gpus N`` cannot run on CPU with
Detectron2 alone. :func:`launch` here keeps Detectron2's ``launch`` for CUDA and, for
``device="cpu"``, spawns N processes itself:

* ``torch.distributed`` with the **gloo** backend (same ``dist_url``, ``num_machines`` and
  ``machine_rank`` arguments as Detectron2's);
* Detectron2's per-machine process group (``detectron2.utils.comm._LOCAL_PROCESS_GROUP``), so
  ``comm.get_local_rank()`` and ``comm.get_local_size()`` work;
* ``torch.set_num_threads(cores // N)`` per process, so that N processes do not oversubscribe
  the cores;
* :func:`create_ddp_model` installed in ``detectron2.engine.defaults`` (which
  ``DefaultTrainer.__init__`` calls): ``DistributedDataParallel`` with ``device_ids=None`` for
  a CPU model, Detectron2's behaviour otherwise.

:func:`check_norm_names` and :func:`check_cpu_distributed` are the config checks
``tools/train_net.py`` runs before any process starts.

Semantics (the same as on GPUs): ``SOLVER.IMS_PER_BATCH`` is the total over the N processes;
gradients are all-reduced by DDP (``broadcast_buffers=False``), so weights stay identical across
processes while every process keeps its own norm statistics: BN, CBN and MABN statistics,
windows and moving averages are per process, as the papers specify (CBN: per-GPU statistics;
MABN: per-GPU batch of 2). Before every checkpoint and evaluation the trainer averages the
population statistics across the processes (:class:`~smallbn_d2.engine.AveragePopulationStatistics`),
so that every process evaluates, and the checkpoint holds, the same model. Synchronized BN on CPU: PyTorch's ``nn.SyncBatchNorm`` (norm
``"SyncBN"``) only runs on CUDA, so :func:`check_cpu_distributed` refuses it before any process
starts and points to Detectron2's ``"naiveSyncBN"`` (``NaiveSyncBatchNorm``), which all-reduces
with any backend.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import CfgNode

from ..config import ConfigValueError, norm_keys

__all__ = ["launch", "create_ddp_model", "install_cpu_ddp", "check_cpu_distributed", "check_norm_names"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)

def check_norm_names(cfg: CfgNode) -> None:
    """Check every norm key of ``cfg`` against the names ``get_norm`` accepts, before building.

    Detectron2 reports an unknown norm name only when the layer is built, without the config
    key; this names the key.

    Raises:
        ConfigValueError: a norm key (any key called ``NORM``: ``MODEL.RESNETS.NORM``,
            ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``, ...) holds an unknown name; the message
            names the key, the value and every supported name.
    """
    from ..modeling import supported_norms

    allowed = supported_norms()
    for key, value in norm_keys(cfg).items():
        if value and value not in allowed:
            raise ConfigValueError(
                f"{key} = {value!r} is invalid; allowed: {', '.join(repr(n) for n in allowed)}, or '' (no norm)")


def check_cpu_distributed(cfg: CfgNode, world_size: int) -> None:
    """Refuse, before any process starts, what cannot run with ``world_size`` CPU processes.

    Args:
        cfg: the training config.
        world_size: total number of processes (``--num-gpus`` x ``--num-machines``).
    Raises:
        ConfigValueError: ``MODEL.DEVICE`` is "cpu", ``world_size`` > 1 and a norm key is
            "SyncBN"/"nnSyncBN" (``torch.nn.SyncBatchNorm`` is CUDA-only); the message names the
            key and the CPU alternative "naiveSyncBN".
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
    """Detectron2's ``create_ddp_model``, but ``device_ids=None`` for a model on CPU.

    Args:
        model: the model (returned as is with one process).
        kwargs: as Detectron2's (``fp16_compression``, DDP arguments).
    Returns:
        ``model`` or its ``DistributedDataParallel`` wrapper.
    """
    from detectron2.engine import defaults

    d2_create = getattr(defaults, "_smallbn_d2_create_ddp_model", defaults.create_ddp_model)
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu" and "device_ids" not in kwargs:
        kwargs["device_ids"] = None
    return d2_create(model, **kwargs)


def install_cpu_ddp() -> None:
    """Make ``DefaultTrainer`` use :func:`create_ddp_model` (idempotent; raises nothing)."""
    from detectron2.engine import defaults

    if "_smallbn_d2_create_ddp_model" not in defaults.__dict__:
        defaults._smallbn_d2_create_ddp_model = defaults.create_ddp_model
        defaults.create_ddp_model = create_ddp_model


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank: int, main_func: Callable, world_size: int, num_per_machine: int, machine_rank: int,
                dist_url: str, args: Sequence, timeout: timedelta) -> None:
    from detectron2.utils import comm

    from ..compat import set_local_process_group

    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout)
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            set_local_process_group(group)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
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

    Args:
        main_func: the function each process runs (picklable: a module-level function).
        num_processes_per_machine: ``--num-gpus``; on CPU the number of processes.
        num_machines, machine_rank, dist_url, timeout: as Detectron2's ``launch``
            (``dist_url="auto"``: a free local port, single machine only).
        args: arguments of ``main_func``.
        device: ``cfg.MODEL.DEVICE``. "cpu": gloo processes as described in the module
            docstring; anything else: Detectron2's ``launch`` (NCCL, one GPU per process).
    Raises:
        ValueError: ``dist_url="auto"`` with several machines, or a process count < 1.
        Whatever ``main_func`` raises (from a child process: ``torch.multiprocessing``'s
        ``ProcessRaisedException`` carrying its traceback).
    """
    if not str(device).startswith("cpu"):
        from detectron2.engine import launch as d2_launch

        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    if not isinstance(num_processes_per_machine, int) or num_processes_per_machine < 1:
        raise ValueError(f"num_processes_per_machine = {num_processes_per_machine!r} is invalid; allowed: an integer >= 1")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("dist_url = 'auto' is invalid with several machines; allowed: a tcp:// URL of machine 0")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info(f"Launching {num_processes_per_machine} CPU processes (gloo, {dist_url})")
    mp.spawn(_cpu_worker, nprocs=num_processes_per_machine, daemon=False,
             args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args), timeout))
