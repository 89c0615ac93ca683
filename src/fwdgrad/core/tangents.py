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
- ``rademacher``: entries uniform on {-1, +1}. Also E[v v^T] = I. Drawn from packed random
  bits: 64 random bits per int64 word, each bit written straight into the sign bit of a
  float32 1.0 (about 10× cheaper on the CPU than ``torch.randn`` of the same size).
- ``rank1``: for every parameter matrix W (ndim >= 2, viewed as ``(shape[0], rest)``)
  v_W = u w^T with u ~ N(0, I_{shape[0]}), w ~ N(0, I_rest) independent; vectors (biases)
  get N(0, I) entries. E[(u w^T)_ij (u w^T)_kl] = E[u_i u_k] E[w_j w_l] = δ_ik δ_jl, so
  again E[v v^T] = I and (∇f·v) v stays unbiased, with only O(d_out + d_in) random
  numbers per layer (the cheapest sampler on the CPU). Needs the parameter shapes
  (:func:`sample_tangents`, or ``shapes=`` of :func:`sample_flat_tangents`); without them
  the flat space is one vector and ``rank1`` equals ``normal``.
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

from fwdgrad.core.memory import check_fits, element_size

SAMPLERS = ("normal", "rademacher", "rank1", "standard_basis", "angle", "varying_length")
# Samplers whose K tangents are independent draws: a chunk of them can be regenerated
# from its own seed without the others (ForwardGradient's stored-free tangents).
INDEPENDENT_SAMPLERS = ("normal", "rademacher", "rank1")


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown tangent sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}")


def _check_num_tangents(num_tangents: int) -> None:
    if not isinstance(num_tangents, int) or isinstance(num_tangents, bool) or num_tangents < 1:
        raise ValueError(f"num_tangents must be an integer >= 1, got {num_tangents!r}")


def _random_unit_rows(shape, generator, device, dtype) -> torch.Tensor:
    rows = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True)


_SIGN_BIT = -(2**31)  # 0x80000000 as an int32
_FLOAT32_ONE = 0x3F800000  # the bit pattern of 1.0f


def rademacher_from_bits(shape: Sequence[int], generator=None, device=None, dtype=None) -> torch.Tensor:
    """Entries uniform on {-1, +1}, one random bit each.

    ``ceil(N / 64)`` int64 words of uniform random bits (``random_`` over the full 64-bit
    range) are viewed as int32; bit j of a word, shifted into bit 31, becomes the sign bit
    of the float32 1.0 (0x3F800000), so no float arithmetic touches the N entries.
    """
    dtype = dtype or torch.get_default_dtype()
    count = math.prod(shape)
    words = torch.empty((count + 63) // 64, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # every int64, each bit uniform
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    signs = (words.view(torch.int32).unsqueeze(-1) << shifts).bitwise_and_(_SIGN_BIT).bitwise_or_(_FLOAT32_ONE)
    entries = signs.view(-1)[:count].view(torch.float32).reshape(shape)
    return entries if dtype == torch.float32 else entries.to(dtype)


def rank1_layout(shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(rows, cols) per parameter for ``rank1``: matrices (ndim >= 2) are ``(shape[0], rest)``,
    tensors of fewer dims are ``(numel, 0)`` (dense N(0, I) entries, no second factor)."""
    return [(s[0], math.prod(s[1:])) if len(s) >= 2 else (math.prod(s), 0) for s in shapes]


def rank1_factors(lead: Sequence[int], shapes, generator=None, device=None, dtype=None) -> torch.Tensor:
    """The N(0, I) factors of ``rank1`` tangents, ``(*lead, Σ rows + Σ cols)``.

    Per parameter, in order: u (rows entries) then w (cols entries); see :func:`rank1_layout`.
    """
    size = sum(rows + cols for rows, cols in rank1_layout(shapes))
    entries = size * math.prod(lead)
    check_fits(entries * element_size(dtype), device, f"{entries:,} rank-1 tangent factors", "lower num_tangents")
    return torch.randn((*lead, size), generator=generator, device=device, dtype=dtype)


def split_rank1_factors(factors: torch.Tensor, shapes) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Views ``(u (*lead, rows), w (*lead, cols) or None)`` per parameter of :func:`rank1_factors`."""
    parts, offset = [], 0
    for rows, cols in rank1_layout(shapes):
        u = factors[..., offset:offset + rows]
        w = factors[..., offset + rows:offset + rows + cols] if cols else None
        parts.append((u, w))
        offset += rows + cols
    return parts


def _rank1(shape, shapes, generator, device, dtype) -> torch.Tensor:
    """Rank-1 tangents u w^T per parameter matrix, N(0, I) for vectors; shape (*batch, K, n)."""
    factors = rank1_factors(shape[:-1], shapes, generator, device, dtype)
    tangents = torch.empty(shape, device=device, dtype=dtype)
    offset = 0
    for (u, w), (rows, cols) in zip(split_rank1_factors(factors, shapes), rank1_layout(shapes)):
        if w is None:
            tangents[..., offset:offset + rows] = u
            offset += rows
            continue
        block = tangents[..., offset:offset + rows * cols].unflatten(-1, (rows, cols))
        torch.mul(u.unsqueeze(-1), w.unsqueeze(-2), out=block)  # writes through the view
        offset += rows * cols
    return tangents


def _draw(num_tangents, dim, sampler, batch_shape, generator, device, dtype, angle, max_length, shapes=None):
    shape = (*batch_shape, num_tangents, dim)
    if sampler == "normal":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if sampler == "rademacher":
        return rademacher_from_bits(shape, generator=generator, device=device, dtype=dtype)
    if sampler == "rank1":
        return _rank1(shape, shapes or [(dim,)], generator, device, dtype)
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
    shapes: Sequence[Sequence[int]] | None = None,
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
        shapes: the parameter shapes the n entries are split into (sum of their sizes must
            be n); used by ``rank1`` (one u w^T per matrix).

    Returns:
        V of shape ``(*batch_shape, K, n)``.
    """
    _check_sampler(sampler)
    _check_num_tangents(num_tangents)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"the tangent dimension must be an integer >= 1, got {dim!r}")
    entries = num_tangents * dim * math.prod(batch_shape)
    check_fits(entries * element_size(dtype), device, f"num_tangents={num_tangents}: {entries:,} tangent entries",
               "lower num_tangents, or set chunk_size (the tangents are then held chunk by chunk)")
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
    if shapes is not None and sum(math.prod(shape) for shape in shapes) != dim:
        raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not add up to the tangent dimension {dim}")
    dtype = dtype or torch.get_default_dtype()
    batch_shape = tuple(batch_shape)
    draw_args = (num_tangents, dim, sampler)
    draw_kwargs = dict(
        generator=generator, device=device, dtype=dtype, angle=angle, max_length=max_length, shapes=shapes
    )
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
        normalize=normalize, shapes=shapes, **sampler_kwargs,
    )
    return split_flat(flat, shapes)


def expected_chi(dof: int) -> float:
    """E[χ_m] = sqrt(2) Γ((m+1)/2) / Γ(m/2): the expected norm of an m-dim N(0, I) vector."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))


def expected_tangent_norm(sampler: str, dim: int, normalize: bool = False) -> float:
    """E||v|| for the given sampler in R^n, as the scaling correction needs it.

    ``normalize`` or ``standard_basis``/``angle``: 1; ``normal``: E[χ_n];
    ``rademacher``: sqrt(n). ``varying_length`` and ``rank1`` (whose norm depends on the
    parameter shapes) have no closed form here.
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
