"""fwdgrad optimize: learning-rate lookup, the command's files, and clean errors."""

import csv
import os

import pytest
import torch
from omegaconf import OmegaConf

from fwdgrad.experiments import optimize
from fwdgrad.studies.descent import GradientSpec
from fwdgrad.studies.functions import get_function

LR_DIR = os.path.join(os.path.dirname(optimize.__file__), "..", "train", "reference_lrs")


def _read(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _table_lr(table, **wanted):
    """The lr of the CSV row matching ``wanted`` (read here, independently of fwdgrad.train.reference_lrs)."""
    for row in _read(os.path.join(LR_DIR, f"{table}.csv")):
        if all(row[key] == value for key, value in wanted.items()):
            return float(row["lr"])
    raise AssertionError(f"no row {wanted}")


def test_default_learning_rates_come_from_the_papers_tables():
    assert optimize.default_lr("sphere", 64, GradientSpec("bp")) == _table_lr(
        "math", function="sphere", n="64", gradient_approach="bp")
    assert optimize.default_lr("rosenbrock", 1024, GradientSpec("fg", 16, "mean")) == _table_lr(
        "math", function="rosenbrock", n="1024", gradient_approach="fg-mean", k="16.0")
    assert optimize.default_lr("styblinski-tang", 8, GradientSpec("frog", 4, "frog")) == _table_lr(
        "math", function="styblinski-tang", n="8", gradient_approach="frog", k="4.0")
    angle = GradientSpec("fg", 16, "mean", sampler="angle", angle=45.0)
    assert optimize.default_lr("styblinski-tang", 64, angle) == _table_lr(
        "math__custom_tangents", k="16",
        optimizer="FG(k=16,agg=mean,normalize=False,sampler=specific_angle_45)")


@pytest.mark.parametrize(
    "spec",
    [GradientSpec("fg", 4, "max"), GradientSpec("fg", 4, "mean", normalize_tangents=True),
     GradientSpec("fg", 3, "mean")],
    ids=["other aggregation", "normalized", "k not in table"],
)
def test_missing_learning_rate_asks_for_lr(spec):
    with pytest.raises(ValueError, match="lr="):
        optimize.default_lr("sphere", 64, spec)


def test_single_run_writes_the_documented_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = optimize.main([
        "function=rosenbrock", "n=2", "gradient=frog", "gradient.num_tangents=1", "steps=30", "lr=1e-3", "seeds=3",
        f"hydra.run.dir={tmp_path}/run",
    ])
    assert code == 0
    run = tmp_path / "run"
    for name in ("steps.csv", "summary.csv", "table.md", "values_rosenbrock_n2.png", "contour_rosenbrock.png"):
        assert (run / name).exists(), name
    steps = _read(run / "steps.csv")
    assert list(steps[0]) == list(optimize.STEP_COLUMNS)
    assert len(steps) == 3 * 31
    first = steps[0]
    # step 0 is the default start (-1, 0): f = 100 (0 - 1)^2 + (1 + 1)^2 = 104, distance to (1, 1) = sqrt(5)
    assert float(first["value"]) == pytest.approx(104.0)
    assert float(first["distance"]) == pytest.approx(5**0.5, rel=1e-6)
    summary = _read(run / "summary.csv")
    assert len(summary) == 3
    for row in summary:
        mine = [r for r in steps if r["run"] == row["run"]]
        assert float(row["final_value"]) == pytest.approx(float(mine[-1]["value"]))
        assert float(row["best_value"]) == pytest.approx(min(float(r["value"]) for r in mine))
        assert float(row["final_gap"]) == pytest.approx(float(row["final_value"]))  # minimum 0
        assert row["method"] == "frog K=1"


@pytest.mark.slow  # ~25 s on 2 loaded cores: 24 batches and their figures
def test_section42_and_baydin_studies_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = optimize.main([
        "study=section42", "section42.dims=[2,4]", "section42.ks=[2]", "steps=20", "seeds=2",
        f"hydra.run.dir={tmp_path}/s42",
    ])
    assert code == 0
    summary = _read(tmp_path / "s42" / "summary.csv")
    methods = {row["method"] for row in summary}
    assert methods == {"bp", "fg K=1", "fg-mean K=2", "frog K=2"}
    assert len(summary) == 3 * 2 * 4 * 2  # functions × dims × methods × runs
    st = get_function("styblinski-tang")
    for row in summary:
        if row["function"] == "styblinski-tang":
            assert float(row["final_gap"]) == pytest.approx(
                float(row["final_value"]) - st.minimum_value(int(row["n"])), rel=1e-6)
    assert (tmp_path / "s42" / "final_gap_vs_n.png").exists()
    assert "| frog K=2 |" in (tmp_path / "s42" / "table.md").read_text()
    code = optimize.main([
        "study=baydin", "seeds=1", "baydin.runs=[{function: beale, start: [0.0, 0.5], steps: 10, lr: 0.01}]",
        f"hydra.run.dir={tmp_path}/baydin",
    ])
    assert code == 0
    assert {row["method"] for row in _read(tmp_path / "baydin" / "summary.csv")} == {"bp", "fg K=1", "frog K=1"}
    assert (tmp_path / "baydin" / "contour_beale.png").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("function=nope", "unknown function 'nope'"),
        ("n=0", "n must be an integer >= 1"),
        ("gradient.num_tangents=0", "num_tangents must be an integer >= 1"),
        ("gradient.aggregation=nope", "unknown aggregation 'nope'"),
        ("gradient.name=nope", "unknown gradient 'nope'"),
        ("study=nope", "unknown study 'nope'"),
        ("function=beale", "no reference learning rate"),
        ("start=[1,2,3]", "start has 3 coordinates but n=2"),
    ],
)
def test_bad_overrides_exit_2_with_a_message(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.chdir(tmp_path)
    code = optimize.main([override, "steps=2", "plot=false", f"hydra.run.dir={tmp_path}/run"])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_baydin_study_reproduces_orobix_fwdgrads_default_run(tmp_path):
    """Run 0 of fg K=1 on Beale is orobix/fwdgrad's global_optimization_fwdgrad.py with its config
    (seed 42, lr 0.01, 1000 iterations), re-implemented here independently with torch.func.jvp."""
    from fwdgrad.experiments.optimize import RandomStart, method_from_gradient, run_method
    from fwdgrad.studies.functions import get_function

    def beale(x):  # orobix/fwdgrad's function, on a point (2,)
        return ((1.5 - x[0] + x[0] * x[1]) ** 2 + (2.25 - x[0] + x[0] * x[1] ** 2) ** 2
                + (2.625 - x[0] + x[0] * x[1] ** 3) ** 2)

    torch.manual_seed(42)
    params = torch.rand(2)
    assert torch.allclose(params, torch.tensor([0.8823, 0.9150]), atol=1e-4)
    for _ in range(1000):
        v = torch.randn_like(params)
        _, derivative = torch.func.jvp(beale, (params,), (v,))
        params = params - 0.01 * derivative * v
    method = method_from_gradient(OmegaConf.create({"name": "fg", "num_tangents": 1, "aggregation": "mean"}))
    runs = run_method("baydin", get_function("beale"), 2, method, 0.01, 1000, RandomStart(42), 2, seed=0,
                      patience=0, dtype=torch.float32)
    final_of_run_0 = runs.positions[1000, 0]
    torch.testing.assert_close(final_of_run_0, params, rtol=1e-4, atol=1e-5)
    start_of_run_1 = runs.positions[0, 1]
    torch.manual_seed(43)
    torch.testing.assert_close(start_of_run_1, torch.rand(2))  # the next run: seed 43, drawn the same way
