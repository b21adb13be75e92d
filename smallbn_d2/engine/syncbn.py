"""What SyncBN does with a single process, said in the log (docs/MODEL_ZOO.md, "SyncBN needs several
processes"): ``torch.nn.SyncBatchNorm`` synchronizes only when ``torch.distributed`` has several
processes, so with one it computes plain BN statistics of that process's batch."""
from __future__ import annotations

import logging
from typing import Optional

from torch import nn

__all__ = ["warn_single_process_syncbn"]

logger = logging.getLogger(__name__)


def warn_single_process_syncbn(model: nn.Module, world_size: int, images_per_process: int) -> Optional[str]:
    """Log a warning if ``model`` has SyncBatchNorm layers and ``world_size`` (training processes) is 1;
    ``images_per_process`` (per iteration) is named in it. Returns the warning, or None."""
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if count == 0 or world_size > 1:
        return None
    msg = (f"The model has {count} SyncBN (torch.nn.SyncBatchNorm) layers but runs in a single process: "
           f"they compute plain BN statistics over this process's {images_per_process} images per iteration, "
           "with nothing to synchronize. Launch several processes (--num-gpus N) for synchronized statistics.")
    logger.warning(msg)
    return msg
