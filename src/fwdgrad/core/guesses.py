"""Gradient guesses: tangents that are not isotropic noise, with a well-defined estimate.

**Input-span guesses** (Singhal et al. 2023, "How to Guess a Gradient", the "W^T" guess):
a layer z = m(h; θ_m) can only have gradients of the form (∂z/∂θ_m)^T δ, δ the gradient
with respect to its output, so its gradient lies in the span the batch's inputs allow
(for a Linear layer z = h W^T + c: ∇_W = Δ^T H, rows in the span of the B inputs h_b).
:class:`InputSpanForwardGradient` draws every tangent inside that span: for each module m
owning parameters and each tangent k,

    v_{k, θ_m} = (∂z_m/∂θ_m)^T ε_{k, m},        ε_{k, m} ~ N(0, I) in z_m's shape,

the module's local vector-Jacobian product (one layer at its recorded input, never through
the network: :func:`fwdgrad.core.layer_derivatives.local_parameter_gradients`) of a random
output perturbation. Linear: v_W = ε^T H, v_c = Σ_b ε_b; ConvNd: the correlation of the
input with ε; norm layers: Σ ε x̂ and Σ ε. Parameters used outside any module call get
N(0, I) tangents. The inputs come from one plain forward pass before the forward-mode pass
(RNG and buffers restored), so a step costs one extra forward pass and K local products.

What it estimates: with ``aggregation="mean"``, g = (1/K) Σ_k (∇f·v_k) v_k and
E[g] = E[v v^T] ∇f ≠ ∇f: **biased**, towards the directions the inputs span. For a Linear
layer E[g_W] = ∇_W H^T H (H the layer's B × d_in inputs); ⟨∇_W, E g_W⟩ = ‖∇_W H^T‖² ≥ 0, so it
is a descent direction. With ``aggregation="frog"`` the update is the orthogonal projection
of ∇f onto the span of the K guesses (exact projection, no bias within that span). The
span is much smaller than R^n (d_out·B instead of d_out·d_in per layer when B < d_in), which
is where the variance reduction comes from.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fwdgrad.core.forward_mode import rng_state, set_rng_state
from fwdgrad.core.layer_derivatives import local_parameter_gradients
from fwdgrad.core.perturbation_sites import InputHooks
from fwdgrad.core.weight import WeightForwardGradient

GUESSES = ("input_span",)


class InputSpanForwardGradient(WeightForwardGradient):
    """Weight-space forward gradient whose K tangents are input-span guesses (see the module docstring).

    Same arguments as :class:`fwdgrad.ForwardGradient` (weight space) except the sampler,
    which the guesses replace (``normalize_tangents`` still scales each to unit norm over
    all parameters). Needs an ``nn.Module``; the closure runs once more per step, plainly,
    to record the layers' inputs. ``last_tangents``: the step's guesses ``(K, n)``.
    """

    def __init__(self, model: torch.nn.Module, *args, chunk_size: int | None = None, **kwargs):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"input-span guesses need an nn.Module (its layers' inputs), got {type(model).__name__}")
        kwargs.pop("sampler", None)
        super().__init__(model, *args, sampler="normal", chunk_size=chunk_size, regenerate_tangents=False,
                         factored=False, **kwargs)
        self.sampler = "input_span"
        self._owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self._guesses: torch.Tensor | None = None
        self.last_tangents: torch.Tensor | None = None

    def __repr__(self) -> str:
        return super().__repr__().replace("ForwardGradient(", "InputSpanForwardGradient(", 1)

    def _record_inputs(self, closure, inputs: tuple) -> list[tuple[torch.nn.Module, tuple, dict, torch.Size]]:
        """One plain forward pass: every owner module's call, its input and its output's shape
        (RNG and buffers restored)."""
        saved_rng = rng_state(self.device)
        buffers = [(b, b.clone()) for b in self.module.buffers()]
        try:
            with torch.no_grad(), InputHooks(self._owners) as hooks:
                closure(*inputs)
        finally:
            set_rng_state(self.device, saved_rng)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return [(module, *call, shape) for module, call, shape
                in zip(hooks.calls, hooks.recorded_inputs(hooks.inputs), hooks.output_shapes) if shape is not None]

    def guesses(self, calls: Iterable[tuple[torch.nn.Module, tuple, dict, torch.Size]]) -> torch.Tensor:
        """The K input-span tangents ``(K, n)`` for the recorded calls (parameter order of the estimator)."""
        calls = list(calls)
        index = {id(p): i for i, p in enumerate(self.parameters)}
        parts: list[list[torch.Tensor | None]] = [[None] * len(self.parameters) for _ in range(self.num_tangents)]
        with torch.no_grad():
            for module, args, kwargs, shape in calls:
                for k in range(self.num_tangents):
                    noise = torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
                    for name, value in local_parameter_gradients(module, args, kwargs, noise).items():
                        position = index.get(id(getattr(module, name)))
                        if position is not None:
                            previous = parts[k][position]
                            parts[k][position] = value if previous is None else previous + value
        rows = []
        for k in range(self.num_tangents):
            pieces = []
            for position, parameter in enumerate(self.parameters):
                piece = parts[k][position]
                if piece is None:  # not a direct parameter of a called module: isotropic
                    piece = torch.randn(parameter.shape, generator=self.generator, device=self.device,
                                        dtype=self.dtype)
                pieces.append(piece.reshape(-1).to(self.dtype))
            rows.append(torch.cat(pieces))
        tangents = torch.stack(rows)
        if self.normalize_tangents:
            tangents = tangents / torch.linalg.vector_norm(tangents, dim=1, keepdim=True)
        return tangents

    def step_tangents(self) -> torch.Tensor:
        """The guesses of the current step (drawn in :meth:`backward` before the forward-mode pass)."""
        if self._guesses is None:
            raise RuntimeError("input-span guesses are drawn by backward(closure), from the layers' inputs")
        return self._guesses

    def backward(self, closure, *inputs: object) -> torch.Tensor:
        """Record the layers' inputs (plain forward pass), draw the guesses, then the forward-gradient step."""
        self._guesses = self.guesses(self._record_inputs(closure, inputs))
        try:
            return super().backward(closure, *inputs)
        finally:
            self.last_tangents, self._guesses = self._guesses, None
