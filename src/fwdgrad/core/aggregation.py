"""Aggregation: K directional derivatives d_k = ∇f·v_k  ->  one gradient estimate g.

Every aggregation of Flügel et al. 2024 ("Beyond Backpropagation: Optimization with
Multi-Tangent Forward Gradients", Section 3) is a linear combination of the tangents,

    g = Σ_k c_k v_k = V^T c,

with coefficients c ∈ R^K that depend on d and on the tangents' Gram matrix G = V V^T:

===========================  ====================================================
method                       coefficients c
===========================  ====================================================
``sum``                      c = d                       (Σ_k g_k, g_k = d_k v_k)
``mean``                     c = d / K
``mean_times_dim``           c = n d / K                 (unbiased for unit tangents)
``max``                      c = d_j e_j,  j = argmax_k |d_k|
``max_normalized``           c = d_j e_j,  j = argmax_k |d_k| / ||v_k||  (best cosine)
``mean_of_top_k``            c = d ⊙ m / Σ m,  m_k = [|cos_k| >= max_j |cos_j| - tol],
                             cos_k = d_k / ||v_k||  (up to the common factor ||∇f||)
``orthogonal_projection``    c = G^+ d, so g = V^T (V V^T)^+ V ∇f = P_U(∇f),
(alias ``frog``)             the orthogonal projection of ∇f onto U = span(v_1..v_K)
===========================  ====================================================

The projection is *global*: V is the tangent matrix over all parameter tensors together.
It is solved stably, never with an explicit inverse. The K×K Gram matrix is accumulated
over the tensors and solved in float64 by Cholesky (an eigenvalue pseudo-inverse when the
tangents are linearly dependent or K > n) when it is well conditioned (cond <= 100, which
random tangents with K << n always are). Otherwise, for small problems (B·K·n <= 2^22
entries), g comes from a float64 SVD of V itself, g = U_r S_r^{-1} W_r^T d (the
pseudo-inverse V^+ d, so its accuracy follows cond(V), not cond(V)^2), and for large ones
from a Gram matrix accumulated in float64.
Either way the result is the least-squares projection onto the span of the tangents.

``mean_of_top_k`` divides by the number of selected tangents (the reference code of the
paper divides by K, which shrinks the update whenever fewer than K are selected).

Scaling correction (paper, Section 3.3): rescale g so that E||g|| = ||∇f|| under random
tangents of expected norm L = E||v||, with E[χ_m] = sqrt(2) Γ((m+1)/2) / Γ(m/2):

- ``orthogonal_projection``: ||P_U ∇f|| / ||∇f|| = sqrt(Beta(K/2, (n-K)/2)) for a random
  K-dim subspace, whose mean is E[χ_K] / E[χ_n]; factor E[χ_n] / E[χ_K] (1 if K >= n).
- ``mean``: expected relative length L^2 a, a = sqrt(2/(π n)) for K = 1 and
  a = sqrt((n+K)/(1+K)) / n for K > 1; factor 1 / (L^2 a).
- ``sum``: factor (1/K) × the ``mean`` factor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from fwdgrad.core.tangents import expected_chi

AGGREGATIONS = (
    "sum",
    "mean",
    "mean_times_dim",
    "max",
    "max_normalized",
    "mean_of_top_k",
    "orthogonal_projection",
)
ALIASES = {"frog": "orthogonal_projection"}
SCALING_CORRECTED = ("sum", "mean", "orthogonal_projection")
# The projection is solved from the K×K Gram matrix (products in the tangents' dtype, solve
# in float64) when that matrix is well conditioned — random tangents with K << n always
# are: cond(G) ≈ ((√n + √K) / (√n − √K))² — since the solution's relative error is about
# cond(G)·eps. Otherwise (K near n, nearly dependent tangents) it is solved from a float64
# copy of V by SVD when V has at most this many entries (all batch elements together), and
# else from a Gram matrix accumulated in float64.
PRECISE_PROJECTION_MAX_ENTRIES = 2**22
WELL_CONDITIONED_GRAM = 1e2


def resolve_aggregation(method: str) -> str:
    """Canonical name of an aggregation method (``frog`` -> ``orthogonal_projection``)."""
    method = ALIASES.get(method, method)
    if method not in AGGREGATIONS:
        valid = ", ".join([*AGGREGATIONS, *ALIASES])
        raise ValueError(f"unknown aggregation {method!r}; valid choices: {valid}")
    return method


def check_top_k_tolerance(top_k_tolerance: float) -> None:
    """ValueError unless ``mean_of_top_k``'s cosine margin is a finite number >= 0.

    A negative margin selects no tangent at all (c = 0 / 0), NaN selects none either.
    """
    if type(top_k_tolerance) in (float, int) and 0 <= top_k_tolerance < math.inf:
        return  # the common case, without an ABC isinstance check on every step
    valid = isinstance(top_k_tolerance, numbers.Real) and not isinstance(top_k_tolerance, bool)
    if not (valid and math.isfinite(top_k_tolerance) and top_k_tolerance >= 0):
        raise ValueError(
            f"top_k_tolerance must be a finite number >= 0 (the cosine margin of mean_of_top_k; valid range "
            f"[0, inf)), got {top_k_tolerance!r}"
        )


def scaling_correction_factor(method: str, num_tangents: int, dim: int, tangent_norm: float | None) -> float:
    """The chi-distribution scaling correction of the paper (see the module docstring).

    Args:
        method: ``sum``, ``mean`` or ``orthogonal_projection``.
        num_tangents: K.
        dim: n.
        tangent_norm: L = E||v||, needed by ``sum`` and ``mean``
            (:func:`fwdgrad.core.tangents.expected_tangent_norm`).
    """
    method = resolve_aggregation(method)
    if method == "orthogonal_projection":
        return 1.0 if num_tangents >= dim else expected_chi(dim) / expected_chi(num_tangents)
    if method not in SCALING_CORRECTED:
        raise ValueError(
            f"the scaling correction is defined for {', '.join(SCALING_CORRECTED)}; got aggregation={method!r}"
        )
    if tangent_norm is None:
        raise ValueError(f"the scaling correction of aggregation={method!r} needs tangent_norm = E||v||")
    if num_tangents == 1:
        relative_length = math.sqrt(2 / (math.pi * dim))
    else:
        relative_length = math.sqrt((dim + num_tangents) / (1 + num_tangents)) / dim
    factor = 1.0 / (tangent_norm**2 * relative_length)
    return factor / num_tangents if method == "sum" else factor


def _pseudo_solve(gram: torch.Tensor, rhs: torch.Tensor, relative_tolerance: float) -> torch.Tensor:
    """c = G^+ rhs for symmetric PSD G (…, K, K), eigenvalues below tol·λ_max dropped."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    cutoff = eigenvalues[..., -1:].clamp_min(0) * relative_tolerance
    inverse = torch.where(eigenvalues > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    projected = (eigenvectors.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
    return (eigenvectors @ (inverse * projected).unsqueeze(-1)).squeeze(-1)


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Least-squares solution c = G^+ rhs of the K×K Gram system, in float64.

    Cholesky when G is positive definite; an eigenvalue pseudo-inverse otherwise (linearly
    dependent tangents, K > n). ``gram_dtype`` is the precision G was accumulated in: it
    sets the cut-off below which eigenvalues count as zero.

    Shapes: gram ``(..., K, K)``, rhs ``(..., K)`` -> ``(..., K)`` float64.
    """
    gram = gram.double()
    rhs = rhs.double()
    factor, info = torch.linalg.cholesky_ex(gram)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(solution).all(-1)
    if bad.any():
        tolerance = gram.shape[-1] * torch.finfo(gram_dtype).eps * 10
        solution = torch.where(bad.unsqueeze(-1), _pseudo_solve(gram, rhs, tolerance), solution)
    return solution


def _projection_flat(tangents: torch.Tensor, directional_derivatives: torch.Tensor) -> torch.Tensor:
    """g = V^+ d in float64 via the SVD of V; shapes (B, K, n), (B, K) -> (B, n)."""
    tangents = tangents.double()
    left, singular, right_h = torch.linalg.svd(tangents, full_matrices=False)
    cutoff = singular[..., :1] * max(tangents.shape[-2:]) * torch.finfo(torch.float64).eps
    inverse = torch.where(singular > cutoff, 1.0 / singular, torch.zeros_like(singular))
    weights = inverse * (left.transpose(-1, -2) @ directional_derivatives.double().unsqueeze(-1)).squeeze(-1)
    return (right_h.transpose(-1, -2) @ weights.unsqueeze(-1)).squeeze(-1)


def _well_conditioned(gram: torch.Tensor) -> bool:
    """Is every K×K Gram matrix of the batch positive definite with cond <= WELL_CONDITIONED_GRAM?"""
    eigenvalues = torch.linalg.eigvalsh(gram)
    smallest, largest = eigenvalues[..., 0], eigenvalues[..., -1]
    return bool((smallest > 0).all() and (largest <= WELL_CONDITIONED_GRAM * smallest).all())


def _as_batched(tangents: Sequence[torch.Tensor], directional_derivatives: torch.Tensor):
    """Views of the tangents as (B, K, m_i) and d as (B, K) for d of shape (K, *batch)."""
    num_tangents = directional_derivatives.shape[0]
    batch_shape = directional_derivatives.shape[1:]
    batch = math.prod(batch_shape)
    views = []
    for tangent in tangents:
        if tangent.shape[: 1 + len(batch_shape)] != directional_derivatives.shape:
            raise ValueError(
                f"a tangent of shape {tuple(tangent.shape)} does not start with the directional "
                f"derivatives' shape (K, *batch) = {tuple(directional_derivatives.shape)}"
            )
        views.append(tangent.reshape(num_tangents, batch, -1).transpose(0, 1))
    return views, directional_derivatives.reshape(num_tangents, batch).transpose(0, 1)


def aggregation_coefficients(
    method: str,
    directional_derivatives: torch.Tensor,
    squared_norms: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    dim: int | None = None,
    top_k_tolerance: float = 0.1,
) -> torch.Tensor:
    """Coefficients c with g = V^T c (see the module docstring's table).

    Args:
        method: one of :data:`AGGREGATIONS` (or an alias).
        directional_derivatives: d, shape ``(..., K)``.
        squared_norms: ||v_k||^2, shape ``(..., K)``; needed by ``max_normalized`` and
            ``mean_of_top_k``.
        gram: G = V V^T, shape ``(..., K, K)``; needed by ``orthogonal_projection``.
        dim: n; needed by ``mean_times_dim``.
        top_k_tolerance: the cosine margin of ``mean_of_top_k``, a finite number >= 0.

    Returns:
        c of shape ``(..., K)``.
    """
    method = resolve_aggregation(method)
    check_top_k_tolerance(top_k_tolerance)
    d = directional_derivatives
    num_tangents = d.shape[-1]
    if method == "sum":
        return d
    if method == "mean":
        return d / num_tangents
    if method == "mean_times_dim":
        return d * (dim / num_tangents)
    if method == "orthogonal_projection":
        return solve_gram(gram, d).to(d.dtype)
    if method == "max":
        scores = d.abs()
    else:
        scores = d.abs() / squared_norms.sqrt()
    if method == "mean_of_top_k":
        mask = scores >= scores.amax(-1, keepdim=True) - top_k_tolerance
        return d * mask / mask.sum(-1, keepdim=True)
    best = scores.argmax(-1, keepdim=True)
    return torch.zeros_like(d).scatter_(-1, best, d.gather(-1, best))


def aggregate(
    tangents: Sequence[torch.Tensor],
    directional_derivatives: torch.Tensor,
    method: str = "mean",
    scaling_correction: bool = False,
    tangent_norm: float | None = None,
    top_k_tolerance: float = 0.1,
) -> list[torch.Tensor]:
    """Turn K directional derivatives into one gradient estimate per parameter tensor.

    The tangent is the concatenation of all tensors: n = Σ_i ``numel(tangents[i][0])``.

    Args:
        tangents: V split by parameter, each of shape ``(K, *shape_i)``; or, for a batch of
            independent problems (e.g. one per sample), ``(K, *batch, *shape_i)``.
        directional_derivatives: d_k = ∇f·v_k, shape ``(K,)`` or ``(K, *batch)``.
        method: one of :data:`AGGREGATIONS` or ``frog``.
        scaling_correction: multiply by :func:`scaling_correction_factor`.
        tangent_norm: E||v|| for the scaling correction of ``sum`` and ``mean``.
        top_k_tolerance: the cosine margin of ``mean_of_top_k``, a finite number >= 0.

    Returns:
        One tensor per parameter, of shape ``shape_i`` (or ``(*batch, *shape_i)``), in the
        tangents' dtype.
    """
    return _aggregate(tangents, directional_derivatives, method, scaling_correction, tangent_norm, top_k_tolerance)[0]


def _aggregate(tangents, directional_derivatives, method, scaling_correction, tangent_norm, top_k_tolerance):
    """:func:`aggregate`'s estimate, and the coefficients c ``(B, K)`` (float64, scaling factor
    included) of g = V^T c; c is ``None`` where g came from the SVD of V instead."""
    method = resolve_aggregation(method)
    check_top_k_tolerance(top_k_tolerance)
    directional_derivatives = torch.as_tensor(directional_derivatives)
    if directional_derivatives.dim() == 0:
        raise ValueError("directional_derivatives must have shape (K,) or (K, *batch), got a scalar")
    num_tangents = directional_derivatives.shape[0]
    batch_shape = directional_derivatives.shape[1:]
    views, d = _as_batched(tangents, directional_derivatives)
    dim = sum(view.shape[-1] for view in views)
    batch = d.shape[0]
    gram = squared_norms = None
    if method == "orthogonal_projection":
        gram = sum((view @ view.transpose(-1, -2)).double() for view in views)
        if not _well_conditioned(gram):
            if batch * num_tangents * dim <= PRECISE_PROJECTION_MAX_ENTRIES:
                gram = None
            else:
                gram = sum(view.double() @ view.double().transpose(-1, -2) for view in views)
    coefficients = None
    if method == "orthogonal_projection" and gram is None:
        flat = _projection_flat(torch.cat([view.double() for view in views], dim=-1), d)
        parts = flat.split([view.shape[-1] for view in views], dim=-1)
    else:
        if method in ("max_normalized", "mean_of_top_k"):
            squared_norms = sum(view.double().square().sum(-1) for view in views)
        coefficients = aggregation_coefficients(
            method, d.double(), squared_norms=squared_norms, gram=gram, dim=dim, top_k_tolerance=top_k_tolerance
        )
        parts = [(coefficients.to(view.dtype).unsqueeze(-2) @ view).squeeze(-2) for view in views]
    if scaling_correction:
        factor = scaling_correction_factor(method, num_tangents, dim, tangent_norm)
        parts = [part * factor for part in parts]
        coefficients = None if coefficients is None else coefficients * factor
    estimate = [
        part.to(tangent.dtype).reshape(*batch_shape, *tangent.shape[1 + len(batch_shape):])
        for part, tangent in zip(parts, tangents)
    ]
    return estimate, coefficients


def aggregate_flat(
    tangents: torch.Tensor,
    directional_derivatives: torch.Tensor,
    method: str = "mean",
    scaling_correction: bool = False,
    tangent_norm: float | None = None,
    top_k_tolerance: float = 0.1,
) -> torch.Tensor:
    """:func:`aggregate` for flat tangent matrices with leading batch dimensions.

    Shapes: tangents V ``(*batch, K, n)``, directional derivatives ``(*batch, K)``;
    returns g ``(*batch, n)``.
    """
    return aggregate_flat_with_coefficients(
        tangents, directional_derivatives, method, scaling_correction, tangent_norm, top_k_tolerance
    )[0]


def aggregate_flat_with_coefficients(
    tangents: torch.Tensor,
    directional_derivatives: torch.Tensor,
    method: str = "mean",
    scaling_correction: bool = False,
    tangent_norm: float | None = None,
    top_k_tolerance: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`aggregate_flat`, and the coefficients c of its estimate g = V^T c.

    Returns:
        ``(g (*batch, n), c (*batch, K))``: c in float64, the scaling correction included;
        ``None`` when g came from the SVD of V (ill-conditioned small projections), not as V^T c.
    """
    if tangents.dim() < 2 or tangents.shape[:-1] != directional_derivatives.shape:
        raise ValueError(
            f"tangents of shape (*batch, K, n) and directional derivatives of shape (*batch, K) expected, "
            f"got {tuple(tangents.shape)} and {tuple(directional_derivatives.shape)}"
        )
    batch_ndim = tangents.dim() - 2
    (estimate,), coefficients = _aggregate(
        [tangents.movedim(-2, 0)],
        directional_derivatives.movedim(-1, 0),
        method,
        scaling_correction,
        tangent_norm,
        top_k_tolerance,
    )
    assert estimate.dim() == batch_ndim + 1
    if coefficients is not None:
        coefficients = coefficients.reshape(directional_derivatives.shape)
    return estimate, coefficients
