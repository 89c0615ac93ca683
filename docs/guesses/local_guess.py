"""Global target, local guess (fwdgrad.local.guess) on the Baydin MLP and mnist5k: cosines and accuracy.

1. Cosine of each block's weight update with the true gradient of the *global* loss
   (backprop, as a reference only) on one mnist5k training batch of 64, for: random activity
   tangents (K = 1), the local guess (K = 1), the local guess mixed with random tangents
   (frog, K = 4 and 16), local losses (LocalForwardGradient: exact local gradients with
   group_size 1, and the local_fg configuration K = 1 with groups of 4), and input-span
   guesses (weight space, Singhal et al. 2023). Twice: at initialization (the heads are
   random, so the guesses are too) and after one epoch of local-guess training (heads trained).
   Random methods: mean ± std over ``--repeats`` tangent draws.
2. Test accuracy after 3 epochs (batch 64, SGD, mnist5k's fixed split) of bp, local_fg and
   the local guess (K = 1; + 3 random, frog K = 4), seeds 0..``--seeds``-1; the local methods
   all at local_fg's measured lr 0.3 (not tuned for the guess; lr 1 diverged in a first try).

Run (≈ 2–3 minutes on 2 idle CPU cores; ``--threads 1`` when the cores are shared):

    PYTHONPATH=src .venv/bin/python docs/guesses/local_guess.py [--out docs/results/guesses]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.train.data import load_dataset
from fwdgrad.train.models import build_model

BLOCKS = "baydin_mlp"  # [Flatten, Linear, ReLU], [Linear, ReLU], [Linear]
BLOCK_LAYERS = ("1", "3", "5")  # the Linear of each block
LOCAL_FG_LR = 0.3  # fwdgrad's measured lr of local_fg on the Baydin MLP (README, local losses)
BP_LR = 0.0334  # the multi-tangent paper's bp lr for fc_w=1024 on mnist (fc_nns.csv)


def mnist5k_batch(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch ``(B, 1, 28, 28), (B,)`` of the mnist5k training split, normalized."""
    train = load_dataset("mnist5k").train
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return train.normalize(train.images[index]), train.labels[index]


def block_cosines(model, estimate: dict[str, torch.Tensor], true: dict[str, torch.Tensor]) -> list[float]:
    """Per block, the cosine of the update (all of the block's parameters) with the true gradient."""
    result = []
    for layer in BLOCK_LAYERS:
        names = [name for name, _ in model.named_parameters() if name.split(".")[0] == layer]
        result.append(fwdgrad.cosine_similarity([estimate[n] for n in names], [true[n] for n in names]))
    return result


def update_of(model, run) -> dict[str, torch.Tensor]:
    """The ``.grad`` that ``run()`` leaves on the model's parameters (zeros where none)."""
    model.zero_grad(set_to_none=True)
    run()
    result = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return result


def local_estimator(kind: str, model, seed: int, heads=None, **options):
    if kind == "guess":
        estimator = fwdgrad.LocalGuessForwardGradient(model, BLOCKS, (1, 28, 28), seed=seed, **options)
    else:
        estimator = fwdgrad.LocalForwardGradient(model, BLOCKS, (1, 28, 28), seed=seed, **options)
    if heads is not None:  # the same (trained) heads for every local method
        estimator.heads.load_state_dict(heads.state_dict())
    return estimator


# rows: (label, kind, options, random?)
METHODS = (
    ("random activity tangents, K=1 (global loss)", "activity", dict(num_tangents=1, aggregation="frog"), True),
    ("local guess, K=1 (`gradient.guess=local`)", "guess", dict(num_tangents=1), False),
    ("local guess + 3 random, frog K=4", "guess", dict(num_tangents=4, aggregation="frog"), True),
    ("local guess + 15 random, frog K=16", "guess", dict(num_tangents=16, aggregation="frog"), True),
    ("local loss, exact local gradient (LocalForwardGradient, group_size=1)", "local",
     dict(group_size=1, sampler="rademacher"), False),
    ("local_fg: local loss, K=1, groups of 4 (`gradient=local`)", "local", dict(group_size=4), True),
    ("input-span guesses, K=1 mean (`gradient.guess=input_span`)", "input_span", dict(num_tangents=1), True),
    ("input-span guesses, frog K=4", "input_span", dict(num_tangents=4, aggregation="frog"), True),
)


def cosine_rows(model, heads, x, y, repeats: int) -> list[tuple[str, list[tuple[float, float]]]]:
    """(label, per block (mean, std) of the cosine) for every method of :data:`METHODS`."""
    true = update_of(model, lambda: F.cross_entropy(model(x), y).backward())
    rows = []
    for label, kind, options, random in METHODS:
        cosines, started = [], time.perf_counter()
        for seed in range(repeats if random else 1):
            if kind == "activity":
                estimator = fwdgrad.ForwardGradient(model, perturbation="activity", seed=seed, **options)
                run = lambda: estimator.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))  # noqa: E731
            elif kind == "input_span":
                estimator = fwdgrad.InputSpanForwardGradient(model, seed=seed, **options)
                run = lambda: estimator.backward(lambda: F.cross_entropy(model(x), y))  # noqa: E731
            else:
                estimator = local_estimator(kind, model, seed, heads, **options)
                run = lambda: estimator.backward(x, y)  # noqa: E731
            cosines.append(block_cosines(model, update_of(model, run), true))
        per_block = [(statistics.mean(c), statistics.stdev(c) if len(c) > 1 else 0.0) for c in zip(*cosines)]
        rows.append((label, per_block))
        print(label, " ".join(f"{m:.3f}" for m, _ in per_block), f"({time.perf_counter() - started:.1f} s)", flush=True)
    return rows


def train_one_epoch_with_the_local_guess(model, seed: int):
    """One epoch (batch 64, SGD lr 0.3) of the local guess on mnist5k; returns the trained heads."""
    train = load_dataset("mnist5k").train
    estimator = local_estimator("guess", model, seed)
    optimizer = torch.optim.SGD([*model.parameters(), *estimator.auxiliary_parameters()], lr=0.3)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(train), 64):
        index = order[start:start + 64]
        optimizer.zero_grad(set_to_none=True)
        estimator.backward(train.normalize(train.images[index]), train.labels[index])
        optimizer.step()
    return estimator.heads


def train_run(overrides: list[str], directory: str) -> dict:
    """``fwdgrad train`` (3 epochs, batch 64, SGD, mnist5k) with ``overrides``; its summary."""
    from fwdgrad.experiments import train

    run_dir = os.path.join(directory, f"run{len(os.listdir(directory))}")
    with contextlib.redirect_stdout(io.StringIO()):
        code = train.main(["model=baydin_mlp", "epochs=3", "batch_size=64", "optimizer=sgd", "progress=false",
                           "tensorboard=false", f"run_dir={run_dir}", *overrides])
    if code != 0:
        raise RuntimeError(f"fwdgrad train {' '.join(overrides)} failed with exit code {code}")
    with open(os.path.join(run_dir, "summary.json")) as handle:
        return json.load(handle)


def accuracy_rows(seeds: int) -> list[str]:
    guess = ["gradient=local", "gradient.guess=local"]
    chosen = LOCAL_FG_LR
    with tempfile.TemporaryDirectory() as directory:
        methods = (
            ("bp", ["gradient=bp", f"lr={BP_LR}"]),
            ("local_fg (K=1, groups of 4)", ["gradient=local", f"lr={LOCAL_FG_LR}"]),
            ("local guess, K=1", [*guess, f"lr={chosen}"]),
            ("local guess + 3 random, frog K=4", [*guess, "gradient.num_tangents=4", "gradient.aggregation=frog",
                                                  f"lr={chosen}"]),
        )
        lines = ["| method | lr | test accuracy after 3 epochs | ms / step |", "|---|---|---|---|"]
        for label, overrides in methods:
            summaries = [train_run([*overrides, f"seed={seed}"], directory) for seed in range(seeds)]
            accuracies = [s["test_accuracy_last"] for s in summaries]
            spread = f" ± {statistics.stdev(accuracies):.3f}" if seeds > 1 else ""
            milliseconds = statistics.median(s["ms_per_step"] for s in summaries)
            lines.append(f"| {label} | {summaries[0]['lr']:g} | {statistics.mean(accuracies):.3f}{spread} | "
                         f"{milliseconds:.1f} |")
            print(lines[-1], flush=True)
    return lines


def cosine_table(rows, title: str) -> list[str]:
    lines = [f"| {title} | block 1 (784→1024) | block 2 (1024→1024) | block 3 (1024→10) |", "|---|---|---|---|"]
    for label, per_block in rows:
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f}" + (f" ± {s:.3f}" if s else "") for m, s in per_block)
                     + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/guesses", help="directory of local_guess.md")
    parser.add_argument("--repeats", type=int, default=3, help="tangent draws per random method")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per method")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("baydin_mlp")
    x, y = mnist5k_batch(64)
    # one set of initial heads for every local method and draw (the heads' own seed would differ by seed)
    initial_heads = copy.deepcopy(local_estimator("guess", model, seed=0).heads)
    trained = copy.deepcopy(model)
    at_init = cosine_rows(model, initial_heads, x, y, args.repeats)
    heads = train_one_epoch_with_the_local_guess(trained, seed=0)
    after_epoch = cosine_rows(trained, heads, x, y, args.repeats)
    accuracy = accuracy_rows(args.seeds)
    lines = [
        f"Baydin MLP, one mnist5k training batch of 64; cosine of each block's weight update with backprop's "
        f"gradient of the global loss (mean ± std over {args.repeats} tangent draws where random).",
        "",
        *cosine_table(at_init, "at initialization (random heads)"),
        "",
        *cosine_table(after_epoch, "after 1 epoch of local-guess training (trained heads)"),
        "",
        f"mnist5k (3,500 / 500 / 1,000), 3 epochs, batch 64, SGD; mean ± std over {args.seeds} seeds. lr: bp from the "
        f"multi-tangent paper's table; the local methods all {LOCAL_FG_LR:g}, fwdgrad's measured lr of local_fg "
        f"(not tuned for the local guess). torch threads: {torch.get_num_threads()}.",
        "",
        *accuracy,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "local_guess.md")
    with tempfile.NamedTemporaryFile("w", dir=args.out, delete=False, suffix=".tmp") as handle:
        handle.write(table)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
