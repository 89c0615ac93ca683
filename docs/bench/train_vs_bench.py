"""Do `fwdgrad train` and `fwdgrad bench` report the same step time?

Both time the same unit (zero_grad + estimator + optimizer.step, between device
synchronizations; the median step): `train` over an epoch of real mnist5k batches with its
progress bar, TensorBoard and data loader around the timed region, `bench` on one fixed
batch with nothing else running. For each method this runs `fwdgrad bench` (Baydin MLP,
batch 64) and a one-epoch `fwdgrad train` (Baydin MLP, batch 64, mnist5k, `max_steps` steps)
with the same thread count, one after the other, and prints the two medians and their ratio.

    python docs/bench/train_vs_bench.py                 # bp, fg K=1 (normal), fg K=1 (rank1); 2 threads
    python docs/bench/train_vs_bench.py --threads 1

Writes docs/bench/train_vs_bench.md (with the machine, thread count and load average).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# label -> (bench options, train options)
METHODS = {
    "bp": (["methods=[]"], ["gradient=bp"]),
    "fg K=1 (normal)": (["methods=[fg]", "ks=[1]", "samplers=[normal]"], ["gradient=fg", "gradient.sampler=normal"]),
    "fg K=1 (rank1)": (["methods=[fg]", "ks=[1]", "samplers=[rank1]"], ["gradient=fg", "gradient.sampler=rank1"]),
}


def fwdgrad(*arguments: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "fwdgrad", *arguments], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, (bench_options, train_options) in METHODS.items():
            bench_dir = os.path.join(scratch, f"bench-{len(rows)}")
            fwdgrad("bench", "device=cpu", "workloads=[baydin_mlp_64]", *bench_options, "plot=false",
                    f"threads={args.threads}", f"repetitions={args.repetitions}", f"hydra.run.dir={bench_dir}",
                    env=env)
            with open(os.path.join(bench_dir, "bench.csv"), newline="") as file:
                bench_rows = list(csv.DictReader(file))
            bench_ms = float(bench_rows[0 if label == "bp" else -1]["ms"])
            train_dir = os.path.join(scratch, f"train-{len(rows)}")
            fwdgrad("train", "device=cpu", "model=baydin_mlp", "batch_size=64", "epochs=1", "lr=0.001",
                    f"max_steps_per_epoch={args.max_steps}", "progress=true", "tensorboard=true", *train_options,
                    f"run_dir={train_dir}", env=env)
            with open(os.path.join(train_dir, "summary.json")) as file:
                train_ms = json.load(file)["ms_per_step"]
            rows.append((label, bench_ms, train_ms))
            print(f"{label}: bench {bench_ms:.2f} ms, train {train_ms:.2f} ms, train/bench {train_ms / bench_ms:.3f}",
                  flush=True)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    lines = [f"Baydin MLP, batch 64, {cpu}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at the "
             f"end; `python docs/bench/train_vs_bench.py --threads {args.threads}`", "",
             "| method | `fwdgrad bench` ms/step | `fwdgrad train` ms/step | train / bench |", "|---|---|---|---|"]
    lines += [f"| {label} | {bench:.2f} | {train:.2f} | {train / bench:.3f} |" for label, bench, train in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "train_vs_bench.md"), "w") as file:
        file.write(text)
    print(text)


if __name__ == "__main__":
    main()
