"""Global target, local guess: ``LocalGuessForwardGradient(model, blocks=...)``.

Fournier et al. 2023, "Can Forward Gradient Match Backpropagation?" (ICML). A gradient
*guess* is a tangent that is not isotropic noise. Here the guess for block b's output is the
gradient of the block's *local* loss (its auxiliary head's loss, as in
:mod:`fwdgrad.local.estimator`), and the target is the *global* task loss: forward mode measures how
much of the true global gradient lies along the local one.

The model is cut into blocks with auxiliary heads exactly as :class:`fwdgrad.LocalForwardGradient`
does (same ``blocks`` argument, same heads). Per sample s and block b with output a_b,s
(``(B, *a_b)``; the last block's output is the logits and its "local" loss is the task loss):

1. **Guess** (exact, local to the head only): g_b,s = ∇_{a_b,s} ℓ(head_b(pool(a_b,s)), y_s), by
   a reverse-mode product through the head and the pooling alone (``torch.func.vjp``; for the
   last block g = ∇_o ℓ of the logits, closed form for cross-entropy). Nothing runs backward
   through the network body. The tangent is the unit guess ĝ = g / ||g|| (per sample).
2. **Directional derivative of the global loss** (forward mode): perturbing a_b alone along
   u and running the *rest of the network* (blocks b+1..N-1, then the task loss ℓ) in one
   ``torch.func.jvp`` (``vmap`` over K) gives

       d_b,s,k = ∇_{a_b,s} ℓ(model(x_s), y_s) · u_b,s,k            (shape (K, B)),

   with ∇_{a_b} the *total* derivative through every later block. Each block needs its own
   pass (perturbing all blocks at once would add their directional derivatives up), and each
   pass starts at its block's output, so block b's pass runs only the blocks after it.
3. **Estimate** per sample, through :mod:`fwdgrad.core.aggregation`: with K = 1, u = ĝ and

       ĝ_{a_b,s} = d ĝ = (∇ℓ · g / ||g||²) g = P_g ∇_{a_b,s} ℓ,

   the orthogonal projection of the true activity gradient onto the guess. With K > 1 the
   guess is mixed with K − 1 random unit tangents (``sampler``, normalized per sample) and
   ``aggregation="orthogonal_projection"`` (``frog``, the default) gives the projection onto
   span{g, r_1..r_{K-1}}; other aggregations combine the K unit tangents as they would any.
4. **Weight update** of block b: the local vector-Jacobian product of the estimate through the
   block alone (a derivative local to one block, at its detached input h_b; ``torch.func.vjp``
   of the block's parameters):

       θ_b.grad += (1/B) Σ_s (∂a_b,s/∂θ_b)^T ĝ_{a_b,s}.

   The heads' parameters get the exact gradient of their own local loss, as in
   :class:`fwdgrad.LocalForwardGradient`.

**What it estimates.** Per sample the projection P_g ∇ℓ is deterministic given the guess: it is
*biased* — not ∇ℓ, and no expectation over anything makes it ∇ℓ — towards the guess direction:
P_g ∇ℓ = cos(∇ℓ, g) ||∇ℓ|| ĝ, shorter than ∇ℓ by |cos| and pointing along ±g. It is always a
descent direction for the activity, ⟨P_g ∇ℓ, ∇ℓ⟩ = ||P_g ∇ℓ||² ≥ 0 (zero when the guess is
orthogonal to the true gradient). With K > 1 and ``frog`` it is the projection onto a
K-dimensional subspace containing g: still biased, with ⟨P ∇ℓ, ∇ℓ⟩ = ||P ∇ℓ||² ≥ 0 and
E[P ∇ℓ] = P_g ∇ℓ + (K−1)/(e−1) (I − P_g) ∇ℓ under isotropic (normal) random tangents, e the
per-sample dimension of a_b: the random tangents recover only that fraction of the component
orthogonal to the guess. The weight update is
the block-local VJP of that activity estimate, so it inherits the bias; for the last block the
guess is the exact gradient and its update is exact. (Mean over samples: the per-sample
projections are averaged; that is not a projection of the batch gradient onto one direction.)

**Cost** per step, with block b costing a fraction c_b of one forward pass (Σ c_b = 1): one
forward pass of the network (each block once, keeping its own pullback only until its update
is made), K tangents through the rest of the network for each block, ≈ (1 + K) Σ_b Σ_{j>b} c_j
forward passes (activity tangents: one extra product per layer and tangent, plus the primal of
the rest), one block-local VJP per block (≈ the weight half of a backward pass), and the heads.
For N equal blocks that is ≈ 1 + (1 + K)(N − 1)/2 forward passes plus the local VJPs; for the
Baydin MLP (c ≈ 0.43, 0.57, 0.006) ≈ 1 + 0.58 (1 + K).

BatchNorm in training mode computes with its batch statistics as constants (in the block's
own pass and in the later passes alike; :func:`fwdgrad.local.blocks.constant_batch_statistics`)
and updates its running statistics once per step, so each sample's loss depends on its own
input only. Dropout: the RNG state after block b is replayed for the pass through the later
blocks, so that pass sees the masks the next blocks then use (with K > 1, under ``vmap`` with
``randomness="same"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn
from torch.func import functional_call

from fwdgrad.core.aggregation import aggregate_flat
from fwdgrad.core.forward_mode import (
    accumulate_grad,
    batched_jvp,
    check_finite,
    check_finite_updates,
    forward_mode_region,
    rng_state,
    set_rng_state,
)
from fwdgrad.core.tangents import sample_flat_tangents
from fwdgrad.local.blocks import Block, constant_batch_statistics, update_running_statistics
from fwdgrad.local.estimator import LocalForwardGradient
from fwdgrad.local.heads import loss_point
from fwdgrad.local.losses import _call_detached

__all__ = ["LOCAL_GUESSES", "LocalGuessForwardGradient"]

# the guesses of a gradient=local config (gradient.guess): the local-loss gradient of each block's output
LOCAL_GUESSES = ("local",)


class _BlockParameters(nn.Module):
    """The block's modules under one root, so that ``functional_call`` can substitute their
    parameters while ``block.forward`` (which calls those same modules) runs."""

    def __init__(self, block: Block):
        super().__init__()
        self.parts = nn.ModuleList(block.modules)
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.forward(h)


class LocalGuessForwardGradient(LocalForwardGradient):
    """Global target, local guess (Fournier et al. 2023): ``loss = lgg.backward(x, y)``.

    See the module docstring for the method, what it estimates and its cost. Like
    :class:`fwdgrad.LocalForwardGradient` the estimator runs the model block by block
    (``runs_model = True``), fills ``.grad`` of the model's parameters and of the heads
    (:meth:`auxiliary_parameters`: give them to the optimizer too) and returns the task loss.

    Args:
        model, blocks, input_shape, num_classes, head, loss, seed: as in
            :class:`fwdgrad.LocalForwardGradient` (the heads are built the same way).
        num_tangents: K >= 1 tangents per sample and block: the guess, and K − 1 random
            tangents drawn by ``sampler`` (every tangent normalized to unit norm per sample).
        aggregation: :data:`fwdgrad.core.aggregation.AGGREGATIONS`; ``orthogonal_projection``
            (``frog``, default) gives the projection onto the span of the K tangents. With
            K = 1 every aggregation but ``mean_times_dim`` gives the projection onto the
            guess (unit tangent: ``mean`` = d ĝ).
        sampler: the random tangents' distribution (:data:`fwdgrad.core.tangents.SAMPLERS`).
        chunk_size: tangents per ``vmap`` pass when K > 1 (``None``: all K at once).

    After ``backward``: ``last_local_losses`` (the heads' losses, then the task loss); with
    ``keep_records = True``, ``last_records`` holds per block its ``input`` h_b, ``output``
    a_b, the raw ``guess`` g ``(B, *a_b)`` (before normalization), the ``tangents``
    ``(K, B, *a_b)`` (row 0 the unit guess), the ``directional_derivatives`` d ``(K, B)`` of
    the per-sample task losses, and the per-sample ``estimate`` ĝ_a ``(B, *a_b)`` (of ∇ℓ_s,
    before the 1/B of the mean).
    """

    runs_model = True

    probes_sites = False  # one tangent per block output: no sites

    def __init__(
        self,
        model: nn.Module,
        blocks,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        num_tangents: int = 1,
        aggregation: str = "orthogonal_projection",
        sampler: str = "normal",
        seed: int | None = None,
        chunk_size: int | None = None,
        *,
        head: str | Callable[[int, int], nn.Module] = "linear",
        head_pool: int = 2,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        perturbation: str | None = None,  # consumed by ForwardGradient.__new__
    ):
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None (all K tangents at once), got {chunk_size!r}")
        # the guess is the block-wise head loss's gradient: no groups, no patches (their losses' gradients
        # add up to the block loss's gradient anyway)
        super().__init__(
            model, blocks, input_shape, num_classes=num_classes, num_tangents=num_tangents, aggregation=aggregation,
            sampler=sampler, seed=seed, chunk_size=chunk_size, group_size=None, last_group_size=None, patches=1,
            head=head, head_pool=head_pool, loss=loss,
        )
        self._wrappers = [_BlockParameters(block) for block in self.blocks]

    def __repr__(self) -> str:
        return (f"LocalGuessForwardGradient(blocks={[b.name for b in self.blocks]}, num_tangents={self.num_tangents}, "
                f"aggregation={self.aggregation!r}, sampler={self.sampler!r})")

    # ---- the pieces of one block's step -----------------------------------------------------

    def _guess(self, index: int, output: torch.Tensor, targets: torch.Tensor, statistics: list):
        """The block's local loss (a :class:`fwdgrad.local.heads.LossPoint`) and the guess
        g = ∇_a ℓ_b ``(B, *a)``: a reverse-mode product through the head (and its pooling) only."""
        head = self.heads[index] if index < len(self.heads) else None
        layout = self.layouts[index]
        point = loss_point(layout, head, output, targets, self.loss_fn, statistics)
        if head is None:  # the last block: its output is the logits, its local loss the task loss
            return point, point.logit_gradients
        if point.input_gradients is not None:
            return point, point.input_gradients
        _, pullback = torch.func.vjp(lambda a: _call_detached(head, layout.pool(a)), output)
        (guess,) = pullback(point.logit_gradients)
        return point, guess

    def _tangents(self, guess: torch.Tensor) -> torch.Tensor:
        """Per sample the unit guess and K − 1 random unit tangents: ``(B, K, e)``."""
        batch = guess.shape[0]
        flat = guess.reshape(batch, 1, -1)
        unit = flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        if self.num_tangents == 1:
            return unit
        random = sample_flat_tangents(
            self.num_tangents - 1, flat.shape[-1], self.sampler, batch_shape=(batch,), generator=self.generator,
            device=self.device, dtype=flat.dtype, normalize=True, **self.sampler_options,
        )
        return torch.cat([unit, random], dim=1)

    def _rest_of_network(self, index: int, output: torch.Tensor, targets: torch.Tensor, tangents: torch.Tensor):
        """d ``(K, B)``: the per-sample task losses' derivatives along ``tangents`` ``(K, B, *a_b)`` on
        block ``index``'s output, by forward mode through the blocks after it (none after the last block:
        the loss alone; no autograd graph)."""
        later = self.blocks[index + 1:]
        modules = [module for block in later for module in block.modules]

        def task_losses(a: torch.Tensor) -> torch.Tensor:
            with constant_batch_statistics(modules):  # statistics as constants; running ones untouched
                for block in later:
                    a = block.forward(a)
            return self.loss_fn(a, targets)

        saved = rng_state(self.device)
        chunk = self.chunk_size or tangents.shape[0]
        derivatives = []
        for start in range(0, tangents.shape[0], chunk):
            set_rng_state(self.device, saved)  # every chunk, and then the next block, sees the same masks
            _, derivative = batched_jvp(task_losses, (output,), (tangents[start:start + chunk],))
            derivatives.append(derivative)
        set_rng_state(self.device, saved)
        return torch.cat(derivatives)

    # ---- one step ------------------------------------------------------------------------------

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Train every block on the global loss's projected gradient for the batch ``(inputs, targets)``.

        Adds to ``.grad`` of the model's parameters the block-local VJPs of the estimates and of
        the heads' parameters their exact local gradients; returns the task loss (mean over the
        batch, detached). Raises ``FloatingPointError`` for non-finite losses, derivatives or
        estimates (``.grad`` of that block unchanged).
        """
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("LocalGuessForwardGradient runs the model block by block: call backward(inputs, targets) "
                            f"with the batch's tensors, got {type(inputs).__name__} and {type(targets).__name__}")
        h = inputs.detach()
        records, local_losses = [], []
        with ExitStack() as stack:
            forward_mode_region(stack)  # no autograd graph, math attention, missing forward rules explained
            for index in range(len(self.blocks)):
                h, loss, record = self._train_block(index, h, targets)
                local_losses.append(loss)
                records.append(record)
        self.last_local_losses = torch.stack(local_losses).tolist()
        self.last_records = records if self.keep_records else None
        return loss

    def _train_block(self, index: int, h: torch.Tensor, targets: torch.Tensor):
        batch = h.shape[0]
        wrapper = self._wrappers[index]
        names = [name for name, p in wrapper.named_parameters() if p.requires_grad]
        primals = {name: wrapper.get_parameter(name).detach() for name in names}
        counts = []

        def block_output(parameters):
            recorded = []
            with constant_batch_statistics(self.blocks[index].modules, recorded):
                output = functional_call(wrapper, parameters, (h,), strict=False)
            counts[:] = [(module, count) for module, _, _, count in recorded]
            return output, [tensor for _, mean, var, _ in recorded for tensor in (mean, var)]

        # the block's own pass: its output, and the pullback of its local VJP (this block's graph only);
        # the batch statistics leave the transform as its aux output
        output, pullback, moments = torch.func.vjp(block_output, primals, has_aux=True)
        statistics = [(module, mean, var, count) for (module, count), mean, var
                      in zip(counts, moments[0::2], moments[1::2])]
        point, guess = self._guess(index, output, targets, statistics)
        loss = point.loss
        flat_tangents = self._tangents(guess)                                    # (B, K, e)
        tangents = flat_tangents.transpose(0, 1).reshape(self.num_tangents, *output.shape)
        derivatives = self._rest_of_network(index, output, targets, tangents)  # the last block: the loss alone
        derivatives = self.combine_directional_derivatives(derivatives)          # (K, B)
        flat_estimate = aggregate_flat(flat_tangents, derivatives.transpose(0, 1), self.aggregation)
        estimate = flat_estimate.reshape(output.shape)                           # per sample: of ∇ℓ_s
        if not math.isfinite(float(estimate.sum() + loss)):
            check_finite(loss, derivatives)
            check_finite_updates([estimate], self.aggregation, f"estimate ĝ_a of block {self.blocks[index].name!r}")
        (gradients,) = pullback(estimate / batch)  # ĝ / B: the gradient of the mean loss
        for name, gradient in gradients.items():
            accumulate_grad(wrapper.get_parameter(name), gradient, owned=True)
        for name, gradient in point.head_gradients().items():
            accumulate_grad(point.head.get_parameter(name), gradient, owned=True)
        update_running_statistics(statistics)
        record = None
        if self.keep_records:
            record = {"input": h, "output": output, "guess": guess, "tangents": tangents,
                      "directional_derivatives": derivatives, "estimate": estimate}
        return output.detach(), loss, record
