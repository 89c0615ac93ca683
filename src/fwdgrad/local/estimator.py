"""Local losses with activity forward gradients: ``LocalForwardGradient(model, blocks=...)``.

Ren et al. 2023, "Scaling Forward Gradient With Local Losses" (ICLR). The model is cut
into blocks (:mod:`fwdgrad.local.blocks`); block b < last gets an auxiliary head and its
own local loss L_b, the last block's loss is the task loss (:mod:`fwdgrad.local.losses`).
The input of every block is detached: no derivative crosses a block boundary. One step,
block after block, holding only one block's activations at a time:

1. h ← the previous block's output (detached; the batch x for the first block).
2. Perturbation sites: the outputs z_m of the block's modules that own parameters (as
   activity perturbation, :mod:`fwdgrad.core.activity`). For each site m, one forward-mode pass
   (:func:`fwdgrad.local.execution.block_jvp`: K tangents u on z_m, the other sites
   unperturbed) runs the block on h and gives its output's tangents; the chain rule at the
   primal (:func:`fwdgrad.local.losses.group_directional_derivatives`) turns them into the
   directional derivatives of all G·P group/patch losses at once:

       d[k, b, g, p] = ∇_{z_m} ℓ_{b,g,p} · u_m[k, b]           (shape (K, B, G, P)).

3. Estimates per *unit*. A site whose coordinates feed each loss (g, p) only through its
   own group and patch (checked at the first step by a forward-mode probe: a tangent on
   group 0 alone must leave the other groups of the output exactly zero; the same for
   patches) gets
   tangents per unit (b, g, p), u ∈ R^e, e = s × positions per patch, and the
   aggregation of :mod:`fwdgrad.core.aggregation` per unit:

       ĝ_{z_{m,b,g,p}} = Σ_k c_k u_k,   c = aggregate(d[:, b, g, p], U)   (mean: c = d / K).

   Every loss has the block loss's value and ∇ of it in its own coordinates, so ĝ is an
   estimate of ∇_{z_m} ℓ_b, unbiased for ``mean`` with E[u u^T] = I. A site that mixes
   groups (e.g. the first convolution of a BasicBlock) or patches is credited with the
   sum of the losses over the axes it mixes (their sum's derivative is the block loss's):
   one unit per sample (and per patch or group it keeps apart). With K ≥ e and the
   orthogonal projection the estimate is exact.
4. Weight update of site m by its local vector-Jacobian product (a derivative of one
   layer at its recorded input, :func:`fwdgrad.core.layer_derivatives.local_parameter_gradients`):
   θ_m.grad += (1/B) Σ_b (∂z_{m,b}/∂θ_m)^T ĝ_{z_{m,b}}.
5. The head's parameters get the exact gradient of L_b (one layer,
   :func:`fwdgrad.local.losses.head_gradients`); the block's output becomes the next input.

BatchNorm in training mode runs inside the passes with its batch statistics as
constants (:func:`fwdgrad.local.blocks.constant_batch_statistics`) and updates its running
statistics once per step: each sample's loss then depends on its own input only, and the
estimate is of the gradient with the statistics held fixed (not through them, as backprop's).
With group size 1 and Rademacher tangents (u_i² = 1) the estimate is exact (d_i u_i =
∂ℓ/∂z_i): the method is then greedy block-local learning computed in forward mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from fwdgrad.core.aggregation import aggregation_coefficients, scaling_correction_factor
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.forward_mode import (
    accumulate_grad,
    check_finite,
    check_finite_updates,
    forward_mode_region,
    rng_state,
    set_rng_state,
)
from fwdgrad.core.tangents import expected_tangent_norm, sample_flat_tangents
from fwdgrad.local.blocks import Block, resolve_blocks, update_running_statistics
from fwdgrad.local.execution import block_jvp
from fwdgrad.local.losses import (
    LossLayout,
    cross_entropy_per_sample,
    group_directional_derivatives,
    head_gradients,
    layout_of,
    loss_and_logit_gradients,
    make_head,
)
from fwdgrad.local.sites import BlockStructure, Site, parameter, probe_structure, site_parameter_gradients

__all__ = ["LocalForwardGradient"]


class LocalForwardGradient(ForwardGradient, perturbation="local"):
    """Local losses trained by activity forward gradients: ``loss = lfg.backward(x, y)``.

    See the module docstring for the method. The estimator runs the model itself, block
    by block (``runs_model = True``): ``backward(inputs, targets)`` fills ``.grad`` of the
    model's parameters and of the heads (:attr:`heads`, which the optimizer must get too:
    :meth:`auxiliary_parameters`) and returns the task loss (mean over the batch).

    Args:
        model: the ``nn.Module``; ``model.eval()``-mode modules keep their mode.
        blocks: a model-zoo name (``baydin_mlp``, ``fc``, ``baydin_cnn``, ``resnet18``,
            ``vit``) or a list of blocks, see :func:`fwdgrad.local.blocks.resolve_blocks`.
        input_shape: one sample's input shape, e.g. ``(1, 28, 28)``: a probe pass learns the
            block outputs' shapes (to build the heads) and checks that the blocks, run in
            order, compute ``model(x)``.
        num_classes: the heads' outputs; default: the model's output width.
        num_tangents, aggregation, sampler, normalize_tangents, scaling_correction, seed: as in
            :class:`fwdgrad.ForwardGradient`, per unit (sampler default ``rademacher``;
            tangents are drawn per unit, so normalization refers to a unit's e entries).
        chunk_size, angle, max_length, ensure_independent, top_k_tolerance: as in
            :class:`fwdgrad.ForwardGradient`.
        group_size: features (channels) per group of the hidden blocks' losses; ``None``:
            one group (the block-wise loss).
        last_group_size: the same for the last block's output (the logits); 1: one loss per
            logit (exact with Rademacher tangents); ``None``: one group.
        patches: patch-wise losses: feature maps cut into q × q tiles (q parts per spatial
            dimension), token sequences into q runs of tokens, q the largest divisor of the
            block's sizes not above ``patches`` (a 28-pixel map gets q = 14 from ``patches=14``,
            a 7-pixel one 7: one patch per position); 1: none.
        head: ``"linear"`` or a callable ``(features, classes) -> nn.Module``.
        loss: per-sample task and head loss ``(logits (N, C), targets (N,)) -> (N,)``;
            default cross-entropy.

    After ``backward``: ``last_local_losses`` (one number per block: the heads' losses, then
    the task loss); with ``keep_records = True``, ``last_records`` holds per block its input,
    output and per site the tangents ``(K, B, *z)``, d ``(K, B, G, P)`` and ĝ ``(B, *z)``.
    """

    runs_model = True

    def __init__(
        self,
        model: nn.Module,
        blocks,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        num_tangents: int = 1,
        aggregation: str = "mean",
        sampler: str = "rademacher",
        normalize_tangents: bool = False,
        scaling_correction: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        *,
        group_size: int | None = None,
        last_group_size: int | None = 1,
        patches: int = 1,
        head: str | Callable[[int, int], nn.Module] = "linear",
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        angle: float | None = None,
        max_length: float | None = None,
        ensure_independent: bool = False,
        top_k_tolerance: float = 0.1,
        perturbation: str | None = None,  # consumed by ForwardGradient.__new__
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"local losses need an nn.Module (they cut it into blocks), got {type(model).__name__}")
        for name, value in (("group_size", group_size), ("last_group_size", last_group_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None (one group), got {value!r}")
        if not isinstance(patches, int) or isinstance(patches, bool) or patches < 1:
            raise ValueError(f"patches must be an integer >= 1 (1: no patch-wise losses), got {patches!r}")
        super().__init__(
            model, num_tangents=num_tangents, aggregation=aggregation, sampler=sampler,
            normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, seed=seed,
            chunk_size=chunk_size, angle=angle, max_length=max_length, ensure_independent=ensure_independent,
            top_k_tolerance=top_k_tolerance,
        )
        self.blocks: list[Block] = resolve_blocks(model, blocks)
        self.group_size, self.last_group_size, self.patches = group_size, last_group_size, patches
        self.loss_fn = loss or cross_entropy_per_sample
        self.module_names = {module: name for name, module in model.named_modules()}
        shapes = self._output_shapes(model, tuple(input_shape))
        self.num_classes = num_classes or shapes[-1][0]
        self.layouts = [self._layout(index, shape) for index, shape in enumerate(shapes)]
        head_generator = None if seed is None else torch.Generator(self.device).manual_seed(seed + 1)
        self.heads = nn.ModuleList([
            make_head(head, layout.features, self.num_classes, head_generator, self.device, self.dtype)
            for layout in self.layouts[:-1]
        ])
        self._structures: dict[tuple, BlockStructure] = {}
        self.keep_records = False
        self.last_records: list[dict] | None = None
        self.last_local_losses: list[float] | None = None

    def __repr__(self) -> str:
        return (f"LocalForwardGradient(blocks={[b.name for b in self.blocks]}, num_tangents={self.num_tangents}, "
                f"aggregation={self.aggregation!r}, sampler={self.sampler!r}, group_size={self.group_size}, "
                f"last_group_size={self.last_group_size}, patches={self.patches})")

    # ---- construction ------------------------------------------------------------------

    @torch.no_grad()
    def _output_shapes(self, model: nn.Module, input_shape: tuple) -> list[tuple[int, ...]]:
        """Each block's per-sample output shape; checks that the blocks compose to ``model(x)``."""
        generator = torch.Generator(self.device).manual_seed(0)
        x = torch.randn((2, *input_shape), generator=generator, device=self.device, dtype=self.dtype)
        modes = {module: module.training for module in model.modules()}
        model.eval()  # deterministic (dropout), and BatchNorm leaves its running statistics alone
        try:
            h, shapes = x, []
            for block in self.blocks:
                try:
                    h = block.forward(h)
                except RuntimeError as error:
                    raise ValueError(f"blocks: running the blocks {[b.name for b in self.blocks]} in order fails at "
                                     f"block {block.name!r} ({str(error).splitlines()[0][:160]}); a block list must "
                                     "follow the model's forward") from error
                if not isinstance(h, torch.Tensor) or h.dim() < 2:
                    raise ValueError(f"blocks: block {block.name!r} must return a tensor (batch, ...), got "
                                     f"{type(h).__name__ if not isinstance(h, torch.Tensor) else tuple(h.shape)}")
                shapes.append(tuple(h.shape[1:]))
            expected = model(x)
        finally:
            for module, training in modes.items():
                module.train(training)
        if h.shape != expected.shape or not torch.allclose(h, expected, rtol=1e-4, atol=1e-5):
            raise ValueError(f"blocks: running the blocks {[b.name for b in self.blocks]} in order does not compute "
                             "model(x) (the outputs differ); a block list must follow the model's forward")
        if len(shapes[-1]) != 1:
            raise ValueError(f"the last block must output logits (batch, classes), got per-sample shape {shapes[-1]}")
        return shapes

    def _layout(self, index: int, shape: tuple[int, ...]) -> LossLayout:
        last = index == len(self.blocks) - 1
        kind = layout_of(torch.Size(shape))
        size = self.last_group_size if last else self.group_size
        features = shape[-1] if kind == "tokens" else shape[0]
        groups = 1 if size is None else max(features // size, 1)
        spatial = {"features": (), "tokens": shape[:1], "channels": shape[1:]}[kind]
        patches = 1 if last or not spatial else max(
            q for q in range(1, min(self.patches, *spatial) + 1) if all(size % q == 0 for size in spatial))
        layout = LossLayout(kind, shape, groups, patches)
        if size is not None and features % size:
            divisors = [d for d in range(1, features + 1) if features % d == 0]
            option = "last_group_size" if last else "group_size"
            raise ValueError(f"{option}={size} does not divide the {features} features of block "
                             f"{self.blocks[index].name!r} (output shape {shape}); valid: "
                             f"{', '.join(map(str, divisors))}")
        layout.check(f"block {self.blocks[index].name!r}")
        return layout

    def auxiliary_parameters(self) -> list[torch.Tensor]:
        """The heads' parameters: the optimizer must update them besides the model's."""
        return [p for p in self.heads.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        """The generators' state (:meth:`ForwardGradient.state_dict`) and the heads' tensors."""
        return {**super().state_dict(), "heads": {k: v.detach().clone() for k, v in self.heads.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "heads" not in state:
            raise ValueError("the state has no 'heads' entry: it was not saved by a LocalForwardGradient")
        self.heads.load_state_dict(state.pop("heads"))
        super().load_state_dict(state)

    # ---- one step -------------------------------------------------------------------------

    def _sample(self, site: Site, layout: LossLayout, batch: int) -> torch.Tensor:
        """K tangents per unit: ``(B, *unit axes, K, e)``."""
        axes, dim = site.units(layout)
        return sample_flat_tangents(
            self.num_tangents, dim, self.sampler, batch_shape=(batch, *axes), generator=self.generator,
            device=self.device, dtype=self.dtype, normalize=self.normalize_tangents, **self.sampler_options,
        )

    @property
    def _linear_single_tangent(self) -> bool:
        return self.aggregation == "mean" and self.num_tangents == 1 and not self.scaling_correction

    def _estimate(self, tangents: torch.Tensor, derivatives: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale`` × ĝ per unit from tangents ``(B, *U, K, e)`` and d ``(B, *U, K)``: ``(B, *U, e)``."""
        num_tangents, dim = tangents.shape[-2:]
        if self._linear_single_tangent:
            return (derivatives * scale) * tangents[..., 0, :]  # ĝ = d u; scaled on the K·B·G·P numbers d
        gram = squared_norms = None
        if self.aggregation == "orthogonal_projection":
            gram = (tangents @ tangents.transpose(-1, -2)).double()
        if self.aggregation in ("max_normalized", "mean_of_top_k"):
            squared_norms = tangents.double().square().sum(-1)
        coefficients = aggregation_coefficients(
            self.aggregation, derivatives.double(), squared_norms=squared_norms, gram=gram, dim=dim,
            top_k_tolerance=self.top_k_tolerance,
        )
        estimate = (coefficients.to(tangents.dtype).unsqueeze(-2) @ tangents).squeeze(-2)
        if self.scaling_correction:
            norm = None if self.aggregation == "orthogonal_projection" else \
                expected_tangent_norm(self.sampler, dim, self.normalize_tangents)
            scale = scale * scaling_correction_factor(self.aggregation, num_tangents, dim, norm)
        return estimate * scale

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Train every block on its local loss for the batch ``(inputs, targets)``.

        Adds to ``.grad`` of the model's parameters the local forward-gradient estimates
        and of the heads' parameters their exact gradients; returns the task loss (mean
        over the batch, detached). Raises as :meth:`fwdgrad.ForwardGradient.backward` does
        for non-finite losses, derivatives or estimates (``.grad`` of that block unchanged).
        """
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("LocalForwardGradient runs the model block by block: call backward(inputs, targets) "
                            f"with the batch's tensors, got {type(inputs).__name__} and {type(targets).__name__}")
        h = inputs
        records, local_losses = [], []
        with ExitStack() as stack:
            forward_mode_region(stack)  # no autograd graph, math attention, missing forward rules explained
            for index in range(len(self.blocks)):
                h, loss, record = self._train_block(index, h.detach(), targets)
                local_losses.append(loss)
                records.append(record)
        self.last_local_losses = torch.stack(local_losses).tolist()
        self.last_records = records if self.keep_records else None
        return loss

    def _train_block(self, index: int, h: torch.Tensor, targets: torch.Tensor):
        key = (index, tuple(h.shape[1:]))
        if key not in self._structures:
            self._structures[key] = probe_structure(self.blocks[index], self.layouts[index], self.module_names, h)
        structure = self._structures[key]
        sites, layout, batch = structure.sites, structure.layout, h.shape[0]
        head = self.heads[index] if index < len(self.heads) else None
        saved = rng_state(self.device) if len(sites) > 1 else None
        record = {"input": h, "sites": []} if self.keep_records else None
        updates = []
        for position, site in enumerate(sites):
            if position:
                set_rng_state(self.device, saved)  # the same dropout masks in every site's pass
            unit_tangents = self._sample(site, layout, batch)                  # (B, *U, K, e)
            tangents = site.from_units(unit_tangents.movedim(-2, 0), layout)  # (K, B, *z)
            result = block_jvp(self.blocks[index], structure.site_modules, position, h, tangents, position == 0,
                               self.chunk_size)
            if position == 0:
                first = result
                pooled = layout.pool(result.output)
                logits = pooled if head is None else head(pooled)
                losses, logit_gradients = loss_and_logit_gradients(self.loss_fn, logits, targets)
                loss = losses.mean()
            derivatives = group_directional_derivatives(layout, result.output_tangents, pooled, logit_gradients, head)
            result.output_tangents = None  # `first` keeps the output and the inputs, not the tangents
            derivatives = self.combine_directional_derivatives(derivatives)
            unit_derivatives = site.reduce(derivatives).movedim(0, -1)  # (B, *U, K)
            # ĝ / B: the update estimates the gradient of the mean loss
            estimate = site.from_units(self._estimate(unit_tangents, unit_derivatives, 1 / batch), layout)
            # one number checks the loss, d and ĝ: a sum is finite iff every term is (or it overflowed: then the
            # precise checks below pass and the step goes on); with the mean of K = 1, ĝ = d u is finite with d
            checked = unit_derivatives if self._linear_single_tangent else estimate
            if not math.isfinite(float(checked.sum() + loss)):
                check_finite(loss, derivatives)
                check_finite_updates([estimate], self.aggregation, f"estimate ĝ_z of site {site.name!r}")
            # the site's parameter gradients now (parameter-sized), so that one site's activation-sized
            # tensors are alive at a time; they reach .grad once every site of the block is checked
            args, kwargs = first.inputs[position]
            updates.append(site_parameter_gradients(site, args, kwargs, estimate))
            if record is not None:
                record["sites"].append({"name": site.name, "tangents": tangents, "directional_derivatives":
                                        derivatives, "estimate": estimate * batch, "by_group": site.by_group,
                                        "by_patch": site.by_patch})
            del unit_tangents, tangents, result, derivatives, unit_derivatives, estimate, checked
        for site, gradients in zip(sites, updates):
            for name, gradient in gradients.items():
                accumulate_grad(parameter(site.module, name), gradient, owned=True)
        if head is not None:
            for name, gradient in head_gradients(head, pooled, logit_gradients).items():
                accumulate_grad(parameter(head, name), gradient, owned=True)
        update_running_statistics(first.statistics)
        if record is not None:
            record["output"] = first.output
        return first.output, loss, record

