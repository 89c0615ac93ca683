"""Time and peak memory of one training step, for every gradient method on one workload.

A *step* is what a training loop pays per batch, the same unit as ``ms_per_step`` of
``fwdgrad train`` (:class:`fwdgrad.train.trainer.Trainer`). The methods,
the workloads and one step of each are in :mod:`fwdgrad.bench.workloads`.

Timing: ``warmup`` untimed steps per case (compilation happens there), then
``repetitions`` rounds that time one step of every case in turn (interleaved, so machine
load hits all methods alike), each step between two device synchronizations
(``torch.cuda.synchronize`` on CUDA); the median is reported. Peak memory:
:class:`fwdgrad.train.profiling.PeakMemory` around ``memory_steps`` further steps, after the
timing. On CUDA: ``max_memory_allocated`` above the allocation at the start (the model
and the batch are already resident). On the CPU: the peak resident-set size above the
start, sampled every 0.5 ms (hence not while timing), with glibc's mmap threshold fixed at
64 KiB (:func:`release_freed_memory_to_the_system`) so that every tensor above it is
mapped on allocation and unmapped when freed and the resident size follows live tensor
memory; an approximation (short peaks can be missed). That setting is made in a fresh
process that only measures memory (:func:`measure_memory`): it turns every large
allocation into a fresh mapping, whose page faults would slow the timed steps.

Only torch is imported here; :func:`fwdgrad.train.models.build_model` is looked up when a
workload is built.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fwdgrad.bench.workloads import LOCAL_FG, LOCAL_METHODS, METHODS, WORKLOADS, Workload, make_step
from fwdgrad.train.profiling import PeakMemory, device_name

# names of this module before the workloads and steps moved to fwdgrad.bench.workloads
__all__ = [
    "COLUMNS", "LOCAL_FG", "METHODS", "WORKLOADS", "Case", "Workload", "cases", "make_step", "measure_memory",
    "peak_memory_mb", "profile_cases", "release_freed_memory_to_the_system", "run_benchmark", "synchronize",
    "time_step", "time_workload",
]


COLUMNS = (
    "workload", "model", "batch", "parameters", "method", "K", "mode", "sampler", "ms", "ms_min", "peak_MB",
    "ms_ratio_bp", "memory_ratio_bp", "repetitions", "device", "error",
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, warmup: int, repetitions: int) -> list[float]:
    """Milliseconds of ``repetitions`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repetitions):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_memory_mb(step: Callable[[], object], device: torch.device, steps: int) -> float:
    """:class:`PeakMemory` (MiB above the start) over ``steps`` calls of ``step``."""
    with PeakMemory(device) as peak:
        for _ in range(steps):
            step()
    return peak.megabytes


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a method with its K, execution mode and sampler."""

    method: str
    num_tangents: int = 1
    mode: str = ""
    sampler: str = ""

    @property
    def label(self) -> str:
        single = self.method in ("bp", "bp_compiled", "seed_jvp")
        label = self.method if single else f"{self.method} K={self.num_tangents}"
        extras = [e for e in (self.mode, self.sampler) if e]
        return f"{label} ({', '.join(extras)})" if extras else label


def cases(
    methods: Sequence[str], ks: Sequence[int], modes: Sequence[str], samplers: Sequence[str]
) -> list[Case]:
    """Expand methods × K × modes × samplers into the rows to run (``bp`` first).

    ``bp``, ``bp_compiled`` and ``seed_jvp`` have K = 1; ``frog`` (``frog_activity``) needs
    K >= 2; ``dual_loop`` runs every K; ``fg``/``frog`` and their ``_activity`` twins run every
    mode and sampler; ``local_fg`` and ``local_fg_plain`` every sampler and mode but ``compiled``,
    with ``rademacher`` (their default) for ``rank1``: local losses draw tangents of activations, not
    of parameter matrices, and ``rank1`` of a vector is ``normal``.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"every K must be an integer >= 1, got {k!r}")
    rows = [Case("bp")]
    for method in methods:
        if method in ("bp_compiled", "seed_jvp"):
            rows.append(Case(method))
        elif method == "dual_loop":
            rows += [Case(method, k) for k in ks]
        elif method in LOCAL_METHODS:  # eager and fast (local losses have no compiled pass)
            local_samplers = dict.fromkeys("rademacher" if sampler == "rank1" else sampler for sampler in samplers)
            rows += [Case(method, k, mode, sampler) for k in ks for mode in modes if mode != "compiled"
                     for sampler in local_samplers]
        elif method in ("fg", "frog", "fg_activity", "frog_activity"):
            rows += [
                Case(method, k, mode, sampler)
                for k in ks if not (method.startswith("frog") and k == 1)
                for mode in modes for sampler in samplers
            ]
    return rows


def time_workload(
    name: str,
    workload: Workload,
    rows: Sequence[Case],
    device: torch.device,
    warmup: int = 3,
    repetitions: int = 10,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], list, torch.nn.Module]:
    """Time every case on one workload: ``(rows, steps, model)`` for :func:`measure_memory`.

    The timed repetitions are *interleaved*: round r times one step of every case in turn,
    so a change of machine load during the run hits all methods alike and the ratios to
    ``bp`` stay meaningful on a shared machine. A case that fails (e.g. a baseline that
    cannot run a BatchNorm model under ``torch.func``) gives a row with ``ms = nan`` and
    the error message.
    """
    model, x, y = workload.build(device)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results, steps, times = [], [], []
    for case in rows:
        if progress is not None:
            progress(f"{name}: {case.label} (warm-up)")
        row = dict(
            workload=name, model=workload.model, batch=workload.batch, parameters=parameters, method=case.method,
            K=case.num_tangents, mode=case.mode, sampler=case.sampler, ms=math.nan, ms_min=math.nan,
            peak_MB=math.nan, repetitions=repetitions, device=device_name(device), error="",
        )
        step = None
        try:
            mode, sampler = case.mode or "eager", case.sampler or "normal"
            step = make_step(case.method, model, x, y, case.num_tangents, mode, sampler, workload.model)
            time_step(step, device, warmup, 1)  # warm-up (compilation) and one trial step
        except Exception as error:  # noqa: BLE001 - a failing method is a result, not a crash
            row["error"] = _describe(error)
            step = None
        model.zero_grad(set_to_none=True)
        results.append(row)
        steps.append(step)
        times.append([])
    for repetition in range(repetitions):
        if progress is not None:
            progress(f"{name}: timing round {repetition + 1}/{repetitions}")
        for step, case_times in zip(steps, times):
            if step is not None:
                case_times += time_step(step, device, 0, 1)
    for row, step, case_times in zip(results, steps, times):
        if step is None:
            continue
        row.update(ms=statistics.median(case_times), ms_min=min(case_times))
    model.zero_grad(set_to_none=True)
    return results, steps, model


def measure_memory(results: list[dict], steps: list, model: torch.nn.Module, device: torch.device,
                   memory_steps: int = 2, workload: str | None = None, rows: Sequence[Case] = ()) -> list[dict]:
    """Peak memory of every timed case of one workload, then the ratios to its ``bp`` row.

    On CUDA in this process (the allocator's counters are exact). On the CPU in a fresh
    process (:func:`_cpu_memory_worker`) that fixes glibc's mmap threshold before anything
    is allocated: that setting makes every large allocation a fresh mapping, whose page
    faults would slow the timed steps (backprop on the Baydin MLP: 12.9 ms instead of
    7.2 ms), and a heap that earlier work has grown would hide allocations from the
    resident-size measure. Pass ``workload`` and ``rows`` for the CPU.
    """
    if device.type == "cpu" and workload is not None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            peaks = pool.apply(_cpu_memory_worker, (workload, list(rows), memory_steps, torch.get_num_threads()))
        for row, step, peak in zip(results, steps, peaks):
            if step is not None:
                row["peak_MB"] = peak
    else:
        for row, step in zip(results, steps):
            if step is None:
                continue
            model.zero_grad(set_to_none=True)  # so that every method's peak includes its .grad
            try:
                row["peak_MB"] = peak_memory_mb(step, device, memory_steps)
            except Exception as error:  # noqa: BLE001
                row["error"] = _describe(error)
            model.zero_grad(set_to_none=True)
    bp = results[0]
    for row in results:
        row["ms_ratio_bp"] = row["ms"] / bp["ms"]
        row["memory_ratio_bp"] = row["peak_MB"] / bp["peak_MB"] if bp["peak_MB"] > 0 else math.nan
    return results


def _describe(error: Exception) -> str:
    message = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def release_freed_memory_to_the_system() -> bool:
    """Make the CPU peak-memory measure follow tensor memory (glibc only).

    glibc raises its mmap threshold after large blocks are freed, so later tensors come
    from the heap and a process's resident size stops following them. Fixing the
    threshold at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``) keeps every tensor above it in its
    own mapping, returned to the system when freed. Call it before the work to measure
    allocates (the benchmark does so in a fresh process). Returns False where unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def run_benchmark(
    workloads: Sequence[str] = ("baydin_mlp_64",),
    methods: Sequence[str] = METHODS,
    ks: Sequence[int] = (1, 4, 16),
    modes: Sequence[str] = ("eager",),
    samplers: Sequence[str] = ("normal",),
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repetitions: int = 10,
    memory_steps: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """The whole benchmark as rows (dicts with :data:`COLUMNS`), one per workload × case.

    Example::

        rows = run_benchmark(["baydin_mlp_64"], ["fg"], ks=[1], samplers=["normal", "rank1"])
        [(r["method"], r["sampler"], r["ms"], r["ms_ratio_bp"]) for r in rows]
    """
    device = torch.device(device)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; valid choices: {', '.join(WORKLOADS)}")
    if warmup < 0 or repetitions < 1 or memory_steps < 1:
        raise ValueError(
            f"need warmup >= 0, repetitions >= 1, memory_steps >= 1; got {warmup}, {repetitions}, {memory_steps}"
        )
    rows = cases(methods, ks, modes, samplers)
    # Time everything first, with the allocator as a user has it; the CPU memory measure
    # needs glibc's mmap threshold fixed, which makes every large allocation a fresh
    # mapping (page faults: measured 1.8x slower backprop steps), so it comes after.
    results = []
    for name in workloads:
        workload_rows, steps, model = time_workload(name, WORKLOADS[name], rows, device, warmup, repetitions, progress)
        if progress is not None:
            progress(f"{name}: peak memory")
        results += measure_memory(workload_rows, steps, model, device, memory_steps, name, rows)
    return results


def _cpu_memory_worker(workload: str, rows: list[Case], memory_steps: int, threads: int) -> list[float]:
    """In a fresh process: fix the mmap threshold, then the CPU peak memory (MiB) of each case."""
    torch.set_num_threads(threads)
    release_freed_memory_to_the_system()
    device = torch.device("cpu")
    model, x, y = WORKLOADS[workload].build(device)
    peaks = []
    for case in rows:
        try:
            mode, sampler = case.mode or "eager", case.sampler or "normal"
            step = make_step(case.method, model, x, y, case.num_tangents, mode, sampler, WORKLOADS[workload].model)
            step()  # warm-up (compilation) outside the measure
            model.zero_grad(set_to_none=True)  # so that every method's peak includes its .grad
            peaks.append(peak_memory_mb(step, device, memory_steps))
        except Exception:  # noqa: BLE001 - the timing pass reports the error
            peaks.append(math.nan)
        model.zero_grad(set_to_none=True)
    return peaks


def profile_cases(
    name: str, rows: Sequence[Case], device: torch.device | str = "cpu", steps: int = 5, row_limit: int = 12
) -> str:
    """``torch.profiler`` tables (operators by self time, with input shapes) of each case's step.

    What dominates a step, for the README's analysis of a missed target:
    ``print(profile_cases("baydin_mlp_64", [Case("bp"), Case("fg", 1, "eager", "rank1")]))``.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    model, x, y = WORKLOADS[name].build(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    sections = []
    for case in rows:
        step = make_step(case.method, model, x, y, case.num_tangents, case.mode or "eager", case.sampler or "normal",
                         WORKLOADS[name].model)
        time_step(step, device, 3, 1)
        with profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(steps):
                step()
            synchronize(device)
        table = profiler.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=row_limit, max_name_column_width=28, max_shapes_column_width=60
        )
        sections.append(f"## {name}: {case.label} ({steps} steps)\n\n{table}")
        model.zero_grad(set_to_none=True)
    return "\n\n".join(sections)
