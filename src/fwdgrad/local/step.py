"""One step of local losses on one block: its passes, the estimates per unit, the local updates.

:func:`train_block` is :meth:`fwdgrad.LocalForwardGradient.backward`'s work for block b (see
:mod:`fwdgrad.local.estimator` for the method): the first pass records every site's input and
the BatchNorms' batch statistics, the block's loss (:mod:`fwdgrad.local.heads`) gives the
directional derivatives of its group and patch losses, each site gets its estimate per unit
(a site that mixes the block's units: :mod:`fwdgrad.local.mixing`), and the sites' parameters
their local vector-Jacobian products, reaching ``.grad`` once every site of the block is checked.
"""

from __future__ import annotations

import math

import torch

from fwdgrad.core.forward_mode import (
    accumulate_grad,
    check_finite,
    check_finite_updates,
    rng_state,
    same_rng_state,
    set_rng_state,
)
from fwdgrad.local.blocks import update_running_statistics
from fwdgrad.local.execution import block_jvp, record_pass, site_output
from fwdgrad.local.heads import LossPoint, loss_point
from fwdgrad.local.mixing import guess_estimate
from fwdgrad.local.normalization import statistics_projection
from fwdgrad.local.sites import parameter, site_parameter_gradients


def train_block(lfg, index: int, h: torch.Tensor, targets: torch.Tensor):
    """Fill ``.grad`` of block ``index``'s parameters and heads for the batch; returns ``(output, loss, record)``.

    ``lfg`` is the :class:`fwdgrad.LocalForwardGradient`; ``h`` the block's (detached) input.
    """
    structure = lfg._structure(index, h)
    fast = lfg.mode == "fast"
    sites, layout, batch, block = structure.sites, structure.layout, h.shape[0], lfg.blocks[index]
    on_block_loss = structure.block_loss_positions
    saved = rng_state(lfg.device) if len(sites) > 1 else None
    record = {"input": h, "sites": []} if lfg.keep_records else None
    # the first pass records every site's input and the batch statistics: the first block-loss site's
    # forward-mode pass, or a plain pass when every site has a loss of its own
    first_position = on_block_loss[0] if on_block_loss else None
    tangents_of = {}
    if first_position is None:
        first = record_pass(block, structure.site_modules, h)
    else:
        unit_tangents = lfg._sample(sites[first_position], layout, batch)
        tangents_of[first_position] = unit_tangents
        first = block_jvp(block, structure.site_modules, first_position, h,
                          sites[first_position].from_units(unit_tangents.movedim(-2, 0), layout), True, lfg.chunk_size,
                          fast, keep_outputs=len(sites) > 1)
    statistics = list(first.statistics)
    # the later passes reuse the first pass's values (fwdgrad.local.reuse) while they replay its random draws
    after_first = rng_state(lfg.device) if saved is not None and index not in lfg.replayed_blocks else None
    head = lfg.heads[index] if index < len(lfg.heads) else None
    point = loss_point(layout, head, first.output, targets, lfg.loss_fn, statistics)
    points, updates = {}, []
    for position, site in enumerate(sites):
        if position and saved is not None:
            set_rng_state(lfg.device, saved)  # the same dropout masks in every site's pass
        args, kwargs = first.inputs[position]
        if site.own_loss:  # a loss of the site's own output: the guess, or what it is trained on
            output = _site_output(first, position, site, args, kwargs, statistics)
            points[position] = site_point = loss_point(site.own_layout, lfg.site_heads[lfg._site_key(index, position)],
                                                       output, targets, lfg.loss_fn, statistics)
        if site.own_loss and lfg.mixing_sites == "guess":
            tangents, derivatives, estimate = guess_estimate(
                block, structure.site_modules, position, h, site_point, point, tuple(output.shape),
                lfg.combine_directional_derivatives, lfg.chunk_size, fast)
            estimate = estimate / batch
            checked, target = estimate, point
        else:
            if site.own_loss:  # the tangent sits on the loss's own input: ȧ = u
                site_layout, target = site.own_layout, site_point
                unit_tangents = lfg._sample(site, site_layout, batch)
                tangents = site.from_units(unit_tangents.movedim(-2, 0), site_layout)
                derivatives = site_point.derivatives(tangents)
            else:
                site_layout, target = layout, point
                unit_tangents = tangents_of.pop(position, None)
                if unit_tangents is None:
                    unit_tangents = lfg._sample(site, layout, batch)
                tangents = site.from_units(unit_tangents.movedim(-2, 0), layout)
                result = first if position == first_position else _later_pass(
                    lfg, index, block, structure, position, h, tangents, first, saved, after_first)
                derivatives = point.derivatives(result.output_tangents)
                result.output_tangents = None  # `first` keeps the output and the inputs, not the tangents
            derivatives = lfg.combine_directional_derivatives(derivatives)
            unit_derivatives = site.reduce(derivatives).movedim(0, -1)  # (B, *U, K)
            # ĝ / B: the update estimates the gradient of the mean loss
            estimate = site.from_units(lfg._estimate(unit_tangents, unit_derivatives, 1 / batch), site_layout)
            if not site.own_loss and site.batch_norm is not None and lfg.batch_norm == "differentiated":
                estimate = _through_statistics(site, estimate, sites, first, statistics)
            # with the mean of K = 1, ĝ = d u is finite with d
            checked = unit_derivatives if lfg._linear_single_tangent else estimate
        # one number checks the loss, d and ĝ: a sum is finite iff every term is (or it overflowed: then the
        # precise checks below pass and the step goes on)
        if not math.isfinite(float(checked.sum() + target.loss)):
            check_finite(target.loss, derivatives)
            check_finite_updates([estimate], lfg.aggregation, f"estimate ĝ_z of site {site.name!r}")
        # the site's parameter gradients now (parameter-sized), so that one site's activation-sized
        # tensors are alive at a time; they reach .grad once every site of the block is checked
        updates.append(site_parameter_gradients(site, args, kwargs, estimate, statistics))
        if record is not None:
            record["sites"].append({"name": site.name, "tangents": tangents, "directional_derivatives":
                                    derivatives, "estimate": estimate * batch, "by_group": site.by_group,
                                    "by_patch": site.by_patch, "own_loss": site.own_loss})
        del tangents, derivatives, estimate, checked
    for site, gradients in zip(sites, updates):
        for name, gradient in gradients.items():
            accumulate_grad(parameter(site.module, name), gradient, owned=True)
    for loss_at in (point, *points.values()):
        _accumulate_head(loss_at)
    update_running_statistics(statistics)
    if record is not None:
        record["output"] = first.output
        record["site_losses"] = {sites[p].name: float(q.loss) for p, q in points.items()}
    return first.output, point.loss, record


def _later_pass(lfg, index, block, structure, position, h, tangents, first, saved, after_first):
    """Site call ``position``'s pass after the first, reusing the first pass's values; if the reused pass
    drew other random numbers than the first (a module it skipped draws some), it runs again without."""
    fast = lfg.mode == "fast"
    if after_first is None:
        return block_jvp(block, structure.site_modules, position, h, tangents, False, lfg.chunk_size, fast)
    result = block_jvp(block, structure.site_modules, position, h, tangents, False, lfg.chunk_size, fast, first)
    if same_rng_state(rng_state(lfg.device), after_first):
        return result
    lfg.replayed_blocks.add(index)
    set_rng_state(lfg.device, saved)
    return block_jvp(block, structure.site_modules, position, h, tangents, False, lfg.chunk_size, fast)


def _site_output(first, position: int, site, args, kwargs, statistics) -> torch.Tensor:
    """A site's output: the first pass's if unchanged since (a new view: the caller may keep it), else computed."""
    output = first.site_output(position)
    return site_output(site.module, args, kwargs, statistics) if output is None else output.view_as(output)


def _through_statistics(site, estimate: torch.Tensor, sites, first, statistics) -> torch.Tensor:
    """The estimate at a site that feeds a training-mode BatchNorm, taken through that BatchNorm's batch
    statistics (:func:`fwdgrad.local.normalization.statistics_projection`)."""
    norm = site.batch_norm
    mean, var = next((mean, var) for module, mean, var, _ in statistics if module is norm)
    position = next((p for p, other in enumerate(sites) if other.module is norm), None)
    if position is not None:  # the BatchNorm is a site: its recorded input is z
        z = first.inputs[position][0][0]
    else:
        position = sites.index(site)
        args, kwargs = first.inputs[position]
        z = _site_output(first, position, site, args, kwargs, statistics)
    return statistics_projection(estimate, z, mean, var, norm.eps)


def _accumulate_head(point: LossPoint) -> None:
    for name, gradient in point.head_gradients().items():
        accumulate_grad(parameter(point.head, name), gradient, owned=True)
