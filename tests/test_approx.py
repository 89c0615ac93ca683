"""fwdgrad approx: approximation quality against closed-form expectations, and the command."""

import csv
import math

import pytest
import torch
from scipy import special, stats

from fwdgrad.core.tangents import sample_flat_tangents
from fwdgrad.experiments import approx
from fwdgrad.studies.descent import directional_derivatives
from precision import dot_product_rtol


def expected_projection_cosine(n: int, k: int) -> float:
    """E[sqrt(Beta(k/2, (n-k)/2))] = B((k+1)/2, (n-k)/2) / B(k/2, (n-k)/2): the squared cosine
    between a fixed vector and a uniformly random k-dim subspace of R^n is Beta(k/2, (n-k)/2)."""
    return math.exp(special.betaln((k + 1) / 2, (n - k) / 2) - special.betaln(k / 2, (n - k) / 2))


@pytest.mark.parametrize(("n", "k"), [(64, 4), (256, 16), (32, 16), (100, 1)])
@pytest.mark.parametrize("kind", ["ones", "random"])
def test_projection_cosine_matches_the_beta_expectation(n, k, kind):
    gradient = approx.true_gradient(kind, n, seed=1, dtype=torch.float64)
    result = approx.approximation_quality(gradient, k, ["frog"], 3000, generator=torch.Generator().manual_seed(0))
    cosine = result.cosine["orthogonal_projection"]
    assert float(cosine.mean()) == pytest.approx(expected_projection_cosine(n, k), rel=0.03)
    # the projection never overshoots: ||P g|| = cos * ||g||
    torch.testing.assert_close(result.norm_ratio["orthogonal_projection"], cosine)


def test_projection_is_exact_when_k_reaches_n():
    for n, k in [(16, 16), (8, 32)]:  # both Gram routes: K = n (K×K) and K > n (n×n)
        gradient = approx.true_gradient("random", n, dtype=torch.float32)
        result = approx.approximation_quality(gradient, k, ["frog"], 50, generator=torch.Generator().manual_seed(0))
        # a float32 cosine: float32 rounding of dot products over n (or K) terms, not float64's 1e-7
        rtol = dot_product_rtol(torch.float32, max(n, k))
        torch.testing.assert_close(result.cosine["orthogonal_projection"], torch.ones(50, dtype=torch.float64),
                                   rtol=rtol, atol=0)


@pytest.mark.parametrize(("n", "k"), [(64, 4), (256, 16)])
def test_mean_aggregation_norm_matches_its_closed_form(n, k):
    # ḡ = (1/K) Σ_k (v_k·g) v_k with v_k ~ N(0, I): E||(v·g) v||^2 = (n + 2)||g||^2 and the K(K-1)
    # cross terms have E[(v_i·g)(v_j·g) v_i·v_j] = ||g||^2, so E||ḡ||^2 / ||g||^2 = (n + K + 1) / K.
    gradient = approx.true_gradient("ones", n, dtype=torch.float64)
    result = approx.approximation_quality(gradient, k, ["mean"], 6000, generator=torch.Generator().manual_seed(1))
    assert float(result.norm_ratio["mean"].square().mean()) == pytest.approx((n + k + 1) / k, rel=0.05)


def test_matmul_directional_derivatives_equal_forward_mode_on_a_linear_function():
    generator = torch.Generator().manual_seed(2)
    gradient = torch.randn(40, generator=generator, dtype=torch.float64)
    tangents = sample_flat_tangents(5, 40, batch_shape=(3,), generator=generator, dtype=torch.float64)
    x = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    forward_mode = directional_derivatives(lambda point: point @ gradient, x, tangents)
    torch.testing.assert_close(forward_mode, tangents @ gradient)


def test_scaling_correction_makes_projection_norm_unbiased():
    # factor E[χ_n] / E[χ_k] turns E||P g|| / ||g|| = E[χ_k] / E[χ_n] into 1
    n, k = 128, 8
    gradient = approx.true_gradient("ones", n, dtype=torch.float64)
    result = approx.approximation_quality(gradient, k, ["frog"], 3000, generator=torch.Generator().manual_seed(3))
    factor = approx.scaled_ratio_factor("frog", k, n, "normal", False)
    assert float((result.norm_ratio["orthogonal_projection"] * factor).mean()) == pytest.approx(1.0, rel=0.03)


def test_sample_count_rule():
    assert approx.samples_for(4, 64, 1000, 2**24, 10) == 1000
    assert approx.samples_for(1024, 16384, 1000, 2**24, 10) == 10  # 2^24 // 2^24 = 1 -> at least 10
    assert approx.samples_for(256, 1024, 1000, 2**24, 10) == 64


def test_confidence_interval_matches_scipy():
    values = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.55], dtype=torch.float64)
    mean, std, low, high = approx.mean_std_ci(values)
    expected = stats.t.interval(0.95, 4, loc=values.mean().item(), scale=values.std().item() / math.sqrt(5))
    assert (low, high) == pytest.approx(expected)
    assert std == pytest.approx(float(torch.std(values)))


def _read(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_command_writes_the_documented_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = approx.main([
        "dims=[4,32]", "ks=[1,4]", "num_samples=50", "samplers=[normal]", "normalize=[false]",
        "aggregations=[mean,frog]", f"hydra.run.dir={tmp_path}/run",
    ])
    assert code == 0
    run = tmp_path / "run"
    for name in ("raw.csv", "summary.csv", "timing.txt", "cosine_vs_n_normal.png", "norm_ratio_vs_n_normal.png"):
        assert (run / name).exists(), name
    raw = _read(run / "raw.csv")
    summary = _read(run / "summary.csv")
    assert len(raw) == 2 * 2 * 2 * 50  # n × k × aggregation × samples
    # summary = statistics of the raw rows (mean of the 50 cosines of one cell)
    cell = [float(r["cosine"]) for r in raw if (r["aggregation"], r["n"], r["k"]) == ("mean", "32", "4")]
    row = next(r for r in summary if (r["aggregation"], r["n"], r["k"], r["scaling_correction"])
               == ("mean", "32", "4", "False"))
    assert float(row["cosine_mean"]) == pytest.approx(sum(cell) / len(cell), rel=1e-5)
    assert float(row["cosine_ci95_low"]) < float(row["cosine_mean"]) < float(row["cosine_ci95_high"])


def test_angle_study_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = approx.main([
        "study=angles", "angles.ks=[4]", "angles.angles=[30,90]", "num_samples=20", "aggregations=[mean,frog]",
        f"hydra.run.dir={tmp_path}/run",
    ])
    assert code == 0
    summary = _read(tmp_path / "run" / "summary.csv")
    assert {r["angle"] for r in summary} == {"30", "90"}
    assert (tmp_path / "run" / "angles.png").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study=nope", "unknown study 'nope'"),
        ("true_gradient=zeros", "unknown true_gradient 'zeros'"),
        ("ks=[0]", "ks must contain integers >= 1"),
        ("dims=[0]", "dims must contain integers >= 1"),
        ("aggregations=[nope]", "unknown aggregation 'nope'"),
        ("samplers=[nope]", "unknown sampler 'nope'"),
    ],
)
def test_bad_overrides_exit_2_with_a_message(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.chdir(tmp_path)
    code = approx.main([override, "num_samples=2", f"hydra.run.dir={tmp_path}/run"])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert "Traceback" not in captured.err
