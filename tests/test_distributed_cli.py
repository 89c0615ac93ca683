"""``torchrun ... -m fwdgrad train | compare | bench distributed=...``: 1 and 2 gloo processes on the CPU.

Reference for 2 processes: the same command on 1 process (the same global batches, from
``DistributedSampler``'s permutation, which does not depend on the number of processes),
and for a restarted run the uninterrupted one.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fwdgrad.train.trainer import METRIC_COLUMNS, TIMING_COLUMNS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

LAUNCHERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launchers")
# a small run: synthetic 256 training images, an MLP of width 32, 4 steps per epoch
SMALL = ["data=synthetic", "data.num_samples=256", "model=fc", "model.width=32", "batch_size=64", "lr=0.05",
         "device=cpu", "progress=false", "tensorboard=false"]


def torchrun(processes, arguments, tmp_path, module=True, extra=(), env=None):
    """``torchrun --standalone --nproc_per_node=processes [-m fwdgrad | script] arguments``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *extra, *(["-m", "fwdgrad"] if module else []), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source, environment.get("PYTHONPATH")]))
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


def metrics(run_dir):
    """metrics.csv without the timing columns, as floats."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and list(rows[0]) == list(METRIC_COLUMNS)
    return [{k: float(v) for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_same_metrics(got, expected, rtol):
    assert len(got) == len(expected)
    for row, reference in zip(got, expected):
        for key, value in reference.items():
            assert row[key] == pytest.approx(value, rel=rtol, abs=rtol), (row["epoch"], key)


def test_two_processes_train_like_one(tmp_path):
    """Data parallel FROG (rank-1 tangents): the same metrics.csv on 1 and 2 processes (1e-5), bytes
    per step 8 (K + 1) + 8, one run directory written by rank 0."""
    runs = {}
    for processes in (1, 2):
        run_dir = str(tmp_path / f"run{processes}")
        result = torchrun(processes, ["train", *SMALL, "epochs=2", "gradient=frog", "gradient.num_tangents=4",
                                      "gradient.sampler=rank1", "distributed=data", f"run_dir={run_dir}"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("wrote ") == 1  # rank 0 alone reports
        runs[processes] = run_dir
    assert_same_metrics(metrics(runs[2]), metrics(runs[1]), rtol=1e-5)
    summary = json.load(open(os.path.join(runs[2], "summary.json")))
    assert summary["world_size"] == 2 and summary["distributed"] == "data"
    assert summary["bytes_per_step"] == 8 * (4 + 1) + 8
    assert sorted(os.listdir(tmp_path)) == ["run1", "run2"]


def test_usage_errors_under_torchrun_are_one_line(tmp_path):
    result = torchrun(2, ["train", *SMALL, "gradient=bp", "distributed=tangent", f"run_dir={tmp_path / 'r'}"], tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fwdgrad train: error:")]
    assert len(errors) == 1 and "gradient=bp has none: use distributed=data" in errors[0]
    assert not os.path.exists(tmp_path / "r" / "config.yaml")


@pytest.mark.slow
def test_a_crashed_process_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    arguments = [*SMALL, "epochs=4", "gradient=fg", "gradient.num_tangents=2", "distributed=data"]
    reference = str(tmp_path / "uninterrupted")
    result = torchrun(2, ["train", *arguments, f"run_dir={reference}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = str(tmp_path / "crashed")
    flag = str(tmp_path / "crashed.flag")
    result = torchrun(2, [os.path.join(LAUNCHERS, "failing_train.py"), "train", *arguments, f"run_dir={run_dir}"],
                      tmp_path, module=False, extra=["--max-restarts=1"],
                      env={"FWDGRAD_TEST_FAIL_FLAG": flag, "FWDGRAD_TEST_FAIL_AFTER_EPOCH": "2",
                           # pytorch issue 135712: with the store torchrun shares across restarts, a restarted
                           # process can read the previous attempt's addresses (1 of 3 restarts failed here)
                           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(flag)  # the first attempt did crash
    assert "resuming" in result.stdout
    assert_same_metrics(metrics(run_dir), metrics(reference), rtol=1e-12)


@pytest.mark.slow
def test_tangent_parallel_train_matches_one_process(tmp_path):
    """distributed=tangent on 2 processes trains like one process without torchrun (same tangents)."""
    arguments = [*SMALL, "epochs=2", "gradient=frog", "gradient.num_tangents=6", "gradient.sampler=rank1"]
    alone = str(tmp_path / "alone")
    from fwdgrad.experiments import train

    assert train.main([*arguments, f"run_dir={alone}"]) == 0
    run_dir = str(tmp_path / "tangent")
    result = torchrun(2, ["train", *arguments, "distributed=tangent", f"run_dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_metrics(metrics(run_dir), metrics(alone), rtol=1e-5)
    assert json.load(open(os.path.join(run_dir, "summary.json")))["bytes_per_step"] == 8 * 3


@pytest.mark.slow
def test_compare_and_bench_under_torchrun(tmp_path):
    run_dir = str(tmp_path / "compare")
    result = torchrun(2, ["compare", *SMALL, "epochs=1", "methods=[bp,fg1]", "plot=false", "distributed=data",
                          f"run_dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run_dir, "compare.csv"), newline="") as file:
        rows = {row["method"]: row for row in csv.DictReader(file)}
    parameters = json.load(open(os.path.join(run_dir, "bp", "summary.json")))["parameters"]
    assert float(rows["bp"]["bytes_per_step"]) == 4 * parameters + 16  # DDP's buckets, N and the loss
    assert float(rows["fg K=1"]["bytes_per_step"]) == 8 * 2 + 8
    bench_dir = str(tmp_path / "bench")
    result = torchrun(2, ["bench", "device=cpu", "distributed=data", "workloads=[tiny_fc]", "methods=[fg]", "ks=[1]",
                          "modes=[eager]", "warmup=1", "repetitions=2", f"hydra.run.dir={bench_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(bench_dir, "bench.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == ["bp", "fg"]
    assert float(rows[1]["bytes_per_step"]) == 24
    assert float(rows[0]["bytes_per_step"]) == 4 * int(rows[0]["parameters"]) + 16


@pytest.mark.parametrize("command,arguments,message", [
    ("train", ["distributed=data"], "distributed=data needs a torchrun launch (RANK and WORLD_SIZE are not set)"),
    ("bench", ["distributed=tangent"], "distributed=tangent needs a torchrun launch"),
    ("train", ["distributed=pipeline"], "unknown distributed mode 'pipeline'; valid choices: none, data, tangent"),
    ("lr_search", ["distributed=data"], "distributed=data is an option of train, compare and bench"),
])
def test_distributed_without_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch, command, arguments, message):
    import importlib

    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    module = importlib.import_module(f"fwdgrad.experiments.{command}")
    directory = [f"hydra.run.dir={tmp_path / 'run'}"] if command == "bench" else [f"run_dir={tmp_path / 'run'}"]
    assert module.main([*SMALL[:5], *arguments, *directory] if command != "bench" else [*arguments, *directory]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
