"""What SyncBN does with a single process, said in the log (see docs/MODEL_ZOO.md).

Detectron2's "SyncBN" is ``torch.nn.SyncBatchNorm``. It synchronizes batch statistics only
when ``torch.distributed`` is initialized with more than one process; Detectron2's ``launch``
initializes it only for ``--num-gpus`` > 1 (and then requires CUDA). With one process
SyncBatchNorm therefore computes the statistics of that process's own batch: it *is* BN, with
``SOLVER.IMS_PER_BATCH`` images. (When ``torch.distributed`` is initialized and the input is on
the CPU, torch raises ``ValueError: SyncBatchNorm expected input tensor to be on GPU ...``.)
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import nn

__all__ = ["warn_single_process_syncbn"]

logger = logging.getLogger(__name__)


def warn_single_process_syncbn(model: nn.Module, world_size: int, images_per_process: int) -> Optional[str]:
    """Log a warning if ``model`` has SyncBatchNorm layers and there is only one process.

    Args:
        model: the built model.
        world_size: number of training processes (``detectron2.utils.comm.get_world_size()``).
        images_per_process: images per iteration of each process.
    Returns:
        the warning logged, or None when there is nothing to say.
    """
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if count == 0 or world_size > 1:
        return None
    msg = (f"The model has {count} SyncBN (torch.nn.SyncBatchNorm) layers but runs in a single process: "
           f"they compute plain BN statistics over this process's {images_per_process} images per iteration, "
           "with nothing to synchronize. Launch several processes (--num-gpus N) for synchronized statistics.")
    logger.warning(msg)
    return msg
