"""A block's later passes reuse the first pass's primal values (:mod:`fwdgrad.local.execution`).

Local losses run one forward-mode pass per perturbation site of a block, each with the tangent
on one site's output z_m; every pass computes the same primal (the same input, parameters and
dropout masks). A pass for site call m therefore needs no primal arithmetic of the site
modules (the convolutions, linear layers, norms), only:

- a site call before m, or after m with no tangent in its inputs: its first-pass output as it
  is (no tangent can reach it);
- the call m: its first-pass output, which the site's hook makes dual with the tangent;
- a call after m whose input carries a tangent: its first-pass output with the tangent of the
  module's linear part (a linear layer or convolution without its bias, a BatchNorm's scale
  γ / sqrt(σ² + ε) with the pass's constant statistics), the primal not computed again; any
  other module runs as it is (its forward-mode rule).

The operations between the site modules (activations, additions, pooling) still run, on
primal and tangent. An output changed in place after the first pass recorded it (torchvision's
``ReLU(inplace=True)`` after a BatchNorm, a residual ``+=``) is computed again, by the module
itself, with the recorded batch statistics. The reuse holds only where the pass replays the
first: each site module called once per pass (sites never nest); step.py checks that the
random-number state after a pass that reused values is the first pass's (a skipped module drew
no random numbers) and otherwise runs that pass again without reuse, for good.

On ResNet-18's BasicBlocks with downsampling this saves 9 of 12 convolutions a step used to run
in the block's four passes (``fwdgrad bench``, docs/speed-memory.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.local.blocks import is_training_batch_norm

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class RecordedOutputs:
    """The first pass's primal output of every site call, with its version counter then: an
    output changed in place since is not reused. ``None`` for an output that is not one tensor."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, int] | None] = []

    def add(self, output, primal: torch.Tensor) -> None:
        self.entries.append((primal, primal._version) if isinstance(output, torch.Tensor) else None)

    def get(self, index: int) -> torch.Tensor | None:
        """Call ``index``'s output if it is unchanged since the first pass, else ``None``."""
        entry = self.entries[index] if index < len(self.entries) else None
        if entry is None or entry[0]._version != entry[1]:
            return None
        return entry[0]


def reusable(calls: list[nn.Module]) -> bool:
    """Can the later passes replay the first from its values? Each site module called once (no site sits
    inside another: :func:`fwdgrad.local.sites.probe_structure` refuses such a block)."""
    return len(set(calls)) == len(calls)


def linear_part(module: nn.Module, tangent: torch.Tensor, lead: int, variances: dict) -> torch.Tensor | None:
    """The tangent of the module's output for an input tangent ``(*lead dims, B, ...)``, where the
    module is linear in its input up to a constant (no bias, constant statistics); ``None`` otherwise."""
    kind = type(module)
    if kind is nn.Linear:
        return F.linear(tangent, module.weight)
    if kind in _CONVOLUTIONS:
        flat = tangent.flatten(0, lead) if lead else tangent
        result = module._conv_forward(flat, module.weight, None)
        return result.unflatten(0, tangent.shape[:lead + 1]) if lead else result
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if is_training_batch_norm(module):
            var = variances.get(module)
        else:
            var = module.running_var
        if var is None:
            return None
        scale = torch.rsqrt(var.to(tangent.dtype) + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.to(tangent.dtype)
        return tangent * scale.reshape([1] * (lead + 1) + [-1] + [1] * (tangent.dim() - lead - 2))
    return None


class ReusedPrimals:
    """Inside: the site modules' forward serves the first pass's values as the module docstring says.

    Args:
        sites: the block's site modules (their names as values).
        outputs: the first pass's :class:`RecordedOutputs`.
        position: the perturbed site call m.
        count: the number of site calls so far in this pass (the site hooks' count).
        carries_tangent: ``(args, kwargs) -> bool``; make_dual: ``(primal, tangent) -> value``;
        tangent_of: ``value -> tangent``: the pass's forward mode (dual tensors or the fast mode).
        lead: leading tangent dimensions (0 for a dual tensor, 1 for the fast mode's K).
        variances: ``{BatchNorm: σ²}`` of the training-mode BatchNorms, from the first pass.
    """

    def __init__(self, sites: dict[nn.Module, str], outputs: RecordedOutputs, position: int,
                 count: Callable[[], int], carries_tangent: Callable, make_dual: Callable, tangent_of: Callable,
                 lead: int, variances: dict):
        self.sites, self.outputs, self.position, self.count = sites, outputs, position, count
        self.carries_tangent, self.make_dual, self.tangent_of = carries_tangent, make_dual, tangent_of
        self.lead, self.variances = lead, variances
        self.saved: dict[nn.Module, object] = {}

    def __enter__(self):
        for module in self.sites:
            self.saved[module] = module.__dict__.get("forward")  # a BatchNorm's constant-statistics forward
            module.forward = self._forward(module, module.forward)
        return self

    def __exit__(self, *exc):
        for module, previous in self.saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self.saved.clear()

    def _forward(self, module: nn.Module, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            index = self.count()
            cached = self.outputs.get(index)
            if cached is None:
                return original(*args, **kwargs)
            if index <= self.position or not self.carries_tangent(args, kwargs):
                return cached.view_as(cached)
            tangents = [self.tangent_of(a) for a in args if isinstance(a, torch.Tensor)]
            if len(args) != 1 or kwargs or len(tangents) != 1 or tangents[0] is None:
                return original(*args, **kwargs)
            tangent = linear_part(module, tangents[0], self.lead, self.variances)
            if tangent is None:
                return original(*args, **kwargs)
            return self.make_dual(cached.view_as(cached), tangent)

        return forward
