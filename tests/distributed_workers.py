"""Multi-process helpers of test_distributed.py: spawn W gloo processes on the CPU, run a
function in each, return what each returned.

Each process is started with ``torch.multiprocessing.spawn`` (a fresh interpreter: forking
a process whose OpenMP threads already ran is unsafe), joins a gloo group through a file
in a temporary directory, uses one thread, and saves its result with ``torch.save``.
The functions below run in those processes; tests compare their results with
single-process references computed in the test process.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import Backprop, ForwardGradient
from fwdgrad.distributed.parallel import DataParallel, TangentParallel, ddp_module


def run_processes(function, world_size: int, *args, backend: str = "gloo") -> list:
    """``function(rank, world_size, *args)`` in ``world_size`` processes (``backend`` gloo, or
    ``cpu:gloo,cuda:nccl`` with process r on ``cuda:r``); their results, by rank."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_entry, args=(world_size, directory, function, args, backend), nprocs=world_size, join=True)
        return [torch.load(os.path.join(directory, f"result{rank}.pt"), weights_only=False)
                for rank in range(world_size)]


def run_all(rank, world_size, tasks):
    """Several worker functions in one process group (one start-up for all): ``tasks`` maps a
    name to ``(function, args)``; returns ``{name: function(rank, world_size, *args)}``."""
    return {name: function(rank, world_size, *args) for name, (function, args) in tasks.items()}


def _entry(rank, world_size, directory, function, args, backend="gloo"):
    torch.set_num_threads(1)
    if "nccl" in backend:
        torch.cuda.set_device(rank)
    # a collective that waits longer than this fails the test instead of hanging it
    dist.init_process_group(backend, init_method=f"file://{os.path.join(directory, 'rendezvous')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(directory, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ---- models and data (the same in every process and in the test process) -----------------


def mlp(width: int = 12):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def bn_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    )


MODELS = {"mlp": (mlp, (1, 4, 4)), "bn_cnn": (bn_cnn, (1, 8, 8)), "wide_mlp": (lambda: mlp(1000), (1, 4, 4))}


def problem(name: str, batch: int = 8, dtype=torch.float64, seed: int = 0):
    """The model (train mode) and a global batch ``(x, y)``; the same bits everywhere."""
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(dtype).train()
    x = torch.randn(batch, *shape, dtype=dtype)
    y = torch.randint(0, 3, (batch,))
    return model, x, y


def shards(x, y, sizes):
    """Contiguous shards of the global batch, one per process."""
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def data_parallel_updates(rank, world_size, scenarios):
    """For every scenario (name, model, options, shard sizes): this process's .grad and d after
    one DataParallel step on its shard, and the returned global loss."""
    results = {}
    for key, (name, options, sizes) in scenarios.items():
        model, x, y = problem(name)
        x_r, y_r = shards(x, y, sizes)[rank]
        fg = DataParallel(ForwardGradient(model, seed=7, **options))
        loss = fg.backward(lambda: F.cross_entropy(model(x_r), y_r), num_samples=len(y_r))
        results[key] = {"grad": flat_grad(model), "d": fg.last_directional_derivatives.clone(), "loss": loss,
                        "buffers": [b.clone() for b in model.buffers()], "bytes": fg.counter.per_step()}
    return results


def local_losses_training(rank, world_size, steps):
    """LocalForwardGradient under DataParallel, each process its own random shard, ``steps`` SGD
    steps: the first step's head .grad, and the final model and heads."""
    from fwdgrad import LocalForwardGradient

    torch.manual_seed(rank)  # different initial heads and model on every process: DataParallel broadcasts rank 0's
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = model.double()
    local = DataParallel(LocalForwardGradient(model, [[0, 1, 2], [3]], input_shape=(12,), num_classes=3, seed=5,
                                              group_size=2))
    local.estimator.heads.double()
    heads = local.estimator.heads
    initial = {"model": copy.deepcopy(model.state_dict()), "heads": copy.deepcopy(heads.state_dict())}
    optimizer = torch.optim.SGD([*model.parameters(), *local.estimator.auxiliary_parameters()], lr=0.1)
    generator = torch.Generator().manual_seed(200 + rank)
    batches, head_grads = [], None
    for step in range(steps):
        x = torch.randn(4, 12, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (4,), generator=generator)
        batches.append((x, y))
        optimizer.zero_grad(set_to_none=True)
        local.backward(x, y)
        if step == 0:
            head_grads = [p.grad.clone() for p in heads.parameters()]
        optimizer.step()
    return {"initial": initial, "head_grads": head_grads, "batches": batches,
            "final": {"model": model.state_dict(), "heads": heads.state_dict()}, "bytes": local.counter.per_step()}


def data_parallel_training(rank, world_size, scenarios, steps):
    """For every scenario (name, options): ``steps`` SGD (momentum) steps, each process on its own
    random shard; the initial and final states."""
    return {key: _train(rank, name, options, steps) for key, (name, options) in scenarios.items()}


def _train(rank, name, options, steps, buffers="average"):
    model, _, _ = problem(name, dtype=torch.float32)
    fg = DataParallel(ForwardGradient(model, seed=3, **options), buffers=buffers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shape = MODELS[name][1]
    generator = torch.Generator().manual_seed(100 + rank)  # different data on every process
    initial = copy.deepcopy(model.state_dict())
    for _ in range(steps):
        x = torch.randn(4, *shape, generator=generator)
        y = torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        fg.backward(lambda: F.cross_entropy(model(x), y))
        optimizer.step()
    return {"initial": initial, "final": model.state_dict(), "bytes": fg.counter.per_step()}


def sgd_steps(fg, model, x, y, steps: int) -> torch.Tensor:
    """``steps`` SGD steps (lr 0.1) of ``fg`` on the batch ``(x, y)``; the last step's flat .grad."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        fg.backward(lambda: F.cross_entropy(model(x), y))
        grad = flat_grad(model)
        optimizer.step()
    return grad


def tangent_parallel_updates(rank, world_size, scenarios):
    """For every scenario (name, options, dtype, steps): .grad of the last of ``steps`` SGD steps
    under TangentParallel on the global batch, its d, and the final parameters."""
    results = {}
    for key, (name, options, dtype, steps) in scenarios.items():
        model, x, y = problem(name, dtype=dtype)
        fg = TangentParallel(ForwardGradient(model, seed=11, **options))
        grad = sgd_steps(fg, model, x, y, steps)
        results[key] = {"grad": grad, "d": fg.last_directional_derivatives.clone(), "range": fg.tangent_range,
                        "final": model.state_dict(), "bytes": fg.counter.per_step()}
    return results


def bytes_per_step(rank, world_size, cases):
    """Bytes handed to the collectives per step of every case (estimator kind, model, K)."""
    results = {}
    for key, (kind, name, num_tangents) in cases.items():
        model, x, y = problem(name, dtype=torch.float32)
        x_r, y_r = shards(x, y, [len(y) // world_size] * world_size)[rank]
        if kind == "bp":
            module = ddp_module(model)
            wrapper = DataParallel(Backprop(model), module=module)
            closure = lambda: F.cross_entropy(module(x_r), y_r)
        elif kind == "activity":
            wrapper = DataParallel(ForwardGradient(model, num_tangents=num_tangents, seed=1, perturbation="activity"))
            closure = lambda: F.cross_entropy(model(x_r), y_r, reduction="none")
        elif kind == "tangent":
            wrapper = TangentParallel(ForwardGradient(model, num_tangents=num_tangents, aggregation="frog", seed=1))
            closure = lambda: F.cross_entropy(model(x), y)
        else:
            wrapper = DataParallel(ForwardGradient(model, num_tangents=num_tangents, aggregation="frog", seed=1,
                                                   sampler="rank1"))
            closure = lambda: F.cross_entropy(model(x_r), y_r)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            wrapper.backward(closure)
        results[key] = {"per_step": wrapper.counter.per_step(), "total": wrapper.bytes_per_step,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "grad": flat_grad(model) if kind in ("bp", "activity") else None,
                        "tangents": wrapper.last_tangents[0].clone() if kind == "activity" else None}
    return results


def cuda_updates(rank, world_size):
    """On ``cuda:rank``: one DataParallel step (FROG, shard of the batch) and one TangentParallel
    step (FROG, rank-1 factored, the whole batch) of the float64 MLP; .grad on the CPU."""
    device = torch.device("cuda", rank)
    results = {}
    for key, wrap in (("data", DataParallel), ("tangent", TangentParallel)):
        model, x, y = problem("mlp")
        model, x, y = model.to(device), x.to(device), y.to(device)
        options = dict(num_tangents=6, aggregation="frog", sampler="rank1" if key == "tangent" else "normal")
        fg = wrap(ForwardGradient(model, seed=5, **options))
        x_r, y_r = shards(x, y, [4, 4])[rank] if key == "data" else (x, y)
        fg.backward(lambda: F.cross_entropy(model(x_r), y_r))
        results[key] = flat_grad(model).cpu()
    return results


def failing_process(rank, world_size):
    """Rank 1's batch holds a NaN, so its step fails before the collective the others wait in:
    every process must raise (and say so), none may wait. The error message of each, by mode."""
    results = {}
    for key in ("data", "activity", "tangent"):
        model, x, y = problem("mlp")
        if rank == 1:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        reduction = "none" if key == "activity" else "mean"
        estimator = ForwardGradient(model, num_tangents=4, seed=0, perturbation="activity" if key == "activity"
                                    else "weight")
        wrapper = TangentParallel(estimator) if key == "tangent" else DataParallel(estimator)
        try:
            wrapper.backward(lambda: F.cross_entropy(model(x), y, reduction=reduction))
            results[key] = None
        except RuntimeError as error:
            results[key] = str(error)
    return results
