"""``fwdgrad bench distributed=data|tangent`` under torchrun: ms and bytes per step on W processes.

One step is the unit of :mod:`fwdgrad.bench.benchmark` (``zero_grad``, the gradient, SGD with lr 0)
on one *global* batch of the workload:

- ``bp``: backprop under DistributedDataParallel, each process ``x[rank::W]`` (the shards
  of a ``DistributedSampler``): the baseline row of both modes;
- ``fg`` / ``frog`` with ``distributed=data``: :class:`fwdgrad.distributed.parallel.DataParallel`,
  each process its shard; with ``distributed=tangent``:
  :class:`fwdgrad.distributed.parallel.TangentParallel`, each process the whole batch along its
  slice of the K tangents.

Timing: warm-up steps, then ``repetitions`` rounds that run one step of every case in turn
(interleaved, so load on the machine hits every case alike), each started after a barrier
so that the processes begin together; ``ms`` is rank 0's median, ``ms_slowest`` the largest
of the processes' medians. In the same rounds rank 0 alone also runs the case's
*one-process* step (the same estimator unwrapped, the whole batch and all K tangents; the
others wait at a barrier) twice: with the threads of all W processes
(``torch.set_num_threads(W × threads)``: ``ms_one_process``, ``speedup = ms_one_process /
ms``, what one process on the same cores gives) and with one process's threads
(``ms_one_process_same_threads``, ``speedup_same_threads``: the same resources per process,
so the ideal is W). On GPUs both are one GPU against W. Bytes: what each process handed to the collectives per step
(:class:`fwdgrad.distributed.parallel.CommunicationCounter`), and ``bytes_ratio_ddp`` against the bp row.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fwdgrad.bench.benchmark import WORKLOADS, synchronize
from fwdgrad.core.estimators import Backprop, ForwardGradient
from fwdgrad.distributed.parallel import DataParallel, TangentParallel, ddp_module
from fwdgrad.train.profiling import device_name

METHODS = ("bp", "fg", "frog")
COLUMNS = (
    "workload", "model", "batch", "parameters", "parallelism", "world_size", "threads", "method", "K", "sampler",
    "mode", "ms", "ms_slowest", "ms_one_process", "speedup", "ms_one_process_same_threads", "speedup_same_threads",
    "ms_ratio_bp", "bytes_per_step", "bytes_ratio_ddp",
    "bytes_by_category", "repetitions", "device", "error",
)


@dataclass
class _Case:
    method: str
    num_tangents: int | None = None
    sampler: str | None = None
    mode: str | None = None

    @property
    def label(self) -> str:
        if self.method == "bp":
            return "bp (DDP)"
        return f"{self.method} K={self.num_tangents} ({self.sampler}, {self.mode})"


def cases(methods: Sequence[str], ks: Sequence[int], samplers: Sequence[str], modes: Sequence[str]) -> list[_Case]:
    """bp first, then fg / frog for every K (frog: K >= 2), sampler and mode."""
    rows = [_Case("bp")]
    for method in methods:
        if method not in ("fg", "frog"):
            continue
        for k in ks:
            if method == "frog" and k < 2:
                continue
            rows += [_Case(method, k, sampler, mode) for sampler in samplers for mode in modes]
    return rows


def _steps(case: _Case, parallelism: str, model, pristine, x, y, device) -> tuple[Callable, Callable, object]:
    """(distributed step, one-process step, wrapper) of a case; the one-process step on a copy of
    ``pristine`` (the model before any wrapper touched it)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x_shard, y_shard = x[rank::world_size], y[rank::world_size]
    reference = copy.deepcopy(pristine)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.0)
    if case.method == "bp":
        module = ddp_module(model, device=device)
        wrapper = DataParallel(Backprop(module), module=module)
        closure = lambda: F.cross_entropy(module(x_shard), y_shard)
        single = Backprop(reference)
    else:
        options = dict(num_tangents=case.num_tangents, aggregation="orthogonal_projection" if case.method == "frog"
                       else "mean", sampler=case.sampler, mode=case.mode, seed=0)
        estimator = ForwardGradient(model, **options)
        if parallelism == "tangent":
            wrapper = TangentParallel(estimator)
            closure = lambda: F.cross_entropy(model(x), y)
        else:
            wrapper = DataParallel(estimator)
            closure = lambda: F.cross_entropy(model(x_shard), y_shard)
        single = ForwardGradient(reference, **options)

    def step():
        model.zero_grad(set_to_none=True)
        loss = wrapper.backward(closure)
        optimizer.step()
        return loss

    def one_process_step():
        reference.zero_grad(set_to_none=True)
        loss = single.backward(lambda: F.cross_entropy(reference(x), y))
        reference_optimizer.step()
        return loss

    return step, one_process_step, wrapper


def run_distributed_benchmark(
    workloads: Sequence[str], methods: Sequence[str], ks: Sequence[int], samplers: Sequence[str],
    modes: Sequence[str], parallelism: str, device: torch.device, warmup: int = 3, repetitions: int = 10,
    one_process: bool = True, progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows (dicts with :data:`COLUMNS`) of every workload × case, the same on every process."""
    if parallelism not in ("data", "tangent"):
        raise ValueError(f"unknown parallelism {parallelism!r}; valid choices: data, tangent")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    threads = torch.get_num_threads()
    rows = []
    for name in workloads:
        workload = WORKLOADS[name]
        if workload.batch % world_size:
            raise ValueError(f"workload {name} has a global batch of {workload.batch}, not divisible by the "
                             f"{world_size} processes")
        model, x, y = workload.build(device)
        pristine = copy.deepcopy(model)
        all_cases = cases(methods, ks, samplers, modes)
        prepared = []
        for case in all_cases:
            row = {"workload": name, "model": workload.model, "batch": workload.batch,
                   "parameters": sum(p.numel() for p in model.parameters()), "parallelism": parallelism,
                   "world_size": world_size, "threads": threads, "method": case.method, "K": case.num_tangents,
                   "sampler": case.sampler or "", "mode": case.mode or "", "repetitions": repetitions,
                   "device": device_name(device), "error": ""}
            try:
                # bp runs data parallel (DDP) in both modes: the baseline
                steps = _steps(case, "data" if case.method == "bp" else parallelism, model, pristine, x, y, device)
            except (ValueError, RuntimeError) as error:
                row["error"] = str(error).splitlines()[0][:160]
                steps = None
            rows.append(row)
            prepared.append(steps)
        times = [([], [], []) for _ in prepared]

        def run(steps, timed: tuple[list, list, list] | None):
            step, one_process_step, _ = steps
            dist.barrier()
            start = time.perf_counter()
            step()
            synchronize(device)
            if timed is not None:
                timed[0].append(1e3 * (time.perf_counter() - start))
            if not one_process:
                return
            dist.barrier()
            if rank == 0:  # the same work on one process, with the threads of all of them, then of one
                for column, count in ((1, threads * world_size), (2, threads)):
                    torch.set_num_threads(count)
                    start = time.perf_counter()
                    one_process_step()
                    synchronize(device)
                    if timed is not None:
                        timed[column].append(1e3 * (time.perf_counter() - start))
                torch.set_num_threads(threads)
            dist.barrier()

        for index in range(warmup):
            if progress is not None:
                progress(f"{name}: warm-up {index + 1}/{warmup}")
            for steps in prepared:
                if steps is not None:
                    run(steps, None)
        for steps in prepared:  # bytes per step of the timed steps only
            if steps is not None:
                steps[2].counter.reset()
        for index in range(repetitions):
            if progress is not None:
                progress(f"{name}: round {index + 1}/{repetitions}")
            for steps, timed in zip(prepared, times):
                if steps is not None:
                    run(steps, timed)
        medians = [statistics.median(t[0]) if t[0] else math.nan for t in times]
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, medians)
        shared = [None]
        if rank == 0:
            shared = [[[statistics.median(t[column]) if t[column] else math.nan for t in times] for column in (1, 2)]]
        dist.broadcast_object_list(shared, src=0)
        workload_rows = rows[-len(prepared):]
        for index, (row, steps) in enumerate(zip(workload_rows, prepared)):
            if steps is None:
                row.update(ms=math.nan, ms_slowest=math.nan, ms_one_process=math.nan, bytes_per_step=math.nan,
                           ms_one_process_same_threads=math.nan, bytes_by_category="")
                continue
            per_step = steps[2].counter.per_step()
            row.update(ms=gathered[0][index], ms_slowest=max(medians_[index] for medians_ in gathered),
                       ms_one_process=shared[0][0][index], ms_one_process_same_threads=shared[0][1][index],
                       bytes_per_step=sum(per_step.values()),
                       bytes_by_category=" ".join(f"{k}={v:.0f}" for k, v in per_step.items()))
        baseline = workload_rows[0]
        for row in workload_rows:
            row["speedup"] = row["ms_one_process"] / row["ms"]
            row["speedup_same_threads"] = row["ms_one_process_same_threads"] / row["ms"]
            row["ms_ratio_bp"] = row["ms"] / baseline["ms"]
            row["bytes_ratio_ddp"] = row["bytes_per_step"] / baseline["bytes_per_step"]
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: ms per step (rank 0, slowest process, one process), bytes per step, ratios to DDP bp."""
    first = rows[0]
    lines = [
        f"{first['world_size']} processes × {first['threads']} threads ({first['parallelism']} parallel), "
        f"device: {first['device']}, torch {torch.__version__}; one process with "
        f"{first['world_size'] * first['threads']} threads (speedup) and with {first['threads']} (same threads)",
        "",
        "| workload | method | ms/step | slowest | one process | speedup | one process, same threads | speedup "
        "| × bp (DDP) | bytes/step | × DDP bytes | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        label = "bp (DDP)" if row["method"] == "bp" else f"{row['method']} K={row['K']} ({row['sampler']})"
        lines.append(
            f"| {row['workload']} | {label} | {row['ms']:.2f} | {row['ms_slowest']:.2f} | {row['ms_one_process']:.2f} "
            f"| {row['speedup']:.2f} | {row['ms_one_process_same_threads']:.2f} | {row['speedup_same_threads']:.2f} "
            f"| {row['ms_ratio_bp']:.2f} | {row['bytes_per_step']:,.0f} | "
            f"{row['bytes_ratio_ddp']:.2e} | {row['error']} |"
        )
    return "\n".join(lines) + "\n"
