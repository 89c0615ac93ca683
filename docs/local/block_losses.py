"""Per-block local losses during a short local_fg run: which blocks learn, and how fast.

    python docs/local/block_losses.py --model resnet18 --steps 50 --optimizer adam --lr 1e-3 --patches 28
    python docs/local/block_losses.py --model baydin_cnn --steps 110 --optimizer adam --lr 1e-3 --patches 14

mnist5k, batch 64, seed 0, the model zoo's blocks, K = 1, Rademacher, groups of --group-size.
Prints every block's loss (heads' losses, then the task loss) averaged over windows of steps,
and the test accuracy (1,000 images) at the end. Exact local gradients for comparison:
--group-size 1 with per-position patches (--patches 28).
"""

from __future__ import annotations

import argparse
import sys

import torch

from fwdgrad.local.estimator import LocalForwardGradient
from fwdgrad.train import data as datasets
from fwdgrad.train.models import build_model
from fwdgrad.train.trainer import build_optimizer, evaluate


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--patches", type=int, default=1)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bundle = datasets.load("mnist5k", batch_size=64, seed=0)
    model = build_model(args.model, bundle.channels, bundle.image_size, bundle.num_classes)
    local = LocalForwardGradient(model, args.model, (bundle.channels, bundle.image_size, bundle.image_size),
                                 group_size=args.group_size, patches=args.patches, seed=0)
    optimizer = build_optimizer(args.optimizer, [*model.parameters(), *local.auxiliary_parameters()], args.lr)
    print("blocks:", ", ".join(block.name for block in local.blocks), flush=True)
    window, step = [], 0
    while step < args.steps:
        for x, y in bundle.train_loader:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            local.backward(x, y)
            optimizer.step()
            window.append(local.last_local_losses)
            step += 1
            if step % args.window == 0 or step == args.steps:
                means = [sum(column) / len(window) for column in zip(*window)]
                losses = " ".join(f"{m:.3f}" for m in means)
                print(f"steps {step - len(window) + 1:4d}-{step:4d}: {losses}", flush=True)
                window = []
            if step == args.steps:
                break
    loss, accuracy = evaluate(model, bundle.test_loader, torch.device("cpu"))
    print(f"test accuracy after {step} steps: {accuracy:.3f} (test loss {loss:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
