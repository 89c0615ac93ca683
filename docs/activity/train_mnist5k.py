"""Short mnist5k training runs: backprop vs frog K=16 in weight and in activity space.

A plain loop (the one of tests/test_activity.py): SGD, batch 64, the 3,500 mnist5k
training images (pixels / 255, normalized with 0.1307 / 0.3081), test accuracy on its
1,000 test images after every epoch. Learning rates are given, not tuned.

    .venv/bin/python docs/activity/train_mnist5k.py --model small --epochs 2 --lr 0.3
    .venv/bin/python docs/activity/train_mnist5k.py --model baydin_mlp --epochs 3 --lr 0.3 --bp-lr 0.1

``small`` is 784-256-10 (ReLU); ``baydin_mlp`` is 784-1024-1024-10. Prints a markdown
table row per method.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fwdgrad
from fwdgrad.train.data import load_dataset
from fwdgrad.train.models import build_model


def build(name: str) -> nn.Module:
    if name == "small":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    return build_model(name)


def train(model_name: str, method: str, lr: float, epochs: int, num_tangents: int = 16) -> tuple[list[float], float]:
    """Test accuracy after every epoch and seconds per step, for ``method`` in bp / weight / activity."""
    torch.manual_seed(0)
    splits = load_dataset("mnist5k")
    x_train, y_train = splits.train.normalize(splits.train.images), splits.train.labels
    x_test, y_test = splits.test.normalize(splits.test.images), splits.test.labels
    model = build(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if method == "bp":
        estimator = fwdgrad.Backprop(model)
    else:
        estimator = fwdgrad.ForwardGradient(
            model, num_tangents=num_tangents, aggregation="frog", seed=0, perturbation=method
        )
    reduction = "none" if method == "activity" else "mean"
    generator = torch.Generator().manual_seed(0)
    accuracies, seconds, steps = [], 0.0, 0
    for _ in tqdm(range(epochs), desc=f"{model_name} {method}", leave=False):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            begin = time.perf_counter()
            optimizer.zero_grad()
            estimator.backward(lambda: F.cross_entropy(model(x_train[index]), y_train[index], reduction=reduction))
            optimizer.step()
            seconds += time.perf_counter() - begin
            steps += 1
        with torch.no_grad():
            accuracies.append((model(x_test).argmax(-1) == y_test).float().mean().item())
    return accuracies, seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="small | baydin_mlp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.3, help="learning rate of the forward-gradient runs")
    parser.add_argument("--bp-lr", type=float, default=None, help="learning rate of backprop (default: --lr)")
    parser.add_argument("--methods", default="bp,activity,weight")
    args = parser.parse_args()
    print("| model | method | lr | test accuracy per epoch | s/step |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        lr = args.bp_lr if method == "bp" and args.bp_lr is not None else args.lr
        accuracies, seconds = train(args.model, method, lr, args.epochs)
        label = "bp" if method == "bp" else f"frog K=16 ({method})"
        print(f"| {args.model} | {label} | {lr} | {', '.join(f'{a:.3f}' for a in accuracies)} | {seconds:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
