"""The derivative through a BatchNorm's batch statistics, for the sites that feed one.

Inside a block's forward-mode passes a training-mode BatchNorm computes with its batch
statistics μ, σ² as constants (:func:`fwdgrad.local.blocks.constant_batch_statistics`), so
that each sample's loss depends on its own input only and the per-unit estimates of
:mod:`fwdgrad.local.estimator` stay apart. What the passes estimate at a site z that feeds a
BatchNorm y = γ x̂ + β, x̂ = (z − μ)/σ, is then the gradient with the statistics held fixed,
ĝ_const ≈ (γ/σ) ∇_y L. ``nn.BatchNorm`` (and backprop) differentiate through μ(z) and σ(z):

    ∇_z L = (γ/σ) (∇_y L − mean(∇_y L) − x̂ · mean(∇_y L · x̂)) = P(ĝ_const),

    P(v) = v − mean(v) − x̂ · mean(v · x̂),

means per channel over the batch and the positions (the BatchNorm's reduction axes). P is
linear and the same for every sample, so P applied to an unbiased estimate of the
constant-statistics gradient is an unbiased estimate of the gradient through the
statistics, and exact where that one is (groups of one unit at every position). It is a
derivative local to the one BatchNorm, computed from its recorded batch statistics: no
pass through any other layer. P is an orthogonal projection (per channel, onto the
vectors orthogonal to 1 and x̂), so it only removes what the statistics cancel.

Why it matters is measured in ``docs/local-losses.md`` (the ResNet-18 table, its
``local_constant_bn`` row: the same training with the statistics held constant).
"""

from __future__ import annotations

import torch
from torch import nn

from fwdgrad.core.forward_mode import rng_state, set_rng_state
from fwdgrad.local.blocks import Block, constant_batch_statistics, is_training_batch_norm

BATCH_NORM_MODES = ("differentiated", "constant")


def statistics_projection(gradient: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """P(ĝ) = ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂), x̂ = (z − μ)/√(σ² + ε), per channel (module docstring).

    Args:
        gradient: ĝ ``(B, C, *spatial)``, an estimate of ∇_z L with the statistics held constant.
        z: the BatchNorm's input ``(B, C, *spatial)``.
        mean, var: its batch mean and biased variance ``(C,)``; eps: its ε.

    Returns:
        The gradient through the batch statistics, ``(B, C, *spatial)``.
    """
    dims = [0, *range(2, z.dim())]
    shape = [1, -1] + [1] * (z.dim() - 2)
    normalized = (z.to(gradient.dtype) - mean.to(gradient.dtype).reshape(shape)) * torch.rsqrt(
        var.to(gradient.dtype).reshape(shape) + eps)
    return gradient - gradient.mean(dims, keepdim=True) - normalized * (gradient * normalized).mean(dims, keepdim=True)


@torch.no_grad()
def batch_norm_consumers(block: Block, site_modules: dict[nn.Module, str], h: torch.Tensor
                         ) -> dict[int, nn.Module]:
    """{site call position: the training-mode BatchNorm whose input is that call's output tensor}.

    Learnt from one plain pass on the batch ``h`` (the RNG replayed, running statistics
    untouched). Only a BatchNorm called once in the block counts (its one set of statistics).
    """
    outputs: list[torch.Tensor] = []
    norms = [module for root in block.modules for module in root.modules() if is_training_batch_norm(module)]
    calls: dict[nn.Module, int] = {}
    consumers: dict[int, nn.Module] = {}

    def after_site(module, args, output):
        outputs.append(output if isinstance(output, torch.Tensor) else None)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        for position, output in enumerate(outputs):
            if output is not None and args and args[0] is output:
                consumers[position] = module

    handles = [module.register_forward_hook(after_site) for module in site_modules]
    handles += [module.register_forward_pre_hook(before_norm) for module in norms]
    saved = rng_state(h.device)
    try:
        with constant_batch_statistics(block.modules):
            block.forward(h)
    finally:
        for handle in handles:
            handle.remove()
        set_rng_state(h.device, saved)
    return {position: norm for position, norm in consumers.items() if calls.get(norm) == 1}
