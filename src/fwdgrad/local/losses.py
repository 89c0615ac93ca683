"""Local losses of one block: auxiliary heads, and group- and patch-wise losses.

Block b's output a (per sample: features ``(F,)``, a feature map ``(C, *spatial)`` or
tokens ``(T, D)``; :class:`LossLayout`) feeds an auxiliary head: global average pooling
over the positions (spatial positions or tokens), then a linear classifier,
logits = W pool(a) + c. The block's local loss is the head's loss on the block's output,

    L_b = (1/B) Σ_samples ℓ(W pool(a) + c, y)          (ℓ: cross-entropy by default).

**Groups and patches** (Ren et al. 2023, "Scaling Forward Gradient With Local Losses",
with their feature aggregation). The F features (channels) are cut into G groups of s
consecutive ones and the positions into P patches; loss (g, p) of a sample sees only the
features of group g at the positions of patch p move, everything else as a constant
(sg = stop-gradient, ``detach``):

    logits_{g,p} = sg(W pool(a) + c) + W_g (pool_p(a_g) − sg(pool_p(a_g))),

with pool_p(a_g) the sum of a_g over the positions of patch p divided by the number of
all positions, and W_g the head's columns of group g. Every loss (g, p) has the value of
the block's loss, and its derivative with respect to a is the (g, p) part of ∇_a L_b and
zero elsewhere. So the directional derivatives of all G·P losses along one tangent come
from one forward-mode pass through the block: with ȧ the tangent of the block's output
(:mod:`fwdgrad.local.execution`) and ṁ_{g,p} its patch means in group g, the chain rule
at the primal gives (:func:`group_directional_derivatives`)

    d_{b,g,p} = ∇_o ℓ_b · W_g ṁ_{b,g,p} = (W_g^T ∇_o ℓ_b) · ṁ_{b,g,p},

o the head's logits, ∇_o ℓ (C numbers per sample) from :func:`loss_and_logit_gradients`.
Each d_{g,p} u_{g,p} estimates the gradient of the *same* block loss in its own few
coordinates: its variance is set by the unit's dimension s × (positions per patch), not by
the block's. The last block has no head: its loss is the task loss, and groups on its
output (the logits) use the identity as W (``last_group_size=1``: one loss per logit).

The heads learn from the exact derivative of their own loss with respect to their own
parameters, :func:`head_gradients` (the head's one-layer local derivative; nothing flows
into the block). This module holds the closed forms of the linear head on globally pooled
features; other heads (pooled grids, normalization, convolutions, MLPs) and the loss at a
point for any head are in :mod:`fwdgrad.local.heads`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from fwdgrad.core.layer_derivatives import local_parameter_gradients

LAYOUTS = ("features", "channels", "tokens")
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ = cross-entropy of each row: ``(N, C), (N,) -> (N,)``."""
    return F.cross_entropy(logits, targets, reduction="none")


def layout_of(shape: torch.Size) -> str:
    """A block output's layout from its per-sample shape: ``(F,)`` features, ``(T, D)`` tokens,
    ``(C, H, W)`` (or more spatial dims) channels."""
    if len(shape) == 1:
        return "features"
    if len(shape) == 2:
        return "tokens"
    if len(shape) >= 3:
        return "channels"
    raise ValueError("a block output needs a batch dimension and at least one more, got a per-sample scalar")


@dataclass(frozen=True)
class LossLayout:
    """How one block's per-sample output ``shape`` is cut into G groups × P patches.

    ``features`` ``(F,)``: P = 1. ``channels`` ``(C, S_1, .., S_n)``: each spatial size
    cut into ``patches`` equal parts, P = patches^n. ``tokens`` ``(T, D)``: T cut into
    ``patches`` runs of consecutive tokens. A *unit* is one (group, patch) pair; its
    e = s × (positions per patch) coordinates are ordered (feature in group, position in patch).
    """

    kind: str
    shape: tuple[int, ...]
    groups: int = 1
    patches: int = 1

    @property
    def features(self) -> int:
        return self.shape[-1] if self.kind == "tokens" else self.shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return {"features": (), "channels": self.shape[1:], "tokens": self.shape[:1]}[self.kind]

    @property
    def group_size(self) -> int:
        return self.features // self.groups

    @property
    def num_patches(self) -> int:
        return self.patches ** len(self.spatial)

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)

    @property
    def unit_dim(self) -> int:
        return self.group_size * self.positions // self.num_patches

    def check(self, where: str) -> None:
        """ValueError naming the block and the valid choices if the patches do not divide the positions."""
        for size in self.spatial:
            if self.kind != "features" and size % self.patches:
                valid = [d for d in range(1, min(self.spatial) + 1) if all(s % d == 0 for s in self.spatial)]
                raise ValueError(f"{where}: patches={self.patches} does not divide the block's positions "
                                 f"{self.spatial} (output shape {self.shape}); valid: {', '.join(map(str, valid))}")

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        """``(*lead, *shape) -> (*lead, G, P, e)``."""
        lead = x.shape[: x.dim() - len(self.shape)]
        n, q, groups, s = len(lead), self.patches, self.groups, self.group_size
        if self.kind == "features":
            return x.reshape(*lead, groups, 1, s)
        if self.kind == "tokens":
            tokens = x.reshape(*lead, q, self.shape[0] // q, groups, s)
            return tokens.permute(*range(n), n + 2, n, n + 3, n + 1).reshape(*lead, groups, q, self.unit_dim)
        spatial = [part for size in self.spatial for part in (q, size // q)]
        maps = x.reshape(*lead, groups, s, *spatial)
        k = len(self.spatial)
        order = [*range(n), n, *(n + 2 + 2 * i for i in range(k)), n + 1, *(n + 3 + 2 * i for i in range(k))]
        return maps.permute(order).reshape(*lead, groups, self.num_patches, self.unit_dim)

    def from_units(self, units: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_units`: ``(*lead, G, P, e) -> (*lead, *shape)``."""
        lead = units.shape[:-3]
        n, q, groups, s = len(lead), self.patches, self.groups, self.group_size
        if self.kind == "features":
            return units.reshape(*lead, *self.shape)
        if self.kind == "tokens":
            tokens = units.reshape(*lead, groups, q, s, self.shape[0] // q)
            return tokens.permute(*range(n), n + 1, n + 3, n, n + 2).reshape(*lead, *self.shape)
        k = len(self.spatial)
        maps = units.reshape(*lead, groups, *(q,) * k, s, *(size // q for size in self.spatial))
        # maps dims: G, q_1..q_k, s, r_1..r_k -> G, s, (q_1, r_1), .., (q_k, r_k)
        order = [*range(n), n, n + 1 + k, *(d for i in range(k) for d in (n + 1 + i, n + 2 + k + i))]
        return maps.permute(order).reshape(*lead, *self.shape)

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        """Global average pooling over the positions: ``(B, *shape) -> (B, F)``."""
        if self.kind == "features":
            return a
        if self.kind == "tokens":
            return a.mean(1)
        return a.flatten(2).mean(-1)

    def patch_means(self, a: torch.Tensor) -> torch.Tensor:
        """Σ over each patch's positions / all positions: ``(B, *shape) -> (B, G, P, s)``."""
        if self.kind == "features":
            return a.reshape(a.shape[0], self.groups, 1, self.group_size)
        units = self.to_units(a)
        per_position = units.reshape(*units.shape[:-1], self.group_size, -1)
        return per_position.sum(-1) / self.positions


def loss_layout(shape: tuple[int, ...], group_size: int | None, patches: int, where: str, option: str = "group_size",
                fit_groups: bool = False) -> LossLayout:
    """The :class:`LossLayout` of a per-sample ``shape``: groups of ``group_size`` features (``None``:
    one), the largest number of patches per spatial dimension <= ``patches`` that divides every size.

    A ``group_size`` that does not divide the features is a ValueError naming ``where``,
    ``option`` and the valid sizes; with ``fit_groups`` the largest divisor below it is taken.
    """
    kind = layout_of(torch.Size(shape))
    features = shape[-1] if kind == "tokens" else shape[0]
    if fit_groups and group_size is not None:
        group_size = max(d for d in range(1, min(group_size, features) + 1) if features % d == 0)
    if group_size is not None and features % group_size:
        divisors = [d for d in range(1, features + 1) if features % d == 0]
        raise ValueError(f"{option}={group_size} does not divide the {features} features of {where} (output shape "
                         f"{shape}); valid: {', '.join(map(str, divisors))}")
    groups = 1 if group_size is None else max(features // group_size, 1)
    spatial = {"features": (), "tokens": shape[:1], "channels": shape[1:]}[kind]
    patches = 1 if not spatial else max(
        q for q in range(1, min(patches, *spatial) + 1) if all(size % q == 0 for size in spatial))
    layout = LossLayout(kind, shape, groups, patches)
    layout.check(where)
    return layout


def loss_and_logit_gradients(loss_fn: LossFunction, logits: torch.Tensor, targets: torch.Tensor,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_b and ∂ℓ_b/∂o_b for every sample: logits o ``(B, C) -> (B,), (B, C)``.

    Cross-entropy (the default loss): softmax(o) − onehot(y), its closed form. Any other
    loss: forward mode over the loss function alone, one jvp of the loss of C copies of
    the batch, copy c along the unit vector e_c (each sample's loss depends on its row only).
    """
    if loss_fn is cross_entropy_per_sample:
        log_probabilities = torch.log_softmax(logits, dim=1)
        losses = F.nll_loss(log_probabilities, targets, reduction="none")
        gradients = log_probabilities.exp_().scatter_(1, targets.unsqueeze(1), -1.0, reduce="add")
        return losses, gradients
    batch, classes = logits.shape
    rows = logits.unsqueeze(0).expand(classes, batch, classes).reshape(classes * batch, classes)
    basis = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    directions = basis.unsqueeze(1).expand(classes, batch, classes).reshape(classes * batch, classes)
    losses, derivatives = jvp(lambda r: loss_fn(r, targets.repeat(classes)), (rows,), (directions,))
    return losses[:batch], derivatives.reshape(classes, batch).t()


def group_directional_derivatives(
    layout: LossLayout, output_tangents: torch.Tensor, pooled: torch.Tensor, logit_gradients: torch.Tensor,
    head: nn.Linear | None,
) -> torch.Tensor:
    """d_{b,g,p} = ∇_a ℓ_{b,g,p} · ȧ_b for the block output's tangents ȧ: ``(K, B, G, P)``.

    Loss (g, p) sees a only through the moving part m_{g,p} of its group and patch, so
    by the chain rule (forward mode: the block's tangent ȧ, then the head's and the
    loss's Jacobian-vector products at the primal)

        d_{b,g,p} = ∇_o ℓ_b · W_g ṁ_{g,p} = (W_g^T ∇_o ℓ_b) · ṁ_{g,p},

    with ṁ_{g,p} the patch means of ȧ in group g, patch p, and W the linear head's weight
    (the identity for the last block). Other heads: :func:`fwdgrad.local.heads.unit_directional_derivatives`.

    Args:
        layout: the block output's layout (groups, patches).
        output_tangents: ȧ ``(K, B, *layout.shape)``.
        pooled: pool(a) ``(B, F)`` (the head's input at the primal).
        logit_gradients: ∇_o ℓ ``(B, C)`` (:func:`loss_and_logit_gradients`).
        head: the linear auxiliary head, ``None`` for the last block.
    """
    num_tangents, batch = output_tangents.shape[:2]
    moving = layout.patch_means(output_tangents.flatten(0, 1))  # (K·B, G, P, s)
    moving = moving.reshape(num_tangents, batch, *moving.shape[1:])
    weighted = logit_gradients if head is None else logit_gradients @ head.weight.detach()  # W^T ∇_o ℓ
    return (moving * weighted.reshape(1, batch, layout.groups, 1, layout.group_size)).sum(-1)


def _call_detached(head: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """head(inputs) with the head's parameters as constants (they carry no tangent anyway)."""
    if isinstance(head, nn.Linear):
        return F.linear(inputs, head.weight.detach(), None if head.bias is None else head.bias.detach())
    parameters = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, parameters, (inputs,))


def head_gradients(head: nn.Module, pooled: torch.Tensor, logit_gradients: torch.Tensor,
                   ) -> dict[str, torch.Tensor]:
    """The exact gradient of the head's loss (1/B) Σ ℓ(head(pool(a)), y) w.r.t. the head's own
    parameters, from ∇_o ℓ (``logit_gradients`` ``(B, C)``, :func:`group_losses` computed it):
    the head's local vector-Jacobian product
    (:func:`fwdgrad.core.layer_derivatives.local_parameter_gradients`: W: (1/B) Σ ∇_o ℓ pool(a)^T,
    c: (1/B) Σ ∇_o ℓ for the linear head; for another head a ``torch.func.vjp`` of the head
    alone, i.e. reverse mode over the head's own layers). Nothing flows into the block:
    ``pooled`` is a constant.
    """
    pooled = pooled.detach()
    scaled = logit_gradients / pooled.shape[0]
    if isinstance(head, nn.Linear):
        return local_parameter_gradients(head, (pooled,), {}, scaled)
    primals = {name: p.detach() for name, p in head.named_parameters() if p.requires_grad}
    _, pullback = torch.func.vjp(lambda params: torch.func.functional_call(head, params, (pooled,)), primals)
    return pullback(scaled)[0]
