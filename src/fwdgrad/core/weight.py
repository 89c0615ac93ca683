"""Weight perturbation: tangents on the parameters (Baydin et al. 2022, "Gradients without
Backpropagation"; multi-tangent: Flügel et al. 2024), in true forward mode, no backward pass:

1. draw K tangents v_1..v_K over all trainable parameters θ ∈ R^n (:mod:`fwdgrad.core.tangents`);
2. compute the K directional derivatives d_k = ∇f(θ)·v_k in *one* batched forward-mode
   pass: ``torch.func.vmap`` over ``torch.func.jvp`` of the closure, the parameters being
   the differentiated inputs (:mod:`fwdgrad.core.parameter_substitution` hands them to the
   closure's code; :mod:`fwdgrad.core.execution` runs the pass);
3. combine them across processes (:meth:`~fwdgrad.core.base.ForwardGradient.combine_directional_derivatives`),
   aggregate them into g = V^T c (:mod:`fwdgrad.core.aggregation`) and add g to ``p.grad``.

How V is held and g = V^T c formed is the execution strategy, one per estimator, chosen in
:meth:`WeightForwardGradient.__init__`:

- stored (:func:`stored_step`): V materialized, ``(K, n)``; the reference path, and the
  one for tangents given by :meth:`WeightForwardGradient.step_tangents` (gradient guesses);
- regenerated (:func:`fwdgrad.core.regenerated.regenerated_step`): chunks of V drawn again
  from per-chunk seeds, O(chunk_size × n) entries held;
- factored (:func:`fwdgrad.core.factored.factored_step`): rank-1 matrix tangents kept as
  factors u w^T, never materialized.

Training-mode modules work under the transforms: BatchNorm's running statistics are
updated once per step, as one plain forward pass would; dropout draws one mask per step,
shared by all tangents (``randomness="same"``, the RNG state replayed for every chunk);
``scaled_dot_product_attention`` runs on its math backend, the one with a forward-mode rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from fwdgrad.core.aggregation import aggregate_flat_with_coefficients, scaling_correction_factor
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.execution import MODES, BatchedJvp, ForwardStep, chunked_batched_jvp
from fwdgrad.core.factored import factored_step
from fwdgrad.core.fast_execution import weight_pass
from fwdgrad.core.forward_mode import (
    accumulate_grad,
    check_finite,
    check_finite_coefficients,
    check_finite_updates,
    require_tangent,
    scalar_loss,
)
from fwdgrad.core.memory import check_fits
from fwdgrad.core.parameter_substitution import ParameterSubstitution, update_running_statistics
from fwdgrad.core.regenerated import chunk_seed, regenerated_step
from fwdgrad.core.tangents import (
    INDEPENDENT_SAMPLERS,
    expected_tangent_norm,
    rank1_layout,
    sample_flat_tangents,
    split_flat,
)

Closure = Callable[..., torch.Tensor]
# rank1 tangents are kept as factors by default up to this many tangents per step
FACTORED_MAX_TANGENTS = 64
# K = 1: every aggregation but mean_times_dim is c = d (the projection onto span(v) is
# (d / ||v||^2) v), so the stored step skips the general machinery for these
_K1_SHORTCUT = ("sum", "mean", "max", "max_normalized", "mean_of_top_k", "orthogonal_projection")


def stored_step(fg: WeightForwardGradient, closure: Closure, inputs: tuple,
                tangent_range: tuple[int, int] | None = None) -> ForwardStep:
    """All K tangents materialized as V ``(K, n)`` (:meth:`~WeightForwardGradient.step_tangents`),
    evaluated in chunks of ``chunk_size``; g = aggregate(V, d) (:func:`fwdgrad.core.aggregation.aggregate_flat`).

    ``tangent_range=(start, stop)``: the pass evaluates only tangents start..stop-1 (d of
    shape ``(stop - start,)``; tangent parallelism, :mod:`fwdgrad.distributed.parallel`), while
    ``updates`` takes the d of all K and uses all of V."""
    tangents = fg.step_tangents()
    bounds = fg._chunk_bounds(tangent_range)
    loss, derivatives, used = fg._directional_derivatives(
        closure, [fg._split(tangents[start:stop]) for start, stop in bounds], len(bounds), inputs
    )

    def updates(directional_derivatives: torch.Tensor) -> list[torch.Tensor]:
        if fg.num_tangents == 1 and fg.aggregation in _K1_SHORTCUT:
            coefficient = directional_derivatives.to(fg.dtype)
            if fg.aggregation == "orthogonal_projection":
                coefficient = coefficient / tangents.square().sum()
            coefficient = coefficient * fg._scaling_factor()
            check_finite_coefficients(coefficient, fg.aggregation, directional_derivatives)
            update = tangents[0] * coefficient
        else:
            tangent_norm = None
            if fg.scaling_correction and fg.aggregation != "orthogonal_projection":
                tangent_norm = expected_tangent_norm(fg.sampler, fg.dim, fg.normalize_tangents)
            update, coefficients = aggregate_flat_with_coefficients(
                tangents, directional_derivatives.to(fg.dtype), fg.aggregation,
                scaling_correction=fg.scaling_correction, tangent_norm=tangent_norm,
                top_k_tolerance=fg.top_k_tolerance,
            )
            if coefficients is None:  # the projection came from the SVD of V, not as V^T c
                check_finite_updates([update], fg.aggregation, "update")
            else:
                check_finite_coefficients(coefficients.to(fg.dtype), fg.aggregation, directional_derivatives)
        return split_flat(update, fg.shapes)

    return ForwardStep(loss, derivatives, used, updates)


class WeightForwardGradient(ForwardGradient, perturbation="weight"):
    """Forward gradient with tangents on the parameters: what ``ForwardGradient(model, ...)`` returns.

    Arguments as :class:`fwdgrad.ForwardGradient`; the weight space's own:

    Args:
        mode: execution of the batched forward-mode pass: ``eager`` (``vmap(jvp(...))``);
            ``compiled`` (``torch.compile`` around ``vmap(jvp(...))``, CUDA graphs on CUDA via
            ``mode="reduce-overhead"``); ``fast`` (no dual tensors: the primal and its K
            tangents side by side, one rule per operation, :mod:`fwdgrad.core.fast_forward`;
            the same d and update); ``auto`` = fast on the CPU (measured faster than eager,
            docs/speed-memory.md) and, on CUDA, compiled when the batch is passed as
            ``backward(loss_fn, *inputs)`` (eager otherwise), falling back to eager with
            a warning if compilation fails.
        regenerate_tangents: ``None`` (default) regenerates chunked tangents whenever the
            sampler allows it; ``False`` stores them (the materialized reference path,
            same tangents for the same seed); ``True`` insists (error if impossible).
        factored: with ``sampler="rank1"``, keep every matrix tangent as its factors
            u, w and differentiate t -> f(θ + Σ_k t_k v_k): a linear layer's tangent term
            is (x·w_k) u_k^T (O(B (d_in + d_out)) instead of a B×d_in×d_out matmul) and
            the update is Σ_k c_k u_k w_k^T, so no K×n tangent matrix exists. ``None``
            (default): on for rank1 without chunks or normalization, in the fast mode for
            every K, in eager mode when K <= 64;
            ``False``: the dense reference path (same tangents for the same seed).

    After ``backward``, ``last_directional_derivatives`` (K,) holds the d_k of the step.

    ``tangent_range`` (``None``: all K) is the ``(start, stop)`` of the tangents whose
    directional derivatives this process computes; every execution strategy takes it, and
    :class:`fwdgrad.distributed.parallel.TangentParallel` sets it (with a ``combiner`` gathering the
    other processes' d).
    """

    tangent_range: tuple[int, int] | None = None

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        *args,
        mode: str = "auto",
        regenerate_tangents: bool | None = None,
        factored: bool | None = None,
        **kwargs,
    ):
        # num_tangents, aggregation, sampler, ... as ForwardGradient takes them
        super().__init__(model, *args, **kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.shapes = [p.shape for p in self.parameters]
        self.dim = sum(p.numel() for p in self.parameters)
        self._same_dtype = all(p.dtype == self.dtype for p in self.parameters)
        sampler, num_tangents, chunk_size = self.sampler, self.num_tangents, self.chunk_size
        ensure_independent = self.sampler_options["ensure_independent"]
        # Chunked tangents of an independent sampler are drawn chunk by chunk from seeds
        # derived from one per-step seed: that is what lets a chunk be regenerated.
        chunked = chunk_size is not None and chunk_size < num_tangents
        self._seeded_chunks = chunked and sampler in INDEPENDENT_SAMPLERS and not ensure_independent
        if regenerate_tangents and not self._seeded_chunks:
            raise ValueError(
                "regenerate_tangents=True needs chunk_size < num_tangents and an independent sampler "
                f"({', '.join(INDEPENDENT_SAMPLERS)}) without ensure_independent; got chunk_size={chunk_size}, "
                f"num_tangents={num_tangents}, sampler={sampler!r}, ensure_independent={ensure_independent}"
            )
        self.regenerate_tangents = self._seeded_chunks and regenerate_tangents is not False
        # the per-step seeds of seeded chunks (CPU: no device sync); torch's global RNG when unseeded
        self._step_seeds = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self.requested_mode = mode
        # auto: fast on the CPU (measured faster, docs/speed-memory.md), compiled on CUDA
        resolved = ("compiled" if self.device.type == "cuda" else "fast") if mode == "auto" else mode
        # rank-1 tangents of linear layers kept as factors (never materialized): eager only
        can_factor = (sampler == "rank1" and not self.normalize_tangents and not chunked
                      and not ensure_independent)
        if factored and not can_factor:
            raise ValueError(
                "factored=True needs sampler='rank1' without normalize_tangents, ensure_independent or "
                f"chunk_size < num_tangents; got sampler={sampler!r}, normalize_tangents={self.normalize_tangents}, "
                f"chunk_size={chunk_size}, ensure_independent={ensure_independent}"
            )
        # the factored linear costs O(K^2 B d_out) under vmap over e_k (not in the fast mode): only for moderate K
        auto_factor = resolved == "fast" or (mode != "compiled" and num_tangents <= FACTORED_MAX_TANGENTS)
        self.factored = can_factor and factored is not False and (factored or auto_factor)
        if self.factored and resolved != "fast":
            resolved = "eager"
        self._jvp = BatchedJvp(resolved, mode, self.device, self.compile_options)
        # the execution strategy: one function (fg, closure, inputs) -> ForwardStep
        self._execute = factored_step if self.factored else regenerated_step if self.regenerate_tangents \
            else stored_step
        self._check_tangent_memory(chunked)

    def _check_tangent_memory(self, chunked: bool) -> None:
        """Refuse now, before any allocation, tangents (and a Gram matrix) the device cannot hold."""
        num_tangents = self.num_tangents
        if self.factored:
            held = num_tangents * sum(rows + cols for rows, cols in rank1_layout(self.shapes))
        else:
            held = (self.chunk_size if chunked else num_tangents) * self.dim
        needed = held * self.dtype.itemsize
        if self.aggregation == "orthogonal_projection":
            needed += 8 * num_tangents * num_tangents  # the K x K Gram matrix, float64
        chunks = f" in chunks of {self.chunk_size}" if chunked else ""
        check_fits(needed, self.device, f"num_tangents={num_tangents}: the tangents of {self.dim:,} parameters"
                   f"{chunks}", "lower num_tangents, or set chunk_size to hold the tangents chunk by chunk")

    @property
    def mode(self) -> str:
        """``eager``, ``compiled`` or ``fast``: how the batched jvp runs now (``auto`` falls back to eager)."""
        return self._jvp.mode

    def _set_execution(self, mode: str) -> None:
        if self.factored and mode == "compiled":
            raise ValueError("factored rank-1 tangents run eagerly or fast; the state asks for mode='compiled'")
        self._jvp = BatchedJvp(mode, "auto", self.device, self.compile_options)

    def __repr__(self) -> str:
        return (
            f"ForwardGradient(num_tangents={self.num_tangents}, aggregation={self.aggregation!r}, "
            f"sampler={self.sampler!r}, parameters={self.dim}, mode={self.mode!r})"
        )

    # ---- tangents ---------------------------------------------------------------------

    def _chunk_bounds(self, tangent_range: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk of the K tangents (of tangents ``tangent_range`` only)."""
        chunk = self.chunk_size or self.num_tangents
        first, last = (0, self.num_tangents) if tangent_range is None else tangent_range
        return [(start, min(start + chunk, last)) for start in range(first, last, chunk)]

    def _draw_flat(self, num_tangents: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(num_tangents, n)`` tangents in the parameters' common dtype."""
        return sample_flat_tangents(
            num_tangents, self.dim, self.sampler, generator=generator, device=self.device, dtype=self.dtype,
            normalize=self.normalize_tangents, shapes=self.shapes, **self.sampler_options,
        )

    def _next_step_seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self._step_seeds))

    def _chunk_tangents(self, step_seed: int, index: int) -> torch.Tensor:
        """Chunk ``index`` of the step's tangents, ``(stop - start, n)``, from its own seed."""
        start, stop = self._chunk_bounds()[index]
        return self._draw_flat(stop - start, torch.Generator(self.device).manual_seed(chunk_seed(step_seed, index)))

    def step_tangents(self) -> torch.Tensor:
        """All K tangents of the next step as one ``(K, n)`` matrix V (materialized).

        The stored execution's source of tangents: a subclass that supplies tangents
        computed otherwise (gradient guesses) overrides this, and must then run with
        ``regenerate_tangents=False`` and ``factored=False`` (those strategies draw their
        tangents themselves, from seeds and factors).
        """
        if self._seeded_chunks:
            step_seed = self._next_step_seed()
            return torch.cat([self._chunk_tangents(step_seed, i) for i in range(len(self._chunk_bounds()))])
        return self._draw_flat(self.num_tangents, self.generator)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``(k, n)`` -> one ``(k, *p.shape)`` view per parameter (cast if dtypes differ)."""
        parts = split_flat(flat, self.shapes)
        if self._same_dtype:
            return parts
        return [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(parts, self.parameters)]

    def sample_tangents(self) -> list[torch.Tensor]:
        """K tangents over the trainable parameters, one ``(K, *p.shape)`` tensor each.

        With seeded chunks these are exactly the tangents a (regenerating) ``backward``
        would use for the next step: the materialized reference.
        """
        return self._split(self.step_tangents())

    def random_generators(self) -> dict[str, torch.Generator | None]:
        """The tangent generator and the generator of the per-step seeds of seeded chunks."""
        return {**super().random_generators(), "step_seed_generator": self._step_seeds}

    # ---- directional derivatives --------------------------------------------------------

    def directional_derivatives(self, closure: Closure, tangents: Sequence[torch.Tensor], *inputs: object):
        """Loss and d_k = ∇f·v_k for the given tangents, in forward mode.

        The loss is ``closure(*inputs)``. The tangents (one ``(K, *p.shape)`` tensor per
        parameter) are evaluated in chunks of ``chunk_size``. Returns
        ``(loss, directional_derivatives (K,), used)`` where ``used`` is the set of
        ``id``s of the parameters the closure touched. Applies the step's buffer updates.
        """
        num_tangents = tangents[0].shape[0]
        chunk = self.chunk_size or num_tangents
        chunks = [[t[start:start + chunk] for t in tangents] for start in range(0, num_tangents, chunk)]
        return self._directional_derivatives(closure, chunks, len(chunks), inputs)

    def _directional_derivatives(
        self, closure, chunks: Iterable[list[torch.Tensor]], num_chunks: int, inputs=(), primals=None,
        substitutes=None,
    ):
        """:meth:`directional_derivatives` over an iterable of tangent chunks (may be lazy).

        By default the differentiated inputs are the parameters; ``primals`` and
        ``substitutes(differentiated) -> (id(p) -> tensor mapping, linear rules)`` replace
        them (the factored rank-1 path differentiates in t ∈ R^K, θ + Σ_k t_k v_k).
        """
        buffers = () if self.module is None or num_chunks == 1 else self.module.buffers()
        if self.mode == "fast" and substitutes is None:  # the parameters carry the tangents themselves
            loss, derivatives, used, updates, statistics = weight_pass(
                self.parameters, closure, chunks, num_chunks, inputs, self.device, buffers)
            return self._finish_pass(loss, derivatives, used, updates, statistics)
        primals = tuple(p.detach() for p in self.parameters) if primals is None else primals
        ids = [id(p) for p in self.parameters]
        used: set[int] = set()
        updates: list = []

        def make_function(first: bool):
            def function(params, inputs):
                if substitutes is None:
                    mode = ParameterSubstitution(dict(zip(ids, params)), first, self.parameters)
                else:
                    mapping, linear_rules = substitutes(params)
                    mode = ParameterSubstitution(mapping, first, self.parameters, linear_rules)
                with mode:
                    loss = scalar_loss(closure(*inputs))
                used.update(mode.used)
                require_tangent(loss, "the trainable parameters", used=bool(mode.used))
                if first:
                    updates.extend(mode.batch_norm_updates)
                return loss, mode.batch_norm_statistics

            return function

        loss, derivatives, statistics = chunked_batched_jvp(
            self._jvp, make_function, primals, chunks, num_chunks, tuple(inputs), device=self.device, buffers=buffers,
        )
        return self._finish_pass(loss, derivatives, used, updates, statistics)

    def _finish_pass(self, loss, derivatives, used, updates, statistics):
        """The step's running-statistics update, then the checks of the pass's results."""
        if updates:  # after the buffers' last restore: the step's single running-statistics update
            with torch.no_grad():
                update_running_statistics(updates, statistics)
        if not used:
            raise ValueError(
                "the closure never used the parameters given to ForwardGradient; it must compute the loss "
                "from them (e.g. by calling the model they belong to)"
            )
        check_finite(loss, derivatives)
        return loss, derivatives, used

    # ---- the step -------------------------------------------------------------------------

    def _scaling_factor(self) -> float:
        if not self.scaling_correction:
            return 1.0
        tangent_norm = None
        if self.aggregation != "orthogonal_projection":
            tangent_norm = expected_tangent_norm(self.sampler, self.dim, self.normalize_tangents)
        return scaling_correction_factor(self.aggregation, self.num_tangents, self.dim, tangent_norm)

    def backward(self, closure: Closure, *inputs: object) -> torch.Tensor:
        """Estimate the gradient of ``closure(*inputs)`` and add it to ``.grad`` of the parameters.

        Args:
            closure: returns the scalar loss computed from the parameters (it is evaluated
                inside forward-mode transforms); usually takes no arguments.
            inputs: optional arguments of the closure (e.g. the batch). With
                ``mode="compiled"`` pass the batch here, ``fg.backward(loss_fn, x, y)``
                with the same ``loss_fn`` every step: tensors the closure captures are
                constants to the compiler, so a new batch captured in a new lambda
                would recompile every step.

        Returns:
            The loss (detached, shape ``()``).

        Raises:
            ValueError: the loss is not a floating-point scalar, or has no forward-mode
                tangent (not computed from the parameters, or detached from them).
            RuntimeError: the loss, a directional derivative or the update is not finite
                (``.grad`` is unchanged then).
        """
        step = self._execute(self, closure, inputs, self.tangent_range)
        derivatives = self.combine_directional_derivatives(step.directional_derivatives)
        # g = V^T c with finite tangents (every sampler draws finite ones): each strategy
        # checks the K coefficients c before g exists, not the n entries of g (cheap for K << n)
        updates = step.updates(derivatives)
        self.last_directional_derivatives = derivatives
        self._accumulate(updates, step.used)
        return step.loss.detach()

    def _accumulate(self, updates: Sequence[torch.Tensor], used: set[int]) -> None:
        """p.grad += g_p for every parameter the closure used; ``updates`` holds g split by parameter."""
        if len(used) == len(self.parameters) and self._same_dtype and all(p.grad is not None for p in self.parameters):
            torch._foreach_add_([p.grad for p in self.parameters], list(updates))  # one call, not one per tensor
            return
        for parameter, update in zip(self.parameters, updates):
            if id(parameter) in used:
                accumulate_grad(parameter, update, owned=True)
