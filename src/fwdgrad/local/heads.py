"""Auxiliary heads: a block's (or a site's) output a ``(B, *shape)`` -> logits ``(B, C)``.

The local loss of a block is its head's loss, L = (1/B) Σ_b ℓ(head(a_b), y_b). Kinds
(:data:`HEADS`; ``head_pool`` = Q sets the pooled grid):

==============  ===========================================================  ==========================
kind            head(a)                                                      after
==============  ===========================================================  ==========================
``linear``      W pool(a) + c, pool = global average over the positions      Ren et al. 2023 (default)
``normalized``  W flatten(pool_Q(norm(a))) + c; norm = BatchNorm for feature  Fournier et al. 2023
                maps and vectors (batch statistics), a LayerNorm without
                affine over each token's features for token sequences (Ren
                et al.'s LocalMixer head normalizes each group of the model's
                channels); pool_Q = adaptive average pool to Q × Q
``conv``        W flatten(pool_Q(ReLU(BN(conv3x3(a))))) + c (feature maps;   Belilovsky et al. 2020 (DGL)
                the convolution without bias: BatchNorm cancels it); on
                vectors and token sequences the ``mlp`` head (its hidden
                layer a Linear instead of the convolution)
``mlp``         W₂ ReLU(W₁ flatten(pool_Q(norm(a))) + c₁) + c₂, 256 hidden
==============  ===========================================================  ==========================

What the estimators need from a head, per sample b (:func:`head_derivatives`): the loss
ℓ_b, the gradient of ℓ_b with respect to the head's input, ∇_a ℓ_b ``(B, *shape)``, and
the gradient of L with respect to the head's own parameters. Both gradients come from one
reverse-mode product through the head alone (``torch.func.vjp``): a **derivative local to
the head**, the head's own layers and nothing of the model; the block's parameters are
estimated by forward mode (:mod:`fwdgrad.local.estimator`). The head's BatchNorms run with
their batch statistics, differentiated through as ``nn.BatchNorm`` is, and update their
running statistics once per step. The ``linear`` head (a bare ``nn.Linear`` on the pooled features) has the same
derivatives in closed form (:mod:`fwdgrad.local.losses`), used instead.

Cost per step, on top of the head's forward: one reverse pass through the head. For a
``(C, H, W)`` map: ``linear`` O(B C HW); ``normalized`` the same plus C·Q²·classes
weights; ``conv`` a 3×3 convolution C → C at the block's resolution (about one more layer
of the block, forward and backward); ``mlp`` two small matmuls after the pooling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

from fwdgrad.local.blocks import batch_statistics
from fwdgrad.local.losses import LossLayout, group_directional_derivatives, head_gradients, loss_and_logit_gradients

HEADS = ("linear", "normalized", "conv", "mlp")
MLP_HIDDEN = 256


class TokenGroupNorm(nn.Module):
    """LayerNorm without affine over each group of ``group_size`` features of every token:
    ``(B, T, D) -> (B, T, D)`` (Ren et al.'s normalization before their heads)."""

    def __init__(self, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        grouped = a.unflatten(-1, (self.groups, -1))
        return F.layer_norm(grouped, grouped.shape[-1:], eps=self.eps).flatten(-2)


class Pool(nn.Module):
    """Average pooling of a block output: feature maps to a Q × Q grid (Q = 1: global), token
    sequences over their tokens, vectors unchanged; flattened: ``(B, *shape) -> (B, F·Q²)``."""

    def __init__(self, kind: str, size: int):
        super().__init__()
        self.kind, self.size = kind, size

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "features":
            return a
        if self.kind == "tokens":
            return a.mean(1)
        if self.size == 1:
            return a.flatten(2).mean(-1)
        pool = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[a.dim()]
        return pool(a, self.size).flatten(1)


def _pooled_size(layout: LossLayout, pool_size: int) -> tuple[int, int]:
    """(Q actually used, pooled features F·Q^n)."""
    if layout.kind != "channels":
        return 1, layout.features
    size = min(pool_size, *layout.spatial)
    return size, layout.features * size ** len(layout.spatial)


def _norm(layout: LossLayout) -> nn.Module:
    if layout.kind == "tokens":  # over each token's features: the loss's groups may be one feature wide
        return TokenGroupNorm(1)
    if layout.kind == "features":
        return nn.BatchNorm1d(layout.features)
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(layout.spatial)](layout.features)


def _reset(module: nn.Module, generator: torch.Generator | None) -> None:
    """torch's default initialization of Linear / Conv (U(±1/√fan_in)), drawn from ``generator``."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                bound = 1 / math.sqrt(layer.weight[0].numel())
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)


def make_head(kind: str | Callable[[int, int], nn.Module], layout: LossLayout, classes: int, pool_size: int,
              generator: torch.Generator | None, device, dtype) -> nn.Module:
    """The auxiliary head ``kind`` (:data:`HEADS`, or a callable ``(features, classes) -> nn.Module``
    applied to the globally pooled features) for a block output of ``layout``.

    ``linear`` is a bare ``nn.Linear`` on the globally pooled features ``(B, F)`` (the
    estimators pool, then use its closed-form derivatives); every other head maps the block
    output ``(B, *shape)`` itself. Linear and convolution weights get torch's default
    initialization U(±1/√fan_in), drawn from ``generator``.
    """
    if callable(kind) and not isinstance(kind, str):
        module = kind(layout.features, classes)
        if not isinstance(module, nn.Module):
            raise TypeError(f"head({layout.features}, {classes}) must return an nn.Module, got {type(module).__name__}")
        return nn.Sequential(Pool(layout.kind, 1), module).to(device=device, dtype=dtype)
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; valid choices: {', '.join(HEADS)}, or a callable "
                         "(features, classes) -> nn.Module")
    if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
        raise ValueError(f"head_pool must be an integer >= 1 (the pooled grid's side), got {pool_size!r}")
    if kind == "linear":  # applied to the pooled features by the estimators (closed-form derivatives)
        head = nn.Linear(layout.features, classes)
    elif kind == "conv" and layout.kind == "channels":
        size, pooled = _pooled_size(layout, pool_size)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(layout.spatial)]
        head = nn.Sequential(conv(layout.features, layout.features, 3, padding=1, bias=False),  # BN cancels a bias
                             _norm(layout), nn.ReLU(), Pool(layout.kind, size),
                             nn.Linear(pooled, classes))
    else:
        size, pooled = _pooled_size(layout, pool_size)
        body = [nn.Linear(pooled, classes)] if kind == "normalized" else \
            [nn.Linear(pooled, MLP_HIDDEN), nn.ReLU(), nn.Linear(MLP_HIDDEN, classes)]
        head = nn.Sequential(_norm(layout), Pool(layout.kind, size), *body)
    _reset(head, generator)
    return head.to(device=device, dtype=dtype)


def head_derivatives(head: nn.Module, a: torch.Tensor, targets: torch.Tensor, loss_fn,
                     statistics: list | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ℓ_b, ∇_o ℓ_b, ∇_a ℓ_b and ∇_θ L of the head on the block output ``a``: a derivative local to the head.

    One ``torch.func.vjp`` of (a, θ_head) ↦ head(a) at the primal, pulled back along
    ∇_o ℓ (the loss's closed-form logit gradients): B ∇_a L ``(B, *shape)``, which is each
    sample's ∇_a ℓ_b when the samples are independent, and ∇_θ L for the head's parameters,
    L = (1/B) Σ_b ℓ_b. A BatchNorm in the head uses its batch statistics and is differentiated
    through them, as ``nn.BatchNorm`` is (holding them constant would let the block scale its
    output up without bound); they are recorded into ``statistics`` for the running update.

    Returns:
        ``(losses (B,), logit_gradients (B, C), input_gradients (B, *shape), {name: gradient})``.
    """
    a = a.detach()
    parameters = {name: p.detach() for name, p in head.named_parameters() if p.requires_grad}
    with batch_statistics([head], statistics):
        logits, pullback = vjp(lambda x, params: functional_call(head, params, (x,)), a, parameters)
    losses, logit_gradients = loss_and_logit_gradients(loss_fn, logits.detach(), targets)
    input_gradients, gradients = pullback(logit_gradients)
    return losses, logit_gradients, input_gradients, {name: g / a.shape[0] for name, g in gradients.items()}


def unit_directional_derivatives(layout: LossLayout, output_tangents: torch.Tensor, input_gradients: torch.Tensor
                                 ) -> torch.Tensor:
    """d_{k,b,g,p} = Σ_{i ∈ unit (g, p)} (∇_a ℓ_b)_i ȧ_{k,b,i}: ``(K, B, *shape) -> (K, B, G, P)``.

    The derivative along ȧ of the loss with only unit (g, p) of a moving (the group- and
    patch-wise losses of :mod:`fwdgrad.local.losses`, for any head).
    """
    return layout.to_units(output_tangents * input_gradients.to(output_tangents.dtype)).sum(-1)


@dataclass
class LossPoint:
    """The local loss at one tensor a: a block's output, or a mixing site's own output.

    Holds the per-sample losses, ∇_o ℓ, and what turns a tangent ȧ of a into the directional
    derivatives of the group- and patch-wise losses (:meth:`derivatives`): the pooled
    features for a ``linear`` head (or none, the last block: closed forms of
    :mod:`fwdgrad.local.losses`), ∇_a ℓ for any other head (:func:`head_derivatives`).
    """

    layout: LossLayout
    head: nn.Module | None
    losses: torch.Tensor
    logit_gradients: torch.Tensor
    pooled: torch.Tensor | None = None
    input_gradients: torch.Tensor | None = None
    gradients: dict[str, torch.Tensor] | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def derivatives(self, output_tangents: torch.Tensor) -> torch.Tensor:
        """d ``(K, B, G, P)`` of the group/patch losses along ȧ ``(K, B, *shape)``."""
        if self.input_gradients is None:
            return group_directional_derivatives(self.layout, output_tangents, self.pooled, self.logit_gradients,
                                                 self.head)
        return unit_directional_derivatives(self.layout, output_tangents, self.input_gradients)

    def input_gradient(self, shape: tuple[int, ...]) -> torch.Tensor:
        """B ∇_a L ``(B, *shape)`` (each sample's ∇_a ℓ_b for independent samples), for any head: the
        linear head's in closed form, (W^T ∇_o ℓ) / positions at every position (the identity W for
        the last block)."""
        if self.input_gradients is not None:
            return self.input_gradients
        weighted = self.logit_gradients if self.head is None else self.logit_gradients @ self.head.weight.detach()
        features = self.layout.features
        if self.layout.kind == "features":
            return weighted
        if self.layout.kind == "tokens":
            return (weighted / shape[1]).unsqueeze(1).expand(-1, shape[1], features)
        positions = self.layout.positions
        return (weighted / positions).reshape(-1, features, *[1] * len(self.layout.spatial)).expand(-1, *shape[1:])

    def head_gradients(self) -> dict[str, torch.Tensor]:
        """The exact gradient of the mean loss with respect to the head's own parameters."""
        if self.head is None:
            return {}
        if self.gradients is not None:
            return self.gradients
        return head_gradients(self.head, self.pooled, self.logit_gradients)


def loss_point(layout: LossLayout, head: nn.Module | None, a: torch.Tensor, targets: torch.Tensor, loss_fn,
               statistics: list | None = None) -> LossPoint:
    """The :class:`LossPoint` of ``head`` (``None``: a is the logits) at the primal ``a`` ``(B, *shape)``."""
    if head is None or isinstance(head, nn.Linear):
        pooled = layout.pool(a)
        logits = pooled if head is None else head(pooled)
        losses, logit_gradients = loss_and_logit_gradients(loss_fn, logits, targets)
        return LossPoint(layout, head, losses, logit_gradients, pooled=pooled)
    losses, logit_gradients, input_gradients, gradients = head_derivatives(head, a, targets, loss_fn, statistics)
    return LossPoint(layout, head, losses, logit_gradients, input_gradients=input_gradients, gradients=gradients)
