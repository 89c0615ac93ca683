"""Local losses with activity forward gradients: ``LocalForwardGradient(model, blocks=...)``.

Ren et al. 2023, "Scaling Forward Gradient With Local Losses" (ICLR). The model is cut
into blocks (:mod:`fwdgrad.local.blocks`); block b < last gets an auxiliary head
(:mod:`fwdgrad.local.heads`) and its own local loss L_b, the last block's loss is the task
loss (:mod:`fwdgrad.local.losses`).
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
   estimate of ∇_{z_m} ℓ_b, unbiased for ``mean`` with E[u u^T] = I. With K ≥ e and the
   orthogonal projection the estimate is exact. A site that mixes groups or patches (the
   first convolution of a ResNet BasicBlock: the second mixes channels and positions;
   attention across tokens) would get one unit per sample, an estimate whose variance grows
   with the whole output's size. By default (``mixing_sites="own_loss"``) such a site is
   instead trained on a local loss of its **own output**, through an auxiliary head of its
   own, where every unit is kept apart (:mod:`fwdgrad.local.sites`); ``"block_loss"``
   credits it with the sum of the block's losses over the axes it mixes.
4. Weight update of site m by its local vector-Jacobian product (a derivative of one
   layer at its recorded input, :func:`fwdgrad.core.layer_derivatives.local_parameter_gradients`):
   θ_m.grad += (1/B) Σ_b (∂z_{m,b}/∂θ_m)^T ĝ_{z_{m,b}}.
5. The heads' parameters get the exact gradient of their loss (a derivative local to the
   head, :func:`fwdgrad.local.heads.head_derivatives`); the block's output becomes the next
   input.

BatchNorm in training mode runs inside the passes with its batch statistics as
constants (:func:`fwdgrad.local.blocks.constant_batch_statistics`) and updates its running
statistics once per step: each sample's loss then depends on its own input only. The
estimate at a site whose output a BatchNorm takes is then carried through that BatchNorm's
batch statistics by their exact linear correction (``batch_norm="differentiated"``,
:mod:`fwdgrad.local.normalization`), as backprop's gradient is; statistics of BatchNorms
further down the block stay constants. With group size 1, one patch per position and
Rademacher tangents (u_i² = 1) the estimate is exact for every site (d_i u_i = ∂ℓ/∂z_i;
tested against autograd of the local losses on ResNet-18 and the ViT): the method is then
greedy local learning computed in forward mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from fwdgrad.core.aggregation import aggregation_coefficients, scaling_correction_factor
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.forward_mode import (
    forward_mode_region,
)
from fwdgrad.core.tangents import expected_tangent_norm, sample_flat_tangents
from fwdgrad.local.blocks import Block, block_outputs, resolve_blocks
from fwdgrad.local.heads import make_head
from fwdgrad.local.losses import LossLayout, cross_entropy_per_sample, loss_layout
from fwdgrad.local.mixing import MIXING_SITES
from fwdgrad.local.normalization import BATCH_NORM_MODES
from fwdgrad.local.sites import BlockStructure, Site, probe_structure
from fwdgrad.local.step import train_block

__all__ = ["BATCH_NORM_MODES", "LOCAL_MODES", "MIXING_SITES", "LocalForwardGradient"]

# how a block's forward-mode passes run: PyTorch's forward AD (eager) or fwdgrad's fast forward mode
LOCAL_MODES = ("auto", "eager", "fast")


class LocalForwardGradient(ForwardGradient, perturbation="local"):
    """Local losses trained by activity forward gradients: ``loss = lfg.backward(x, y)``.

    See the module docstring for the method. The estimator runs the model itself, block
    by block (``runs_model = True``): ``backward(inputs, targets)`` fills ``.grad`` of the
    model's parameters and of the heads (:attr:`heads`, :attr:`site_heads`, which the
    optimizer must get too: :meth:`auxiliary_parameters`) and returns the task loss (mean
    over the batch).

    Args:
        model: the ``nn.Module``; ``model.eval()``-mode modules keep their mode.
        blocks: a model-zoo name (``baydin_mlp``, ``fc``, ``baydin_cnn``, ``resnet18``,
            ``vit``, ...) or a list of blocks, see :func:`fwdgrad.local.blocks.resolve_blocks`.
        input_shape: one sample's input shape, e.g. ``(1, 28, 28)``: a probe pass learns the
            block outputs' shapes (to build the heads), checks that the blocks, run in
            order, compute ``model(x)``, and learns every block's sites.
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
        head: a kind of :data:`fwdgrad.local.heads.HEADS` (``linear``, ``normalized``,
            ``conv``, ``mlp``) or a callable ``(features, classes) -> nn.Module`` applied to
            the globally pooled features.
        head_pool: Q, the grid a ``normalized``, ``conv`` or ``mlp`` head pools a feature map to.
        mixing_sites: what a site that mixes the block's groups or patches is trained on
            (:mod:`fwdgrad.local.mixing`): ``"own_loss"`` (a loss of its own output, through its
            own head), ``"guess"`` (the block's loss along its own loss's gradient) or
            ``"block_loss"`` (the block's loss summed over what it mixes, one unit per sample).
        batch_norm: how a training-mode BatchNorm that takes a site's output enters that site's
            estimate on the block's loss: ``"differentiated"`` (through its batch statistics, as
            ``nn.BatchNorm`` and backprop do: :mod:`fwdgrad.local.normalization`) or
            ``"constant"`` (the statistics held fixed, the estimate of the passes as it is).
        mode: how a block's forward-mode passes run: ``eager`` (``torch.autograd.forward_ad``
            for K = 1, ``vmap`` over ``torch.func.jvp`` for K > 1), ``fast`` (the primal and the K
            tangents side by side, :class:`fwdgrad.core.fast_forward.FastForward`), ``auto``:
            eager (measured no slower here). The same directional derivatives (tested).
        loss: per-sample task and head loss ``(logits (N, C), targets (N,)) -> (N,)``;
            default cross-entropy.

    After ``backward``: ``last_local_losses`` (one number per block: the heads' losses, then
    the task loss); with ``keep_records = True``, ``last_records`` holds per block its input,
    output and per site the tangents ``(K, B, *z)``, d ``(K, B, G, P)`` and ĝ ``(B, *z)``.
    """

    runs_model = True
    # the sites of every block are learnt at construction (a subclass that needs none sets False)
    probes_sites = True

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
        head_pool: int = 2,
        mixing_sites: str = "own_loss",
        batch_norm: str = "differentiated",
        mode: str = "auto",
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
        if mixing_sites not in MIXING_SITES:
            raise ValueError(f"unknown mixing_sites {mixing_sites!r}; valid choices: {', '.join(MIXING_SITES)}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"unknown batch_norm {batch_norm!r}; valid choices: {', '.join(BATCH_NORM_MODES)}")
        if mode not in LOCAL_MODES:
            raise ValueError(f"local losses run their forward-mode passes eagerly or fast; got mode={mode!r}; valid "
                             f"choices: {', '.join(LOCAL_MODES)}")
        super().__init__(
            model, num_tangents=num_tangents, aggregation=aggregation, sampler=sampler,
            normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, seed=seed,
            chunk_size=chunk_size, angle=angle, max_length=max_length, ensure_independent=ensure_independent,
            top_k_tolerance=top_k_tolerance,
        )
        self.blocks: list[Block] = resolve_blocks(model, blocks)
        self.group_size, self.last_group_size, self.patches = group_size, last_group_size, patches
        self.head_kind, self.head_pool, self.mixing_sites = head, head_pool, mixing_sites
        self.batch_norm = batch_norm
        self.requested_mode = mode
        # auto: forward AD; the fast mode measured no faster for local losses' per-site passes on the CPU
        # (fwdgrad bench, docs/speed-memory.md)
        self.mode = "eager" if mode == "auto" else mode
        self.loss_fn = loss or cross_entropy_per_sample
        self.module_names = {module: name for name, module in model.named_modules()}
        shapes, block_inputs = block_outputs(model, self.blocks, tuple(input_shape), self.device, self.dtype)
        self.num_classes = num_classes or shapes[-1][0]
        self.layouts = [self._layout(index, shape) for index, shape in enumerate(shapes)]
        self._head_generator = None if seed is None else torch.Generator(self.device).manual_seed(seed + 1)
        self.heads = nn.ModuleList([self._make_head(layout) for layout in self.layouts[:-1]])
        self._structures: dict[tuple, BlockStructure] = {}
        self.site_heads = nn.ModuleDict()
        if self.probes_sites:
            self._probe(model, block_inputs)
        self.keep_records = False
        # blocks whose later passes do not reuse the first pass's values (a skipped module drew random numbers)
        self.replayed_blocks: set[int] = set()
        self.last_records: list[dict] | None = None
        self.last_local_losses: list[float] | None = None

    def __repr__(self) -> str:
        return (f"LocalForwardGradient(blocks={[b.name for b in self.blocks]}, num_tangents={self.num_tangents}, "
                f"aggregation={self.aggregation!r}, sampler={self.sampler!r}, group_size={self.group_size}, "
                f"last_group_size={self.last_group_size}, patches={self.patches}, head={self.head_kind!r}, "
                f"mixing_sites={self.mixing_sites!r}, batch_norm={self.batch_norm!r}, mode={self.mode!r})")

    # ---- construction ------------------------------------------------------------------

    def _layout(self, index: int | None, shape: tuple[int, ...]) -> LossLayout:
        """The loss layout of block ``index``'s output; ``index=None``: of a mixing site's own output."""
        last = index == len(self.blocks) - 1
        return loss_layout(shape, self.last_group_size if last else self.group_size, 1 if last else self.patches,
                           "a site" if index is None else f"block {self.blocks[index].name!r}",
                           "last_group_size" if last else "group_size", fit_groups=index is None)

    def _make_head(self, layout: LossLayout) -> nn.Module:
        return make_head(self.head_kind, layout, self.num_classes, self.head_pool, self._head_generator,
                         self.device, self.dtype)

    def _probe(self, model: nn.Module, block_inputs: list) -> None:
        """Every block's sites, from the probe inputs, and the heads of its mixing sites.

        In training mode, as the steps run (an ``nn.MultiheadAttention`` in eval mode takes a fused
        kernel without a forward-mode rule); the probes replay the RNG and leave BatchNorm's
        running statistics alone."""
        own_layout = None if self.mixing_sites == "block_loss" else (lambda shape: self._layout(None, shape))
        modes = {module: module.training for module in model.modules()}
        model.train()
        try:
            for index, h in enumerate(block_inputs):
                structure = probe_structure(self.blocks[index], self.layouts[index], self.module_names, h, own_layout)
                self._structures[(index, tuple(h.shape[1:]))] = structure
                for position, site in enumerate(structure.sites):
                    if site.own_loss:
                        self.site_heads[self._site_key(index, position)] = self._make_head(site.own_layout)
        finally:
            for module, training in modes.items():
                module.train(training)

    @staticmethod
    def _site_key(index: int, position: int) -> str:
        return f"block{index}_site{position}"

    def auxiliary_parameters(self) -> list[torch.Tensor]:
        """The heads' parameters (blocks' and mixing sites'): the optimizer must update them besides the model's."""
        return [p for heads in (self.heads, self.site_heads) for p in heads.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        """The generators' state (:meth:`ForwardGradient.state_dict`) and the heads' tensors."""
        def tensors(module):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

        return {**super().state_dict(), "heads": tensors(self.heads), "site_heads": tensors(self.site_heads)}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "heads" not in state:
            raise ValueError("the state has no 'heads' entry: it was not saved by a LocalForwardGradient")
        self.heads.load_state_dict(state.pop("heads"))
        self.site_heads.load_state_dict(state.pop("site_heads", {}))
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

    def _structure(self, index: int, h: torch.Tensor) -> BlockStructure:
        key = (index, tuple(h.shape[1:]))
        if key not in self._structures:  # inputs of another shape than the probe's: learn the sites again
            structure = probe_structure(self.blocks[index], self.layouts[index], self.module_names, h,
                                        None if self.mixing_sites == "block_loss" else lambda s: self._layout(None, s))
            if any(site.own_loss for site in structure.sites):  # their heads were built for the probe's shapes
                raise ValueError(f"block {self.blocks[index].name!r} gets inputs of per-sample shape "
                                 f"{tuple(h.shape[1:])}, not the ones of input_shape; its mixing sites' heads "
                                 "were built for those: build the estimator for this input shape")
            self._structures[key] = structure
        return self._structures[key]

    def _train_block(self, index: int, h: torch.Tensor, targets: torch.Tensor):
        return train_block(self, index, h, targets)
