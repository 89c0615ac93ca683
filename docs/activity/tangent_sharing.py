"""Activity perturbation: per-sample vs shared tangents, and tangents before vs after the activation.

The default of ``tangent_sharing`` is chosen by this measurement. Baydin MLP (= the
multi-tangent paper's FC net of width 1024) on mnist5k, fg-mean K=16 in activity space,
3 epochs, at the paper's table lr (lr=auto, 0.00269) and at 3× it (the better of 1/3, 1, 3
and 9× for both variants in a sweep), seeds 0-4, same data order per seed for every variant.
Reports the mean ± std over seeds of the test loss and accuracy at the last epoch, the
paired t-test of each variant against per-sample tangents at the same lr (scipy), and the
step time of each variant as a ratio to per-sample tangents measured interleaved in this
process.

    python docs/activity/tangent_sharing.py            # writes docs/activity/tangent_sharing.{csv,md}
    python docs/activity/tangent_sharing.py --seeds 2  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F
from scipy import stats

from fwdgrad.bench.benchmark import WORKLOADS
from fwdgrad.core.activity import ActivityForwardGradient
from fwdgrad.experiments.train import compose, run_training
from fwdgrad.train.atomic import atomic_write_text, write_csv

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> gradient overrides
    "per_sample": ["gradient.tangent_sharing=per_sample"],
    "shared": ["gradient.tangent_sharing=shared"],
    "shared, after activation": ["gradient.tangent_sharing=shared", "gradient.after_activation=true"],
}
BASE = ["gradient=fg", "gradient.num_tangents=16", "gradient.perturbation=activity", "epochs=3",
        "progress=false", "tensorboard=false"]
PAPER_LR = 0.00269  # fc_nns.csv, fc_w=1024, fg-mean, k=16: what lr=auto gives
LR_FACTORS = (1, 3)


def step_times(repetitions: int = 20) -> dict[str, float]:
    """Median ms per activity step of each variant, interleaved (same model and batch)."""
    model, x, y = WORKLOADS["baydin_mlp_64"].build(torch.device("cpu"))
    estimators = {
        "per_sample": ActivityForwardGradient(model, num_tangents=16, seed=0, tangent_sharing="per_sample"),
        "shared": ActivityForwardGradient(model, num_tangents=16, seed=0, tangent_sharing="shared"),
        "shared, after activation": ActivityForwardGradient(model, num_tangents=16, seed=0, tangent_sharing="shared",
                                                            after_activation=True),
    }
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    times = {name: [] for name in estimators}
    for round_ in range(repetitions + 2):
        for name, estimator in estimators.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            estimator.backward(closure)
            if round_ >= 2:  # two warm-up rounds
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for factor in LR_FACTORS:
            for seed in range(args.seeds):
                for name, overrides in VARIANTS.items():
                    cfg = compose("train", [*BASE, f"epochs={args.epochs}", *overrides,
                                            f"lr={PAPER_LR * factor}", f"seed={seed}"])
                    run_dir = os.path.join(scratch, f"{name.replace(', ', '_').replace(' ', '_')}-{factor}-{seed}")
                    summary = run_training(cfg, run_dir, verbose=False)
                    rows.append({"variant": name, "lr_factor": factor, "seed": seed,
                                 "test_loss": summary["test_loss_last"],
                                 "test_accuracy": summary["test_accuracy_last"], "lr": summary["lr"]})
                    print(f"{name} lr {summary['lr']:.5f} seed {seed}: test loss {rows[-1]['test_loss']:.4f}, "
                          f"accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    times = step_times()
    write_csv(rows, os.path.join(args.out, "tangent_sharing.csv"))
    reference = {(r["lr_factor"], r["seed"]): r for r in rows if r["variant"] == "per_sample"}
    load = os.getloadavg()[0]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    lines = [
        f"Baydin MLP, mnist5k, fg-mean K=16 (activity), {args.epochs} epochs, seeds 0-{args.seeds - 1}; {cpu}, "
        f"{torch.get_num_threads()} threads, load average {load:.2f} at the end; "
        f"`python docs/activity/tangent_sharing.py --seeds {args.seeds}`",
        "",
        "| tangents | lr | test loss (mean ± std) | test accuracy (mean ± std) | p (paired t-test vs per_sample, "
        "loss) | ms/step | × per_sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for factor in LR_FACTORS:
        for name in VARIANTS:
            mine = [r for r in rows if r["variant"] == name and r["lr_factor"] == factor]
            losses = [r["test_loss"] for r in mine]
            accuracies = [r["test_accuracy"] for r in mine]
            spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            p_value = "" if name == "per_sample" or len(mine) < 2 else \
                f"{stats.ttest_rel(losses, [reference[factor, r['seed']]['test_loss'] for r in mine]).pvalue:.3g}"
            lines.append(f"| {name} | {PAPER_LR * factor:.5f} ({factor}× the paper's) | "
                         f"{statistics.mean(losses):.4f} ± {spread(losses):.4f} | "
                         f"{statistics.mean(accuracies):.4f} ± {spread(accuracies):.4f} | {p_value} | "
                         f"{times[name]:.1f} | {times[name] / times['per_sample']:.2f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(text, os.path.join(args.out, "tangent_sharing.md"))
    print(text)


if __name__ == "__main__":
    main()
