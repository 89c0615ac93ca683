"""Time per training step of weight vs activity perturbation, as a ratio to backprop.

Baydin MLP, batch 64 of random images, SGD step excluded; the estimator steps of all
methods are timed interleaved (round r times one step of each), median over the rounds.

    .venv/bin/python docs/activity/step_time.py --repetitions 21

Prints a markdown table (ms per step and × bp) for mean and frog at K = 1, 4, 16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.train.models import build_model
from fwdgrad.train.profiling import device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=21)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("baydin_mlp")
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    methods = {"bp": (fwdgrad.Backprop(model), "mean")}
    for k in (1, 4, 16):
        for aggregation in ("mean", "frog"):
            for space in ("weight", "activity"):
                estimator = fwdgrad.ForwardGradient(model, num_tangents=k, aggregation=aggregation, seed=0,
                                                    perturbation=space)
                methods[f"{aggregation} K={k} {space}"] = (estimator, "none" if space == "activity" else "mean")

    def step(estimator, reduction):
        model.zero_grad(set_to_none=True)
        estimator.backward(lambda: F.cross_entropy(model(x), y, reduction=reduction))

    for estimator, reduction in methods.values():  # warm-up
        step(estimator, reduction)
    times = {name: [] for name in methods}
    for _ in range(args.repetitions):
        for name, (estimator, reduction) in methods.items():
            start = time.perf_counter()
            step(estimator, reduction)
            times[name].append((time.perf_counter() - start) * 1e3)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"device: {device_name(torch.device('cpu'))}, torch {torch.__version__}")
    print("| method | weight perturbation | activity perturbation |\n|---|---|---|")
    print(f"| bp | {median['bp']:.1f} ms (1.00×) | |")
    for k in (1, 4, 16):
        for aggregation in ("mean", "frog"):
            cells = [median[f"{aggregation} K={k} {space}"] for space in ("weight", "activity")]
            row = " | ".join(f"{c:.1f} ms ({c / median['bp']:.2f}×)" for c in cells)
            print(f"| {aggregation} K={k} | {row} |")


if __name__ == "__main__":
    main()
