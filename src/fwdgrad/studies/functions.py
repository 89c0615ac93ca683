"""Closed-form test functions, batched: ``(..., n) -> (...)``, with their minimizers and start points.

Every function maps a batch of points ``x`` of shape ``(..., n)`` to values of shape
``(...)``, so S seeds or start points are one tensor program: ``(S, n) -> (S,)``.

==================  =====================================================  ==================  =================
name                f(x)                                                   minimizer x*        f(x*)
==================  =====================================================  ==================  =================
``sphere``          Σ_i x_i²                                               0                   0
``rosenbrock``      Σ_{i<n} b (x_{i+1} - x_i²)² + (a - x_i)²,  a=1, b=100   (1, ..., 1)         0
``styblinski-tang`` ½ Σ_i (x_i⁴ - 16 x_i² + 5 x_i)                         x_i = -2.903534     -39.166166 n
``beale``           (1.5 - x + xy)² + (2.25 - x + xy²)² + (2.625 - x + xy³)²  (3, 0.5)            0
``ackley``          -20 exp(-0.2 sqrt((x²+y²)/2)) - exp((cos 2πx + cos 2πy)/2) + e + 20    (0, 0)   0
``goldstein-price`` [1 + (x+y+1)² (19 - 14x + 3x² - 14y + 6xy + 3y²)]
                    × [30 + (2x-3y)² (18 - 32x + 12x² + 48y - 36xy + 27y²)]  (0, -1)             3
``three-hump-camel`` 2x² - 1.05x⁴ + x⁶/6 + xy + y²                          (0, 0)              0
``egg-crate``       x² + y² + 25 (sin² x + sin² y)                          (0, 0)              0
==================  =====================================================  ==================  =================

Styblinski-Tang's minimizer is the smallest root of 4x³ - 32x + 5 = 0, x* = -2.9035340277711783,
with f(x*) = -39.16616570377141 per coordinate; the literature's "-39.16599 n" is a rounded
value (1.7e-4 n above the true minimum), so gaps here are measured to the exact value.
Rosenbrock with n = 1 has an empty sum (f ≡ 0), as in the multi-tangent paper's code. Ackley
is not differentiable at its minimizer (a cone); its square root is clamped so the gradient
there is the zero subgradient instead of NaN.

Default start points: sphere (-1, ..., -1), Rosenbrock (-1, 0, ..., 0), Styblinski-Tang 0 (the
multi-tangent paper's code, Helmholtz-AI-Energy/frog, ``function_optimization``); Beale
(0, 0.5), fwdgrad's own choice (the public reproduction orobix/fwdgrad draws its start at
random, see ``fwdgrad optimize study=baydin``); the other 2-D functions start where the
multi-tangent paper's code starts them. Default step counts: 25,000 for Rosenbrock, 1,000 otherwise (paper's code).

Gradient descent on them with bp / fg / frog estimates: :mod:`fwdgrad.studies.descent`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

STYBLINSKI_TANG_MINIMIZER = -2.9035340277711783
STYBLINSKI_TANG_MINIMUM_PER_DIM = -39.16616570377141


def _sphere(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum(-1)


def _rosenbrock(x: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    head, tail = x[..., :-1], x[..., 1:]
    return (b * (tail - head.square()).square() + (a - head).square()).sum(-1)


def _styblinski_tang(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x.pow(4) - 16 * x.square() + 5 * x).sum(-1)


def _beale(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]
    return (1.5 - u + u * v).square() + (2.25 - u + u * v.square()).square() + (2.625 - u + u * v.pow(3)).square()


def _ackley(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]
    # clamp: the zero subgradient at the cone's tip instead of 0 * inf = NaN
    radius = (0.5 * (u.square() + v.square())).clamp_min(1e-30).sqrt()
    cosines = 0.5 * (torch.cos(2 * math.pi * u) + torch.cos(2 * math.pi * v))
    return -20 * torch.exp(-0.2 * radius) - torch.exp(cosines) + math.e + 20


def _goldstein_price(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]
    first = 1 + (u + v + 1).square() * (19 - 14 * u + 3 * u.square() - 14 * v + 6 * u * v + 3 * v.square())
    second = 30 + (2 * u - 3 * v).square() * (
        18 - 32 * u + 12 * u.square() + 48 * v - 36 * u * v + 27 * v.square()
    )
    return first * second


def _three_hump_camel(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]
    return 2 * u.square() - 1.05 * u.pow(4) + u.pow(6) / 6 + u * v + v.square()


def _egg_crate(x: torch.Tensor) -> torch.Tensor:
    u, v = x[..., 0], x[..., 1]
    return u.square() + v.square() + 25 * (torch.sin(u).square() + torch.sin(v).square())


@dataclass(frozen=True)
class TestFunction:
    """A closed-form function with its known minimum and default start.

    Attributes:
        name: the key in :data:`FUNCTIONS`.
        evaluate: ``(..., n) -> (...)``.
        minimizer_coordinates: x* as the value of every coordinate (n-D functions) or the
            full 2-D point.
        minimum_per_dim / minimum: f(x*) = ``minimum + minimum_per_dim * n``.
        start_coordinates: the default start: one value per coordinate, a 2-D point, or
            ``(first, rest)`` for Rosenbrock's (-1, 0, ..., 0).
        dim: 2 for the 2-D functions, ``None`` for any n.
        steps: the default number of gradient-descent steps.
        plot_box: ``((x_min, x_max), (y_min, y_max))`` for contour plots.
    """

    __test__ = False  # not a pytest class

    name: str
    evaluate: Callable[[torch.Tensor], torch.Tensor]
    minimizer_coordinates: tuple[float, ...]
    start_coordinates: tuple[float, ...]
    minimum: float = 0.0
    minimum_per_dim: float = 0.0
    dim: int | None = None
    steps: int = 1000
    plot_box: tuple[tuple[float, float], tuple[float, float]] = ((-5.0, 5.0), (-5.0, 5.0))
    start_first_then_rest: bool = field(default=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x)

    def check_dim(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"the dimension n must be an integer >= 1, got n={n!r}")
        if self.dim is not None and n != self.dim:
            raise ValueError(f"function {self.name!r} is defined for n={self.dim} only, got n={n}")

    def minimizer(self, n: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """x* of shape ``(n,)``."""
        self.check_dim(n)
        if self.dim is None:
            return torch.full((n,), self.minimizer_coordinates[0], dtype=dtype, device=device)
        return torch.tensor(self.minimizer_coordinates, dtype=dtype, device=device)

    def minimum_value(self, n: int) -> float:
        """f(x*) for dimension n."""
        self.check_dim(n)
        return self.minimum + self.minimum_per_dim * n

    def default_start(self, n: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The default start point, shape ``(n,)``."""
        self.check_dim(n)
        if self.start_first_then_rest:
            start = torch.full((n,), self.start_coordinates[1], dtype=dtype, device=device)
            start[0] = self.start_coordinates[0]
            return start
        if self.dim is None:
            return torch.full((n,), self.start_coordinates[0], dtype=dtype, device=device)
        return torch.tensor(self.start_coordinates, dtype=dtype, device=device)


FUNCTIONS: dict[str, TestFunction] = {
    function.name: function
    for function in (
        TestFunction("sphere", _sphere, (0.0,), (-1.0,), plot_box=((-2, 2), (-2, 2))),
        TestFunction(
            "rosenbrock", _rosenbrock, (1.0,), (-1.0, 0.0), steps=25_000, start_first_then_rest=True,
            plot_box=((-1.5, 1.5), (-0.5, 1.5)),
        ),
        TestFunction(
            "styblinski-tang", _styblinski_tang, (STYBLINSKI_TANG_MINIMIZER,), (0.0,),
            minimum_per_dim=STYBLINSKI_TANG_MINIMUM_PER_DIM,
        ),
        TestFunction("beale", _beale, (3.0, 0.5), (0.0, 0.5), dim=2, plot_box=((-0.5, 3.5), (-1.0, 1.5))),
        TestFunction("ackley", _ackley, (0.0, 0.0), (-20.0, 0.0), dim=2, steps=2500, plot_box=((-25, 25), (-25, 25))),
        TestFunction(
            "goldstein-price", _goldstein_price, (0.0, -1.0), (-1.0, -1.0), minimum=3.0, dim=2,
            plot_box=((-2, 2), (-3, 1)),
        ),
        TestFunction("three-hump-camel", _three_hump_camel, (0.0, 0.0), (-4.0, -4.0), dim=2, steps=5000),
        TestFunction("egg-crate", _egg_crate, (0.0, 0.0), (-4.0, -2.0), dim=2),
    )
}


def get_function(name: str) -> TestFunction:
    """The :class:`TestFunction` called ``name``; a clear error listing the choices otherwise."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; valid choices: {', '.join(FUNCTIONS)}")
    return FUNCTIONS[name]

