"""Closed-form test functions and batched gradient descent on them (bp / fg / frog).

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

:func:`gradient_estimate` turns a batch of points into a batch of gradient estimates:
``bp`` by reverse mode (``torch.func.grad`` of Σ_s f(x_s)); ``fg`` / ``frog`` by forward mode
only: K tangents per point, V of shape ``(S, K, n)``, the directional derivatives
d_{s,k} = ∇f(x_s)·v_{s,k} from one ``vmap`` over K of ``torch.func.jvp`` (rows of x are
independent, so a ``(S, n)`` tangent gives S derivatives), then
:func:`aggregate_batched` per point (the library's aggregations; the projection solved on the
smaller Gram matrix). :func:`gradient_descent` runs
x <- x - lr ĝ(x) with per-run early stopping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fwdgrad.aggregation import (
    SCALING_CORRECTED,
    aggregate_flat,
    aggregation_coefficients,
    resolve_aggregation,
    scaling_correction_factor,
    solve_gram,
)
from fwdgrad.tangents import expected_tangent_norm, sample_flat_tangents

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


@dataclass(frozen=True)
class GradientSpec:
    """How to estimate the gradient: ``bp``, or a forward gradient with K tangents.

    ``aggregation`` is any of :data:`fwdgrad.aggregation.AGGREGATIONS` (``frog`` =
    ``orthogonal_projection``); ``sampler``/``normalize_tangents``/``angle``/``max_length`` as
    in :func:`fwdgrad.tangents.sample_flat_tangents`; ``scaling_correction`` as in
    :func:`fwdgrad.aggregation.aggregate`.
    """

    name: str = "fg"
    num_tangents: int = 1
    aggregation: str = "mean"
    sampler: str = "normal"
    normalize_tangents: bool = False
    scaling_correction: bool = False
    angle: float | None = None
    max_length: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ("bp", "fg", "frog"):
            raise ValueError(f"unknown gradient {self.name!r}; valid choices: bp, fg, frog")
        if self.name != "bp":
            if not isinstance(self.num_tangents, int) or isinstance(self.num_tangents, bool) or self.num_tangents < 1:
                raise ValueError(f"num_tangents must be an integer >= 1, got {self.num_tangents!r}")
            resolve_aggregation(self.aggregation)


def directional_derivatives(
    function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tangents: torch.Tensor
) -> torch.Tensor:
    """d_{s,k} = ∇f(x_s)·v_{s,k} by forward-mode AD (no backward pass).

    One ``torch.func.vmap`` over the K tangents of ``torch.func.jvp(f, (x,), (v_k,))``; rows
    of x are independent problems, so a ``(S, n)`` tangent gives S derivatives at once.

    Shapes: x ``(S, n)``, tangents ``(S, K, n)`` -> ``(S, K)``.
    """

    def along(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(function, (x,), (tangent,))[1]

    return torch.func.vmap(along, in_dims=1, out_dims=1)(tangents)


def aggregate_batched(
    tangents: torch.Tensor,
    derivatives: torch.Tensor,
    method: str,
    scaling_correction: bool = False,
    tangent_norm: float | None = None,
) -> torch.Tensor:
    """:func:`aggregate_flat` for a batch of small problems, with a fast projection.

    Shapes: tangents ``(S, K, n)``, derivatives ``(S, K)`` -> ``(S, n)``. Every method other
    than the projection goes to :func:`aggregate_flat` unchanged.

    The projection ĝ = V^+ d = V^T (V V^T)^+ d = P_U(g) is solved with
    :func:`fwdgrad.aggregation.solve_gram` (Cholesky in float64, eigenvalue pseudo-inverse
    fallback) on whichever Gram matrix is smaller, because the SVD route that
    :func:`aggregate_flat` takes for small batches costs seconds per sample at K, n ~ 10^3
    (and ~7 ms per step for S = 5, K = 16, n = 1024 in gradient descent):

    - K <= n: c = (V V^T)^+ d, ĝ = V^T c (the library's K×K route). G is formed in float32
      when K <= n/4 (cond(V) <= 3, so cond(G) <= 9) and in float64 otherwise, where
      cond(G) = cond(V)^2 defeats float32 (the reference code's 0.944 at K = n).
    - K > n: ĝ = (V^T V)^+ V^T d, the same pseudo-inverse from the n×n normal equations
      (V^T V ĝ = V^T d), in float64.
    """
    method = resolve_aggregation(method)
    if method != "orthogonal_projection":
        return aggregate_flat(
            tangents, derivatives, method, scaling_correction=scaling_correction, tangent_norm=tangent_norm
        )
    num_tangents, dim = tangents.shape[-2:]
    if num_tangents <= dim:
        precise = tangents if 4 * num_tangents <= dim else tangents.double()
        gram = (precise @ precise.transpose(-1, -2)).double()
        coefficients = aggregation_coefficients(method, derivatives.double(), gram=gram)
        estimate = (coefficients.to(precise.dtype).unsqueeze(-2) @ precise).squeeze(-2).to(tangents.dtype)
    else:
        tangents64 = tangents.double()
        normal_matrix = tangents64.transpose(-1, -2) @ tangents64
        right_side = (tangents64.transpose(-1, -2) @ derivatives.double().unsqueeze(-1)).squeeze(-1)
        estimate = solve_gram(normal_matrix, right_side).to(tangents.dtype)
    if scaling_correction:
        estimate = estimate * scaling_correction_factor(method, num_tangents, dim, tangent_norm)
    return estimate


def gradient_estimate(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    spec: GradientSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One gradient estimate per row of x: ``(S, n) -> (S, n)``.

    ``bp``: ∇f(x_s) by reverse mode (backprop). ``fg``/``frog``: V ~ sampler,
    ``(S, K, n)``; d = :func:`directional_derivatives` (forward mode);
    ĝ_s = aggregate(V_s, d_s) (e.g. mean: (1/K) Σ_k d_{s,k} v_{s,k}; frog: V_s^T (V_s V_s^T)^+ d_s).
    """
    if spec.name == "bp":
        return torch.func.grad(lambda point: function(point).sum())(x)
    num_points, dim = x.shape
    tangents = sample_flat_tangents(
        spec.num_tangents, dim, spec.sampler, batch_shape=(num_points,), generator=generator,
        device=x.device, dtype=x.dtype, normalize=spec.normalize_tangents, angle=spec.angle,
        max_length=spec.max_length,
    )
    derivatives = directional_derivatives(function, x, tangents)
    method = resolve_aggregation(spec.aggregation)
    tangent_norm = None
    if spec.scaling_correction and method in SCALING_CORRECTED and method != "orthogonal_projection":
        tangent_norm = expected_tangent_norm(spec.sampler, dim, spec.normalize_tangents)
    return aggregate_batched(
        tangents, derivatives, method, scaling_correction=spec.scaling_correction, tangent_norm=tangent_norm
    )


@dataclass
class DescentResult:
    """What :func:`gradient_descent` records, for S runs side by side.

    values: ``(T+1, S)`` f(x_t), NaN after a run stopped; positions: ``(T+1, S, n)`` when
    recorded (else ``None``); wall_time: ``(T+1,)`` seconds since the start (shared by all S
    runs, which advance together); last_step: ``(S,)`` the last step each run took;
    final: ``(S, n)`` the last point of each run; distances: ``(T+1, S)`` ||x_t - x*|| when
    a minimizer was given (NaN after a run stopped).
    """

    values: torch.Tensor
    wall_time: torch.Tensor
    last_step: torch.Tensor
    final: torch.Tensor
    positions: torch.Tensor | None = None
    distances: torch.Tensor | None = None

    @staticmethod
    def side_by_side(results: Sequence[DescentResult]) -> DescentResult:
        """Runs made separately, as one result: runs concatenated, the shorter padded with NaN
        (their wall time: the longest run's, held after it ended)."""
        length = max(r.values.shape[0] for r in results)

        def pad(tensor: torch.Tensor | None, value: float = math.nan) -> torch.Tensor | None:
            if tensor is None:
                return None
            extra = torch.full((length - tensor.shape[0], *tensor.shape[1:]), value, dtype=tensor.dtype)
            return torch.cat([tensor, extra])

        longest = max(results, key=lambda r: r.values.shape[0]).wall_time
        return DescentResult(
            values=torch.cat([pad(r.values) for r in results], dim=1),
            wall_time=longest,
            last_step=torch.cat([r.last_step for r in results]),
            final=torch.cat([r.final for r in results]),
            positions=None if results[0].positions is None else torch.cat([pad(r.positions) for r in results], dim=1),
            distances=None if results[0].distances is None else torch.cat([pad(r.distances) for r in results], dim=1),
        )


def gradient_descent(
    function: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    spec: GradientSpec,
    lr: float,
    steps: int,
    patience: int = 0,
    generator: torch.Generator | None = None,
    record_positions: bool = False,
    minimizer: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> DescentResult:
    """Plain gradient descent x_{t+1} = x_t - lr ĝ(x_t) for S runs at once.

    A run stops (its point is frozen, later values NaN) when f(x_t) is NaN or, with
    ``patience`` > 0, after ``patience`` consecutive steps with f(x_{t+1}) >= f(x_t) (the
    multi-tangent paper's early stopping). The loop ends when all runs stopped or after
    ``steps`` steps.

    Args:
        start: ``(S, n)`` start points (one per run; repeat one point for S seeds).
        minimizer: ``(n,)`` x*; if given, ||x_t - x*|| is recorded every step.
        progress: called with the number of steps just taken (e.g. ``tqdm.update``).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if start.dim() != 2:
        raise ValueError(f"start must have shape (S, n), got {tuple(start.shape)}")
    x = start.clone()
    num_runs = x.shape[0]
    values = torch.full((steps + 1, num_runs), math.nan, dtype=x.dtype)
    wall_time = torch.zeros(steps + 1, dtype=torch.float64)
    positions = torch.full((steps + 1, *x.shape), math.nan, dtype=x.dtype) if record_positions else None
    with torch.no_grad():
        current = function(x)
    values[0] = current
    if positions is not None:
        positions[0] = x
    distances = None
    if minimizer is not None:
        distances = torch.full((steps + 1, num_runs), math.nan, dtype=x.dtype)
        distances[0] = torch.linalg.vector_norm(x - minimizer, dim=-1)
    active = torch.isfinite(current)
    last_step = torch.zeros(num_runs, dtype=torch.long)
    without_improvement = torch.zeros(num_runs, dtype=torch.long)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        if not active.any():
            wall_time = wall_time[:step]
            values = values[:step]
            positions = positions[:step] if positions is not None else None
            distances = distances[:step] if distances is not None else None
            break
        estimate = gradient_estimate(function, x, spec, generator)
        with torch.no_grad():
            x = torch.where(active.unsqueeze(-1), x - lr * estimate, x)
            new = function(x)
        values[step] = torch.where(active, new, torch.full_like(new, math.nan))
        if positions is not None:
            positions[step] = torch.where(active.unsqueeze(-1), x, torch.full_like(x, math.nan))
        if distances is not None:
            distance = torch.linalg.vector_norm(x - minimizer, dim=-1)
            distances[step] = torch.where(active, distance, torch.full_like(distance, math.nan))
        last_step = torch.where(active, torch.full_like(last_step, step), last_step)
        without_improvement = torch.where(new >= current, without_improvement + 1, torch.zeros_like(last_step))
        current = new
        stop = ~torch.isfinite(new)
        if patience > 0:
            stop |= without_improvement >= patience
        active &= ~stop
        wall_time[step] = time.perf_counter() - began
        if progress is not None:
            progress(1)
    return DescentResult(
        values=values, wall_time=wall_time, last_step=last_step, final=x, positions=positions, distances=distances
    )


def repeat_start(start: torch.Tensor | Sequence[float], num_runs: int) -> torch.Tensor:
    """``(n,)`` -> ``(num_runs, n)``: the same start for every run (seed)."""
    start = torch.as_tensor(start)
    return start.unsqueeze(0).expand(num_runs, -1).clone()
