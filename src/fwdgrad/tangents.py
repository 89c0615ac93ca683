"""Tangent samplers: K directions v_1, ..., v_K along which forward mode differentiates.

A tangent always lives in the *flattened* parameter space R^n, n = sum of the numbers of
elements of all parameter tensors. :func:`sample_flat_tangents` draws a ``(K, n)`` matrix V
whose rows are the tangents; :func:`sample_tangents` draws the same matrix and hands it back
split into one ``(K, *shape)`` view per parameter tensor, so normalization, linear
independence and the standard basis always refer to the whole parameter vector.

Samplers (Flügel et al. 2024, "Beyond Backpropagation: Optimization with Multi-Tangent
Forward Gradients", Sections 3 and 4.3):

- ``normal``: v_k ~ N(0, I_n). E[v v^T] = I, so (∇f·v) v is an unbiased gradient estimate
  (Baydin et al. 2022).
- ``rademacher``: entries uniform on {-1, +1}. Also E[v v^T] = I.
- ``standard_basis``: v_k = e_k, the first K unit vectors of R^n (needs K <= n).
- ``angle``: unit tangents; v_1 = u uniform on the sphere, and for k >= 2
  v_k = cos(θ) u + sin(θ) w_k with w_k a random unit vector orthogonal to u, so every
  tangent is at angle θ (degrees) to the first.
- ``varying_length``: K distinct random standard-basis directions (hence orthogonal) with
  lengths drawn uniformly from [1, max_length] (needs K <= n).

Post-processing: ``normalize=True`` divides each tangent by its norm over all n entries;
``ensure_independent=True`` resamples until the K tangents are linearly independent
(rank K, which needs K <= n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SAMPLERS = ("normal", "rademacher", "standard_basis", "angle", "varying_length")


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown tangent sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}")


def _check_num_tangents(num_tangents: int) -> None:
    if not isinstance(num_tangents, int) or isinstance(num_tangents, bool) or num_tangents < 1:
        raise ValueError(f"num_tangents must be an integer >= 1, got {num_tangents!r}")


def _random_unit_rows(shape, generator, device, dtype) -> torch.Tensor:
    rows = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True)


def _draw(num_tangents, dim, sampler, batch_shape, generator, device, dtype, angle, max_length):
    shape = (*batch_shape, num_tangents, dim)
    if sampler == "normal":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if sampler == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.int8)
        return bits.to(dtype).mul_(2).sub_(1)
    if sampler == "standard_basis":
        eye = torch.eye(num_tangents, dim, device=device, dtype=dtype)
        return eye.expand(shape).clone()
    if sampler == "angle":
        theta = math.radians(angle)
        base = _random_unit_rows((*batch_shape, 1, dim), generator, device, dtype)
        others = torch.randn((*batch_shape, num_tangents - 1, dim), generator=generator, device=device, dtype=dtype)
        # Gram-Schmidt against the first tangent only: the others need not be orthogonal
        # to each other, exactly as in the paper's custom-angle study.
        others = others - (others * base).sum(-1, keepdim=True) * base
        others = others / torch.linalg.vector_norm(others, dim=-1, keepdim=True)
        return torch.cat([base, math.cos(theta) * base + math.sin(theta) * others], dim=-2)
    # varying_length: K distinct random coordinates per batch element, scaled.
    scores = torch.rand((*batch_shape, dim), generator=generator, device=device)
    coordinates = scores.argsort(dim=-1)[..., :num_tangents]
    lengths = 1 + (max_length - 1) * torch.rand(
        (*batch_shape, num_tangents), generator=generator, device=device, dtype=dtype
    )
    tangents = torch.zeros(shape, device=device, dtype=dtype)
    tangents.scatter_(-1, coordinates.unsqueeze(-1), lengths.unsqueeze(-1))
    return tangents


def _linearly_independent(tangents: torch.Tensor) -> torch.Tensor:
    """Boolean ``batch_shape`` mask: do the K rows of each ``(K, n)`` matrix have rank K?"""
    num_tangents = tangents.shape[-2]
    return torch.linalg.matrix_rank(tangents.double()) == num_tangents


def sample_flat_tangents(
    num_tangents: int,
    dim: int,
    sampler: str = "normal",
    *,
    batch_shape: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    normalize: bool = False,
    angle: float | None = None,
    max_length: float | None = None,
    ensure_independent: bool = False,
    max_resamples: int = 100,
) -> torch.Tensor:
    """Draw K tangents in R^n as the rows of a matrix V.

    Args:
        num_tangents: K >= 1.
        dim: n >= 1, the dimension of the flattened parameter space.
        sampler: one of :data:`SAMPLERS` (see the module docstring for the distributions).
        batch_shape: leading dimensions of independent draws (e.g. many Monte-Carlo samples).
        generator: a ``torch.Generator`` on ``device``; the global RNG when ``None``.
        device, dtype: of the result (default: CPU, ``torch.get_default_dtype()``).
        normalize: divide every tangent by its Euclidean norm, v_k <- v_k / ||v_k||.
        angle: degrees in (0, 180), required by ``sampler="angle"``.
        max_length: >= 1, required by ``sampler="varying_length"``.
        ensure_independent: resample (up to ``max_resamples`` times) every draw whose K
            tangents are linearly dependent.

    Returns:
        V of shape ``(*batch_shape, K, n)``.
    """
    _check_sampler(sampler)
    _check_num_tangents(num_tangents)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"the tangent dimension must be an integer >= 1, got {dim!r}")
    if sampler in ("standard_basis", "varying_length") and num_tangents > dim:
        raise ValueError(
            f"sampler={sampler!r} draws distinct basis directions, so it needs num_tangents <= {dim} "
            f"(the number of parameters), got num_tangents={num_tangents}"
        )
    if sampler == "angle" and (angle is None or not 0 < angle < 180):
        raise ValueError(f"sampler='angle' needs angle in degrees, 0 < angle < 180; got angle={angle!r}")
    if sampler == "angle" and dim < 2 and num_tangents > 1:
        raise ValueError("sampler='angle' needs at least 2 parameters to place tangents at an angle")
    if sampler == "varying_length" and (max_length is None or max_length < 1):
        raise ValueError(f"sampler='varying_length' needs max_length >= 1; got max_length={max_length!r}")
    if ensure_independent and num_tangents > dim:
        raise ValueError(
            f"ensure_independent=True cannot hold: {num_tangents} tangents in a space of dimension {dim} "
            "are always linearly dependent"
        )
    dtype = dtype or torch.get_default_dtype()
    batch_shape = tuple(batch_shape)
    draw_args = (num_tangents, dim, sampler)
    draw_kwargs = dict(generator=generator, device=device, dtype=dtype, angle=angle, max_length=max_length)
    tangents = _draw(*draw_args, batch_shape, **draw_kwargs)
    if ensure_independent:
        for _ in range(max_resamples):
            dependent = ~_linearly_independent(tangents)
            if not dependent.any():
                break
            count = int(dependent.sum())
            tangents[dependent] = _draw(*draw_args, (count,), **draw_kwargs)
        else:
            raise RuntimeError(
                f"sampler={sampler!r} gave linearly dependent tangents after {max_resamples} resamples"
            )
    if normalize:
        tangents = tangents / torch.linalg.vector_norm(tangents, dim=-1, keepdim=True)
    return tangents


def split_flat(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split ``(*lead, n)`` into views of shape ``(*lead, *shape)``, one per entry of ``shapes``."""
    sizes = [math.prod(shape) for shape in shapes]
    lead = flat.shape[:-1]
    return [part.reshape(*lead, *shape) for part, shape in zip(flat.split(sizes, dim=-1), shapes)]


def sample_tangents(
    num_tangents: int,
    shapes: Sequence[Sequence[int]],
    sampler: str = "normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    normalize: bool = False,
    **sampler_kwargs,
) -> list[torch.Tensor]:
    """Draw K tangents over several parameter tensors, as one tensor per parameter.

    The tangents are drawn jointly in R^n, n = sum(prod(shape) for shape in shapes), by
    :func:`sample_flat_tangents` (which takes ``angle``, ``max_length``,
    ``ensure_independent``, ``max_resamples`` as keyword arguments), then split.

    Returns:
        A list with one tensor of shape ``(K, *shape)`` per entry of ``shapes``.
    """
    shapes = [torch.Size(shape) for shape in shapes]
    dim = sum(math.prod(shape) for shape in shapes)
    flat = sample_flat_tangents(
        num_tangents, dim, sampler, generator=generator, device=device, dtype=dtype,
        normalize=normalize, **sampler_kwargs,
    )
    return split_flat(flat, shapes)


def expected_chi(dof: int) -> float:
    """E[χ_m] = sqrt(2) Γ((m+1)/2) / Γ(m/2): the expected norm of an m-dim N(0, I) vector."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))


def expected_tangent_norm(sampler: str, dim: int, normalize: bool = False) -> float:
    """E||v|| for the given sampler in R^n, as the scaling correction needs it.

    ``normalize`` or ``standard_basis``/``angle``: 1; ``normal``: E[χ_n];
    ``rademacher``: sqrt(n). ``varying_length`` has no fixed expectation here.
    """
    _check_sampler(sampler)
    if normalize or sampler in ("standard_basis", "angle"):
        return 1.0
    if sampler == "normal":
        return expected_chi(dim)
    if sampler == "rademacher":
        return math.sqrt(dim)
    raise ValueError(
        f"the scaling correction needs the expected tangent norm, which is not defined for "
        f"sampler={sampler!r}; use normalize=True or one of normal, rademacher, standard_basis, angle"
    )
