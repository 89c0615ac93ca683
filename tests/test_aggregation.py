import math

import pytest
import torch

from fwdgrad.core.aggregation import (
    AGGREGATIONS,
    PRECISE_PROJECTION_MAX_ENTRIES,
    aggregate,
    aggregate_flat,
    aggregation_coefficients,
    scaling_correction_factor,
)
from fwdgrad.core.tangents import expected_chi


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def problem(num_tangents=5, dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gradient = torch.randn(dim, generator=generator)
    tangents = torch.randn(num_tangents, dim, generator=generator)
    return gradient, tangents, tangents @ gradient


def reference(method, gradient, v, d):
    """Each aggregation written directly from its definition, on the flat K×n matrix."""
    k, n = v.shape
    forward_gradients = d[:, None] * v  # g_k = (∇f·v_k) v_k
    cos = d.abs() / v.norm(dim=1)
    if method == "sum":
        return forward_gradients.sum(0)
    if method == "mean":
        return forward_gradients.mean(0)
    if method == "mean_times_dim":
        return forward_gradients.mean(0) * n
    if method == "max":
        return forward_gradients[d.abs().argmax()]
    if method == "max_normalized":
        return forward_gradients[cos.argmax()]
    if method == "mean_of_top_k":
        keep = cos >= cos.max() - 0.1
        return forward_gradients[keep].mean(0)
    # orthogonal projection onto span(v): the least-squares fit of ∇f by the rows of v
    coefficients = torch.linalg.lstsq(v.T, gradient[:, None]).solution[:, 0]
    return v.T @ coefficients


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_every_method_matches_its_definition_split_over_tensors(method):
    gradient, v, d = problem()
    shapes = [(2, 3), (6,)]
    split = [v[:, :6].reshape(5, 2, 3), v[:, 6:]]
    parts = aggregate(split, d, method)
    estimate = torch.cat([p.reshape(-1) for p in parts])
    torch.testing.assert_close(estimate, reference(method, gradient, v, d))
    assert [tuple(p.shape) for p in parts] == shapes


def test_mean_of_top_k_with_a_loose_tolerance_is_the_mean():
    _, v, d = problem()
    (top,) = aggregate([v], d, "mean_of_top_k", top_k_tolerance=10.0)
    (mean,) = aggregate([v], d, "mean")
    torch.testing.assert_close(top, mean)


@pytest.mark.parametrize("tolerance", [-0.1, math.nan, math.inf, "0.1"])
def test_bad_top_k_tolerance_is_named(tolerance):
    # a negative margin selects no tangent: c = 0 / 0 would be a silent NaN update
    gradient, v, d = problem()
    message = rf"top_k_tolerance must be a finite number >= 0 .*\[0, inf\)\), got {tolerance!r}"
    with pytest.raises(ValueError, match=message):
        aggregate([v], d, "mean_of_top_k", top_k_tolerance=tolerance)
    with pytest.raises(ValueError, match=message):
        aggregation_coefficients("mean_of_top_k", d, squared_norms=v.square().sum(1), top_k_tolerance=tolerance)


def test_zero_top_k_tolerance_keeps_the_best_cosine():
    gradient, v, d = problem()
    (estimate,) = aggregate([v], d, "mean_of_top_k", top_k_tolerance=0)
    torch.testing.assert_close(estimate, reference("max_normalized", gradient, v, d))


def test_frog_alias():
    gradient, v, d = problem()
    torch.testing.assert_close(aggregate([v], d, "frog")[0], aggregate([v], d, "orthogonal_projection")[0])


@pytest.mark.parametrize("precise", [True, False])
def test_projection_is_global_not_per_tensor(precise, monkeypatch):
    # <g, ∇f> = ||g||^2 holds for the projection onto the span of the whole tangents
    if not precise:
        monkeypatch.setattr("fwdgrad.core.aggregation.PRECISE_PROJECTION_MAX_ENTRIES", 0)
    gradient, v, d = problem(num_tangents=4, dim=30, seed=1)
    split = [v[:, :10], v[:, 10:25], v[:, 25:]]
    parts = aggregate(split, d, "orthogonal_projection")
    g = torch.cat(parts)
    assert (g @ gradient).item() == pytest.approx((g @ g).item(), rel=1e-10)
    # projecting each tensor separately with the network's d (what the reference code does) breaks it
    per_tensor = torch.cat([aggregate([part], d, "frog")[0] for part in split])
    squared_norm = (per_tensor @ per_tensor).item()
    assert abs((per_tensor @ gradient).item() - squared_norm) > 1e-3 * squared_norm
    assert aggregate([v], torch.zeros(4), "frog")[0].abs().max() == 0


@pytest.mark.parametrize("precise", [True, False])
def test_projection_with_more_tangents_than_dimensions_or_duplicates(precise, monkeypatch):
    if not precise:
        monkeypatch.setattr("fwdgrad.core.aggregation.PRECISE_PROJECTION_MAX_ENTRIES", 0)
    gradient, v, d = problem(num_tangents=9, dim=6, seed=2)
    (g,) = aggregate([v], d, "frog")
    torch.testing.assert_close(g, gradient)  # span(v) = R^6 -> the exact gradient
    duplicated = torch.cat([v[:2], v[:2], 3 * v[:1]])  # rank 2, K = 5
    (g2,) = aggregate([duplicated], duplicated @ gradient, "frog")
    torch.testing.assert_close(g2, reference("orthogonal_projection", gradient, v[:2], v[:2] @ gradient))


def test_projection_k_equals_n_1024_float32_recovers_gradient():
    # The FROG reference code inverts the Gram matrix in float32 and gets cosine 0.944 here.
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(1024, generator=generator, dtype=torch.float32)
    v = torch.randn(1024, 1024, generator=generator, dtype=torch.float32)
    d = (v.double() @ gradient.double()).float()
    assert 1024 * 1024 <= PRECISE_PROJECTION_MAX_ENTRIES
    (g,) = aggregate([v], d, "frog")
    assert g.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g.double(), gradient.double(), dim=0) >= 0.99999


def test_batched_problems_equal_one_by_one():
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(6, 3, 10, generator=generator)  # (batch, K, n)
    gradients = torch.randn(6, 10, generator=generator)
    d = (v @ gradients[..., None])[..., 0]
    for method in AGGREGATIONS:
        batched = aggregate_flat(v, d, method)
        one_by_one = torch.stack([aggregate([v[i]], d[i], method)[0] for i in range(6)])
        torch.testing.assert_close(batched, one_by_one)


def test_projection_scaling_correction_makes_expected_norm_ratio_one():
    # ||P_U ∇f|| / ||∇f|| = sqrt(Beta(k/2,(n-k)/2)) with mean E[χ_k]/E[χ_n]
    n, k, samples = 40, 5, 4000
    generator = torch.Generator().manual_seed(4)
    v = torch.randn(samples, k, n, generator=generator)
    gradient = torch.randn(n, generator=generator)
    d = v @ gradient
    g = aggregate_flat(v, d, "frog", scaling_correction=True)
    ratio = (g.norm(dim=1) / gradient.norm()).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert scaling_correction_factor("frog", k, n, None) == pytest.approx(expected_chi(n) / expected_chi(k))
    assert scaling_correction_factor("frog", 50, 40, None) == 1.0


def test_mean_and_sum_scaling_factors_follow_the_paper():
    n = 100
    assert scaling_correction_factor("mean", 1, n, 1.0) == pytest.approx(1 / math.sqrt(2 / (math.pi * n)))
    assert scaling_correction_factor("mean", 4, n, 2.0) == pytest.approx(1 / (4 * math.sqrt((n + 4) / 5) / n))
    mean_factor = scaling_correction_factor("mean", 4, n, 2.0)
    assert scaling_correction_factor("sum", 4, n, 2.0) == pytest.approx(mean_factor / 4)
    with pytest.raises(ValueError, match="defined for sum, mean, orthogonal_projection"):
        scaling_correction_factor("max", 4, n, 1.0)
    with pytest.raises(ValueError, match="needs tangent_norm"):
        scaling_correction_factor("mean", 4, n, None)


def test_unknown_method_lists_choices():
    _, v, d = problem()
    with pytest.raises(ValueError, match="unknown aggregation 'median'; valid choices: sum, mean"):
        aggregate([v], d, "median")
    with pytest.raises(ValueError, match="does not start with"):
        aggregate([v[:, :3]], d[:4], "mean")
