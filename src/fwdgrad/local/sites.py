"""The perturbation sites of a block: the modules whose outputs carry tangents, and their updates.

A site is a module of a block that owns trainable parameters; its output z_m carries the
tangents, and its parameters get the local vector-Jacobian product of the estimate ĝ_{z_m}
(a derivative of that one layer at its recorded input). Which sites a block has, in which
order, and whether each keeps the loss layout's groups and patches apart, is learnt from the
block's first step (:func:`probe_structure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fwdgrad.core.forward_mode import rng_state, set_rng_state
from fwdgrad.core.layer_derivatives import local_parameter_gradients
from fwdgrad.local.blocks import Block, batch_mean_var, is_training_batch_norm
from fwdgrad.local.execution import block_jvp, structure_pass
from fwdgrad.local.losses import LossLayout
from fwdgrad.local.normalization import batch_norm_consumers


@dataclass
class Site:
    """A perturbation site of a block: a module's output, the units its tangents live on."""

    module: nn.Module
    name: str
    shape: tuple[int, ...]           # per sample
    owned: tuple[str, ...]           # parameter names (relative to the module) it updates
    by_group: bool = False           # its coordinates feed loss (g, p) through group g only
    by_patch: bool = False           # ... through patch p only
    # a site that mixes the block's units, trained on a loss of its own output (its own layout)
    own_layout: LossLayout | None = None
    # the training-mode BatchNorm that takes this site's output as its input, if any: the estimate on the
    # block's loss is then taken through its batch statistics (fwdgrad.local.normalization)
    batch_norm: nn.Module | None = None

    @property
    def own_loss(self) -> bool:
        return self.own_layout is not None

    def mixes(self, layout: LossLayout) -> bool:
        """Does the site mix the units (groups, patches) of the block's loss ``layout``?"""
        if layout.groups == 1 and layout.num_patches == 1:
            return False  # one unit per sample: nothing to keep apart
        return (layout.groups > 1 and not self.by_group) or (layout.num_patches > 1 and not self.by_patch)

    def units(self, layout: LossLayout) -> tuple[tuple[int, ...], int]:
        """(unit axes per sample, unit dimension e)."""
        if not (self.by_group or self.by_patch):
            return (), int(torch.Size(self.shape).numel())
        groups = layout.groups if self.by_group else 1
        patches = layout.num_patches if self.by_patch else 1
        return tuple(n for n, keep in ((groups, self.by_group), (patches, self.by_patch)) if keep), \
            layout.group_size * layout.positions * (layout.groups // groups) // patches

    def from_units(self, units: torch.Tensor, layout: LossLayout) -> torch.Tensor:
        """``(*lead, *unit axes, e) -> (*lead, *shape)``: a unit's e entries back to the site's coordinates."""
        if not (self.by_group or self.by_patch):
            return units.reshape(*units.shape[:-1], *self.shape)
        groups, patches, e = layout.groups, layout.num_patches, layout.unit_dim
        if self.by_group and not self.by_patch:
            units = units.reshape(*units.shape[:-2], groups, patches, e)
        elif self.by_patch and not self.by_group:
            units = units.reshape(*units.shape[:-2], patches, groups, e).transpose(-3, -2)
        return layout.from_units(units)

    def reduce(self, derivatives: torch.Tensor) -> torch.Tensor:
        """d ``(K, B, G, P)`` summed over the axes this site mixes: ``(K, B, *unit axes)``."""
        mixed = [dim for dim, kept in ((2, self.by_group), (3, self.by_patch))
                 if not kept and derivatives.shape[dim] > 1]
        if mixed:
            derivatives = derivatives.sum(mixed, keepdim=True)
        drop = [dim for dim, kept in ((2, self.by_group), (3, self.by_patch)) if not kept]
        return derivatives.squeeze(drop) if drop else derivatives


@dataclass
class BlockStructure:
    """What the probe of a block learnt: its sites in call order, and its loss layout."""

    sites: list[Site]
    site_modules: dict[nn.Module, str]
    layout: LossLayout

    @property
    def block_loss_positions(self) -> list[int]:
        """The sites trained on the block's loss (the others have losses of their own)."""
        return [position for position, site in enumerate(self.sites) if not site.own_loss]


def probe_structure(block: Block, layout: LossLayout, module_names: dict[nn.Module, str], h: torch.Tensor,
                    own_layout: Callable[[tuple[int, ...]], LossLayout] | None = None) -> BlockStructure:
    """The sites of ``block`` in call order, learnt from one pass on the batch ``h``.

    A site is a module of the block that owns trainable parameters; it is checked to be
    called, and to call no other such module (its local derivative would run through it).
    A site whose output has the block output's shape is probed for separability
    (:func:`separable`): whether it keeps the loss layout's groups and patches apart. With
    ``own_layout`` (the loss layout for a site output's per-sample shape), a site that mixes
    them (:meth:`Site.mixes`) gets a loss of its own output instead of the block's
    (``mixing_sites="own_loss"`` of :class:`fwdgrad.LocalForwardGradient`): its units are
    then its own groups and patches, all kept apart.
    """
    owners = {module: module_names.get(module, type(module).__name__)
              for root in block.modules for module in root.modules()
              if any(p.requires_grad for p in module.parameters(recurse=False))}
    saved = rng_state(h.device)
    hooks = structure_pass(block, owners, h)
    set_rng_state(h.device, saved)
    called = set(hooks.calls)
    sites = []
    for module, shape in zip(hooks.calls, hooks.shapes):
        inner = [m for m in module.modules() if m is not module and m in called]
        if inner:
            raise ValueError(
                f"block {block.name!r}: module {owners[module]!r} owns parameters and calls other modules that "
                f"own parameters ({', '.join(owners[m] for m in inner)}); its local derivative would run through "
                "them. Split the block so that it is not one site, or move its own parameters into a submodule")
        # its own parameters, and those of submodules it uses without calling them (MultiheadAttention's out_proj)
        owned = tuple(name for name, p in module.named_parameters()
                      if p.requires_grad and owner(module, name) not in called - {module})
        sites.append(Site(module, owners[module], tuple(shape[1:]), owned))
    covered = {id(parameter(site.module, name)) for site in sites for name in site.owned}
    missing = [name for module, name in owners.items()
               if any(id(p) not in covered for p in module.parameters(recurse=False) if p.requires_grad)]
    if missing:
        raise ValueError(f"block {block.name!r}: modules {', '.join(missing)} own parameters but are never "
                         "called by the block's forward, so no local derivative reaches them")
    site_modules = {site.module: site.name for site in sites}
    if any(is_training_batch_norm(m) for root in block.modules for m in root.modules()):
        for position, norm in batch_norm_consumers(block, site_modules, h).items():
            sites[position].batch_norm = norm
    for position, site in enumerate(sites):
        if site.shape == layout.shape and (layout.groups > 1 or layout.num_patches > 1):
            site.by_group, site.by_patch = separable(block, layout, site_modules, position, site, h)
        if own_layout is not None and site.mixes(layout):
            site.own_layout = own_layout(site.shape)
            site.by_group = site.by_patch = True  # the tangent is on the loss's own input: nothing mixes
    return BlockStructure(sites, site_modules, layout)

def separable(block: Block, layout: LossLayout, site_modules: dict[nn.Module, str], position: int, site: Site,
              h: torch.Tensor) -> tuple[bool, bool]:
    """Does the site's group g (patch p) reach the block output's group g (patch p) only?

    Forward-mode probe on (up to) 4 samples: a random tangent on group 0 alone (patch 0
    alone) must give the other groups (patches) of the output an exactly zero tangent,
    and group 0 (patch 0) a nonzero one; then loss (g, p), which sees the output's group
    g and patch p only, sees the site's group g and patch p only.
    """
    h = h[:4]
    noise = torch.randn((h.shape[0], *site.shape), generator=torch.Generator(h.device).manual_seed(0),
                        device=h.device, dtype=h.dtype)
    units = layout.to_units(noise)
    on_group, on_patch = torch.zeros_like(units), torch.zeros_like(units)
    on_group[:, 0] = units[:, 0]
    on_patch[:, :, 0] = units[:, :, 0]
    tangents = layout.from_units(torch.stack([on_group, on_patch]))
    saved = rng_state(h.device)
    result = block_jvp(block, site_modules, position, h, tangents, first=False)
    set_rng_state(h.device, saved)
    reached = layout.to_units(result.output_tangents) != 0  # (2, b, G, P, e)
    by_group = layout.groups > 1 and bool(reached[0, :, 0].any() and not reached[0, :, 1:].any())
    by_patch = layout.num_patches > 1 and bool(reached[1, :, :, 0].any() and not reached[1, :, :, 1:].any())
    return by_group, by_patch


def site_parameter_gradients(site: Site, args, kwargs, estimate: torch.Tensor, statistics: list | None = None
                             ) -> dict[str, torch.Tensor]:
    """(∂z/∂θ)^T ĝ of the site's module w.r.t. the parameters it owns (one layer). ``statistics``: the
    pass's recorded ``(module, μ, σ², n)``, whose μ, σ² a training-mode BatchNorm site takes if it was
    called once (else they are computed from its input)."""
    module = site.module
    direct = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    if set(site.owned) == direct and is_training_batch_norm(module):
        # z = γ x̂ + β with x̂ normalized by the batch statistics held constant in the pass
        (h,) = args
        dims = [0, *range(2, h.dim())]
        shape = [1, -1] + [1] * (h.dim() - 2)
        h = h.to(estimate.dtype)
        recorded = [(mean, var) for other, mean, var, _ in statistics or () if other is module]
        mean, var = recorded[0] if len(recorded) == 1 else batch_mean_var(h)
        mean, var = mean.to(estimate.dtype), var.to(estimate.dtype)
        normalized = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)
        result = {"weight": (estimate * normalized).sum(dims), "bias": estimate.sum(dims)}
        return {name: result[name] for name in site.owned}
    if set(site.owned) == direct:
        return local_parameter_gradients(module, args, kwargs, estimate)
    # the module uses parameters of submodules it never calls (nn.MultiheadAttention's out_proj)
    primals = {name: parameter(module, name).detach() for name in site.owned}

    def output(parameters):
        result = functional_call(module, parameters, args, kwargs, strict=False)
        return result[0] if isinstance(result, (tuple, list)) else result

    _, pullback = torch.func.vjp(output, primals)
    (gradients,) = pullback(estimate.to(next(iter(primals.values())).dtype))
    return gradients


def parameter(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s parameter at the dotted path ``name``."""
    return module.get_parameter(name)


def owner(module: nn.Module, name: str) -> nn.Module:
    """The submodule of ``module`` that holds the parameter ``name`` directly."""
    return module.get_submodule(name.rpartition(".")[0])
