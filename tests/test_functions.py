"""fwdgrad.studies.functions: values at hand-computed points, gradients, batched forward-mode descent."""

import math

import pytest
import torch

from fwdgrad.studies.descent import (
    GradientSpec,
    directional_derivatives,
    gradient_descent,
    gradient_estimate,
    repeat_start,
)
from fwdgrad.studies.functions import FUNCTIONS, STYBLINSKI_TANG_MINIMIZER, get_function

# (function, point, value computed by hand)
HAND_VALUES = [
    ("sphere", [1.0, 2.0, -3.0], 14.0),
    ("rosenbrock", [0.0, 0.0], 1.0),                            # (1 - 0)^2
    ("rosenbrock", [-1.0, 0.0, 0.0], 104.0 + 1.0),              # 100 (0 - 1)^2 + (1 + 1)^2, then (1 - 0)^2
    ("styblinski-tang", [1.0, 0.0], -5.0),                      # (1 - 16 + 5) / 2
    ("beale", [0.0, 0.5], 1.5**2 + 2.25**2 + 2.625**2),         # = 14.203125
    ("beale", [1.0, 1.0], 1.5**2 + 2.25**2 + 2.625**2),         # every bracket keeps its constant
    ("goldstein-price", [0.0, 0.0], (1 + 1 * 19) * (30 + 0)),   # = 600
    ("three-hump-camel", [1.0, 1.0], 2 - 1.05 + 1 / 6 + 1 + 1),
    ("egg-crate", [math.pi / 2, 0.0], (math.pi / 2) ** 2 + 25),
    ("ackley", [1.0, 0.0], -20 * math.exp(-0.2 * math.sqrt(0.5)) - math.exp(1.0) + math.e + 20),
]


@pytest.mark.parametrize(("name", "point", "expected"), HAND_VALUES)
def test_values_at_hand_computed_points(name, point, expected):
    value = get_function(name)(torch.tensor(point, dtype=torch.float64))
    assert float(value) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_minimum_value_and_zero_gradient_at_the_minimizer(name):
    function = get_function(name)
    n = function.dim or 5
    minimizer = function.minimizer(n, dtype=torch.float64).requires_grad_(True)
    value = function(minimizer)
    (gradient,) = torch.autograd.grad(value, minimizer)
    assert value.item() == pytest.approx(function.minimum_value(n), abs=1e-9)
    assert torch.linalg.vector_norm(gradient) < 1e-6


def test_styblinski_tang_minimizer_is_the_root_of_the_derivative():
    x = STYBLINSKI_TANG_MINIMIZER
    assert 2 * x**3 - 16 * x + 2.5 == pytest.approx(0, abs=1e-12)  # d/dx (x^4 - 16x^2 + 5x)/2
    assert get_function("styblinski-tang").minimum_value(3) == pytest.approx(3 * 0.5 * (x**4 - 16 * x**2 + 5 * x))
    # and the literature's rounded value -39.16599 n is above the true minimum
    assert get_function("styblinski-tang").minimum_value(1) < -39.16599


def test_rosenbrock_gradient_matches_closed_form():
    x = torch.tensor([0.3, -0.7, 1.2, 0.5], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(get_function("rosenbrock")(x), x)
    x = x.detach()
    expected = torch.zeros_like(x)
    expected[:-1] += -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    expected[1:] += 200 * (x[1:] - x[:-1] ** 2)
    torch.testing.assert_close(gradient, expected)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_batched_evaluation_equals_row_by_row(name):
    function = get_function(name)
    n = function.dim or 6
    points = torch.randn(7, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = function(points)
    assert values.shape == (7,)
    torch.testing.assert_close(values, torch.stack([function(point) for point in points]))


def test_default_starts_follow_the_papers_code():
    assert get_function("rosenbrock").default_start(4).tolist() == [-1, 0, 0, 0]
    assert get_function("sphere").default_start(3).tolist() == [-1, -1, -1]
    assert get_function("styblinski-tang").default_start(3).tolist() == [0, 0, 0]
    assert get_function("beale").default_start(2).tolist() == [0, 0.5]


def test_bad_names_and_dimensions_are_clear_errors():
    with pytest.raises(ValueError, match="unknown function 'nope'; valid choices: sphere"):
        get_function("nope")
    with pytest.raises(ValueError, match="n=2 only"):
        get_function("beale").minimizer(3)
    with pytest.raises(ValueError, match="integer >= 1"):
        get_function("sphere").default_start(0)
    with pytest.raises(ValueError, match="num_tangents"):
        GradientSpec("fg", num_tangents=0)


def test_forward_mode_directional_derivatives_equal_autograd_gradient_dot_tangent():
    function = get_function("rosenbrock")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    tangents = torch.randn(5, 3, 8, generator=generator, dtype=torch.float64)
    derivatives = directional_derivatives(function, x, tangents)
    x_leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(function(x_leaf).sum(), x_leaf)
    assert derivatives.shape == (5, 3)
    torch.testing.assert_close(derivatives, torch.einsum("skn,sn->sk", tangents, gradient))


def test_frog_with_k_equal_n_is_the_exact_gradient():
    function = get_function("styblinski-tang")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    estimate = gradient_estimate(function, x, GradientSpec("frog", 6, "frog"), torch.Generator().manual_seed(3))
    exact = gradient_estimate(function, x, GradientSpec("bp"))
    torch.testing.assert_close(exact, 2 * x**3 - 16 * x + 2.5)
    torch.testing.assert_close(estimate, exact)


def test_fg_mean_is_unbiased():
    # E[(∇f·v) v] = ∇f for v ~ N(0, I): average many single-tangent estimates at one point
    function = get_function("sphere")
    x = repeat_start(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 40000)
    estimates = gradient_estimate(function, x, GradientSpec("fg", 1), torch.Generator().manual_seed(4))
    # each coordinate's std is ||∇f|| sqrt(1 + (∇f_i/||∇f||)^2) <= 2 sqrt(2) * 2.3; 40000 samples: SE < 0.033
    torch.testing.assert_close(estimates.mean(0), torch.tensor([2.0, -4.0, 1.0], dtype=torch.float64), atol=0.15,
                               rtol=0)


@pytest.mark.parametrize("spec", [GradientSpec("bp"), GradientSpec("frog", 16, "frog")], ids=["bp", "frog K=n"])
def test_descent_reaches_the_sphere_minimum(spec):
    function = get_function("sphere")
    start = repeat_start(function.default_start(16, dtype=torch.float64), 3)
    result = gradient_descent(function, start, spec, lr=0.1, steps=200, generator=torch.Generator().manual_seed(0),
                              minimizer=function.minimizer(16, dtype=torch.float64))
    final = result.values[result.last_step, torch.arange(3)]
    assert (final < 1e-6).all()
    assert (result.distances[result.last_step, torch.arange(3)] < 1e-3).all()


def test_early_stopping_after_patience_non_improving_steps():
    # lr = 1.5 on the sphere: x <- -2x, f grows 4x every step, so every step is non-improving
    function = get_function("sphere")
    result = gradient_descent(function, torch.ones(2, 3), GradientSpec("bp"), lr=1.5, steps=100, patience=7)
    assert result.last_step.tolist() == [7, 7]
    assert result.values.shape[0] == 8
    torch.testing.assert_close(result.values[:, 0], 3 * 4.0 ** torch.arange(8))
