"""``fwdgrad bench``: ms per training step and peak memory of every method vs backprop.

Runs :func:`fwdgrad.bench.benchmark.run_benchmark` (warm-up, repetitions, median, CUDA sync,
:class:`fwdgrad.train.profiling.PeakMemory`) over the configured workloads, methods, K, modes
and samplers, and writes to the run directory:

- ``bench.csv``: one row per workload × method × K × mode × sampler, with ``ms`` (median),
  ``peak_MB`` and the ratios ``ms_ratio_bp = ms / ms(bp)`` and ``memory_ratio_bp`` to the
  eager-backprop row of the same workload in the same run;
- ``table.md``: the same as a table (also printed);
- ``bench.png``: time and peak memory vs K per workload, backprop as a horizontal line;
- ``profile.txt`` (``profile=true``): ``torch.profiler`` operator tables of every case's
  step, to see what dominates it.

Examples::

    fwdgrad bench                                   # baydin_mlp_64 on the default device
    fwdgrad bench device=cpu methods=[fg] ks=[1] samplers=[normal,rademacher,rank1]
    fwdgrad bench device=cuda workloads=[baydin_mlp_64,resnet18_256] modes=[eager,compiled]

Under torchrun, ``distributed=data|tangent`` measures the distributed step instead
(:mod:`fwdgrad.bench.distributed`: ms and bytes per step next to backprop under
DistributedDataParallel, and the one-process step in the same rounds)::

    torchrun --nproc_per_node=2 -m fwdgrad bench device=cpu distributed=data methods=[fg,frog] ks=[1,16]
"""

from __future__ import annotations

import math
import os

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fwdgrad.bench.benchmark import COLUMNS, WORKLOADS, cases, profile_cases, run_benchmark
from fwdgrad.core.estimators import MODES
from fwdgrad.core.tangents import SAMPLERS
from fwdgrad.distributed import run as distributed_run
from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import run
from fwdgrad.experiments.plots import save_figure
from fwdgrad.train.atomic import atomic_write_text, write_csv
from fwdgrad.train.trainer import resolve_device


def _label(row: dict) -> str:
    label = row["method"] if row["method"] in ("bp", "bp_compiled", "seed_jvp") else f"{row['method']} K={row['K']}"
    extras = [e for e in (row["mode"], row["sampler"]) if e]
    return f"{label} ({', '.join(extras)})" if extras else label


def table(rows: list[dict]) -> str:
    """Markdown table: ms per step, peak MB, and both ratios to bp, per workload."""
    lines = [
        f"device: {rows[0]['device']}, torch {torch.__version__}",
        "",
        "| workload | method | ms/step | × bp | peak MB | × bp mem | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {_label(row)} | {row['ms']:.2f} | {row['ms_ratio_bp']:.2f} | "
            f"{row['peak_MB']:.1f} | {row['memory_ratio_bp']:.2f} | {row['error']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Time and peak memory vs K, one column pair per workload; bp as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    figure, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for column, workload in enumerate(workloads):
        group = [row for row in rows if row["workload"] == workload]
        for line, (key, ylabel) in enumerate((("ms", "ms per step"), ("peak_MB", "peak memory (MiB)"))):
            axis = axes[line][column]
            series: dict[str, list[tuple[int, float]]] = {}
            for row in group:
                if math.isnan(row[key]):
                    continue
                if row["method"] in ("bp", "bp_compiled", "seed_jvp"):
                    style = "--" if row["method"] == "bp" else ":"
                    axis.axhline(row[key], linestyle=style, color="black" if row["method"] == "bp" else "gray",
                                 label=row["method"])
                    continue
                name = row["method"] + "".join(f", {e}" for e in (row["mode"], row["sampler"]) if e)
                series.setdefault(name, []).append((row["K"], row[key]))
            for name, points in series.items():
                points.sort()
                axis.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("K (tangents per step)")
            axis.set_ylabel(ylabel)
            axis.set_title(f"{workload}: {ylabel}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(f"fwdgrad bench on {rows[0]['device']}")
    figure.tight_layout()
    save_figure(figure, path)


def check_workloads_and_set_threads(cfg: DictConfig) -> None:
    """One-line errors for an unknown workload or a thread count below 1; then torch's threads."""
    for name in cfg.workloads:
        if name not in WORKLOADS:
            raise UsageError(f"unknown workload {name!r}; valid choices: {', '.join(WORKLOADS)}")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UsageError(f"threads must be an integer >= 1 or null (torch's default), got {cfg.threads}")
        torch.set_num_threads(cfg.threads)


def bench(cfg: DictConfig) -> list[dict]:
    """The Hydra task: validate, measure, write bench.csv / table.md / bench.png."""
    if cfg.get("distributed", "none") != "none" or distributed_run.launch_environment() is not None:
        return distributed_bench(cfg)
    device = resolve_device(str(cfg.device))  # ValueError naming the choices -> one-line error
    workloads = list(cfg.workloads)
    check_workloads_and_set_threads(cfg)
    for mode in cfg.modes:
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
    for sampler in cfg.samplers:
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    options = OmegaConf.to_container(cfg, resolve=True)
    # one unit per case's warm-up and per timing round
    per_workload = len(cases(options["methods"], options["ks"], options["modes"], options["samplers"]))
    total = len(workloads) * (per_workload + cfg.repetitions)
    with tqdm(total=total, desc="bench", unit="part") as bar:

        def progress(label: str) -> None:
            if bar.n or bar.postfix:
                bar.update()
            bar.set_postfix_str(label)

        rows = run_benchmark(
            workloads, options["methods"], options["ks"], options["modes"], options["samplers"], device,
            cfg.warmup, cfg.repetitions, cfg.memory_steps, progress,
        )
        bar.update(total - bar.n)
    output = HydraConfig.get().runtime.output_dir
    write_csv(rows, os.path.join(output, "bench.csv"), COLUMNS)
    text = table(rows)
    atomic_write_text(text, os.path.join(output, "table.md"))
    written = ["bench.csv", "table.md"]
    if cfg.plot:
        plot(rows, os.path.join(output, "bench.png"))
        written.append("bench.png")
    if cfg.profile:
        profiles = [
            profile_cases(name, cases(options["methods"], options["ks"], options["modes"], options["samplers"]), device)
            for name in workloads
        ]
        atomic_write_text("\n\n".join(profiles) + "\n", os.path.join(output, "profile.txt"))
        written.append("profile.txt")
    print(text)
    print(f"wrote {', '.join(written)} to {output}")
    return rows


def distributed_bench(cfg: DictConfig) -> list[dict]:
    """``distributed=data|tangent`` under torchrun: rank 0 writes bench.csv and table.md."""
    from fwdgrad.bench.distributed import COLUMNS as DISTRIBUTED_COLUMNS
    from fwdgrad.bench.distributed import run_distributed_benchmark
    from fwdgrad.bench.distributed import table as distributed_table
    from fwdgrad.experiments.launch import mode, session, shared_run_dir

    parallelism = mode(cfg)
    with session(cfg) as distributed:
        if parallelism == "none":
            raise UsageError(f"fwdgrad bench under torchrun ({distributed.world_size} processes) needs "
                             "distributed=data or distributed=tangent")
        check_workloads_and_set_threads(cfg)
        output = shared_run_dir(distributed, HydraConfig.get().runtime.output_dir)
        device = distributed_run.rank_device(str(cfg.device))
        methods = [m for m in cfg.methods if m in ("fg", "frog")]
        rows = run_distributed_benchmark(
            list(cfg.workloads), methods, list(cfg.ks), list(cfg.samplers), list(cfg.modes), parallelism, device,
            cfg.warmup, cfg.repetitions,
        )
        if not distributed.is_writer:
            return rows
        write_csv(rows, os.path.join(output, "bench.csv"), DISTRIBUTED_COLUMNS)
        text = distributed_table(rows)
        atomic_write_text(text, os.path.join(output, "table.md"))
        print(text)
        print(f"wrote bench.csv, table.md to {output}")
        return rows


def main(argv: list[str]) -> int:
    return run(bench, "bench", argv, "bench")
