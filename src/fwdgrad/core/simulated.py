"""Simulated forward gradients: the directional derivatives from ONE BACKWARD PASS (backprop).

The multi-tangent paper's network results were computed this way (its code's
``--fg_computation_mode sim``): the exact gradient by reverse-mode autograd, then
d = V ∇f for the step's tangents V, then the estimator's aggregation. For the same tangents
this gives the same d, hence the same update, as the true forward-mode estimators (up to
rounding; tested), at the cost of one backward pass whatever K: a study tool for K = 256
and for the paper's grids, never a way to train without backpropagation. The names say so.

- :class:`SimulatedForwardGradient`: weight space. d_k = Σ_p <∇_p f, v_{k,p}>, with the
  tangents of :class:`fwdgrad.core.weight.WeightForwardGradient` (same sampler, seed, chunks;
  ``rank1`` tangents are formed densely, the same draws as the factored path).
- :class:`SimulatedActivityForwardGradient`: activity space. The per-sample gradients
  G_m[b] = ∂L_b/∂z_{m,b} of every perturbed output come from one backward pass of Σ_b L_b
  (the samples are independent, so each sample's part is its own loss's gradient); then
  d[k, b] = Σ_m <G_m[b], u_m[k, b]>, and the rest as :class:`fwdgrad.core.activity.ActivityForwardGradient`
  (per-sample aggregation, local weight updates).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fwdgrad.core.activity import ActivityForwardGradient, _per_sample_losses
from fwdgrad.core.forward_mode import check_finite, scalar_loss
from fwdgrad.core.perturbation_sites import SitesChanged, site_activations
from fwdgrad.core.weight import WeightForwardGradient


def _require_graph(loss: torch.Tensor, what: str) -> None:
    if not loss.is_floating_point():
        raise ValueError(f"the closure's loss has dtype {loss.dtype}; a gradient needs a floating-point loss")
    if not loss.requires_grad:
        raise ValueError(f"the closure's loss does not depend on {what} (it is detached from them)")


class SimulatedForwardGradient(WeightForwardGradient):
    """Weight-space forward gradient *simulated with backprop*: d = V ∇f, ∇f by ``loss.backward``.

    Same arguments and tangents as :class:`fwdgrad.ForwardGradient` (weight space). The
    execution runs eagerly and stores or regenerates the tangents (``factored`` and
    ``mode="compiled"`` do not apply: no forward-mode pass is made). Uses one backward pass
    per step.
    """

    def __init__(self, model: torch.nn.Module | Iterable[torch.Tensor], *args, mode: str = "eager",
                 factored: bool | None = None, **kwargs):
        if factored:
            raise ValueError("factored=True is a forward-mode execution; the simulation forms rank1 tangents densely")
        if mode == "compiled":
            raise ValueError("mode='compiled' compiles the forward-mode pass; the simulation makes none")
        super().__init__(model, *args, mode="eager", factored=False, **kwargs)

    def __repr__(self) -> str:
        return "Simulated" + super().__repr__()

    def _directional_derivatives(self, closure, chunks: Iterable[list[torch.Tensor]], num_chunks: int, inputs=(),
                                 primals=None, substitutes=None):
        """The loss, d = V ∇f over the chunks of tangents, and the parameters the loss depends on.

        ∇f comes from one reverse-mode pass (``torch.autograd.grad``) of ``closure(*inputs)``.
        """
        if primals is not None or substitutes is not None:
            raise ValueError("the simulation differentiates the parameters themselves (no factored tangents)")
        with torch.enable_grad():
            loss = scalar_loss(closure(*inputs))
            _require_graph(loss, "the trainable parameters")
            gradients = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        used = {id(p) for p, g in zip(self.parameters, gradients) if g is not None}
        if not used:
            raise ValueError("the closure never used the parameters given to SimulatedForwardGradient")
        gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(self.parameters, gradients)]
        derivatives = []
        for chunk in chunks:  # regenerated chunks are consumed here, once, like the forward-mode pass does
            derivative = sum(
                (tangent * gradient).reshape(tangent.shape[0], -1).sum(-1, dtype=tangent.dtype)
                for tangent, gradient in zip(chunk, gradients)
            )
            derivatives.append(derivative)
        derivatives = torch.cat(derivatives)
        loss = loss.detach()
        check_finite(loss, derivatives)
        return loss, derivatives, used


class SimulatedActivityForwardGradient(ActivityForwardGradient):
    """Activity-space forward gradient *simulated with backprop*: d[k, b] = <∂L_b/∂z_b, u[k, b]>.

    Same arguments and tangents as :class:`fwdgrad.core.activity.ActivityForwardGradient`; the
    per-sample output gradients come from one backward pass of Σ_b L_b.
    """

    def __repr__(self) -> str:
        return "Simulated" + super().__repr__()

    def directional_derivatives(self, closure, tangents: Sequence[torch.Tensor]):
        """As :meth:`ActivityForwardGradient.directional_derivatives`, with d from one backward pass."""
        deltas = [torch.zeros(shape, device=self.device, dtype=t.dtype, requires_grad=True)
                  for shape, t in zip(self._sites, tangents)]
        hooks = self._site_hooks()
        hooks.deltas = deltas
        with torch.enable_grad():
            with hooks:
                losses = _per_sample_losses(closure())
            if len(hooks.calls) != len(deltas):
                raise SitesChanged
            _require_graph(losses, "the perturbed modules' outputs")
            output_gradients = torch.autograd.grad(losses.sum(), deltas, allow_unused=True)
        derivatives = sum(
            (tangent * (torch.zeros_like(delta) if gradient is None else gradient).unsqueeze(0))
            .reshape(tangent.shape[0], tangent.shape[1], -1).sum(-1)
            for tangent, gradient, delta in zip(tangents, output_gradients, deltas)
        )
        inputs = [tensor.detach() for tensor in hooks.inputs]
        activation_inputs = [z.detach() for z in getattr(hooks, "activation_inputs", [])]
        return (losses.detach(), derivatives, hooks.calls, hooks.recorded_inputs(inputs),
                site_activations(hooks, activation_inputs))
