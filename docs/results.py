"""`make results`: rerun every table and figure that the README and the documentation site show.

    python docs/results.py                     # every area (45-90 minutes on 2 CPU cores)
    python docs/results.py main_job speed      # some areas
    python docs/results.py --list              # the areas, their files and commands
    python docs/results.py --quick --out /tmp/r   # tiny sizes: checks the pipeline, never for publishing

Each area runs the commands a user would run (``fwdgrad compare``, ``fwdgrad bench``,
``fwdgrad approx``, ``fwdgrad optimize``, torchrun, the measurement scripts under ``docs/``)
in a scratch directory and copies what the pages show into ``docs/results/<area>/``:

- every markdown file starts with a provenance comment, ``<!-- fwdgrad-results {...} -->``
  (JSON: area, command, date, device, torch, threads, load average before and after, quick),
  and ends with the same facts as a visible caption;
- ``docs/results/manifest.json`` lists every file (figures and CSVs included) with the same
  facts and its SHA-256, so a test can check that what the pages reference came from here;
- the README's blocks between ``<!-- results: <area>/<file>.md -->`` and ``<!-- /results -->``
  are replaced by that file's table.

Timings depend on what else runs: the script refuses to start when the 1-minute load average
is above ``--max-load`` (default: half the number of cores, 1.0 on 2 cores), and
records the load before and after every area.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
HEADER = re.compile(r"^<!-- fwdgrad-results (\{.*\}) -->\n")
README_BLOCK = re.compile(r"(<!-- results: (?P<path>[\w/.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), CPU {cpu_name()}"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores, no GPU"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Area:
    """One area of the documentation: the commands that produce its files."""

    name: str
    run: Callable[[Recorder], None]
    description: str
    minutes: float  # about, on 2 CPU cores


@dataclass
class Recorder:
    """Runs an area's commands in a scratch directory and publishes files with their provenance."""

    area: str
    out: str
    scratch: str
    quick: bool
    threads: int
    facts: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)

    def run(self, command: list[str], env: dict | None = None, label: str | None = None) -> str:
        """Run ``command`` from the repository root; return its stdout (its output is also logged)."""
        shown = label or " ".join(command)
        print(f"  $ {shown}", flush=True)
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", **(env or {})}
        environment.setdefault("OMP_NUM_THREADS", str(self.threads))
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=environment, text=True, capture_output=True)
        log = os.path.join(self.scratch, f"{len(self.commands):02d}.log")
        with open(log, "w") as file:
            file.write(f"$ {shown}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{shown} exited with {done.returncode} (log: {log}):\n{tail}")
        self.commands.append(shown)
        print(f"    {time.perf_counter() - started:.0f} s", flush=True)
        return done.stdout

    def python(self, *arguments: str, **kwargs) -> str:
        return self.run([sys.executable, *arguments], **kwargs)

    def fwdgrad(self, *arguments: str, **kwargs) -> str:
        return self.run([sys.executable, "-m", "fwdgrad", *arguments],
                        label=kwargs.pop("label", None) or "fwdgrad " + " ".join(arguments), **kwargs)

    def publish_file(self, source: str, name: str, command: str) -> None:
        """Copy ``source`` to ``<out>/<area>/<name>`` (markdown: with the provenance header and caption)."""
        if name.endswith(".md"):
            with open(source) as file:
                self.publish_text(file.read(), name, command)
            return
        target = self.target(name)
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)
        self.published[name] = command

    def publish_text(self, text: str, name: str, command: str) -> None:
        """Keep a markdown table; :meth:`finish` writes it once the area's facts are complete."""
        self.tables[name] = text
        self.published[name] = command

    def finish(self) -> None:
        """Write every kept table with the provenance header and caption (load before and after)."""
        for name, text in self.tables.items():
            facts = {**self.facts, "command": self.published[name]}
            caption = (f"*Measured {facts['date'][:10]} by `make results` (`{facts['command']}`) on "
                       f"{facts['device']}, torch {facts['torch']}, {facts['threads']} threads, load average "
                       f"{facts['load_before']} at the start"
                       f"{', QUICK SIZES: not for publishing' if self.quick else ''}.*")
            target = self.target(name)
            with open(target + ".tmp", "w") as file:
                file.write(f"<!-- fwdgrad-results {json.dumps(facts, ensure_ascii=False)} -->\n{text.strip()}\n\n"
                           f"{caption}\n")
            os.replace(target + ".tmp", target)

    def target(self, name: str) -> str:
        directory = os.path.join(self.out, self.area)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, name)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, Callable]]) -> str:
    """A markdown table: ``columns`` are (title, key, format)."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[key]) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def table_lines(text: str) -> str:
    """The markdown table printed in ``text`` (its lines starting with '|', and the title line above)."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    above = lines[first - 1].strip() if first else ""
    title = above if above and not above.startswith("wrote") else ""
    return (f"{title}\n\n" if title else "") + "\n".join(lines[first:end])


# ---------------------------------------------------------------------------------------- areas

def main_job(r: Recorder) -> None:
    """`fwdgrad compare` as `make demo` runs it, and the same methods over 30 epochs."""
    quick = ["epochs=1", "max_steps_per_epoch=3", "max_eval_batches=1"] if r.quick else []
    run_dir = os.path.join(r.scratch, "compare")
    out = r.fwdgrad("compare", f"run_dir={run_dir}", "progress=false", *quick, label="fwdgrad compare")
    r.publish_text(table_lines(out), "compare.md", "fwdgrad compare")
    r.publish_file(os.path.join(run_dir, "compare.png"), "compare.png", "fwdgrad compare")
    r.publish_file(os.path.join(run_dir, "compare.csv"), "compare.csv", "fwdgrad compare")

    epochs = 2 if r.quick else 30
    command = f"python docs/local/accuracy_vs_epoch.py --epochs {epochs}"
    out_dir = os.path.join(r.scratch, "epochs")
    r.python("docs/local/accuracy_vs_epoch.py", "--epochs", str(epochs), "--out", out_dir,
             "--run-dir", os.path.join(r.scratch, "epochs_run"), label=command)
    rows = read_csv(os.path.join(out_dir, "accuracy_vs_epoch.csv"))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    shown = sorted({1, 3, 10, epochs} & {int(row["epoch"]) for row in rows})
    table = [{"method": label, **{f"e{e}": next(float(row["test_accuracy"]) for row in rows
                                                 if row["label"] == label and int(row["epoch"]) == e)
                                   for e in shown}} for label in labels]
    text = (f"Test accuracy (1,000 mnist5k test images) after epochs {', '.join(map(str, shown))}; "
            "Baydin MLP, batch 64, SGD, same initialization and data order for every method.\n\n"
            + markdown_table(table, [("method", "method", str)]
                             + [(f"epoch {e}", f"e{e}", lambda v: f"{v:.3f}") for e in shown]))
    r.publish_text(text, "epochs.md", command)
    r.publish_file(os.path.join(out_dir, "accuracy_vs_epoch.png"), "epochs.png", command)
    r.publish_file(os.path.join(out_dir, "accuracy_vs_epoch.csv"), "epochs.csv", command)


def speed(r: Recorder) -> None:
    """`fwdgrad bench` on the Baydin MLP and two convolutional workloads; train vs bench; memory."""
    reps = ["warmup=1", "repetitions=3"] if r.quick else ["warmup=3", "repetitions=15"]
    arguments = ["device=cpu", "workloads=[baydin_mlp_64]", "methods=[fg,frog,local_fg,bp_compiled]",
                 "ks=[1,4,16]", "modes=[eager,fast]", "samplers=[normal,rank1]", f"threads={r.threads}", *reps]
    command = "fwdgrad bench " + " ".join(a for a in arguments if not a.startswith(("warmup", "repetitions")))
    run_dir = os.path.join(r.scratch, "bench")
    r.fwdgrad("bench", *arguments, f"hydra.run.dir={run_dir}", label=command)
    r.publish_file(os.path.join(run_dir, "table.md"), "bench.md", command)
    r.publish_file(os.path.join(run_dir, "bench.png"), "bench.png", command)
    r.publish_file(os.path.join(run_dir, "bench.csv"), "bench.csv", command)
    r.publish_text(speed_headline(read_csv(os.path.join(run_dir, "bench.csv"))), "headline.md", command)

    workloads = "[tiny_fc]" if r.quick else "[baydin_cnn_64,resnet18_32]"
    arguments = ["device=cpu", f"workloads={workloads}", "methods=[fg,frog,local_fg,local_fg_plain]", "ks=[1,16]",
                 "modes=[eager,fast]", "samplers=[rank1]", f"threads={r.threads}", "plot=false",
                 *(["warmup=1", "repetitions=3"] if r.quick else ["warmup=2", "repetitions=7"])]
    command = "fwdgrad bench " + " ".join(a for a in arguments if not a.startswith(("warmup", "repetitions", "plot")))
    run_dir = os.path.join(r.scratch, "models")
    r.fwdgrad("bench", *arguments, f"hydra.run.dir={run_dir}", label=command)
    r.publish_file(os.path.join(run_dir, "table.md"), "models.md", command)
    r.publish_text(models_headline(read_csv(os.path.join(run_dir, "bench.csv"))), "models_headline.md", command)

    workloads = "[tiny_fc]" if r.quick else "[baydin_mlp_256]"
    arguments = ["device=cpu", f"workloads={workloads}", "methods=[fg,local_fg]", "ks=[1]", "modes=[eager,fast]",
                 "samplers=[normal,rank1]", f"threads={r.threads}", "plot=false", *reps]
    command = "fwdgrad bench " + " ".join(a for a in arguments if not a.startswith(("warmup", "repetitions", "plot")))
    run_dir = os.path.join(r.scratch, "mlp256")
    r.fwdgrad("bench", *arguments, f"hydra.run.dir={run_dir}", label=command)
    r.publish_file(os.path.join(run_dir, "table.md"), "mlp256.md", command)

    # where a step's time goes: bp, eager forward mode, the fast mode (docs/speed-memory.md#the-fast-forward-mode)
    for workload, options, name in (("baydin_mlp_64", [], "profile_mlp.md"),
                                    ("resnet18_32", ["--tangents", "16", "--steps", "3", "--warmup", "1",
                                                     "--profiled", "1"], "profile_resnet18.md")):
        workload = "tiny_fc" if r.quick else workload
        arguments = [workload, "--threads", str(r.threads), *options, *(["--steps", "2"] if r.quick else [])]
        command = "python docs/bench/step_profile.py " + " ".join(arguments)
        out = r.python("docs/bench/step_profile.py", *arguments, label=command)
        r.publish_text(out, name, command)

    # where a local-losses step goes on the MLP, phase by phase (docs/speed-memory.md#local-losses-where-the-time-goes)
    quick = ["--batches", "64", "--steps", "3", "--warmup", "1"] if r.quick else []
    arguments = ["--threads", str(r.threads), *quick]
    command = "python docs/bench/local_phases.py " + " ".join(arguments)
    r.publish_text(r.python("docs/bench/local_phases.py", *arguments, label=command), "local_phases.md", command)

    command = f"python docs/bench/train_vs_bench.py --threads {r.threads}"
    r.python("docs/bench/train_vs_bench.py", "--threads", str(r.threads), "--out", r.scratch,
             *(["--max-steps", "10", "--repetitions", "3"] if r.quick else []), label=command)
    r.publish_file(os.path.join(r.scratch, "train_vs_bench.md"), "train_vs_bench.md", command)

    command = "python docs/bench/stored_free_memory.py cpu"
    out = r.python("docs/bench/stored_free_memory.py", "cpu", label=command)
    r.publish_text(out, "stored_free_memory.md", command)


HEADLINE = [  # (method, K, sampler, label) of the README's selection of the bench table
    ("bp", "", "", "backprop"),
    ("bp_compiled", "", "", "backprop, torch.compile"),
    ("fg", "1", "normal", "fg K=1, normal tangents (Baydin et al.)"),
    ("fg", "1", "rank1", "fg K=1, rank-1 tangents"),
    ("frog", "16", "rank1", "FROG K=16, rank-1 tangents"),
    ("fg", "1", "rank1", "fg K=1, rank-1 tangents, mode=fast (the CPU default)"),
    ("frog", "16", "rank1", "FROG K=16, rank-1 tangents, mode=fast"),
    ("local_fg", "1", "rademacher", "local_fg K=1 (local losses, Rademacher tangents)"),
]


def memory(r: Recorder) -> None:
    """Peak memory of local training against backprop's at ResNet-18's full batch (256, 32x32 images)."""
    workload = "tiny_fc" if r.quick else "resnet18_256"
    # few steps: the figure is the peak memory (ms/step at this size is a CPU curiosity, 2-20 s a step)
    arguments = ["device=cpu", f"workloads=[{workload}]", "methods=[local_fg,local_fg_plain]", "ks=[1]",
                 "modes=[eager]", "samplers=[rank1]", f"threads={r.threads}", "plot=false",
                 "warmup=1", "repetitions=2", "memory_steps=1"]
    command = "fwdgrad bench " + " ".join(arguments)
    run_dir = os.path.join(r.scratch, "memory")
    r.fwdgrad("bench", *arguments, f"hydra.run.dir={run_dir}", label=command)
    r.publish_file(os.path.join(run_dir, "table.md"), "resnet18_256.md", command)


MODELS_HEADLINE = [  # (method, K, mode, label) of the README's selection of the convolutional workloads' table
    ("bp", "1", "", "backprop"),
    ("fg", "1", "eager", "fg K=1, rank-1 tangents, forward AD"),
    ("fg", "1", "fast", "fg K=1, rank-1 tangents, mode=fast"),
    ("frog", "16", "eager", "FROG K=16, rank-1 tangents, vmap(jvp)"),
    ("frog", "16", "fast", "FROG K=16, rank-1 tangents, mode=fast"),
    ("local_fg_plain", "1", "eager", "local_fg K=1, linear heads (local_fg_plain)"),
    ("local_fg", "1", "eager", "local_fg K=1, compare's configuration (conv heads, per-position losses)"),
]


def models_headline(rows: list[dict]) -> str:
    """The README's rows of the convolutional workloads' bench table, each workload's backprop first."""
    selected = []
    for workload in dict.fromkeys(row["workload"] for row in rows):
        for method, k, mode, label in MODELS_HEADLINE:
            match = [row for row in rows if row["workload"] == workload and row["method"] == method and row["K"] == k
                     and row.get("mode", "") == mode and not row.get("error")]
            if match:
                selected.append(ratio_row(match[0], label))
    return ratio_table(selected, with_workload=True, ms_format="{:.1f}")


def speed_headline(rows: list[dict]) -> str:
    """The README's rows of the bench table: ms per step and peak memory, each × backprop."""
    selected = []
    for method, k, sampler, label in HEADLINE:
        mode = "fast" if "mode=fast" in label else "eager"
        match = [row for row in rows if row["method"] == method and (not k or row["K"] == k)
                 and (not sampler or row["sampler"] == sampler) and row.get("mode", "") in ("", mode)
                 and not row.get("error")]
        if match:
            selected.append(ratio_row(match[0], label))
    return ratio_table(selected, with_workload=False, ms_format="{:.2f}")


def ratio_row(row: dict, label: str) -> dict:
    """One bench.csv row as a README table row: ms per step and peak memory, each × backprop."""
    return {"workload": row["workload"], "method": label, "ms": float(row["ms"]),
            "ms_ratio": float(row["ms_ratio_bp"]), "mb": float(row["peak_MB"]),
            "mb_ratio": float(row["memory_ratio_bp"])}


def ratio_table(selected: list[dict], with_workload: bool, ms_format: str) -> str:
    columns = [("workload", "workload", str)] if with_workload else []
    return markdown_table(selected, [*columns, ("method", "method", str), ("ms/step", "ms", ms_format.format),
                                     ("× bp", "ms_ratio", lambda v: f"{v:.2f}"),
                                     ("peak MB", "mb", lambda v: f"{v:.1f}"),
                                     ("× bp memory", "mb_ratio", lambda v: f"{v:.2f}")])


def expected_projection_cosine(n: int, k: int) -> float:
    """E[cos(P_V g, g)] for K isotropic tangents in R^n: cos² ~ Beta(K/2, (n-K)/2), so
    E[cos] = B((K+1)/2, (n-K)/2) / B(K/2, (n-K)/2) (1 when K >= n)."""
    from math import exp, lgamma

    if k >= n:
        return 1.0
    return exp(lgamma((k + 1) / 2) + lgamma(n / 2) - lgamma(k / 2) - lgamma((n + 1) / 2))


def approx_vs_expectation(rows: list[dict], cells: list[tuple[int, int]]) -> str:
    table = []
    for n, k in cells:
        match = [x for x in rows if x["aggregation"] == "orthogonal_projection" and int(x["n"]) == n
                 and int(x["k"]) == k and x["normalize"] in ("False", "false") and x["sampler"] == "normal"
                 and x["scaling_correction"] in ("False", "false")]
        if match:
            m = match[0]
            half = (float(m["cosine_ci95_high"]) - float(m["cosine_ci95_low"])) / 2
            table.append({"n": n, "k": k, "measured": f"{float(m['cosine_mean']):.4f} ± {half:.4f}",
                          "expected": f"{expected_projection_cosine(n, k):.4f}", "samples": m["samples"]})
    return ("FROG (orthogonal projection onto the K tangents), normal tangents, g = ones: measured cosine "
            "(mean ± half-width of the 95% confidence interval) against its closed-form expectation "
            "E[√Beta(K/2, (n−K)/2)] (1 for K ≥ n).\n\n"
            + markdown_table(table, [("n", "n", str), ("K", "k", str), ("measured", "measured", str),
                                     ("expected", "expected", str), ("samples", "samples", str)]))


def closed_form(r: Recorder) -> None:
    """`fwdgrad approx` (the paper's grid, the angle study) and `fwdgrad optimize` studies."""
    grid = (["dims=[1,4,16,64]", "ks=[1,4,16]", "num_samples=50"] if r.quick else [])
    run_dir = os.path.join(r.scratch, "approx")
    r.fwdgrad("approx", *grid, f"hydra.run.dir={run_dir}", label="fwdgrad approx")
    rows = read_csv(os.path.join(run_dir, "summary.csv"))
    names = {"mean": "mean", "max_normalized": "max_normalized", "orthogonal_projection": "projection (frog)"}
    ns = ["64", "1024", "16384"] if not r.quick else ["4", "16", "64"]
    ks = ["1", "16", "1024"] if not r.quick else ["1", "4", "16"]
    selected = []
    for aggregation, label in names.items():
        for n in ns:
            row = {"aggregation": label, "n": n}
            for k in ks:
                match = [x for x in rows if x["aggregation"] == aggregation and x["n"] == n and x["k"] == k
                         and x["normalize"] in ("False", "false") and x["sampler"] == "normal"
                         and x["scaling_correction"] in ("False", "false")]
                if match:
                    m = match[0]
                    half = (float(m["cosine_ci95_high"]) - float(m["cosine_ci95_low"])) / 2
                    row[k] = f"{float(m['cosine_mean']):.3f} ± {half:.3f} ({m['samples']})"
                else:
                    row[k] = "—"
            selected.append(row)
    text = ("Cosine similarity to the true gradient g = ones (mean ± half-width of the 95% confidence "
            "interval; samples in brackets), normal tangents, not normalized.\n\n"
            + markdown_table(selected, [("aggregation", "aggregation", str), ("n", "n", str)]
                             + [(f"K = {k}", k, str) for k in ks]))
    r.publish_text(text, "approx_selected.md", "fwdgrad approx")
    cells = [(4, 1), (16, 4), (64, 16), (64, 64)] if r.quick else \
        [(64, 1), (64, 16), (64, 64), (1024, 16), (1024, 256), (1024, 1024), (16384, 1024)]
    r.publish_text(approx_vs_expectation(rows, cells), "approx_vs_expectation.md", "fwdgrad approx")
    r.publish_file(os.path.join(run_dir, "cosine_vs_n_normal.png"), "approx_cosine_vs_n.png", "fwdgrad approx")
    r.publish_file(os.path.join(run_dir, "norm_ratio_vs_n_normal.png"), "approx_norm_ratio_vs_n.png", "fwdgrad approx")
    with open(os.path.join(run_dir, "timing.txt")) as file:
        r.publish_text("```\n" + file.read().strip() + "\n```", "approx_timing.md", "fwdgrad approx")

    run_dir = os.path.join(r.scratch, "approx_angles")
    angles = ["angles.ks=[4,16]", "num_samples=50"] if r.quick else []
    r.fwdgrad("approx", "study=angles", *angles, f"hydra.run.dir={run_dir}", label="fwdgrad approx study=angles")
    r.publish_file(os.path.join(run_dir, "angles.png"), "approx_angles.png", "fwdgrad approx study=angles")

    seeds = "seeds=3" if r.quick else "seeds=20"
    run_dir = os.path.join(r.scratch, "baydin")
    quick = ["baydin.runs.1.steps=300"] if r.quick else []
    command = f"fwdgrad optimize study=baydin {seeds}"
    r.fwdgrad("optimize", "study=baydin", seeds, *quick, f"hydra.run.dir={run_dir}", label=command)
    r.publish_file(os.path.join(run_dir, "table.md"), "optimize_baydin.md", command)
    for function in ("beale", "rosenbrock"):
        r.publish_file(os.path.join(run_dir, f"values_{function}_n2.png"), f"baydin_values_{function}.png", command)
        r.publish_file(os.path.join(run_dir, f"contour_{function}.png"), f"baydin_contour_{function}.png", command)

    run_dir = os.path.join(r.scratch, "angles")
    quick = ["angles.angles=[30,90]", "steps=200"] if r.quick else []
    r.fwdgrad("optimize", "study=angles", *quick, f"hydra.run.dir={run_dir}", label="fwdgrad optimize study=angles")
    r.publish_file(os.path.join(run_dir, "table.md"), "angles.md", "fwdgrad optimize study=angles")
    r.publish_file(os.path.join(run_dir, "final_gap_vs_angle.png"), "angles_final_gap_vs_angle.png",
                   "fwdgrad optimize study=angles")


def section42(r: Recorder) -> None:
    """The multi-tangent paper's Sec. 4.2: sphere and Styblinski-Tang at n = 1..1024, Rosenbrock
    (25,000 steps a run, about 5 minutes per n on 2 CPU cores) at n = 2 and 1024."""
    runs = [("section42", ["section42.functions=[sphere,styblinski-tang]"]),
            ("section42_rosenbrock", ["section42.functions=[rosenbrock]", "section42.dims=[2,1024]"])]
    for name, options in runs:
        if r.quick:
            options = [options[0], "section42.dims=[1,8]", "steps=200"]
        command = "fwdgrad optimize study=section42 " + " ".join(options)
        run_dir = os.path.join(r.scratch, name)
        r.fwdgrad("optimize", "study=section42", *options, f"hydra.run.dir={run_dir}", label=command)
        r.publish_file(os.path.join(run_dir, "table.md"), f"{name}.md", command)
        r.publish_file(os.path.join(run_dir, "final_gap_vs_n.png"), f"{name}_final_gap_vs_n.png", command)


def activity(r: Recorder) -> None:
    """Weight vs activity perturbation: cosine at initialization, step time, tangent sharing."""
    repeats = "2" if r.quick else "5"
    command = f"python docs/activity/cosine_table.py --repeats {repeats}"
    r.python("docs/activity/cosine_table.py", "--repeats", repeats, "--output", os.path.join(r.scratch, "cosine.md"),
             "--figure", os.path.join(r.scratch, "cosine.png"), label=command)
    r.publish_file(os.path.join(r.scratch, "cosine.md"), "cosine_table.md", command)
    r.publish_file(os.path.join(r.scratch, "cosine.png"), "cosine.png", command)

    repetitions = "3" if r.quick else "21"
    command = f"python docs/activity/step_time.py --repetitions {repetitions}"
    r.publish_text(r.python("docs/activity/step_time.py", "--repetitions", repetitions, label=command),
                   "step_time.md", command)

    seeds = ["--seeds", "1", "--epochs", "1"] if r.quick else ["--seeds", "5"]
    command = "python docs/activity/tangent_sharing.py " + " ".join(seeds)
    out_dir = os.path.join(r.scratch, "sharing")
    r.python("docs/activity/tangent_sharing.py", *seeds, "--out", out_dir, label=command)
    r.publish_file(os.path.join(out_dir, "tangent_sharing.md"), "tangent_sharing.md", command)


# a training command's budget under --quick (the pipeline check)
QUICK_TRAINING = ["epochs=1", "max_steps_per_epoch=2", "max_eval_batches=1"]


def greedy_epochs(r: Recorder, arguments: list[str]) -> tuple[str, dict]:
    """Run docs/local/greedy_backprop_reference.py: its command and test accuracy per epoch ({"e1": ..., ...})."""
    command = "python docs/local/greedy_backprop_reference.py " + " ".join(arguments)
    out = r.python("docs/local/greedy_backprop_reference.py", *arguments, label=command)
    epochs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return command, {f"e{e['epoch']}": e["test_accuracy"] for e in epochs} | {"seconds": epochs[-1]["seconds"]}


def greedy_table(intro: str, rows: list[dict], columns: list[tuple], after: tuple[tuple, ...] = ()) -> str:
    """``intro`` and a table of greedy_epochs rows: ``columns``, test accuracy after each epoch, ``after``."""
    shown = sorted({key for row in rows for key in row if key.startswith("e") and key[1:].isdigit()})
    epochs = [(f"epoch {key[1:]}", key, lambda v: f"{v:.3f}") for key in shown]
    return intro + "\n\n" + markdown_table(rows, [*columns, *epochs, *after])


def local(r: Recorder) -> None:
    """Local losses: how close one step is to the exact local gradient, per group size; every model family at its
    compare defaults; the greedy ceilings of ResNet-18's block splits."""
    draws = ["--draws", "2"] if r.quick else []
    command = "python docs/local/variance.py " + " ".join(draws)
    output = os.path.join(r.scratch, "variance.md")
    r.python("docs/local/variance.py", *draws, "--out", output, label=command.strip())
    r.publish_file(output, "variance.md", command.strip())

    # every zoo model family at its compare defaults (method_configs.<m>.models.<model>, 3 epochs on mnist5k): bp at
    # three learning rates around its default (its tuning), local_fg, and what local_fg's configuration is made of
    for model, variants in PER_MODEL.items():
        budget = QUICK_TRAINING if r.quick else ["epochs=3"]
        methods = ["bp", "bp_low", "bp_high", "local_fg", *variants]
        arguments = [f"model={model}", *PER_MODEL_ARGUMENTS.get(model, []), *budget,
                     f"methods=[{','.join(methods)}]", *BP_GRID[model],
                     *(f"+method_configs.{name}={definition}" for name, definition in variants.items())]
        command = "fwdgrad compare " + " ".join(arguments)
        out = r.fwdgrad("compare", *arguments, "progress=false", "tensorboard=false", "plot=false",
                        f"run_dir={os.path.join(r.scratch, model)}", label=command)
        r.publish_text(table_lines(out), f"{model}.md", command)

    # ResNet-18: what greedy local learning itself reaches with each block split, computed with backprop inside
    # every block (docs/local/greedy_backprop_reference.py, a study tool): the ceiling of local_fg's objective
    rows = []
    for split, batch_norm in GREEDY_RESNET:
        arguments = ["--model", "resnet18", "--split", split, "--head", "conv2", "--batch", "32", "--epochs",
                     "1" if r.quick else "3", "--batch-norm", batch_norm, "--threads", str(r.threads),
                     *(["--max-steps", "2"] if r.quick else [])]
        _, epochs = greedy_epochs(r, arguments)
        rows.append({"split": GREEDY_SPLITS[split], "batch_norm": batch_norm, **epochs})
    text = greedy_table("Greedy local learning of ResNet-18 computed with backprop inside each block (the exact "
                        "gradient of every block's local loss): test accuracy on mnist5k after each epoch, conv heads "
                        "(3x3 conv, ReLU, 2x2 pool, linear), Adam 1e-3, batch 32.", rows,
                        [("block split", "split", str), ("BatchNorm statistics", "batch_norm", str)],
                        after=(("seconds", "seconds", lambda v: f"{v:.0f}"),))

    r.publish_text(text, "resnet18_greedy.md", "python docs/local/greedy_backprop_reference.py --model resnet18 "
                   "--split {layers,sites} --head conv2 --batch 32 --epochs 3")


def mixer(r: Recorder) -> None:
    """LocalMixer: where local_fg's gap to backprop comes from (tangents per site; the greedy ceiling)."""
    budget = QUICK_TRAINING if r.quick else ["epochs=3"]
    # K = 1: the compare default's estimate (one Rademacher tangent per group of 32, Ren et al.'s LG-FG-A);
    # K > 1: FROG over K normal tangents; K = 32, the loss group's size, is the exact local gradient
    variants = {"k1": "{gradient:{name:local,group_size:32},optimizer:adam,lr:1.0e-3}"}
    for k in (4, 8, 32):
        variants[f"k{k}"] = (f"{{gradient:{{name:local,group_size:32,num_tangents:{k},aggregation:frog,"
                             f"sampler:normal}},optimizer:adam,lr:1.0e-3}}")
    arguments = ["model=localmixer", *budget, f"methods=[bp_adam,{','.join(variants)}]",
                 "+method_configs.bp_adam={gradient:{name:bp},optimizer:adam,lr:1.0e-3}",
                 *(f"+method_configs.{name}={definition}" for name, definition in variants.items())]
    command = "fwdgrad compare " + " ".join(arguments)
    out = r.fwdgrad("compare", *arguments, "progress=false", "tensorboard=false", "plot=false",
                    f"run_dir={os.path.join(r.scratch, 'tangents')}", label=command)
    r.publish_text(table_lines(out), "localmixer_tangents.md", command)

    arguments = ["--model", "localmixer", "--epochs", "1" if r.quick else "3", "--threads", str(r.threads),
                 *(["--max-steps", "2"] if r.quick else [])]
    command, epochs = greedy_epochs(r, arguments)
    text = greedy_table("Greedy local learning of LocalMixer computed with backprop inside each block (the exact "
                        "gradient of every block's local loss, linear heads on the mean token): test accuracy on "
                        "mnist5k after each epoch, Adam 1e-3, batch 64.",
                        [{"split": "LocalMixer blocks (fwdgrad's zoo split)", **epochs}],
                        [("block split", "split", str)])
    r.publish_text(text, "localmixer_greedy.md", command)


# docs/local/greedy_backprop_reference.py's ResNet-18 splits (split, BatchNorm statistics) and what each is
GREEDY_RESNET = [("layers", "differentiated"), ("sites", "differentiated")]
GREEDY_SPLITS = {
    "layers": "stem, 8 BasicBlocks, head (the zoo split; exact gradients for conv1/bn1, which forward mode cannot "
              "split into units)",
    "resnet16": "each BasicBlock cut after conv1-bn1-ReLU (Fournier et al.'s 16 blocks)",
    "sites": "conv1 and bn1 of each BasicBlock on losses of their own outputs (local_fg's mixing_sites=own_loss)",
}


# the variants of each model's local_fg shown next to it (what its groups, heads and sites buy)
PER_MODEL = {
    "baydin_cnn": {
        "local_g4": "{gradient:{name:local,group_size:4,patches:28,head:conv},optimizer:adam,lr:1.0e-3}",
        "local_linear": "{gradient:{name:local,group_size:1,patches:28},optimizer:adam,lr:1.0e-3}",
    },
    "resnet18": {
        "local_constant_bn": "{gradient:{name:local,group_size:1,patches:28,head:conv,batch_norm:constant},"
                             "optimizer:adam,lr:1.0e-3}",
    },
    "vit": {
        "local_g4": "{gradient:{name:local,group_size:4},optimizer:adam,lr:3.0e-4}",
    },
    "localmixer": {
        "local_g1": "{gradient:{name:local,group_size:1},optimizer:sgd_momentum,lr:0.01}",
        "local_g8": "{gradient:{name:local,group_size:8},optimizer:sgd_momentum,lr:0.01}",
    },
}
# a model's own top-level settings in its run (the same for every method)
PER_MODEL_ARGUMENTS = {"resnet18": ["batch_size=32"]}


def _bp_grid(optimizer: str, low: float, high: float) -> list[str]:
    return [f"+method_configs.bp_low={{gradient:{{name:bp}},optimizer:{optimizer},lr:{low}}}",
            f"+method_configs.bp_high={{gradient:{{name:bp}},optimizer:{optimizer},lr:{high}}}"]


# bp at about a third and three times its default learning rate (conf/compare.yaml), next to the default
BP_GRID = {
    "baydin_cnn": _bp_grid("adam", 3.0e-4, 3.0e-3),
    "resnet18": _bp_grid("adam", 3.0e-4, 3.0e-3),
    "vit": _bp_grid("adam", 1.0e-4, 1.0e-3),
    "localmixer": _bp_grid("sgd_momentum", 0.003, 0.03),
}


def guesses(r: Recorder) -> None:
    """Gradient guesses (local-loss guess, input span): cosine to the true gradient, short training."""
    arguments = ["--repeats", "1", "--seeds", "1"] if r.quick else []
    arguments += ["--threads", str(r.threads)]
    command = "python docs/guesses/local_guess.py " + " ".join(arguments)
    r.python("docs/guesses/local_guess.py", "--out", r.scratch, *arguments, label=command.strip())
    r.publish_file(os.path.join(r.scratch, "local_guess.md"), "local_guess.md", command.strip())

    # the local guess's learning rate: an lr-search over the main job's budget (3 epochs)
    budget = ["epochs=1", "max_steps_per_epoch=3", "search.trials=2"] if r.quick else ["epochs=3", "search.trials=16"]
    search = ["lr-search", "model=baydin_mlp", "gradient=local", "gradient.guess=local", *budget,
              "search.lr_min=0.01", "search.lr_max=3", "search.pruner=none"]
    command = "fwdgrad " + " ".join(search)
    run_dir = os.path.join(r.scratch, "lr_search")
    r.fwdgrad(*search, "progress=false", "tensorboard=false", f"run_dir={run_dir}", label=command)
    trials = sorted(read_csv(os.path.join(run_dir, "trials.csv")), key=lambda row: float(row["lr"] or "nan"))
    best = json.load(open(os.path.join(run_dir, "best_lr.json")))
    text = (f"lr-search for the local guess (K = 1) on the main job's budget: Baydin MLP, mnist5k, batch 64, "
            f"SGD, {budget[0].split('=')[1]} epoch(s); lr log-uniform in [0.01, 3] (TPE), objective the best "
            f"validation loss; best lr **{best['best_lr']:.3g}** (validation loss {best['best_val_loss']:.4f}).\n\n"
            + markdown_table(trials, [("trial", "number", str), ("lr", "lr", lambda v: f"{float(v):.3g}"),
                                      ("best validation loss", "best_val_loss",
                                       lambda v: f"{float(v):.4f}" if v not in ("", "inf") else "diverged")]))
    r.publish_text(text, "local_guess_lr.md", command)
    r.publish_file(os.path.join(run_dir, "lr_search.png"), "local_guess_lr.png", command)


def fashion_mnist(r: Recorder) -> None:
    """Fashion-MNIST, 60,000 / 10,000 images (Debian's dataset-fashion-mnist): bp and local_fg on three models."""
    import fwdgrad.train.dataset_files as files

    files.locate("fashion_mnist", "data")  # FileNotFoundError naming the folders and `apt-get install ...`
    quick = QUICK_TRAINING if r.quick else []
    # One cosine learning-rate decay for every method: with a constant rate the last epoch's test accuracy
    # of SGD on 844 steps per epoch swings by 2-4 points (bp and local alike), a decay compares end points.
    runs = {
        # the Baydin MLP: bp (SGD) at 0.03, 0.1 and 0.3, local_fg at its main-job configuration (lr 0.3)
        "baydin_mlp": ["model=baydin_mlp", "epochs=3", "scheduler=cosine", "lr=0.03",
                       "methods=[bp,bp_lr1e-1,bp_lr3e-1,local_fg]"],
        # two epochs of baydin_cnn (what two CPU cores afford: ~15 minutes for both methods)
        "baydin_cnn": ["model=baydin_cnn", "epochs=2", "scheduler=cosine", "methods=[bp,local_fg]"],
        "localmixer": ["model=localmixer", "epochs=3", "scheduler=cosine", "methods=[bp,local_fg]"],
        # does the local-loss gap close with training time? (Ren et al.'s LocalMixer rows train far longer)
        "localmixer_10epochs": ["model=localmixer", "epochs=10", "scheduler=cosine", "methods=[bp,local_fg]"],
    }
    for name, arguments in runs.items():
        arguments = ["data=fashion_mnist", *arguments, *quick]
        command = "fwdgrad compare " + " ".join(arguments)
        out = r.fwdgrad("compare", *arguments, "progress=false", "tensorboard=false", "plot=false",
                        f"run_dir={os.path.join(r.scratch, name)}", label=command)
        r.publish_text(table_lines(out), f"{name}.md", command)


def distributed(r: Recorder) -> None:
    """torchrun with gloo on the CPU: bytes and ms per step next to DDP backprop, identical ranks."""
    out_dir = os.path.join(r.scratch, "distributed")
    parts = "1 2 3" if r.quick else "1 2 3 4 5 6"
    r.run(["bash", "docs/distributed/measure.sh", out_dir],
          env={"PYTHON": sys.executable, "PARTS": parts, "QUICK": "1" if r.quick else ""},
          label="docs/distributed/measure.sh")
    names = {"data_parallel_baydin_mlp.md": "data_parallel.md", "tangent_parallel_frog64.md": "tangent_parallel.md",
             "identical_ranks.md": "identical_ranks.md", "metrics_1_vs_2.md": "metrics_1_vs_2.md",
             "gradient_bytes.md": "gradient_bytes.md", "tangent_parallel_breakdown.md": "breakdown.md"}
    for source, name in names.items():
        path = os.path.join(out_dir, source)
        if os.path.exists(path):
            r.publish_file(path, name, "docs/distributed/measure.sh")
    rows = read_csv(os.path.join(out_dir, "data_parallel_baydin_mlp.csv"))
    rows = [{**row, "label": "backprop, DistributedDataParallel" if row["method"].startswith("bp") else
             f"{row['method']} K={row['K']}, {row['sampler']} tangents"}
            for row in rows if not row.get("error") and (row["method"].startswith("bp") or row["sampler"] == "rank1")]
    text = ("Data parallel, Baydin MLP (1,863,690 parameters), global batch 64 on 2 processes × 1 thread (gloo): "
            "bytes each process hands to the collectives per step, and ms per step.\n\n"
            + markdown_table(rows, [("method", "label", str),
                                    ("bytes/step", "bytes_per_step", lambda v: f"{float(v):,.0f}"),
                                    ("× DDP bytes", "bytes_ratio_ddp", lambda v: f"{float(v):.1e}"),
                                    ("ms/step", "ms", lambda v: f"{float(v):.1f}"),
                                    ("× DDP time", "ms_ratio_bp", lambda v: f"{float(v):.2f}")]))
    r.publish_text(text, "headline.md", "docs/distributed/measure.sh")


AREAS = {area.name: area for area in [
    Area("main_job", main_job, "fwdgrad compare (3 epochs) and 30 epochs of the same methods", 8),
    Area("speed", speed, "fwdgrad bench: Baydin MLP (64, 256), baydin_cnn, resnet18, eager vs fast; step profiles; "
         "train vs bench; memory", 30),
    Area("memory", memory, "peak memory of local losses against backprop, ResNet-18 at batch 256", 3),
    Area("closed_form", closed_form, "fwdgrad approx, fwdgrad optimize study=baydin and study=angles", 12),
    Area("section42", section42, "fwdgrad optimize study=section42 (Rosenbrock at n = 2 and 1024)", 26),
    Area("activity", activity, "weight vs activity perturbation: cosine, step time, tangent sharing", 6),
    Area("local", local, "local losses: variance per group size; every model family at its compare defaults", 60),
    Area("mixer", mixer, "LocalMixer: local_fg against tangents per site and the greedy ceiling", 7),
    Area("fashion_mnist", fashion_mnist, "Fashion-MNIST (60,000 images): bp and local_fg, MLP, CNN, LocalMixer", 30),
    Area("guesses", guesses, "gradient guesses: cosine and short training", 1),
    Area("distributed", distributed, "torchrun: bytes and ms per step, identical ranks, metrics", 10),
]}


# ------------------------------------------------------------------------------- bookkeeping

def sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def update_manifest(out: str, recorders: list[Recorder]) -> None:
    path = os.path.join(out, "manifest.json")
    manifest = {}
    if os.path.exists(path):
        with open(path) as file:
            manifest = json.load(file)
    for r in recorders:
        manifest = {key: value for key, value in manifest.items() if not key.startswith(f"{r.area}/")}
        for name, command in r.published.items():
            manifest[f"{r.area}/{name}"] = {**r.facts, "command": command,
                                            "sha256": sha256(os.path.join(out, r.area, name))}
    with open(path + ".tmp", "w") as file:
        json.dump(dict(sorted(manifest.items())), file, indent=1, ensure_ascii=False)
        file.write("\n")
    os.replace(path + ".tmp", path)


def strip_header(text: str) -> str:
    """A results markdown file without its provenance comment (what the README shows)."""
    return HEADER.sub("", text, count=1)


def refresh_readme(out: str, readme: str = os.path.join(ROOT, "README.md")) -> int:
    """Replace every README block ``<!-- results: area/file.md -->...<!-- /results -->`` by the file."""
    with open(readme) as file:
        text = file.read()
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        path = os.path.join(out, match["path"])
        if not os.path.exists(path):
            return match[0]
        count += 1
        with open(path) as file:
            return match[1] + strip_header(file.read()).strip() + "\n" + match[4]

    new = README_BLOCK.sub(replace, text)
    if new != text:
        with open(readme + ".tmp", "w") as file:
            file.write(new)
        os.replace(readme + ".tmp", readme)
    return count


QUIET_WAIT_S = 600


def wait_for_quiet_cores(max_load: float, name: str) -> bool:
    """Wait (up to QUIET_WAIT_S) until the 1-minute load average is at most ``max_load``."""
    deadline = time.monotonic() + QUIET_WAIT_S
    if load_average() > max_load:
        print(f"[{name}] waiting for the load average ({load_average()}) to fall to {max_load}", flush=True)
    while load_average() > max_load:
        if time.monotonic() > deadline:
            return False
        time.sleep(5)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="areas: " + ", ".join(AREAS))
    parser.add_argument("areas", nargs="*", help="areas to regenerate (default: all)")
    parser.add_argument("--list", action="store_true", help="print the areas and exit")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (pipeline check; files say QUICK)")
    parser.add_argument("--out", default=RESULTS, help="where the files go (default docs/results)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every command")
    parser.add_argument("--max-load", type=float, default=0.5 * (os.cpu_count() or 1),
                        help="refuse to start above this 1-minute load average (timings need quiet cores)")
    parser.add_argument("--keep-going", action="store_true", help="go on with the next area when one fails")
    args = parser.parse_args(argv)
    if args.list:
        for area in AREAS.values():
            print(f"{area.name:12s} ~{area.minutes:>3.0f} min  {area.description}")
        return 0
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        print(f"results.py: error: unknown area {unknown[0]!r}; valid choices: {', '.join(AREAS)}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"results.py: error: --threads {args.threads}: must be at least 1", file=sys.stderr)
        return 2
    if not args.quick and args.out == RESULTS and load_average() > args.max_load:
        print(f"results.py: error: load average {load_average()} is above --max-load {args.max_load}: "
              "timings taken now would not be publishable; wait for quiet cores (or raise --max-load)",
              file=sys.stderr)
        return 2
    import torch

    failed = []
    publishing = not args.quick and args.out == RESULTS
    for name in args.areas or list(AREAS):
        area = AREAS[name]
        # the 1-minute load average lags: the previous area's own work must decay before this one is timed
        if publishing and not wait_for_quiet_cores(args.max_load, name):
            print(f"[{name}] FAILED: the load average stayed above --max-load {args.max_load} for "
                  f"{QUIET_WAIT_S // 60} minutes: another job is using the cores", file=sys.stderr, flush=True)
            failed.append(name)
            if not args.keep_going:
                break
            continue
        print(f"[{name}] {area.description} (about {area.minutes:.0f} min on 2 CPU cores)", flush=True)
        scratch = tempfile.mkdtemp(prefix=f"fwdgrad-results-{name}-")
        r = Recorder(name, args.out, scratch, args.quick, args.threads)
        r.facts = {"area": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "device": device_name(), "torch": torch.__version__, "threads": args.threads,
                   "load_before": load_average(), "quick": args.quick}
        started = time.perf_counter()
        try:
            area.run(r)
        except Exception as error:  # noqa: BLE001 - report the area and go on or stop
            print(f"[{name}] FAILED: {error}", file=sys.stderr, flush=True)
            failed.append(name)
            if not args.keep_going:
                break
            continue
        r.facts["load_after"] = load_average()
        r.facts["minutes"] = round((time.perf_counter() - started) / 60, 1)
        r.finish()
        # the manifest and the README follow each finished area: a run stopped later keeps what it finished
        update_manifest(args.out, [r])
        refreshed = f", README: {refresh_readme(args.out)} results blocks refreshed" if args.out == RESULTS else ""
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"[{name}] {len(r.published)} files in {r.facts['minutes']} min, load {r.facts['load_before']} -> "
              f"{r.facts['load_after']}{refreshed}", flush=True)
    if failed:
        print(f"results.py: error: failed areas: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
