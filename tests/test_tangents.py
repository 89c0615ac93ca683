import math

import pytest
import torch

from fwdgrad.core.tangents import (
    SAMPLERS,
    expected_chi,
    expected_tangent_norm,
    sample_flat_tangents,
    sample_tangents,
)

SHAPES = [(3, 4), (4,), (2, 1, 3)]  # n = 12 + 4 + 6 = 22


def flat(tangents):
    return torch.cat([t.reshape(t.shape[0], -1) for t in tangents], dim=1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_shapes_dtype_and_joint_normalization(sampler):
    generator = torch.Generator().manual_seed(0)
    tangents = sample_tangents(
        5, SHAPES, sampler, generator=generator, dtype=torch.float64, normalize=True, angle=30, max_length=3
    )
    assert [tuple(t.shape) for t in tangents] == [(5, *s) for s in SHAPES]
    assert all(t.dtype == torch.float64 for t in tangents)
    # normalization is over the whole parameter vector, not per tensor
    torch.testing.assert_close(flat(tangents).norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_normal_and_rademacher_second_moment_is_identity():
    # E[v v^T] = I; with N samples each entry of the empirical matrix has std <= sqrt(3/N)
    # (normal: Var(v_i^2) = 2, Var(v_i v_j) = 1; rademacher: 0 and 1), so 6 sigma = 6 sqrt(3/N).
    num = 40_000
    for sampler in ("normal", "rademacher"):
        v = sample_flat_tangents(num, 8, sampler, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        second_moment = v.T @ v / num
        assert (second_moment - torch.eye(8, dtype=torch.float64)).abs().max() < 6 * math.sqrt(3 / num)
    rademacher = sample_flat_tangents(3, 100, "rademacher", generator=torch.Generator().manual_seed(0))
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}


def test_standard_basis_is_first_k_unit_vectors_of_flattened_space():
    tangents = sample_tangents(13, SHAPES, "standard_basis")
    torch.testing.assert_close(flat(tangents), torch.eye(13, 22))
    with pytest.raises(ValueError, match="num_tangents <= 22"):
        sample_tangents(23, SHAPES, "standard_basis")


@pytest.mark.parametrize("angle", [15, 45, 90])
def test_angle_sampler_places_every_tangent_at_the_angle_to_the_first(angle):
    generator = torch.Generator().manual_seed(2)
    v = sample_flat_tangents(6, 64, "angle", angle=angle, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(6, dtype=torch.float64))
    cosines = v[1:] @ v[0]
    torch.testing.assert_close(cosines, torch.full((5,), math.cos(math.radians(angle)), dtype=torch.float64))


def test_varying_length_is_orthogonal_with_lengths_in_range():
    v = sample_flat_tangents(7, 30, "varying_length", max_length=4.0, generator=torch.Generator().manual_seed(3))
    gram = v @ v.T
    lengths = gram.diagonal().sqrt()
    assert torch.all((lengths >= 1) & (lengths <= 4))
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(7, 7))
    assert ((v != 0).sum(dim=1) == 1).all()


def test_batch_shape_gives_independent_draws():
    v = sample_flat_tangents(3, 10, "normal", batch_shape=(4, 2), generator=torch.Generator().manual_seed(0))
    assert v.shape == (4, 2, 3, 10)
    assert not torch.allclose(v[0, 0], v[1, 0])


def test_ensure_independent_resamples_dependent_draws():
    # with n = 2 Rademacher tangents, K = 2 rows are dependent with probability 1/2
    v = sample_flat_tangents(
        2, 2, "rademacher", batch_shape=(64,), ensure_independent=True, generator=torch.Generator().manual_seed(0)
    )
    assert (torch.linalg.matrix_rank(v) == 2).all()
    with pytest.raises(ValueError, match="always linearly dependent"):
        sample_flat_tangents(3, 2, ensure_independent=True)


def test_same_generator_seed_same_tangents():
    a = sample_tangents(4, SHAPES, generator=torch.Generator().manual_seed(7))
    b = sample_tangents(4, SHAPES, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_expected_norms_match_monte_carlo():
    v = torch.randn(200_000, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert expected_chi(9) == pytest.approx(v.norm(dim=1).mean().item(), rel=3e-3)
    assert expected_tangent_norm("rademacher", 16) == 4.0
    assert expected_tangent_norm("normal", 16, normalize=True) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_tangents=0, dim=3), "num_tangents must be an integer >= 1, got 0"),
        (dict(num_tangents=2, dim=3, sampler="gaussian"), "unknown tangent sampler 'gaussian'; valid choices: normal"),
        (dict(num_tangents=2, dim=0), "dimension must be an integer >= 1"),
        (dict(num_tangents=2, dim=3, sampler="angle"), "needs angle"),
        (dict(num_tangents=2, dim=3, sampler="varying_length", max_length=0.5), "max_length >= 1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_flat_tangents(**kwargs)
