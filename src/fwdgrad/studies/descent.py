"""Batched gradient descent on the closed-form functions, with exact or forward-gradient estimates.

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
from dataclasses import dataclass

import torch

from fwdgrad.core.aggregation import (
    SCALING_CORRECTED,
    aggregate_flat,
    aggregation_coefficients,
    resolve_aggregation,
    scaling_correction_factor,
    solve_gram,
)
from fwdgrad.core.tangents import expected_tangent_norm, sample_flat_tangents


@dataclass(frozen=True)
class GradientSpec:
    """How to estimate the gradient: ``bp``, or a forward gradient with K tangents.

    ``aggregation`` is any of :data:`fwdgrad.core.aggregation.AGGREGATIONS` (``frog`` =
    ``orthogonal_projection``); ``sampler``/``normalize_tangents``/``angle``/``max_length`` as
    in :func:`fwdgrad.core.tangents.sample_flat_tangents`; ``scaling_correction`` as in
    :func:`fwdgrad.core.aggregation.aggregate`.
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
    :func:`fwdgrad.core.aggregation.solve_gram` (Cholesky in float64, eigenvalue pseudo-inverse
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
