"""``mode="fast"``: the batched jvp of a step computed by :class:`fwdgrad.core.fast_forward.FastForward`.

One more way the batched jvp of an estimator executes (next to eager ``vmap(jvp(...))`` and
compiled, :mod:`fwdgrad.core.execution`): the same directional derivatives, the same tangents,
the same aggregation and update, computed with the primal and its K tangents side by side
(one rule per operation, the K tangent inputs of a layer stacked into one matmul or
convolution). Chunks of tangents, regenerated tangents and factored rank-1 tangents work as
with the other modes (:func:`fwdgrad.core.execution.chunked_batched_jvp` replays the
closure per chunk, with the same RNG state and the buffers restored).

- weight space (:func:`weight_pass`): the parameters themselves carry the tangents, dense
  ``(k, *p.shape)`` or rank-1 factors (:class:`fwdgrad.core.dual.Factored`, :func:`rank1_tangents`);
- activity space: :func:`fwdgrad.core.fast_forward.fast_batched_jvp` in place of
  :func:`fwdgrad.core.execution.eager_batched_jvp` (the perturbations δ = 0 carry the tangents).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fwdgrad.core.dual import Factored
from fwdgrad.core.execution import chunked_batched_jvp
from fwdgrad.core.fast_forward import FastForward
from fwdgrad.core.forward_mode import require_tangent, scalar_loss


def _call(function, primals, tangents, inputs):
    """The ``run`` of :func:`chunked_batched_jvp` for functions that hold their tangents themselves."""
    return function(tangents, inputs)


def weight_pass(parameters: Sequence[torch.Tensor], closure, chunks: Iterable[Sequence], num_chunks: int,
                inputs: tuple, device: torch.device, buffers: Iterable[torch.Tensor] = ()):
    """Loss and d_k = ∇f·v_k of ``closure(*inputs)`` for the tangents of ``parameters`` in ``chunks``.

    Args:
        parameters: the differentiated parameters (the closure uses them as they are).
        chunks: per chunk, one tangent per parameter: ``(k_c, *p.shape)`` or :class:`Factored`.
        buffers: restored before every chunk after the first.

    Returns:
        ``(loss, directional_derivatives (K,), used, batch_norm_updates, batch_norm_statistics)``:
        ``used`` the ids of the parameters the closure touched; the BatchNorm updates and
        statistics of the first chunk, to be applied once after the pass.
    """
    used: set[int] = set()
    updates: list = []

    def make_function(first: bool):
        def function(tangents, inputs):
            count = tangents[0].num_tangents if isinstance(tangents[0], Factored) else tangents[0].shape[0]
            mode = FastForward(count, {id(p): t for p, t in zip(parameters, tangents)}, parameters, first)
            with mode:
                loss, derivative = mode.unpack(scalar_loss(closure(*inputs)))
            used.update(mode.used)
            if derivative is None:
                require_tangent(loss, "the trainable parameters", used=bool(mode.used))  # raises: no tangent
            if first:
                updates.extend(mode.batch_norm_updates)
            return loss, derivative.reshape(count), mode.batch_norm_statistics

        return function

    loss, derivatives, statistics = chunked_batched_jvp(
        _call, make_function, (), chunks, num_chunks, tuple(inputs), device=device, buffers=buffers)
    return loss, derivatives, used, updates, statistics


def rank1_tangents(parameters: Sequence[torch.Tensor], parts) -> list:
    """The tangents of the factored rank-1 step for :func:`weight_pass`: :class:`Factored` u w^T
    for every tensor with a second factor (matrices, convolution kernels), the dense entries
    (``(k, *p.shape)``) for the others (biases)."""
    return [u.reshape(u.shape[0], *p.shape) if w is None else Factored(u, w, p.shape)
            for p, (u, w) in zip(parameters, parts)]
