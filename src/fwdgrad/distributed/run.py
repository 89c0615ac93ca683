"""A training loop on several processes: torchrun's environment, the process group, who
writes, the sharded data and evaluation (:class:`fwdgrad.train.trainer.Trainer` with ``distributed=``).

- :func:`launch_environment` reads what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``TORCHELASTIC_RESTART_COUNT``); :func:`initialize` starts the process
  group once (``gloo`` for the CPU; ``cpu:gloo,cuda:nccl`` on CUDA, so CPU tensors still
  go through gloo) and :func:`rank_device` gives each process ``cuda:LOCAL_RANK``.
- :class:`DistributedRun` is what the loop asks: am I the writer (rank 0 writes the run
  directory, checkpoints, TensorBoard, and prints), the sharded evaluation whose sums are
  all-reduced (the same numbers as one process, up to the order of the sums), rank 0's
  result of a filesystem decision or of a checkpoint read, broadcast to the others.
- :func:`shard_training_loader`: ``DistributedSampler(shuffle=True, seed)`` (``set_epoch``
  by the loop), ``batch_size`` the *global* batch, ``batch_size / W`` per process. Its
  strided shards make the union of the W processes' i-th batches the i-th batch of one
  permutation that does not depend on W: 1 and W processes train on the same global
  batches when W divides the training set (otherwise the sampler repeats a few samples to
  make the shards equal, as with DistributedDataParallel).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from fwdgrad.distributed.collectives import CommunicationCounter, all_reduce

PARALLELISMS = ("none", "data", "tangent")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int


def launch_environment() -> Launch | None:
    """The torchrun environment of this process, or None when it was not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                  int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))


def rank_device(requested: str) -> torch.device:
    """The device of this process: ``cpu``; ``cuda`` -> ``cuda:LOCAL_RANK``; ``auto``: cuda if available."""
    launch = launch_environment()
    local_rank = 0 if launch is None else launch.local_rank
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; valid choices: auto, cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                             "visible): use --nproc_per_node <= the number of GPUs")
        return torch.device("cuda", local_rank)
    raise ValueError(f"device {requested!r} under torchrun: valid choices: auto, cpu, cuda (each process then uses "
                     "cuda:LOCAL_RANK)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: gloo for the CPU, ``cpu:gloo,cuda:nccl`` for CUDA devices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed backend 'nccl' needs device=cuda; valid choices for the CPU: auto, gloo")
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"


def initialize(device: torch.device, backend: str = "auto", timeout_minutes: float = 30.0) -> Launch:
    """Start the default process group from torchrun's environment (once; later calls check it).

    Raises ValueError when the process was not launched by torchrun.
    """
    launch = launch_environment()
    if launch is None:
        raise ValueError("a distributed run needs a torchrun launch (RANK and WORLD_SIZE are not set): "
                         "torchrun --nproc_per_node=N -m fwdgrad <command> distributed=data ...")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=resolve_backend(backend, device), init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return launch


def shutdown(wait_for_peers: bool = True) -> None:
    """Destroy the default process group, if any.

    ``wait_for_peers`` (a normal end): a barrier first, so that no process tears down its
    connections while another still writes its results or uses them: with gloo on the CPU a
    process that destroyed its group while its peer was still busy aborted at exit now and
    then ("terminate called without an active exception"). After an error no barrier (a
    dead peer would hold it until the timeout).
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def shard_training_loader(loader: DataLoader, seed: int, group=None) -> DataLoader:
    """``loader``'s dataset under ``DistributedSampler(shuffle=True, seed)``, ``loader.batch_size``
    being the global batch (it must be divisible by the number of processes)."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if loader.batch_size % world_size:
        raise ValueError(f"batch_size={loader.batch_size} is the global batch, split among {world_size} processes: "
                         f"it must be divisible by {world_size}")
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world_size, sampler=sampler,
                      num_workers=loader.num_workers, drop_last=loader.drop_last)


class DistributedRun:
    """The process group as a training loop sees it.

    ``counter`` holds the bytes of the loop's own collectives (evaluation sums, under
    ``evaluation``); the estimator wrapper counts the steps'.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.counter = CommunicationCounter()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DistributedRun(rank={self.rank}, world_size={self.world_size}, backend={dist.get_backend(self.group)})"

    def broadcast_object(self, value: object = None) -> object:
        """Rank 0's ``value`` on every process (pickled: for plain values and tensors)."""
        payload = [value if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0, group=self.group)
        return payload[0]

    def run_on_writer(self, function: Callable[[], object]) -> object:
        """``function()`` on rank 0 (a filesystem decision, a checkpoint read), its result on every
        process. A ValueError, TypeError or OSError it raises is raised on every process (the
        others get a ValueError with the same message)."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = ("ok", function())
            except (ValueError, TypeError, OSError) as error:
                outcome = ("error", error)
                self.broadcast_object(("error", str(error)))
                raise
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise ValueError(outcome[1])
        return outcome[1]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, device: torch.device,
                 max_batches: int | None = None) -> tuple[float, float]:
        """:func:`fwdgrad.train.trainer.evaluate` on every process's share of ``loader``'s samples.

        The samples :func:`~fwdgrad.train.trainer.evaluate` would see (the first ``max_batches``
        batches) are dealt out in turn, rank r taking positions r, r + W, ...; the sums of
        the losses, correct predictions and counts are all-reduced in float64.
        """
        model = getattr(model, "module", model)  # never DistributedDataParallel's forward here
        dataset = loader.dataset
        limit = len(dataset) if max_batches is None else min(len(dataset), max_batches * loader.batch_size)
        shard = DataLoader(Subset(dataset, range(self.rank, limit, self.world_size)), batch_size=loader.batch_size,
                           num_workers=loader.num_workers)
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for x, y in shard:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums[1] += int((logits.argmax(1) == y).sum())
            sums[2] += len(y)
        model.train(was_training)
        sums = sums.to(device)
        all_reduce(sums, self.counter, "evaluation", self.group)
        total_loss, correct, count = sums.tolist()
        if count == 0:
            return float("nan"), float("nan")
        return total_loss / count, correct / count
