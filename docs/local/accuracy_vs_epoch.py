"""Test accuracy vs epoch of backprop, fg K=1, FROG K=16, local_fg and local_guess on mnist5k (docs: Training).

One `fwdgrad compare` run (same initialization, data order, batch 64, plain SGD for every
method; each method at its own learning rate from conf/compare.yaml, plus backprop at two
tuned rates), then the per-epoch test accuracy of every method in one figure and one CSV:

    python docs/local/accuracy_vs_epoch.py          # 30 epochs -> docs/local/accuracy_vs_epoch.{png,csv}
    python docs/local/accuracy_vs_epoch.py --epochs 3 --out /tmp/quick
    python docs/local/accuracy_vs_epoch.py --resume runs/local/accuracy_vs_epoch   # finish an interrupted run

The run directory (default runs/local/accuracy_vs_epoch_<date>) holds the comparison itself
(compare.csv, each method's metrics.csv and checkpoints).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from fwdgrad.experiments import compare
from fwdgrad.experiments.plots import save_figure
from fwdgrad.train.atomic import write_csv

# method key -> label in the figure: compare.yaml's method_configs
METHODS = {
    "bp": "bp (lr=auto, 0.0334)",
    "bp_lr1e-1": "bp (lr 0.1)",
    "bp_lr3e-1": "bp (lr 0.3)",
    "fg1": "fg K=1 (weights)",
    "frog16_activity": "frog K=16 (activity)",
    "local_fg": "local_fg (K=1, groups of 4)",
    "local_guess": "local_guess (K=1)",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--run-dir", default=f"runs/local/accuracy_vs_epoch_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    parser.add_argument("--resume", default=None, help="the run directory of an interrupted run")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="where the PNG and CSV go")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV in --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        with open(os.path.join(args.out, "accuracy_vs_epoch.csv"), newline="") as file:
            rows = [{**row, "epoch": int(row["epoch"]), "test_accuracy": float(row["test_accuracy"])}
                    for row in csv.DictReader(file)]
        plot(rows, os.path.join(args.out, "accuracy_vs_epoch.png"))
        return 0
    run_dir = args.resume or args.run_dir
    if args.resume:
        code = compare.main([f"resume={run_dir}", "progress=false"])
    else:
        code = compare.main([f"methods=[{','.join(METHODS)}]", f"epochs={args.epochs}", "tensorboard=false",
                             "progress=false", f"run_dir={run_dir}"])
    if code:
        return code
    rows = []
    for key, label in METHODS.items():
        with open(os.path.join(run_dir, key, "metrics.csv"), newline="") as file:
            for row in csv.DictReader(file):
                rows.append({"method": key, "label": label, "epoch": int(row["epoch"]), "lr": float(row["lr"]),
                             "test_accuracy": float(row["test_accuracy"]), "val_accuracy": float(row["val_accuracy"]),
                             "train_loss": float(row["train_loss"]), "ms_per_step": float(row["ms_per_step"])})
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "accuracy_vs_epoch.csv"), list(rows[0]))
    plot(rows, os.path.join(args.out, "accuracy_vs_epoch.png"))
    for key, label in METHODS.items():
        accuracies = {r["epoch"]: r["test_accuracy"] for r in rows if r["method"] == key}
        shown = ", ".join(f"epoch {e}: {accuracies[e]:.3f}" for e in (1, 3, 10, 30) if e in accuracies)
        print(f"{label:32s} {shown}")
    print(f"wrote {args.out}/accuracy_vs_epoch.png and .csv (run: {run_dir})")
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, bottom in zip(axes, (0.0, 0.8)):
        for key, label in METHODS.items():
            points = [(r["epoch"], r["test_accuracy"]) for r in rows if r["method"] == key]
            style = "--" if key.startswith("bp_") else "-"
            axis.plot([e for e, _ in points], [a for _, a in points], style, marker="o", markersize=3, label=label)
        axis.set_xlabel("epoch (55 SGD steps of batch 64)")
        axis.set_ylabel("test accuracy (1,000 mnist5k test images)")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom, 1)
    axes[0].set_title("all methods")
    axes[1].set_title("zoom: 0.8 to 1")
    axes[0].legend(loc="lower right")
    figure.suptitle("Baydin MLP on mnist5k: test accuracy vs epoch, same initialization and data order")
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
