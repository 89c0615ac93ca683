"""Where a local-losses step goes on the Baydin MLP, phase by phase, against backprop's.

`fwdgrad bench` gives one number per step; this splits `LocalForwardGradient`'s step (the
`local_fg` row: groups of 4, Rademacher tangents, K = 1) into its phases with
`time.perf_counter` around the library's own functions, and backprop's into forward,
backward and optimizer step, the two interleaved step by step in one process. A third
step, "written out", does the same operations as one plain function (no estimator, no
bookkeeping): the floor of this arithmetic in eager PyTorch.

    python docs/bench/local_phases.py                    # batches 64 and 256, 2 threads
    python docs/bench/local_phases.py --batches 64 --steps 50

Prints a markdown table (ms per step, medians over the steps) with the machine, the
thread count and the load average.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

import fwdgrad.local.estimator as estimator_module  # noqa: E402
import fwdgrad.local.heads as heads_module  # noqa: E402
import fwdgrad.local.step as step_module  # noqa: E402
from fwdgrad import LocalForwardGradient  # noqa: E402
from fwdgrad.bench.workloads import LOCAL_FG  # noqa: E402
from fwdgrad.core.tangents import sample_flat_tangents  # noqa: E402
from fwdgrad.train.models import baydin_mlp  # noqa: E402

PHASES = {  # library function -> phase
    "block_jvp": "passes",
    "site_parameter_gradients": "weight gradients",
    "loss_point": "around",
    "accumulate_grad": "around",
    "_accumulate_head": "around",
}
ROWS = [
    ("passes", "the blocks' forward-mode passes (primal GEMMs, the tangent through ReLU)"),
    ("weight gradients", "weight gradients (local vector-Jacobian products: one GEMM per layer)"),
    ("around", "tangent sampling, heads' losses, directional derivatives, estimates, head gradients"),
    ("rest", "the rest of backward (per-block bookkeeping)"),
    ("optimizer", "optimizer step (SGD, lr 0: the same work as backprop's)"),
    ("local step", "**local_fg step** (zero_grad, backward, optimizer step)"),
    ("bp forward", "backprop: forward"),
    ("bp backward", "backprop: backward"),
    ("bp optimizer", "backprop: optimizer step"),
    ("bp step", "**backprop step**"),
    ("written step", "the same operations written out (one function, no estimator)"),
    ("local ratio", "local_fg ÷ backprop"),
    ("written ratio", "written out ÷ backprop"),
]


class Clock:
    """Seconds per phase, summed over a step's calls (:data:`CLOCK`)."""

    def __init__(self):
        self.step: dict[str, float] = collections.defaultdict(float)

    def wrap(self, owner, name: str, phase: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.step[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


CLOCK = Clock()


class Laps:
    """Seconds since the previous lap (or the start) into :data:`CLOCK` under a name; ``total``: also
    the time since the start under that name."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def __call__(self, name: str, total: str | None = None) -> None:
        now = time.perf_counter()
        CLOCK.step[name] += now - self.last
        if total is not None:
            CLOCK.step[total] += now - self.start
        self.last = now


def written_out(linears, heads, x, y, generator, group_size: int) -> None:
    """The local_fg step's operations in one function: per block z, ReLU, the Rademacher tangent through
    ReLU, the head's loss gradients, the group-wise directional derivatives, ĝ = d u / B, the weight
    gradients; the last block's loss is the task loss, one group per logit."""
    h, batch = x.flatten(1), x.shape[0]
    for index, linear in enumerate(linears):
        last = index == len(linears) - 1
        z = F.linear(h, linear.weight, linear.bias)
        a = z if last else torch.relu(z)
        features = z.shape[1]
        u = sample_flat_tangents(1, features, "rademacher", batch_shape=(batch,), generator=generator)[:, 0]
        tangent = u if last else u * (z > 0)
        logits = a if last else F.linear(a, heads[index].weight, heads[index].bias)
        gradients = torch.log_softmax(logits, 1).exp_().scatter_(1, y.unsqueeze(1), -1.0, reduce="add")
        weighted = gradients if last else gradients @ heads[index].weight
        size = 1 if last else group_size
        d = (tangent * weighted).view(batch, features // size, size).sum(-1, keepdim=True)
        estimate = (d * u.view(batch, features // size, size)).view(batch, features) / batch
        linear.weight.grad = estimate.t() @ h
        linear.bias.grad = estimate.sum(0)
        if not last:
            heads[index].weight.grad = gradients.t() @ a / batch
            heads[index].bias.grad = gradients.sum(0) / batch
        h = a


def measure(batch: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model = baydin_mlp()
    local = LocalForwardGradient(model, "baydin_mlp", (1, 28, 28), seed=0, sampler="rademacher", **LOCAL_FG)
    local_optimizer = torch.optim.SGD([*model.parameters(), *local.auxiliary_parameters()], lr=0.0)
    reference = baydin_mlp()
    bp_optimizer = torch.optim.SGD(reference.parameters(), lr=0.0)
    plain = baydin_mlp()
    linears = [module for module in plain if isinstance(module, torch.nn.Linear)]
    heads = [torch.nn.Linear(1024, 10) for _ in linears[:-1]]
    plain_optimizer = torch.optim.SGD([*plain.parameters(), *(p for h in heads for p in h.parameters())], lr=0.0)
    generator = torch.Generator().manual_seed(0)

    def local_step():
        laps = Laps()
        local_optimizer.zero_grad(set_to_none=True)
        local.backward(x, y)
        laps("backward")
        local_optimizer.step()
        laps("optimizer", total="local step")

    def bp_step():
        laps = Laps()
        reference.zero_grad(set_to_none=True)
        loss = F.cross_entropy(reference(x), y)
        laps("bp forward")
        loss.backward()
        laps("bp backward")
        bp_optimizer.step()
        laps("bp optimizer", total="bp step")

    def plain_step():
        laps = Laps()
        plain_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            written_out(linears, heads, x, y, generator, LOCAL_FG["group_size"])
        plain_optimizer.step()
        laps("written step")

    samples: dict[str, list[float]] = collections.defaultdict(list)
    for index in range(warmup + steps):
        CLOCK.step.clear()
        local_step()
        bp_step()
        plain_step()
        if index < warmup:
            continue
        step = dict(CLOCK.step)
        step["rest"] = step["backward"] - sum(step.get(p, 0.0) for p in ("passes", "weight gradients", "around"))
        for name, seconds in step.items():
            samples[name].append(seconds * 1e3)
    result = {name: statistics.median(values) for name, values in samples.items()}
    result["local ratio"] = statistics.median(a / b for a, b in zip(samples["local step"], samples["bp step"]))
    result["written ratio"] = statistics.median(a / b for a, b in zip(samples["written step"], samples["bp step"]))
    return result


def install() -> None:
    """Wrap the library's phase functions (once): they time into :data:`CLOCK`."""
    for name, phase in PHASES.items():
        CLOCK.wrap(step_module, name, phase)
    CLOCK.wrap(estimator_module.LocalForwardGradient, "_sample", "around")
    CLOCK.wrap(estimator_module.LocalForwardGradient, "_estimate", "around")
    CLOCK.wrap(heads_module.LossPoint, "derivatives", "around")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=100, help="timed steps (medians)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if any(b < 1 for b in args.batches) or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("batches, steps and threads must be >= 1, warmup >= 0")
    torch.set_num_threads(args.threads)
    install()
    results = {batch: measure(batch, args.steps, args.warmup) for batch in args.batches}
    load = os.getloadavg()[0]
    print(f"Baydin MLP, local_fg K=1 (groups of 4, Rademacher tangents) against backprop, {args.threads} threads, "
          f"{platform.machine()}, torch {torch.__version__}; ms per step, medians of "
          f"{args.steps} interleaved steps; load average {load:.2f} at the end.\n")
    print("| phase | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for key, label in ROWS:
        cells = [results[b].get(key, float("nan")) for b in args.batches]
        text = [f"{c:.2f}x" if key.endswith("ratio") else f"{c:.2f}" for c in cells]
        print(f"| {label} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
