"""How the batched jvp executes: eagerly or compiled, whole or in chunks of tangents.

One forward-mode pass computes the K directional derivatives d_k = ∇f·v_k of a step as
``vmap`` over ``torch.func.jvp`` (:func:`fwdgrad.core.forward_mode.batched_jvp`):

- :class:`BatchedJvp` runs that pass eagerly or through ``torch.compile`` (put around
  ``vmap(jvp(...))``, never inside it; CUDA graphs on CUDA), falling back to eager in
  ``mode="auto"`` when compilation fails; or, ``mode="fast"``, without dual tensors: the
  primal and its K tangents computed side by side, one rule per operation
  (:mod:`fwdgrad.core.fast_forward`, :mod:`fwdgrad.core.fast_execution`).
- :func:`chunked_batched_jvp` evaluates the K tangents in chunks (bounded memory): the
  closure runs once per chunk, with torch's RNG state replayed (one dropout mask for
  every tangent of the step) and the module's buffers restored between chunks.

The other execution strategies build on these two: tangents regenerated from per-chunk
seeds (:mod:`fwdgrad.core.regenerated`) and factored rank-1 tangents (:mod:`fwdgrad.core.factored`).
A distributed strategy would too: each process evaluates its slice of the K tangents here,
then the estimator's ``combine_directional_derivatives`` gathers the K numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map_only

from fwdgrad.core.fast_forward import fast_batched_jvp
from fwdgrad.core.forward_mode import forward_mode_region, jvp_with_inputs, rng_state, set_rng_state

MODES = ("auto", "eager", "compiled", "fast")

# JvpFunction(differentiated, inputs) -> (value, aux): the function whose jvp is taken
JvpFunction = Callable[[tuple, tuple], tuple]


class BatchedJvp:
    """``run(function, primals, tangents, inputs)``: :func:`jvp_with_inputs`, eager or compiled.

    Args:
        mode: ``eager``, ``compiled`` or ``fast`` (the resolved mode; ``fast``:
            :func:`fwdgrad.core.fast_forward.fast_batched_jvp`, primal and tangents side by side).
        requested_mode: the mode asked for; with ``auto`` the pass compiles only when the
            batch comes as ``inputs`` (a closure capturing a new batch every step would
            recompile every step) and falls back to eager, with a warning, if compiling fails.
        device: where the pass runs (CUDA: ``mode="reduce-overhead"``, i.e. CUDA graphs).
        compile_options: keyword arguments of ``torch.compile`` replacing that default.
    """

    def __init__(self, mode: str, requested_mode: str, device: torch.device, compile_options: dict | None = None):
        self.mode = mode
        self.requested_mode = requested_mode
        self.device = device
        self.compile_options = compile_options
        self._compiled = None

    def __call__(self, function: JvpFunction, primals, tangents, inputs: tuple):
        if self.mode == "fast":
            return fast_batched_jvp(function, primals, tangents, inputs)
        if self.mode == "eager" or (self.requested_mode == "auto" and not inputs):
            return jvp_with_inputs(function, primals, tangents, inputs)
        if self._compiled is None:
            options = {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
            if self.compile_options is not None:
                options = self.compile_options
            self._compiled = torch.compile(jvp_with_inputs, dynamic=False, **options)
        try:
            result = self._compiled(function, primals, tangents, inputs)
            # CUDA-graph outputs are overwritten by the next replay: hand out copies (K + a few numbers)
            return tree_map_only(torch.Tensor, torch.clone, result) if self.device.type == "cuda" else result
        except (ValueError, TypeError):
            # the closure's own errors and fwdgrad's checks of its loss, raised while tracing:
            # the eager pass would raise them too, so they are no reason to stop compiling
            raise
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, loudly
            if self.requested_mode != "auto":
                raise
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eagerly", stacklevel=4)
            self.mode = "eager"
            return jvp_with_inputs(function, primals, tangents, inputs)


def eager_batched_jvp(function: JvpFunction, primals, tangents, inputs: tuple):
    """The eager :class:`BatchedJvp`."""
    return jvp_with_inputs(function, primals, tangents, inputs)


def chunked_batched_jvp(
    run: Callable,
    make_function: Callable[[bool], JvpFunction],
    primals: Sequence[torch.Tensor],
    chunks: Iterable[Sequence[torch.Tensor]],
    num_chunks: int,
    inputs: tuple = (),
    *,
    device: torch.device,
    buffers: Iterable[torch.Tensor] = (),
):
    """The batched jvp over chunks of tangents, the closure replayed for every chunk.

    Args:
        run: executes one batched jvp, ``run(function, primals, tangents, inputs)``
            (:class:`BatchedJvp` or :func:`eager_batched_jvp`).
        make_function: ``make_function(first)`` is the function of chunk ``first`` or a
            later one (a later chunk must not record side effects again).
        primals: the point, tensors of shapes ``shape_i``.
        chunks: iterable (may be lazy, e.g. regenerating tangents) of tangent lists,
            ``(k_c, *shape_i)`` each, Σ_c k_c = K.
        num_chunks: how many chunks ``chunks`` yields.
        inputs: the closure's arguments (graph inputs of a compiled pass).
        device: for the RNG state (CUDA's too).
        buffers: restored to their values at the start before every later chunk.

    Returns:
        ``(value, directional_derivatives (K, *out_shape), aux)``: value and aux of the
        first chunk (the same primal computation for every chunk).
    """
    saved_rng = saved_buffers = None
    if num_chunks > 1:
        saved_rng = rng_state(device)
        saved_buffers = [(buffer, buffer.clone()) for buffer in buffers]
    derivatives = []
    with ExitStack() as stack:
        forward_mode_region(stack)
        for index, chunk_tangents in enumerate(chunks):
            first = index == 0
            if not first:
                set_rng_state(device, saved_rng)
                for buffer, saved in saved_buffers:
                    buffer.copy_(saved)
            value, derivative, aux = run(make_function(first), primals, chunk_tangents, inputs)
            if first:
                first_value, first_aux = value, aux
            derivatives.append(derivative)
    return first_value, torch.cat(derivatives), first_aux


@dataclass
class ForwardStep:
    """One step's forward-mode pass, and how its tangents turn coefficients into the update.

    ``updates(directional_derivatives)`` aggregates d (``(K,)``, after
    ``combine_directional_derivatives``) into g = V^T c and returns g split by parameter
    (one tensor of the parameter's shape each); each execution strategy forms V^T c its
    own way (stored V, regenerated chunks of V, rank-1 factors of V).
    """

    loss: torch.Tensor
    directional_derivatives: torch.Tensor
    used: set[int]
    updates: Callable[[torch.Tensor], list[torch.Tensor]]
