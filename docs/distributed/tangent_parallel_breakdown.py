"""Where a tangent-parallel step's time goes, measured in one process (no load-sensitive pairing of
processes): the forward-mode pass over a slice of the K tangents, and the work every process
repeats for all K (the aggregation's Gram matrix and the update g = V^T c), FROG on the
Baydin MLP (global batch 64).

    python docs/distributed/tangent_parallel_breakdown.py [K] [threads] [repetitions]

Rounds interleave every part (median over rounds). The projected tangent-parallel step on W
processes with this process's threads is pass(K / W) + update(K) (plus an all-gather of
K / W numbers), against pass(K) + update(K) on one process with the same threads.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fwdgrad import ForwardGradient
from fwdgrad.bench.benchmark import WORKLOADS


def main(num_tangents: int = 64, threads: int = 1, repetitions: int = 7) -> None:
    torch.set_num_threads(threads)
    model, x, y = WORKLOADS["baydin_mlp_64"].build(torch.device("cpu"))
    loss = lambda: F.cross_entropy(model(x), y)
    rows = []
    for sampler in ("rank1", "normal"):
        fg = ForwardGradient(model, num_tangents=num_tangents, aggregation="frog", sampler=sampler, seed=0)
        step = fg._execute
        parts = {f"pass over {k} tangents": (0, k) for k in (num_tangents, num_tangents // 2, num_tangents // 4)}
        times = {name: [] for name in [*parts, "aggregation and update over all K"]}
        for _ in range(repetitions + 1):  # the first round warms up
            for name, tangent_range in parts.items():
                start = time.perf_counter()
                result = step(fg, loss, (), tangent_range)
                times[name].append(time.perf_counter() - start)
                if tangent_range[1] == num_tangents:
                    full = result
            start = time.perf_counter()
            full.updates(full.directional_derivatives)
            times["aggregation and update over all K"].append(time.perf_counter() - start)
        medians = {name: 1e3 * statistics.median(values[1:]) for name, values in times.items()}
        update = medians["aggregation and update over all K"]
        one = medians[f"pass over {num_tangents} tangents"] + update
        line = [f"FROG K={num_tangents} ({sampler}), {threads} thread(s): " + "; ".join(
            f"{name} {value:.1f} ms" for name, value in medians.items())]
        for world_size, key in ((2, num_tangents // 2), (4, num_tangents // 4)):
            projected = medians[f"pass over {key} tangents"] + update
            line.append(f"projected {world_size} processes: {projected:.1f} ms = {projected / one:.2f} x one process "
                        f"({one:.1f} ms)")
        rows.append(" | ".join(line))
    print("\n".join(rows))


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:4]]
    main(*arguments)
