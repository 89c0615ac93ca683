"""Time and peak memory of one training step, for every gradient method on one workload.

A *step* is what a training loop pays per batch: ``.grad`` reset
(``zero_grad(set_to_none=True)``), tangents drawn, loss and directional derivatives (or the
backward pass), the update written into ``.grad``, and ``optimizer.step()`` of plain SGD
(with lr 0, so the weights stay put while the arithmetic runs): the same unit as
``ms_per_step`` of ``fwdgrad train`` (:class:`fwdgrad.training.Trainer`). Methods:

- ``bp``: eager backprop, :class:`fwdgrad.Backprop` (``loss.backward()``).
- ``bp_compiled``: backprop through ``torch.compile(model)``.
- ``fg``: :class:`fwdgrad.ForwardGradient`, aggregation ``mean`` (K = 1: Baydin et al.'s
  g = (∇f·v) v), for each K, execution mode and sampler asked for.
- ``frog``: the same with the orthogonal projection (K >= 2).
- ``seed_jvp``: baseline, orobix/fwdgrad's technique re-implemented: one
  ``torch.func.jvp`` over ``torch.func.functional_call`` per step, N(0, I) tangents from
  ``torch.randn_like`` per parameter, K = 1.
- ``dual_loop``: baseline, the FROG repo's true forward-mode path re-implemented:
  ``torch.autograd.forward_ad`` dual numbers, one forward pass per tangent, g = mean_k d_k v_k.
- ``local_fg``: local losses, :class:`fwdgrad.LocalForwardGradient` with the workload's
  model-zoo blocks and the ``local_fg`` configuration of ``conf/compare.yaml`` (groups of
  :data:`LOCAL_FG` features), for each K and sampler; its heads are in the optimizer step.

Timing: ``warmup`` untimed steps per case (compilation happens there), then
``repetitions`` rounds that time one step of every case in turn (interleaved, so machine
load hits all methods alike), each step between two device synchronizations
(``torch.cuda.synchronize`` on CUDA); the median is reported. Peak memory:
:class:`fwdgrad.profiling.PeakMemory` around ``memory_steps`` further steps, after the
timing. On CUDA: ``max_memory_allocated`` above the allocation at the start (the model
and the batch are already resident). On the CPU: the peak resident-set size above the
start, sampled every 0.5 ms (hence not while timing), with glibc's mmap threshold fixed at
64 KiB (:func:`release_freed_memory_to_the_system`) so that every tensor above it is
mapped on allocation and unmapped when freed and the resident size follows live tensor
memory; an approximation (short peaks can be missed). That setting is made in a fresh
process that only measures memory (:func:`measure_memory`): it turns every large
allocation into a fresh mapping, whose page faults would slow the timed steps.

Only torch is imported here; :func:`fwdgrad.models.build_model` is looked up when a
workload is built.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fwdgrad.estimators import Backprop, ForwardGradient, LocalForwardGradient
from fwdgrad.profiling import PeakMemory, device_name


@dataclass(frozen=True)
class Workload:
    """A model of :mod:`fwdgrad.models` on random images ``(batch, channels, size, size)``."""

    model: str
    batch: int
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    options: dict = field(default_factory=dict)

    def build(self, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        from fwdgrad.models import build_model  # lazily: the model zoo is not needed to import this

        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model(self.model, self.channels, self.image_size, self.num_classes, **self.options)
        x = torch.randn(self.batch, self.channels, self.image_size, self.image_size, generator=generator)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=generator)
        return model.to(device).train(), x.to(device), y.to(device)


WORKLOADS: dict[str, Workload] = {
    "baydin_mlp_64": Workload("baydin_mlp", 64),
    "baydin_mlp_1024": Workload("baydin_mlp", 1024),
    "baydin_cnn_64": Workload("baydin_cnn", 64),
    "fc4096_256": Workload("fc", 256, options={"width": 4096}),
    "resnet18_256": Workload("resnet18", 256, channels=3, image_size=32),
    "resnet18_32": Workload("resnet18", 32, channels=3, image_size=32),  # CPU-sized
    "vit_128": Workload("vit", 128),
    # for tests and smoke runs
    "tiny_fc": Workload("fc", 8, image_size=8, options={"width": 16}),
}
METHODS = ("bp", "bp_compiled", "fg", "frog", "seed_jvp", "dual_loop", "local_fg")
# the local_fg configuration of conf/compare.yaml (besides K and the sampler)
LOCAL_FG = {"group_size": 4, "last_group_size": 1}
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


def _assemble(parameters: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], derivatives: torch.Tensor):
    """p.grad = mean_k d_k v_k, as the reference codes write it (baselines only)."""
    for parameter, tangent in zip(parameters, tangents):
        parameter.grad = torch.einsum("k,k...->...", derivatives, tangent) / derivatives.numel()


def make_step(
    method: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_tangents: int = 1,
    mode: str = "eager",
    sampler: str = "normal",
    model_name: str | None = None,
) -> Callable[[], object]:
    """One training step of ``method`` (see the module docstring) as a no-argument callable:
    the method's gradient, then ``optimizer.step()`` of SGD with lr 0. ``model_name``: the
    model-zoo name (``local_fg``'s blocks)."""
    if method == "local_fg":
        return _local_step(model, x, y, num_tangents, sampler, model_name)
    gradient = _gradient_step(method, model, x, y, num_tangents, mode, sampler)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        loss = gradient()
        optimizer.step()
        return loss

    return step


def _local_step(model, x, y, num_tangents, sampler, model_name) -> Callable[[], object]:
    estimator = LocalForwardGradient(model, model_name, tuple(x.shape[1:]), num_tangents=num_tangents,
                                     sampler=sampler, seed=0, **LOCAL_FG)
    parameters = [p for p in model.parameters() if p.requires_grad] + estimator.auxiliary_parameters()
    optimizer = torch.optim.SGD(parameters, lr=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = estimator.backward(x, y)
        optimizer.step()
        return loss

    return step


def _gradient_step(method, model, x, y, num_tangents, mode, sampler) -> Callable[[], object]:
    """zero_grad and ``method``'s gradient in ``.grad``, as a no-argument callable."""
    parameters = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(inputs, targets):
        return F.cross_entropy(model(inputs), targets)

    if method == "bp":
        estimator = Backprop(model)

        def step():
            model.zero_grad(set_to_none=True)
            return estimator.backward(loss_fn, x, y)

        return step
    if method == "bp_compiled":
        compiled = torch.compile(model)

        def step():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        return step
    if method in ("fg", "frog"):
        aggregation = "orthogonal_projection" if method == "frog" else "mean"
        estimator = ForwardGradient(
            model, num_tangents=num_tangents, aggregation=aggregation, sampler=sampler, seed=0, mode=mode
        )

        def step():
            model.zero_grad(set_to_none=True)
            return estimator.backward(loss_fn, x, y)

        return step
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())

    def functional_loss(params):
        return F.cross_entropy(torch.func.functional_call(model, ({**buffers, **params},), (x,)), y)

    if method == "seed_jvp":

        def step():
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                primals = {name: p.detach() for name, p in zip(names, parameters)}
                tangents = {name: torch.randn_like(p) for name, p in primals.items()}
                loss, derivative = torch.func.jvp(functional_loss, (primals,), (tangents,))
                _assemble(parameters, [t.unsqueeze(0) for t in tangents.values()], derivative.reshape(1))
            return loss

        return step
    if method == "dual_loop":
        import torch.autograd.forward_ad as forward_ad

        def step():
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                tangents = [torch.randn((num_tangents, *p.shape), device=p.device, dtype=p.dtype) for p in parameters]
                derivatives = []
                for k in range(num_tangents):
                    with forward_ad.dual_level():
                        duals = {
                            name: forward_ad.make_dual(p.detach(), t[k])
                            for name, p, t in zip(names, parameters, tangents)
                        }
                        derivatives.append(forward_ad.unpack_dual(functional_loss(duals)).tangent)
                _assemble(parameters, tangents, torch.stack(derivatives))

        return step
    raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")


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

    ``bp``, ``bp_compiled`` and ``seed_jvp`` have K = 1; ``frog`` needs K >= 2; ``dual_loop``
    runs every K; ``fg``/``frog`` run every mode and sampler; ``local_fg`` every sampler.
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
        elif method == "local_fg":
            rows += [Case(method, k, "", sampler) for k in ks for sampler in samplers]
        elif method in ("fg", "frog"):
            rows += [
                Case(method, k, mode, sampler)
                for k in ks if not (method == "frog" and k == 1)
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
