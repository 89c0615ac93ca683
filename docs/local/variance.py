"""How close one local forward-gradient step is to the exact local gradient, per block and group size.

Baydin MLP at initialization (seed 0), one mnist5k training batch of 64. For each group size s
(features per group of the hidden blocks; the last block has one loss per logit, or one loss
for all 10 with --last-block-wise), K tangents (Rademacher, mean; or FROG), the update of every
block's weights is compared with the exact gradient of that block's local loss (autograd,
block input detached, the same heads), over --draws independent draws:

    cosine(ĝ, g)  and  relative error  ||ĝ − g||² / ||g||²   (mean ± std over the draws)

    python docs/local/variance.py                       # writes docs/local/variance.md
    python docs/local/variance.py --num-tangents 4 --aggregation frog --draws 10

Why s sets the variance: for one unit (e = s features of one sample) with gradient g_u and a
Rademacher tangent u (K = 1, mean), ĝ_u = (g_u · u) u has E ĝ_u = g_u and E‖ĝ_u‖² = e ‖g_u‖²,
so E‖ĝ_u − g_u‖² = (e − 1) ‖g_u‖²: in activation space the relative error is exactly s − 1.
The weight update Σ_b ĝ_b h_b^T adds B samples' independent errors, which averages part of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.local.estimator import LocalForwardGradient
from fwdgrad.train import data as datasets
from fwdgrad.train.atomic import atomic_write_text
from fwdgrad.train.models import build_model


def exact_local_gradients(estimator: LocalForwardGradient, x: torch.Tensor, y: torch.Tensor) -> list[list]:
    """Autograd's gradient of each block's local loss w.r.t. its own parameters (input detached)."""
    h, result = x, []
    for index, block in enumerate(estimator.blocks):
        with torch.enable_grad():
            output = block.forward(h.detach())
            logits = output if index == len(estimator.blocks) - 1 else estimator.heads[index](output)
            loss = F.cross_entropy(logits, y)
            result.append(list(torch.autograd.grad(loss, block.parameters())))
        h = output.detach()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-sizes", default="1,2,4,8,16,64,1024")
    parser.add_argument("--num-tangents", type=int, default=1)
    parser.add_argument("--aggregation", default="mean")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--last-block-wise", action="store_true", help="one loss for the 10 logits (no groups)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "variance.md"))
    args = parser.parse_args(argv)
    bundle = datasets.load("mnist5k", batch_size=64, seed=0)
    x, y = next(iter(bundle.train_loader))
    lines = [
        f"Baydin MLP at initialization, one mnist5k batch of 64, K = {args.num_tangents}, {args.aggregation}, "
        f"Rademacher tangents, {args.draws} draws (mean ± std); last block: "
        f"{'one loss for all logits' if args.last_block_wise else 'one loss per logit'}",
        "",
        "| group size s | groups per hidden block | block | cosine(ĝ, g) | ‖ĝ − g‖² / ‖g‖² |",
        "|---:|---:|---|---:|---:|",
    ]
    for text in args.group_sizes.split(","):
        group_size = int(text)
        torch.manual_seed(0)
        model = build_model("baydin_mlp")
        estimator = LocalForwardGradient(model, "baydin_mlp", (1, 28, 28), num_tangents=args.num_tangents,
                                         aggregation=args.aggregation, group_size=group_size,
                                         last_group_size=None if args.last_block_wise else 1, seed=0)
        exact = exact_local_gradients(estimator, x, y)
        cosines = [[] for _ in exact]
        errors = [[] for _ in exact]
        for _ in range(args.draws):
            model.zero_grad(set_to_none=True)
            estimator.backward(x, y)
            for index, block in enumerate(estimator.blocks):
                estimate = [p.grad for p in block.parameters()]
                cosines[index].append(fwdgrad.cosine_similarity(estimate, exact[index]))
                squared = sum(float((a - b).double().square().sum()) for a, b in zip(estimate, exact[index]))
                norm = sum(float(b.double().square().sum()) for b in exact[index])
                errors[index].append(squared / norm)
        for index, block in enumerate(estimator.blocks):
            last = index == len(estimator.blocks) - 1
            groups = "" if last else str(1024 // group_size)
            cos, err = cosines[index], errors[index]
            lines.append(
                f"| {group_size if not last else '(last)'} | {groups} | {block.name} | "
                f"{statistics.mean(cos):.3f} ± {statistics.stdev(cos):.3f} | "
                f"{statistics.mean(err):.3g} ± {statistics.stdev(err):.2g} |"
            )
        print("\n".join(lines[-len(estimator.blocks):]), flush=True)
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
