"""Where a training step's time goes: backprop, the eager forward-mode path and mode="fast".

    python docs/bench/step_profile.py baydin_mlp_64 --threads 2 [--tangents 1 --sampler rank1 --steps 20]
    python docs/bench/step_profile.py resnet18_32 --threads 2 --tangents 16 --steps 3 --warmup 1 --profiled 1

Times the pieces of one `fwdgrad bench` step (zero_grad, estimator, SGD step) of bp, fg
(mode=eager) and fg (mode=fast) on a bench workload, medians over interleaved steps, and
splits the forward-mode pass by torch.profiler into the time inside aten operators and the
rest (Python, the TorchFunctionMode, functorch's wrappers: dispatch); the primal's share of
the operator time is that of one plain forward pass (no_grad), timed alone. Prints a
markdown table (ms per step) and the number of aten operator calls per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fwdgrad.core.factored as factored
from fwdgrad import Backprop, ForwardGradient
from fwdgrad.bench.benchmark import WORKLOADS


def timed(store: dict, key: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        store.setdefault(key, []).append(time.perf_counter() - start)
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tangents", type=int, default=1)
    parser.add_argument("--sampler", default="rank1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profiled", type=int, default=5, help="steps under torch.profiler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = WORKLOADS[args.workload].build(torch.device("cpu"))
    aggregation = "orthogonal_projection" if args.tangents > 1 else "mean"

    def loss_fn(inputs, targets):
        return F.cross_entropy(model(inputs), targets)

    pieces: dict[str, dict[str, list[float]]] = {"bp": {}, "eager": {}, "fast": {}}
    draws: dict[str, list[float]] = {}  # the factored strategy's draw of the rank-1 factors
    factored.rank1_factors = timed(draws, "sample", factored.rank1_factors)
    estimators, raw_execute = {"bp": Backprop(model)}, {}
    for mode in ("eager", "fast"):
        fg = ForwardGradient(model, num_tangents=args.tangents, sampler=args.sampler, aggregation=aggregation,
                             seed=0, mode=mode)
        execute = raw_execute[mode] = fg._execute

        def execute_timed(estimator, closure, inputs, tangent_range, execute=execute, mode=mode):
            start = time.perf_counter()
            step = execute(estimator, closure, inputs, tangent_range)
            pieces[mode].setdefault("forward-mode pass (with the draw)", []).append(time.perf_counter() - start)
            step.updates = timed(pieces[mode], "update g = V^T c", step.updates)
            return step

        fg._execute = execute_timed
        fg._accumulate = timed(pieces[mode], "written into .grad", fg._accumulate)
        if not fg.factored:
            fg.step_tangents = timed(pieces[mode], "tangent sampling", fg.step_tangents)
        estimators[mode] = fg
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(name: str) -> None:
        store = pieces[name]
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        store.setdefault("zero_grad", []).append(time.perf_counter() - start)
        middle = time.perf_counter()
        if name == "bp":
            with torch.enable_grad():
                loss = loss_fn(x, y)
                store.setdefault("forward", []).append(time.perf_counter() - middle)
                backward = time.perf_counter()
                loss.backward()
                store.setdefault("backward", []).append(time.perf_counter() - backward)
        else:
            draws.clear()
            estimators[name].backward(loss_fn, x, y)
            if draws:
                store.setdefault("tangent sampling", []).append(draws["sample"][0])
        optimizer_start = time.perf_counter()
        optimizer.step()
        store.setdefault("optimizer step", []).append(time.perf_counter() - optimizer_start)
        store.setdefault("step", []).append(time.perf_counter() - start)

    for _ in range(args.warmup):
        for name in pieces:
            step(name)
    for store in pieces.values():
        store.clear()
    for _ in range(args.steps):
        for name in pieces:
            step(name)
    with torch.no_grad():
        primal = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss_fn(x, y)
            primal.append(time.perf_counter() - start)
    operators, calls = {}, {}
    for name in pieces:  # the operators of the pass alone (with its draw); bp: forward and backward
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.profiled):
                model.zero_grad(set_to_none=True)
                if name == "bp":
                    with torch.enable_grad():
                        loss_fn(x, y).backward()
                else:
                    raw_execute[name](estimators[name], loss_fn, (x, y), None)
        events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
        operators[name] = sum(e.self_cpu_time_total for e in events) / args.profiled / 1e3  # kernels', per step
        calls[name] = sum(e.count for e in events) // args.profiled  # every aten call, views included
    median = {name: {key: statistics.median(v) * 1e3 for key, v in store.items()} for name, store in pieces.items()}
    primal_ms = statistics.median(primal) * 1e3
    rows = ["zero_grad", "tangent sampling", "forward", "backward", "forward-mode pass (with the draw)",
            "update g = V^T c", "written into .grad", "optimizer step", "step"]
    print(f"{args.workload}, {args.threads} threads, K={args.tangents}, sampler={args.sampler}; ms per step "
          f"(median of {args.steps} interleaved steps)\n")
    print("| piece | bp | fg eager | fg fast |\n|---|---:|---:|---:|")
    for row in rows:
        cells = [f"{median[n][row]:.2f}" if row in median[n] else "" for n in pieces]
        print(f"| {row} | {' | '.join(cells)} |")
    passes = {"bp": median["bp"]["forward"] + median["bp"]["backward"]}
    passes.update({n: median[n]["forward-mode pass (with the draw)"] for n in ("eager", "fast")})
    print(f"| of the pass: operator time (torch.profiler) | {operators['bp']:.2f} | {operators['eager']:.2f} | "
          f"{operators['fast']:.2f} |")
    print("| of the pass: Python, dispatch, transforms (pass - operator time) | "
          + " | ".join(f"{max(passes[n] - operators[n], 0):.2f}" for n in pieces) + " |")
    print(f"| of the operators: the primal's (one plain forward pass, no_grad) | {primal_ms:.2f} | {primal_ms:.2f} | "
          f"{primal_ms:.2f} |")
    print(f"| aten operator calls in the pass | {calls['bp']} | {calls['eager']} | {calls['fast']} |")

if __name__ == "__main__":
    main()
