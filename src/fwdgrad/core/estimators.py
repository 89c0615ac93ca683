"""The public estimators: ``.backward(closure)`` fills ``.grad``, a drop-in for ``loss.backward()``.

- :class:`ForwardGradient`: a forward gradient (Baydin et al. 2022; multi-tangent: Flügel
  et al. 2024) in true forward mode, no backward pass. ``ForwardGradient(model, ...)``
  perturbs the weights (:class:`fwdgrad.core.weight.WeightForwardGradient`);
  ``perturbation="activity"`` perturbs layer outputs
  (:class:`fwdgrad.core.activity.ActivityForwardGradient`); ``perturbation="local"`` trains
  blocks on local losses (:class:`fwdgrad.local.estimator.LocalForwardGradient`, ``backward(x, y)``).
  Each registers itself with :class:`fwdgrad.core.base.ForwardGradient`, which dispatches on
  ``perturbation``, when its module is imported (``import fwdgrad`` imports all of them).
- :class:`Backprop`: the same interface around ``loss.backward()``, the baseline.
- :func:`forward_gradient`: the forward gradient of a function of one tensor.

Where the rest lives: the shared forward-mode machinery in :mod:`fwdgrad.core.forward_mode`,
how the batched jvp executes in :mod:`fwdgrad.core.execution` (with :mod:`fwdgrad.core.regenerated`
and :mod:`fwdgrad.core.factored`), tangent samplers in :mod:`fwdgrad.core.tangents`, aggregations in
:mod:`fwdgrad.core.aggregation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from fwdgrad.core.activity import ActivityForwardGradient
from fwdgrad.core.aggregation import aggregate, resolve_aggregation
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.execution import MODES
from fwdgrad.core.forward_mode import (
    batched_jvp,
    check_finite,
    collect_parameters,
    explain_missing_forward_rules,
    scalar_loss,
)
from fwdgrad.core.tangents import _check_num_tangents, expected_tangent_norm, sample_tangents
from fwdgrad.core.weight import WeightForwardGradient

__all__ = [
    "MODES", "ActivityForwardGradient", "Backprop", "ForwardGradient", "WeightForwardGradient",
    "collect_parameters", "cosine_similarity", "forward_gradient",
]


class Backprop:
    """The baseline: ``Backprop(model).backward(closure)`` is ``closure().backward()``.

    It uses reverse-mode autograd (a backward pass); same interface as ForwardGradient.
    """

    def __init__(self, model: torch.nn.Module | Iterable[torch.Tensor]):
        self.parameters = collect_parameters(model)

    def __repr__(self) -> str:
        return f"Backprop(parameters={sum(p.numel() for p in self.parameters)})"

    def state_dict(self) -> dict:
        """Backprop owns no random state: ``{}`` (the interface of :meth:`ForwardGradient.state_dict`)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"Backprop owns no random state; got a state with entries {sorted(state)}")

    def backward(self, closure: Callable[..., torch.Tensor], *inputs: object) -> torch.Tensor:
        """Evaluate ``closure(*inputs)`` with autograd and accumulate the exact gradient into ``.grad``."""
        with torch.enable_grad():
            loss = scalar_loss(closure(*inputs))
            if not loss.requires_grad:
                raise ValueError("the closure's loss does not depend on any trainable parameter")
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss is not finite ({loss.item()})")
            loss.backward(inputs=self.parameters)
        return loss.detach()


def forward_gradient(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_tangents: int = 1,
    aggregation: str = "mean",
    sampler: str = "normal",
    generator: torch.Generator | None = None,
    normalize: bool = False,
    scaling_correction: bool = False,
    **sampler_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward gradient of a function of one tensor.

    g = aggregate(V, V ∇f(x)) with V the K tangents (rows in R^n, n = x.numel()); for
    K = 1, normal tangents and ``mean``: g = (∇f(x)·v) v, E[g] = ∇f(x).

    Args:
        f: maps ``x`` to a scalar tensor.
        x: the point, any shape.
        num_tangents, aggregation, sampler, normalize, scaling_correction: as in
            :class:`ForwardGradient`; ``generator`` drives the sampler.

    Returns:
        ``(f(x), g)`` with g of the shape of ``x``.
    """
    _check_num_tangents(num_tangents)
    method = resolve_aggregation(aggregation)
    (tangents,) = sample_tangents(
        num_tangents, [x.shape], sampler, generator=generator, device=x.device, dtype=x.dtype,
        normalize=normalize, **sampler_options,
    )
    with torch.no_grad(), explain_missing_forward_rules():
        value, derivatives = batched_jvp(lambda y: scalar_loss(f(y)), (x.detach(),), (tangents,))
    check_finite(value, derivatives)
    tangent_norm = None
    if scaling_correction and method != "orthogonal_projection":
        tangent_norm = expected_tangent_norm(sampler, x.numel(), normalize)
    (estimate,) = aggregate(
        [tangents], derivatives, method, scaling_correction=scaling_correction, tangent_norm=tangent_norm
    )
    return value, estimate


def cosine_similarity(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine between two parameter-shaped lists, over the concatenation of all tensors."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norm_a = math.sqrt(sum(float(x.double().square().sum()) for x in a))
    norm_b = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return float(dot) / (norm_a * norm_b)
