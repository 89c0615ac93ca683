"""``fwdgrad demo``: backprop vs forward gradients on a small MLP, in about 30 seconds.

A student MLP (32-64-64-1) learns a fixed random teacher MLP by plain SGD, once with
backprop and once with each forward-gradient estimator, from the same initialization
and data. Prints the final loss and ms per step of each method.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import Backprop, ForwardGradient

METHODS = {
    "bp": (lambda m: Backprop(m), 0.05),
    "fg K=1": (lambda m: ForwardGradient(m, num_tangents=1, seed=0), 0.002),
    "fg-mean K=16": (lambda m: ForwardGradient(m, num_tangents=16, seed=0), 0.01),
    "frog K=16": (lambda m: ForwardGradient(m, num_tangents=16, aggregation="frog", seed=0), 1.0),
}


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else in one line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fwdgrad demo", description=__doc__.split("\n\n")[1])

    def error(message: str):  # one line, exit 2 (argparse's default also prints the usage line)
        print(f"fwdgrad demo: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    parser.add_argument("--steps", type=positive_int, default=500, help="SGD steps per method (default 500)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = mlp(16)
    inputs = torch.randn(4096, 32)
    with torch.no_grad():
        targets = teacher(inputs)
    init = mlp().state_dict()
    print(f"{'method':<14} {'initial loss':>12} {'final loss':>11} {'ms/step':>8}")
    for name, (make, lr) in METHODS.items():
        model = mlp()
        model.load_state_dict(init)
        estimator = make(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        batches = torch.Generator().manual_seed(1)
        start, first = time.perf_counter(), None
        for _ in range(args.steps):
            index = torch.randint(0, len(inputs), (64,), generator=batches)
            optimizer.zero_grad()
            loss = estimator.backward(lambda: F.mse_loss(model(inputs[index]), targets[index]))
            first = float(loss) if first is None else first
            optimizer.step()
        elapsed = (time.perf_counter() - start) / args.steps * 1e3
        with torch.no_grad():
            final = F.mse_loss(model(inputs), targets).item()
        print(f"{name:<14} {first:>12.4f} {final:>11.4f} {elapsed:>8.2f}")
    return 0
