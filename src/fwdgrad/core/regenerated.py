"""Execution with regenerated tangents: a step holds one chunk of V, not all K × n entries.

With an independent sampler (``normal``, ``rademacher``, ``rank1``) the K tangents of a
step are drawn in chunks V_1, ..., V_C of at most ``chunk_size`` rows, chunk c from its own
seed s_c = (s + (c + 1) φ) mod 2^63 (s: a per-step seed, φ = 0x9E3779B97F4A7C15, the 64-bit
golden-ratio increment), so any chunk can be drawn again. A step is two passes over them:

1. for every chunk: d_c = V_c ∇f (the batched jvp), and what the aggregation needs of the
   tangents: ||v_k||^2 (``max_normalized``, ``mean_of_top_k``) or the Gram matrix
   G = V V^T (``orthogonal_projection``), its off-diagonal blocks G_ij = V_i V_j^T formed by
   regenerating V_j for j < i;
2. c from d (and G or the norms), then g = Σ_c V_c^T c_c, each V_c regenerated.

Memory: one chunk of tangents (two while a Gram block is formed; in float64 only a slice of
columns at a time). Same tangents, hence the same update, as the stored path with the same
seed (``regenerate_tangents=False``).
"""

from __future__ import annotations

import torch

from fwdgrad.core.aggregation import aggregation_coefficients
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.execution import ForwardStep
from fwdgrad.core.forward_mode import check_finite_coefficients
from fwdgrad.core.tangents import split_flat

_GOLDEN_RATIO_INCREMENT = 0x9E3779B97F4A7C15


def chunk_seed(step_seed: int, index: int) -> int:
    """s_c = (s + (c + 1) φ) mod 2^63: the seed of chunk ``index`` of the step with seed ``step_seed``."""
    return (step_seed + (index + 1) * _GOLDEN_RATIO_INCREMENT) % 2**63


def gram_block(a: torch.Tensor, b: torch.Tensor, columns: int = 2**16) -> torch.Tensor:
    """a b^T in float64, ``(k_a, n) x (k_b, n) -> (k_a, k_b)``, ``columns`` of n at a time
    (no float64 copy of a whole chunk)."""
    block = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], columns):
        block += a[:, start:start + columns].double() @ b[:, start:start + columns].double().T
    return block


def regenerated_step(fg: ForwardGradient, closure, inputs: tuple,
                     tangent_range: tuple[int, int] | None = None) -> ForwardStep:
    """The two passes of the module docstring: d, ||v_k||^2 and G from pass 1; g = V^T c in pass 2.

    ``fg`` is the weight-space estimator (:class:`~fwdgrad.core.weight.WeightForwardGradient`)
    taking the step: its parameters, shapes, per-step seed and aggregation.

    ``tangent_range=(start, stop)`` (on chunk boundaries): pass 1 evaluates the jvp of those
    chunks only (d of shape ``(stop - start,)``; tangent parallelism, :mod:`fwdgrad.distributed.parallel`)
    but still draws every chunk for the norms and G, and ``updates`` takes the d of all K.
    """
    step_seed = fg._next_step_seed()
    bounds = fg._chunk_bounds()
    first, last = (0, fg.num_tangents) if tangent_range is None else tangent_range
    evaluated = [index for index, (start, stop) in enumerate(bounds) if first <= start and stop <= last]
    if sum(bounds[i][1] - bounds[i][0] for i in evaluated) != last - first:
        raise ValueError(f"tangent_range {tangent_range} does not fall on the chunk boundaries {bounds}")
    num = fg.num_tangents
    need_gram = fg.aggregation == "orthogonal_projection"
    need_norms = fg.aggregation in ("max_normalized", "mean_of_top_k")
    gram = torch.zeros(num, num, dtype=torch.float64, device=fg.device) if need_gram else None
    squared_norms = torch.zeros(num, dtype=torch.float64, device=fg.device) if need_norms else None

    def first_pass():
        for index, (start, stop) in enumerate(bounds):
            if not (need_gram or need_norms or index in evaluated):
                continue
            chunk = fg._chunk_tangents(step_seed, index)
            if need_norms:
                squared_norms[start:stop] = chunk.double().square().sum(-1)
            if need_gram:
                gram[start:stop, start:stop] = gram_block(chunk, chunk)
                for other, (other_start, other_stop) in enumerate(bounds[:index]):
                    block = gram_block(chunk, fg._chunk_tangents(step_seed, other))
                    gram[start:stop, other_start:other_stop] = block
                    gram[other_start:other_stop, start:stop] = block.T
            if index in evaluated:
                yield fg._split(chunk)

    # the jvp's loop runs first_pass to its end, chunks after the last evaluated one included
    loss, derivatives, used = fg._directional_derivatives(closure, first_pass(), len(evaluated), inputs)

    def updates(directional_derivatives: torch.Tensor) -> list[torch.Tensor]:
        coefficients = aggregation_coefficients(
            fg.aggregation, directional_derivatives.double(), squared_norms=squared_norms, gram=gram, dim=fg.dim,
            top_k_tolerance=fg.top_k_tolerance,
        ).to(fg.dtype) * fg._scaling_factor()
        check_finite_coefficients(coefficients, fg.aggregation, directional_derivatives)
        update = torch.zeros(fg.dim, dtype=fg.dtype, device=fg.device)
        for index, (start, stop) in enumerate(bounds):
            update.addmv_(fg._chunk_tangents(step_seed, index).T, coefficients[start:stop])
        return split_flat(update, fg.shapes)

    return ForwardStep(loss, derivatives, used, updates)

