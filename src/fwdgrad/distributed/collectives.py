"""Collectives over ``torch.distributed`` that count what they are handed, and what the
wrappers of :mod:`fwdgrad.distributed.parallel` build on them.

- :class:`CommunicationCounter`: bytes handed to the collectives, by category, per step.
- :func:`all_reduce`, :func:`all_gather`, :func:`broadcast`: the ``torch.distributed``
  operations, counted (payload bytes: a ring all-reduce puts about 2 (W - 1) / W times them
  on each process's link, an all-gather (W - 1) times).
- :func:`broadcast_module` (rank 0's parameters and buffers everywhere, as
  DistributedDataParallel starts), :func:`synchronize_buffers` (BatchNorm's running
  statistics after a step, :data:`BUFFER_SYNC`), :func:`check_same_on_every_process`.
- :func:`ddp_module`: backprop's baseline, ``DistributedDataParallel`` with its gradient
  buckets counted by a communication hook.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

BUFFER_SYNC = ("average", "broadcast", "local")
# categories of traffic that happen once, not every step (left out of bytes_per_step)
ONE_TIME = ("setup",)


@dataclass
class CommunicationCounter:
    """Bytes handed to collectives, by category (``directional_derivatives``, ``loss``,
    ``gradients``, ``buffers``, ``setup``, ...), and the number of steps they were spent in."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def add(self, category: str, tensor: torch.Tensor) -> None:
        self.bytes[category] = self.bytes.get(category, 0) + tensor.numel() * tensor.element_size()
        self.calls[category] = self.calls.get(category, 0) + 1

    def end_step(self) -> None:
        self.steps += 1

    def per_step(self) -> dict[str, float]:
        """Bytes per step of every per-step category (``ONE_TIME`` ones left out)."""
        steps = max(1, self.steps)
        return {key: value / steps for key, value in sorted(self.bytes.items()) if key not in ONE_TIME}

    @property
    def bytes_per_step(self) -> float:
        """All per-step categories together: what one process hands to the collectives per step."""
        return sum(self.per_step().values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.steps = 0


def all_reduce(tensor: torch.Tensor, counter: CommunicationCounter | None, category: str, group=None) -> torch.Tensor:
    """In-place sum over the processes of ``group`` (counted under ``category``); returns ``tensor``."""
    if counter is not None:
        counter.add(category, tensor)
    dist.all_reduce(tensor, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, counter: CommunicationCounter | None, category: str, group=None
               ) -> list[torch.Tensor]:
    """Every process's ``tensor`` (same shape everywhere), in rank order (counted: this process's)."""
    if counter is not None:
        counter.add(category, tensor)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return gathered


def broadcast(tensor: torch.Tensor, counter: CommunicationCounter | None, category: str, group=None, src: int = 0
              ) -> torch.Tensor:
    """``tensor`` of rank ``src`` (a global rank) on every process, in place."""
    if counter is not None and dist.get_rank() == src:
        counter.add(category, tensor)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def apply_flat(tensors: list[torch.Tensor], operation: Callable[[torch.Tensor], None]) -> None:
    """Run ``operation`` once per (dtype, device) on the concatenation of ``tensors``; copy back."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        operation(flat)
        offset = 0
        with torch.no_grad():
            for tensor in members:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


def broadcast_tensors(tensors: list[torch.Tensor], counter: CommunicationCounter | None, group=None) -> None:
    """Rank 0's values of ``tensors`` on every process (counted as setup traffic)."""
    if tensors:
        apply_flat(tensors, lambda flat: broadcast(flat, counter, "setup", group))


def broadcast_module(module: torch.nn.Module, counter: CommunicationCounter | None, group=None) -> None:
    """Rank 0's parameters and buffers on every process (as DistributedDataParallel starts)."""
    broadcast_tensors([*module.parameters(), *module.buffers()], counter, group)


def synchronize_buffers(module: torch.nn.Module, mode: str, counter: CommunicationCounter | None, group=None) -> None:
    """Make the floating-point buffers (BatchNorm's running statistics) agree across processes.

    ``average``: their mean over the processes; ``broadcast``: rank 0's; ``local``: nothing.
    Integer buffers (``num_batches_tracked``) advance identically on every process.
    """
    if mode not in BUFFER_SYNC:
        raise ValueError(f"unknown buffers mode {mode!r}; valid choices: {', '.join(BUFFER_SYNC)}")
    if mode == "local":
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    world_size = dist.get_world_size(group)
    if mode == "average":
        apply_flat(buffers, lambda flat: all_reduce(flat, counter, "buffers", group).div_(world_size))
    else:
        apply_flat(buffers, lambda flat: broadcast(flat, counter, "buffers", group))


def generator_digest(generator: torch.Generator | None) -> str | None:
    return None if generator is None else hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:12]


def check_same_on_every_process(description: dict, group=None, what: str = "estimator") -> None:
    """ValueError on every process unless ``description`` (plain values) is equal on all of them."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, description, group=group)
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            keys = [k for k in sorted(set(other) | set(gathered[0])) if other.get(k) != gathered[0].get(k)]
            differing = ", ".join(f"{k}: rank 0 {gathered[0].get(k)!r}, rank {rank} {other.get(k)!r}" for k in keys)
            raise ValueError(
                f"the {what} differs between processes ({differing}); every process must build it with the same "
                "arguments and seed and restore the same checkpoint"
            )


# ---- backprop under DistributedDataParallel ---------------------------------------------


class DistributedDataParallelModule(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose ``state_dict`` is the wrapped module's (no ``module.``
    prefix): checkpoints stay interchangeable with single-process runs."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def _counting_allreduce_hook(state, bucket):
    """DistributedDataParallel's default all-reduce (mean), with the bucket's bytes counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter, group = state
    counter.add("gradients", bucket.buffer())
    return allreduce_hook(group, bucket)


def ddp_module(model: torch.nn.Module, process_group=None, device: torch.device | None = None
               ) -> DistributedDataParallelModule:
    """``model`` under DistributedDataParallel (buffers synchronized by
    :class:`fwdgrad.distributed.parallel.DataParallel`, not broadcast in forward); pass it as
    ``DataParallel(Backprop(m), module=m)``, which counts the gradient buckets' bytes
    (:func:`count_ddp`)."""
    device = device or next(model.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    # torch >= 2.14 names the option forward_sync_buffers (rank 0's buffers are still copied at the start)
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}
    return DistributedDataParallelModule(model, device_ids=device_ids, process_group=process_group, **no_buffer_sync)


def count_ddp(module: torch.nn.parallel.DistributedDataParallel, counter: CommunicationCounter, group) -> None:
    """Count the bytes of ``module``'s gradient buckets under ``gradients`` (a communication hook)."""
    module.register_comm_hook((counter, group), _counting_allreduce_hook)

