"""The cheap CPU samplers keep E[v v^T] = I, so the forward gradient stays unbiased."""

import math

import pytest
import torch
import torch.nn as nn

from fwdgrad import ForwardGradient
from fwdgrad.core.tangents import rademacher_from_bits, sample_flat_tangents, sample_tangents

SHAPES = [(3, 4), (4,), (2, 1, 3)]  # two matrices (rank-1 tangents) and a vector: n = 22


def flat(tangents):
    return torch.cat([t.reshape(t.shape[0], -1) for t in tangents], dim=1)


def test_rademacher_bits_are_signs_and_every_bit_position_is_balanced():
    # 70 entries per row: not a multiple of the 64 bits of a word, so words straddle rows
    v = rademacher_from_bits((20_000, 70), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert v.dtype == torch.float64 and set(v.unique().tolist()) == {-1.0, 1.0}
    # each column's mean has std 1/sqrt(N): 6 sigma
    assert v.mean(0).abs().max() < 6 / math.sqrt(20_000)


@pytest.mark.parametrize("sampler, fourth_moment", [("rademacher", 1.0), ("rank1", 9.0)])
def test_empirical_second_moment_is_identity(sampler, fourth_moment):
    """max |mean(v v^T) - I| <= 6 sqrt(m4 / N), m4 >= E[(v_i v_j)^2] bounds each entry's variance.

    rademacher: (v_i v_j)^2 = 1. rank1: v_ij = u_i w_j, so (v_a v_b)^2 is a product of at most
    two squared normals per factor, E <= E[u^4] E[w^4] = 9.
    """
    num = 40_000
    v = flat(sample_tangents(num, SHAPES, sampler, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    second_moment = v.T @ v / num
    bound = 6 * math.sqrt(fourth_moment / num)
    assert (second_moment - torch.eye(22, dtype=torch.float64)).abs().max() < bound


def test_rank1_tangents_are_rank_one_per_matrix():
    w, b, c = sample_tangents(5, SHAPES, "rank1", generator=torch.Generator().manual_seed(0))
    assert (torch.linalg.matrix_rank(w) == 1).all()
    assert (torch.linalg.matrix_rank(c.reshape(5, 2, 3)) == 1).all()
    assert b.shape == (5, 4)
    # without shapes the flat space is one vector: rank1 = normal, still E[v v^T] = I
    assert sample_flat_tangents(2, 7, "rank1").shape == (2, 7)


@pytest.mark.parametrize("sampler", ["rademacher", "rank1"])
def test_averaged_forward_gradient_approaches_the_gradient(sampler):
    """mean of N single-tangent estimates g_i = (∇f·v_i) v_i -> ∇f.

    E||mean - ∇f||^2 = E||g - ∇f||^2 / N. Rademacher: ||v||^2 = n, so E||g - ∇f||^2 =
    (n - 1)||∇f||^2 exactly. Rank-1 has no short closed form: we estimate E||g - ∇f||^2 by
    the sample mean of ||g_i - ∇f||^2 over the same N draws (∇f exact from autograd).
    The squared error is a sum of n ≈ independent terms: its ratio to the expectation lies
    in [0.5, 2], and the error is 20 times below ||∇f||.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()  # n = 29
    x = torch.randn(10, 5, dtype=torch.float64)
    loss = lambda: model(x).square().mean()  # noqa: E731
    num = 20_000
    fg = ForwardGradient(model, num_tangents=num, aggregation="mean", sampler=sampler, seed=0)
    fg.backward(loss)
    estimate = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(), list(model.parameters()))])
    n = exact.numel()
    if sampler == "rademacher":
        per_sample = (n - 1) * exact.square().sum()
    else:
        tangents = flat(ForwardGradient(model, num_tangents=num, sampler=sampler, seed=0).sample_tangents())
        samples = (tangents @ exact).unsqueeze(1) * tangents
        torch.testing.assert_close(samples.mean(0), estimate)  # the same draws
        per_sample = (samples - exact).square().sum(1).mean()
    ratio = (estimate - exact).square().sum() / (per_sample / num)
    assert 0.5 < ratio < 2.0
    assert (estimate - exact).norm() < exact.norm() / 20


def test_rank1_has_no_closed_form_tangent_norm():
    from fwdgrad.core.tangents import expected_tangent_norm

    with pytest.raises(ValueError, match="not defined for sampler='rank1'"):
        expected_tangent_norm("rank1", 10)
