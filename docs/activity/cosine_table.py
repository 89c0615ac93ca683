"""Cosine to the true gradient at initialization: weight vs activity perturbation.

The Baydin MLP (784-1024-1024-10, ReLU; fwdgrad.train.models.build_model("baydin_mlp"), seed 0)
on one real mnist5k training batch of 64 (pixels / 255, normalized with MNIST's mean and
std 0.1307 / 0.3081). For K = 1, 4, 16 and aggregations mean / frog (orthogonal
projection), the cosine between the forward-gradient estimate of the mean cross-entropy's
gradient and backprop's exact gradient (over all 1,863,690 parameters), mean ± std over
``--repeats`` tangent draws.

Also with shared tangents (one set for the whole batch). Run (writes
docs/activity/cosine_table.md and docs/activity/cosine.png):

    .venv/bin/python docs/activity/cosine_table.py [--repeats 5] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.train.data import load_dataset
from fwdgrad.train.models import build_model

NUM_TANGENTS = (1, 4, 16)


def mnist5k_batch(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch ``(B, 1, 28, 28), (B,)`` of the mnist5k training split, normalized."""
    train = load_dataset("mnist5k").train
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return train.normalize(train.images[index]), train.labels[index]


def gradient_cosines(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, perturbation: str, num_tangents: int,
    aggregation: str, repeats: int, **options,
) -> list[float]:
    """Cosines of ``repeats`` forward-gradient estimates to backprop's gradient of the mean loss."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    true = [p.grad.clone() for p in model.parameters()]
    cosines = []
    for seed in range(repeats):
        model.zero_grad()
        estimator = fwdgrad.ForwardGradient(
            model, num_tangents=num_tangents, aggregation=aggregation, seed=seed, perturbation=perturbation,
            **options,
        )
        reduction = "none" if perturbation == "activity" else "mean"
        estimator.backward(lambda: F.cross_entropy(model(x), y, reduction=reduction))
        estimate = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        cosines.append(fwdgrad.cosine_similarity(estimate, true))
    model.zero_grad()
    return cosines


# columns: (label, perturbation, extra options)
COLUMNS = (
    ("weight", "weight", {}),
    ("activity", "activity", {}),
    ("activity, shared tangents", "activity", {"tangent_sharing": "shared"}),
)


def cosine_table(repeats: int = 5, batch_size: int = 64, figure: str | None = None) -> str:
    """The markdown table (rows: K × aggregation; columns: weight, activity, shared, ratio)."""
    torch.manual_seed(0)
    model = build_model("baydin_mlp")
    x, y = mnist5k_batch(batch_size)
    header = " | ".join(f"{label} perturbation" if label == "weight" else label for label, _, _ in COLUMNS)
    lines = [f"| K | aggregation | {header} | activity / weight |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    curves: dict[tuple[str, str], list[float]] = {}
    for num_tangents in NUM_TANGENTS:
        for aggregation in ("mean", "frog"):
            cells = {}
            for label, perturbation, options in COLUMNS:
                cosines = gradient_cosines(model, x, y, perturbation, num_tangents, aggregation, repeats, **options)
                cells[label] = (statistics.mean(cosines), statistics.stdev(cosines) if repeats > 1 else 0.0)
                curves.setdefault((label, aggregation), []).append(cells[label][0])
                print(f"K={num_tangents} {aggregation} {label}: {cells[label][0]:.4f}", flush=True)
            ratio = cells["activity"][0] / cells["weight"][0]
            values = " | ".join(f"{cells[label][0]:.4f} ± {cells[label][1]:.4f}" for label, _, _ in COLUMNS)
            lines.append(f"| {num_tangents} | {aggregation} | {values} | {ratio:.0f}× |")
    if figure:
        plot(curves, figure)
    return "\n".join(lines)


def plot(curves: dict[tuple[str, str], list[float]], path: str) -> None:
    """Cosine vs K (log-log), one line per perturbation and aggregation; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for (label, aggregation), values in curves.items():
        axes.plot(NUM_TANGENTS, values, marker="o", linestyle="-" if aggregation == "frog" else "--",
                  label=f"{label} ({aggregation})")
    axes.set(xscale="log", yscale="log", xlabel="K (tangents)", ylabel="cosine to the true gradient",
             title="Baydin MLP at initialization, mnist5k batch of 64")
    axes.set_xticks(NUM_TANGENTS, [str(k) for k in NUM_TANGENTS])
    axes.legend(fontsize=8)
    figure.tight_layout()
    temporary = f"{path}.tmp.png"
    figure.savefig(temporary, dpi=120)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="tangent draws per cell (mean ± std)")
    parser.add_argument("--batch-size", type=int, default=64)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--output", default=os.path.join(here, "cosine_table.md"))
    parser.add_argument("--figure", default=os.path.join(here, "cosine.png"))
    args = parser.parse_args()
    table = cosine_table(args.repeats, args.batch_size, args.figure)
    print(table)
    directory = os.path.dirname(os.path.abspath(args.output))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        handle.write(table + "\n")
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, args.output)


if __name__ == "__main__":
    main()
