"""Forward gradients on ``torch.distributed``: K numbers per step instead of a gradient.

A weight-space forward gradient is g = V^T c with c = aggregation(d), d_k = ∇f·v_k. The
tangents V come from seeded generators, so every process can draw the same V, and what
depends on the data is only the K numbers d. Hence three ways to use W processes
(launched by ``torchrun``; gloo on the CPU, NCCL on CUDA):

- :class:`DataParallel` (weight space): process r evaluates the mean loss f_r of its shard
  of n_r samples along the *same* K tangents, and one all-reduce of K + 1 float64 numbers,
  (Σ_r n_r d_r, Σ_r n_r), gives the directional derivatives of the global mean loss

      d = Σ_r n_r d_r / Σ_r n_r,        f = Σ_r (n_r / N) f_r,

  from which every process forms the identical update locally. Bytes handed to the
  collectives per step and process: 8 (K + 1) for d and N, 8 for the logged loss;
  DistributedDataParallel hands over all P gradient entries (4 P bytes in float32).
  Parameters stay bitwise identical on every process: the same bits of d, V and optimizer
  state give the same bits of θ.
- :class:`DataParallel` (activity space, local losses, any estimator whose update is
  built per sample): the tangents act on per-sample activations, so the update is not a
  combination of shared tangents; the processes all-reduce the ``.grad`` of the estimate,
  bucketed (``bucket_megabytes``) as DistributedDataParallel does, weighted by n_r / N:
  4 P bytes per step, like backprop.
- :class:`TangentParallel` (weight space): every process evaluates the *whole* batch along
  its own slice of the K tangents (``WeightForwardGradient.tangent_range``), one
  all-gather assembles d (8 ⌈K / W⌉ bytes handed over per process), and every process
  draws all K tangents from the shared seeds for the aggregation (the Gram matrix of FROG)
  and the update. The jvp, the expensive part (about 2 K forward passes), is split W ways.
- :func:`ddp_module` and ``DataParallel(Backprop(model))``: backprop under
  ``torch.nn.parallel.DistributedDataParallel``, the baseline, with its bytes counted.

BatchNorm in data parallel: every process normalizes with the statistics of its own shard
(what DistributedDataParallel does without SyncBatchNorm): global statistics inside the
forward-mode pass would need their K tangents all-reduced in every layer. The running
statistics are synchronized after every step (``buffers="average"``: all-reduced and
averaged, as SyncBatchNorm keeps them equal; ``"broadcast"``: rank 0's, as
DistributedDataParallel's ``broadcast_buffers``; ``"local"``: each process its own), and
their bytes are counted apart (category ``buffers``).

Every collective this module starts goes through :func:`fwdgrad.distributed.collectives.all_reduce`,
``all_gather`` or ``broadcast``, which add the bytes of the tensors they are handed to a
:class:`CommunicationCounter` (``wrapper.counter``; ``wrapper.bytes_per_step``). These are
payload bytes: a ring all-reduce puts about 2 (W - 1) / W times them on each process's
link, an all-gather (W - 1) times.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.estimators import Backprop
from fwdgrad.core.regenerated import chunk_seed
from fwdgrad.core.weight import WeightForwardGradient
from fwdgrad.distributed.collectives import (
    BUFFER_SYNC,
    ONE_TIME,
    CommunicationCounter,
    DistributedDataParallelModule,
    all_gather,
    all_reduce,
    apply_flat,
    broadcast,
    broadcast_module,
    broadcast_tensors,
    check_same_on_every_process,
    count_ddp,
    ddp_module,
    generator_digest,
    synchronize_buffers,
)

__all__ = [
    "BUFFER_SYNC", "ONE_TIME", "CommunicationCounter", "DataParallel", "DistributedDataParallelModule",
    "TangentParallel", "all_gather", "all_reduce", "broadcast", "broadcast_module", "check_same_on_every_process",
    "ddp_module", "synchronize_buffers", "tangent_ranges",
]


def _estimator_description(estimator) -> dict:
    description = {"class": type(estimator).__name__}
    if isinstance(estimator, ForwardGradient):
        description.update(
            num_tangents=estimator.num_tangents, aggregation=estimator.aggregation, sampler=estimator.sampler,
            seed=estimator.seed, chunk_size=estimator.chunk_size,
            parameters=sum(p.numel() for p in estimator.parameters),
        )
        description.update({name: generator_digest(g) for name, g in estimator.random_generators().items()})
    return description


def _require_seed(estimator, wrapper: str) -> None:
    if isinstance(estimator, ForwardGradient) and estimator.seed is None:
        raise ValueError(
            f"{wrapper} needs an estimator built with seed=<int>: every process must draw its tangents from the "
            "same seeded generators (torch's global RNG is not shared); e.g. ForwardGradient(model, seed=0)"
        )


class _Wrapper:
    """What both wrappers share: the estimator's interface (``backward``, ``state_dict``,
    ``parameters``, ...; unknown attributes are the estimator's) and the counter."""

    def __init__(self, estimator, process_group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} needs an initialized process group: launch with torchrun and call "
                "torch.distributed.init_process_group() (or fwdgrad.distributed.run.initialize()) first"
            )
        self.estimator = estimator
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.counter = CommunicationCounter()
        self._checked = False

    def __getattr__(self, name: str):
        if name == "estimator":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.estimator, name)

    @property
    def bytes_per_step(self) -> float:
        """Bytes this process handed to the collectives per step (all per-step categories)."""
        return self.counter.bytes_per_step

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)
        self._checked = False  # the restored generators are compared at the next step

    def _check_once(self) -> None:
        """At the first step (and after a restore): the same estimator and generator states everywhere."""
        if not self._checked:
            check_same_on_every_process(_estimator_description(self.estimator), self.group)
            self._checked = True


class DataParallel(_Wrapper):
    """Data parallelism over ``process_group``: each process its shard of the batch.

    Args:
        estimator: a :class:`fwdgrad.ForwardGradient` (built with ``seed=``, the same on
            every process), :class:`fwdgrad.Backprop` (whose closure calls a
            :func:`ddp_module`, given as ``module``), or any estimator with
            ``backward(closure)`` filling ``.grad`` of its ``parameters`` (e.g. local
            losses): all but weight-space ones get the ``.grad`` all-reduce, which includes
            the parameters of ``auxiliary_parameters()`` (local losses' heads, broadcast
            from rank 0 at the start).
        process_group: ``None``: the default group.
        buffers: BatchNorm running statistics across processes after each step, see
            :data:`BUFFER_SYNC` (the module docstring).
        module: the model whose buffers are synchronized (default: the estimator's
            module); a :func:`ddp_module` for ``Backprop``.
        bucket_megabytes: bucket size of the ``.grad`` all-reduce (non-weight-space
            estimators without DistributedDataParallel).

    ``backward(closure, *inputs, num_samples=None)`` takes the closure of this process's
    shard (the mean loss over its n_r = ``num_samples`` samples; ``None`` weighs every
    process equally, as DistributedDataParallel does) and returns the mean loss of the
    global batch, Σ_r n_r f_r / Σ_r n_r; ``.grad`` holds the estimate of its gradient,
    identical on every process. Every process needs at least one sample per step.
    With per-sample tangents (activity space) every process draws its own, from a seed
    derived from the shared generator and its rank.
    """

    def __init__(self, estimator, process_group=None, buffers: str = "average", module: torch.nn.Module | None = None,
                 bucket_megabytes: float = 25.0):
        super().__init__(estimator, process_group)
        if buffers not in BUFFER_SYNC:
            raise ValueError(f"unknown buffers mode {buffers!r}; valid choices: {', '.join(BUFFER_SYNC)}")
        if not (isinstance(bucket_megabytes, (int, float)) and bucket_megabytes > 0):
            raise ValueError(f"bucket_megabytes must be a positive number, got {bucket_megabytes!r}")
        if not (callable(getattr(estimator, "backward", None)) and hasattr(estimator, "parameters")):
            raise TypeError(f"DataParallel wraps an estimator with backward(closure) and parameters (fwdgrad."
                            f"ForwardGradient, fwdgrad.Backprop, ...), got {type(estimator).__name__}")
        _require_seed(estimator, "DataParallel")
        self.buffers = buffers
        self.module = module if module is not None else getattr(estimator, "module", None)
        self.uses_ddp = isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
        if isinstance(estimator, Backprop) and not self.uses_ddp:
            raise ValueError("DataParallel(Backprop(...)) needs module=fwdgrad.distributed.ddp_module(model) (and a "
                             "closure that calls it): DistributedDataParallel all-reduces the gradients")
        # parameters outside the model that learn from the shard too (local losses' heads):
        # rank 0's at the start, their .grad all-reduced with the model's
        self.auxiliary = [p for p in getattr(estimator, "auxiliary_parameters", lambda: [])() if p.requires_grad]
        if self.uses_ddp:
            count_ddp(self.module, self.counter, process_group)
        elif self.module is not None:
            broadcast_module(self.module, self.counter, process_group)
        broadcast_tensors(self.auxiliary, self.counter, process_group)
        self.bucket_bytes = int(bucket_megabytes * 2**20)
        self.weight_space = isinstance(estimator, WeightForwardGradient)
        if self.weight_space:
            estimator.combiner = self._combine
        self._per_sample_tangents = getattr(estimator, "tangent_sharing", None) == "per_sample"
        self._combined = False
        self._weight = 1.0
        self._total = 1.0

    def __repr__(self) -> str:
        return f"DataParallel({self.estimator!r}, world_size={self.world_size}, buffers={self.buffers!r})"

    @property
    def traffic(self) -> str:
        """What a step sends, in words (for logs and summaries)."""
        if self.weight_space:
            return "all-reduce of K+1 float64 (Σ n_r d_r, N) and 1 float64 (the loss)"
        if self.uses_ddp:
            return "DistributedDataParallel's gradient all-reduce (P entries) and 2 float64 (N, the loss)"
        return "bucketed all-reduce of .grad (P entries) and 2 float64 (N, the loss)"

    def _device(self) -> torch.device:
        parameters = self.estimator.parameters
        return parameters[0].device if parameters else torch.device("cpu")

    def _combine(self, directional_derivatives: torch.Tensor, failing: bool = False) -> torch.Tensor:
        """d_r (K,) of this shard -> Σ_r n_r d_r / Σ_r n_r, in float64 (K + 1 numbers). A process
        that failed before it (``failing``) hands over NaN, so that every process stops at once
        with a RuntimeError instead of waiting for it."""
        self._combined = True
        num = directional_derivatives.shape[0]
        buffer = torch.empty(num + 1, dtype=torch.float64, device=directional_derivatives.device)
        buffer[:num] = directional_derivatives.double().reshape(num) * self._weight
        buffer[num] = self._weight
        all_reduce(buffer, self.counter, "directional_derivatives", self.group)
        self._total = float(buffer[num])
        if not failing:
            _check_all_finite(buffer)
        return (buffer[:num] / buffer[num]).to(directional_derivatives.dtype).reshape(directional_derivatives.shape)

    def backward(self, closure, *inputs, num_samples: int | float | None = None) -> torch.Tensor:
        """The estimate of the global batch's mean-loss gradient in ``.grad``; returns that loss."""
        self._check_once()
        weight = 1.0 if num_samples is None else float(num_samples)
        if not weight > 0:
            raise ValueError(f"num_samples must be positive (every process needs a sample), got {num_samples!r}")
        self._weight = weight
        if self.weight_space:
            self._combined = False
            try:
                loss = self.estimator.backward(closure, *inputs)
            except Exception:
                if not self._combined:  # failed before the all-reduce the others wait in: NaN fails them too
                    self._combine(torch.full((self.estimator.num_tangents,), math.nan, dtype=torch.float64,
                                             device=self.estimator.device), failing=True)
                raise
            reduced = torch.tensor([weight * float(loss)], dtype=torch.float64, device=loss.device)
            all_reduce(reduced, self.counter, "loss", self.group)
            global_loss = reduced[0] / self._total
        else:
            try:
                loss = self._shard_backward(closure, inputs)
            except Exception:
                if not self.uses_ddp:  # the others wait in the loss all-reduce: NaN stops them too
                    nan = torch.tensor([weight, math.nan], dtype=torch.float64, device=self._device())
                    all_reduce(nan, self.counter, "loss", self.group)
                raise
            reduced = torch.tensor([weight, weight * float(loss)], dtype=torch.float64, device=loss.device)
            all_reduce(reduced, self.counter, "loss", self.group)
            self._total = float(reduced[0])
            global_loss = reduced[1] / reduced[0]
            if not torch.isfinite(global_loss):
                raise RuntimeError(f"the loss is not finite ({float(global_loss)}) on at least one process; "
                                   "lower the learning rate or check the inputs")
            if not self.uses_ddp:
                self._all_reduce_gradients(weight / self._total)
        if self.module is not None:
            synchronize_buffers(getattr(self.module, "module", self.module), self.buffers, self.counter, self.group)
        self.counter.end_step()
        return global_loss.to(loss.dtype)

    def _shard_backward(self, closure, inputs) -> torch.Tensor:
        """The estimator's step on this shard; per-sample tangents from this process's own seed."""
        generator = getattr(self.estimator, "generator", None)
        if not self._per_sample_tangents or generator is None:
            return self.estimator.backward(closure, *inputs)
        # the shared generator gives one step seed (the same on every process, so it is
        # what the checkpoint holds); this process draws from (step seed, rank)
        step_seed = int(torch.randint(0, 2**62, (), generator=generator))
        own = torch.Generator(generator.device).manual_seed(chunk_seed(step_seed, self.rank))
        self.estimator.generator = own
        try:
            return self.estimator.backward(closure, *inputs)
        finally:
            self.estimator.generator = generator

    def _all_reduce_gradients(self, scale: float) -> None:
        """.grad <- Σ_r (n_r / N) .grad_r, in buckets of at most ``bucket_bytes`` (one per dtype)."""
        gradients = [p.grad for p in [*self.estimator.parameters, *self.auxiliary] if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for gradient in gradients:
            if bucket and (size + gradient.numel() * gradient.element_size() > self.bucket_bytes
                           or gradient.dtype != bucket[0].dtype):
                self._reduce_bucket(bucket, scale)
                bucket, size = [], 0
            bucket.append(gradient)
            size += gradient.numel() * gradient.element_size()
        if bucket:
            self._reduce_bucket(bucket, scale)

    def _reduce_bucket(self, bucket: list[torch.Tensor], scale: float) -> None:
        apply_flat(bucket, lambda flat: all_reduce(flat.mul_(scale), self.counter, "gradients", self.group))


def _check_all_finite(reduced: torch.Tensor) -> None:
    if not torch.isfinite(reduced).all():
        raise RuntimeError("the directional derivatives are not finite on at least one process (that process "
                           "reports why); lower the learning rate or check the inputs")


def tangent_ranges(estimator: WeightForwardGradient, world_size: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of the tangents each of ``world_size`` processes evaluates.

    Contiguous and balanced; with regenerated chunks, whole chunks (the chunks are split
    among the processes as evenly as their count allows).
    """
    num = estimator.num_tangents
    if num < world_size:
        raise ValueError(f"tangent parallelism splits the K tangents among the processes: num_tangents={num} < "
                         f"world size {world_size}; use num_tangents >= {world_size} or data parallelism")
    if estimator.regenerate_tangents:
        bounds = estimator._chunk_bounds()
        if len(bounds) < world_size:
            raise ValueError(f"tangent parallelism with regenerated tangents hands whole chunks to the processes: "
                             f"{len(bounds)} chunks (chunk_size={estimator.chunk_size}) for {world_size} processes; "
                             f"use chunk_size <= {num // world_size}")
        edges = [round(r * len(bounds) / world_size) for r in range(world_size + 1)]
        return [(bounds[edges[r]][0], bounds[edges[r + 1] - 1][1]) for r in range(world_size)]
    edges = [r * num // world_size for r in range(world_size + 1)]
    return [(edges[r], edges[r + 1]) for r in range(world_size)]


class TangentParallel(_Wrapper):
    """Tangent parallelism over ``process_group``: each process a slice of the K tangents.

    Every process evaluates the whole batch along the tangents of its ``tangent_range``
    (:func:`tangent_ranges`), an all-gather assembles the K directional derivatives (in
    float64, in tangent order), and every process draws all K tangents from the shared
    generators to aggregate them and form the update: the same update as one process with
    the same estimator arguments and seed (the tangents do not depend on the number of
    processes). Weight space only (:class:`fwdgrad.core.weight.WeightForwardGradient`, built
    with ``seed=``); every process must pass the same batch.
    """

    def __init__(self, estimator: WeightForwardGradient, process_group=None):
        super().__init__(estimator, process_group)
        if not isinstance(estimator, WeightForwardGradient):
            raise ValueError(
                f"tangent parallelism splits weight-space tangents; got {type(estimator).__name__} (activity tangents "
                "live on per-sample activations, and Backprop has none): use DataParallel for it"
            )
        _require_seed(estimator, "TangentParallel")
        self.ranges = tangent_ranges(estimator, self.world_size)
        estimator.tangent_range = self.ranges[self.rank]
        estimator.combiner = self._gather
        self._gathered = False
        if estimator.module is not None:
            broadcast_module(estimator.module, self.counter, process_group)

    def __repr__(self) -> str:
        return (f"TangentParallel({self.estimator!r}, world_size={self.world_size}, "
                f"tangent_range={self.ranges[self.rank]})")

    @property
    def traffic(self) -> str:
        return "all-gather of ceil(K/W) float64 per process (its slice of d)"

    def _gather(self, directional_derivatives: torch.Tensor, failing: bool = False) -> torch.Tensor:
        """This slice's d -> all K, in tangent order (each slice padded to the longest one)."""
        self._gathered = True
        longest = max(stop - start for start, stop in self.ranges)
        local = torch.zeros(longest, dtype=torch.float64, device=directional_derivatives.device)
        local[:directional_derivatives.shape[0]] = directional_derivatives.double()
        gathered = all_gather(local, self.counter, "directional_derivatives", self.group)
        parts = [part[:stop - start] for part, (start, stop) in zip(gathered, self.ranges)]
        combined = torch.cat(parts)
        if not failing:
            _check_all_finite(combined)
        return combined.to(directional_derivatives.dtype)

    def backward(self, closure, *inputs) -> torch.Tensor:
        """The update from all K tangents in ``.grad``; returns the loss (the same batch everywhere)."""
        self._check_once()
        self._gathered = False
        try:
            loss = self.estimator.backward(closure, *inputs)
        except Exception:
            if not self._gathered:  # failed before the all-gather the others wait in: NaN fails them too
                start, stop = self.ranges[self.rank]
                self._gather(torch.full((stop - start,), math.nan, dtype=torch.float64, device=self.estimator.device),
                             failing=True)
            raise
        self.counter.end_step()
        return loss


