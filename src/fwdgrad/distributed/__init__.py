"""Forward gradients on several processes, on torch.distributed.

Data and tangent parallelism around any estimator (:mod:`~fwdgrad.distributed.parallel`), the
counted collectives (:mod:`~fwdgrad.distributed.collectives`) and what a process launched by
``torchrun`` needs to know of its launch (:mod:`~fwdgrad.distributed.run`).

May import: torch, fwdgrad.core.
"""

from fwdgrad.distributed.parallel import (
    BUFFER_SYNC,
    ONE_TIME,
    CommunicationCounter,
    DataParallel,
    DistributedDataParallelModule,
    TangentParallel,
    all_gather,
    all_reduce,
    broadcast,
    broadcast_module,
    check_same_on_every_process,
    ddp_module,
    synchronize_buffers,
    tangent_ranges,
)

# the names of fwdgrad.distributed before the package (fwdgrad.distributed.parallel's)
__all__ = [
    "BUFFER_SYNC", "ONE_TIME", "CommunicationCounter", "DataParallel", "DistributedDataParallelModule",
    "TangentParallel", "all_gather", "all_reduce", "broadcast", "broadcast_module", "check_same_on_every_process",
    "ddp_module", "synchronize_buffers", "tangent_ranges",
]
