"""`fwdgrad bench` end to end on a tiny CPU configuration: the CSV it writes is consistent."""

import csv
import math

import pytest
import torch

from fwdgrad.bench.benchmark import COLUMNS, cases
from fwdgrad.experiments import bench


def test_bench_writes_csv_with_ratios_to_backprop_of_the_same_run(tmp_path, capsys):
    code = bench.main([
        "device=cpu", "workloads=[tiny_fc]", "methods=[fg,frog,seed_jvp,dual_loop]", "ks=[1,2]",
        "samplers=[normal,rank1]", "warmup=0", "repetitions=2", "memory_steps=1", "threads=1",
        f"hydra.run.dir={tmp_path}",
    ])
    assert code == 0
    with open(tmp_path / "bench.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == COLUMNS
    # bp first; fg: K in {1, 2} x modes eager, fast (the default: old and new path) x 2 samplers;
    # frog: K = 2 x 2 modes x 2 samplers; seed_jvp; dual_loop K = 1, 2
    labels = [(r["method"], r["K"], r["mode"], r["sampler"]) for r in rows]
    per_mode = [(mode, sampler) for mode in ("eager", "fast") for sampler in ("normal", "rank1")]
    assert labels == [
        ("bp", "1", "", ""), *[("fg", k, *case) for k in ("1", "2") for case in per_mode],
        *[("frog", "2", *case) for case in per_mode], ("seed_jvp", "1", "", ""), ("dual_loop", "1", "", ""),
        ("dual_loop", "2", "", ""),
    ]
    bp_ms = float(rows[0]["ms"])
    for row in rows:
        assert row["error"] == "" and row["workload"] == "tiny_fc" and row["parameters"] == "1482"
        ms = float(row["ms"])
        assert 0 < float(row["ms_min"]) <= ms
        assert float(row["ms_ratio_bp"]) == pytest.approx(ms / bp_ms, rel=1e-9)
        assert not math.isnan(float(row["peak_MB"]))
    assert (tmp_path / "table.md").read_text().count("| tiny_fc |") == len(rows)
    assert (tmp_path / "bench.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "fg K=1 (eager, rank1)" in out and "fg K=1 (fast, rank1)" in out


def test_bad_bench_input_is_a_one_line_error(tmp_path, capsys):
    assert bench.main(["workloads=[mnist]", f"hydra.run.dir={tmp_path}"]) == 2
    assert "unknown workload 'mnist'; valid choices: baydin_mlp_64" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method 'sgd'; valid choices: bp, bp_compiled"):
        cases(["sgd"], [1], ["eager"], ["normal"])


def test_local_rows_draw_rademacher_where_rank1_is_asked():
    """rank1 factors parameter matrices; local losses perturb activations, where it would be normal."""
    rows = cases(["fg", "local_fg"], [1], ["eager"], ["normal", "rank1"])
    assert [(r.method, r.sampler) for r in rows if r.method != "bp"] == [
        ("fg", "normal"), ("fg", "rank1"), ("local_fg", "normal"), ("local_fg", "rademacher")]
    assert [r.sampler for r in cases(["local_fg"], [1], ["eager"], ["rank1", "rademacher"])][1:] == ["rademacher"]


def test_the_local_fg_rows_use_the_configuration_compare_uses_on_each_model():
    import os

    import yaml

    import fwdgrad
    from fwdgrad.bench.workloads import LOCAL_FG, LOCAL_FG_BY_MODEL, local_fg_options

    path = os.path.join(os.path.dirname(fwdgrad.__file__), "conf", "compare.yaml")
    entry = yaml.safe_load(open(path))["method_configs"]["local_fg"]
    assert {k: v for k, v in entry["gradient"].items() if k not in ("name", "num_tangents")} == \
        {k: v for k, v in LOCAL_FG.items() if k != "last_group_size"}
    per_model = {model: settings["gradient"] for model, settings in entry["models"].items() if "gradient" in settings}
    assert per_model == LOCAL_FG_BY_MODEL
    assert local_fg_options("baydin_mlp") == LOCAL_FG
    for model, gradient in per_model.items():
        assert local_fg_options(model) == {**LOCAL_FG, **gradient}


def test_local_fg_plain_is_groups_of_4_and_linear_heads_on_every_model(monkeypatch):
    """local_fg on baydin_cnn takes compare's configuration (conv heads); local_fg_plain the plain one."""
    from fwdgrad.bench import workloads
    from fwdgrad.bench.workloads import LOCAL_FG, WORKLOADS, make_step

    built = []
    real = workloads.LocalForwardGradient

    def recording(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(workloads, "LocalForwardGradient", recording)
    model, x, y = WORKLOADS["baydin_cnn_64"].build(torch.device("cpu"))
    x, y = x[:2], y[:2]
    for method in ("local_fg", "local_fg_plain"):
        make_step(method, model, x, y, model_name="baydin_cnn")
    assert built[0]["head"] == "conv" and built[0]["group_size"] == 1
    assert {k: built[1][k] for k in LOCAL_FG} == LOCAL_FG and "head" not in built[1]
