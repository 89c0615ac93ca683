"""What a site that mixes its block's units is trained on (``mixing_sites`` of :class:`fwdgrad.LocalForwardGradient`).

A site m mixes the block's units when no group or patch loss of the block sees only one of
its units (conv1 of a ResNet BasicBlock: conv2 mixes channels and positions). Crediting it
with the block's loss (``block_loss``) leaves one unit per sample: a tangent over the whole
output z_m, an estimate whose variance grows with its size. Two alternatives, both through
an auxiliary head of the site's own output (built at construction, trained on its own loss):

- ``own_loss``: the site is trained on that loss, L_m = (1/B) Σ ℓ(head_m(z_m), y), whose
  units are all apart (:mod:`fwdgrad.local.estimator`): greedy learning per layer.
- ``guess``: the site is trained on the **block's** loss, along a guess of its gradient
  (Fournier et al. 2023, "Can Forward Gradient Match Backpropagation?", inside a block): the
  guess is g_b = ∇_{z_m} ℓ_m,b, the gradient of the site's own loss (a derivative local to
  its head), the tangent its unit direction û_b = g_b / ‖g_b‖, the directional derivative
  of the block's loss d_b = ∇_{z_m} ℓ_b · û_b one forward-mode pass through the rest of the
  block, and the estimate the projection ĝ_b = d_b û_b: the block loss's gradient along the
  guess (biased towards the guess, with the variance of one direction).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fwdgrad.local.blocks import Block
from fwdgrad.local.execution import block_jvp
from fwdgrad.local.heads import LossPoint

MIXING_SITES = ("own_loss", "guess", "block_loss")


def guess_estimate(block: Block, site_modules: dict[nn.Module, str], position: int, h: torch.Tensor,
                   own_point: LossPoint, block_point: LossPoint, shape: tuple[int, ...],
                   combine: Callable[[torch.Tensor], torch.Tensor], chunk_size: int | None = None,
                   fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tangents (1, B, *z), d (1, B, G, P), ĝ (B, *z))`` of the ``guess`` rule for site call ``position``.

    ``own_point`` is the site's own loss at its output z (the guess), ``block_point`` the
    block's loss, ``shape`` z's shape ``(B, *z)``; ``combine`` combines d across processes
    (:meth:`fwdgrad.ForwardGradient.combine_directional_derivatives`). ĝ estimates the
    gradient of the block's loss summed over the batch (divide by B for the mean).
    """
    guess = own_point.input_gradient(shape)
    flat = guess.reshape(shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    direction = (flat / norms).reshape(shape)
    result = block_jvp(block, site_modules, position, h, direction.unsqueeze(0), False, chunk_size, fast)
    derivatives = combine(block_point.derivatives(result.output_tangents))  # (1, B, G, P)
    along = derivatives.sum((-1, -2))[0]  # the whole block loss's derivative along û, per sample
    return direction.unsqueeze(0), derivatives, along.reshape(-1, *[1] * (len(shape) - 1)) * direction
