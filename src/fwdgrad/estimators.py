"""Gradient estimators that fill ``.grad``: a drop-in for ``loss.backward()``.

``ForwardGradient`` computes a forward gradient (Baydin et al. 2022, "Gradients without
Backpropagation"; multi-tangent: Flügel et al. 2024) with true forward-mode AD and no
backward pass:

1. draw K tangents v_1..v_K over all trainable parameters θ ∈ R^n (:mod:`fwdgrad.tangents`);
2. compute the K directional derivatives d_k = ∇f(θ)·v_k in *one* batched forward-mode
   pass: ``torch.func.vmap`` over ``torch.func.jvp`` of the closure, the parameters being
   the differentiated inputs (optionally in chunks of ``chunk_size`` tangents);
3. aggregate them into g = V^T c (:mod:`fwdgrad.aggregation`) and add g to ``p.grad``.

How the closure sees the differentiated parameters: while it runs, a
``TorchFunctionMode`` hands every torch operation the forward-mode counterpart of each
parameter tensor it receives. This works for an ``nn.Module`` and for a bare iterable of
parameters alike, whatever code the closure calls. The same mode makes training-mode
modules work under the transforms:

- BatchNorm computes with batch statistics inside the transform; its running statistics
  are updated once per step, outside it, exactly as one plain forward pass would.
- Other in-place updates of buffers (``num_batches_tracked``) run once, outside the
  transforms; with several chunks, a module's buffers are restored between chunks.
- Dropout draws one mask per step, shared by all tangents (``randomness="same"`` and the
  RNG state replayed for every chunk).
- ``scaled_dot_product_attention`` runs on its math backend, the one with a forward-mode
  rule.

``Backprop`` has the same interface and calls ``loss.backward()``: the baseline.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.func import jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from fwdgrad.aggregation import (
    SCALING_CORRECTED,
    aggregate,
    aggregate_flat,
    aggregation_coefficients,
    resolve_aggregation,
    scaling_correction_factor,
)
from fwdgrad.tangents import (
    INDEPENDENT_SAMPLERS,
    _check_num_tangents,
    _check_sampler,
    expected_tangent_norm,
    rank1_factors,
    sample_flat_tangents,
    sample_tangents,
    split_flat,
    split_rank1_factors,
)

Closure = Callable[[], torch.Tensor]
PERTURBATIONS = ("weight", "activity")
MODES = ("auto", "eager", "compiled")
# rank1 tangents are kept as factors by default up to this many tangents per step
FACTORED_MAX_TANGENTS = 64

# torch registers its forward-AD decompositions with torch.jit.script on the first jvp and
# warns that TorchScript is deprecated; do that registration now, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401


def collect_parameters(model: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct tensors with ``requires_grad=True`` of a module or an iterable."""
    candidates = model.parameters() if isinstance(model, torch.nn.Module) else model
    parameters, seen = [], set()
    for tensor in candidates:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"expected an nn.Module or an iterable of tensors, got an element of type {type(tensor).__name__}"
            )
        if tensor.requires_grad and id(tensor) not in seen:
            seen.add(id(tensor))
            parameters.append(tensor)
    if not parameters:
        raise ValueError("no trainable parameters: the model has no tensor with requires_grad=True")
    return parameters


def _accumulate_grad(parameter: torch.Tensor, update: torch.Tensor, owned: bool = False) -> None:
    """p.grad += update, creating it when absent: what autograd does.

    ``owned``: the update is a fresh tensor nobody else holds, so it becomes ``.grad``
    without a copy.
    """
    if parameter.grad is None:
        update = update.detach().to(parameter.dtype)
        parameter.grad = update if owned else update.clone()
    else:
        parameter.grad.add_(update.to(parameter.grad.dtype))


def _scalar_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the closure must return the loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
            "reduce it (e.g. .mean()) first"
        )
    return loss.reshape(())


class _ForwardModeContext(TorchFunctionMode):
    """Substitutes parameters by their forward-mode counterparts inside the closure.

    ``substitutes`` maps ``id(parameter)`` to the tensor the transform differentiates.
    ``record_side_effects`` is False for the second and later chunks of one step, whose
    buffer updates must not be applied again.
    """

    def __init__(self, substitutes, record_side_effects: bool, parameters=(), factored=None):
        super().__init__()
        self.substitutes = substitutes
        self.pairs = list(zip(parameters, substitutes.values())) if factored is None else []  # compiled execution
        # id(weight) -> (weight, u (K, d_out), w (K, d_in), t (K,)): linear layers whose
        # tangents are rank-1 and never materialized (see ForwardGradient's factored path)
        self.factored = factored or {}
        self.record_side_effects = record_side_effects
        self.used: set[int] = set()
        self.batch_norm_updates: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.batch_norm_statistics: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _swap(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # id() of an input would make the compiler guard on that tensor's identity
            # (a recompile per batch); identity tests against the parameters do not.
            for parameter, substitute in self.pairs:
                if tensor is parameter:
                    self.used.add(id(parameter))
                    return substitute
            return tensor
        substitute = self.substitutes.get(id(tensor))
        if substitute is None:
            return tensor
        self.used.add(id(tensor))
        return substitute

    def _swap_all(self, args: tuple, kwargs: dict):
        """Substitute every parameter among the op's arguments (nested ones too).

        Most ops take flat arguments: a plain loop handles them, pytree only the rest (it
        costs ~1 ms per step of Python on the Baydin MLP)."""
        values = (*args, *kwargs.values())
        if any(isinstance(value, (list, tuple, dict)) for value in values):
            return tree_map_only(torch.Tensor, self._swap, (args, kwargs))
        swap = self._swap
        args = tuple(swap(a) if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs:
            kwargs = {k: swap(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return args, kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.factored:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.factored:
                return self._factored_linear(*args, **kwargs)
        args, kwargs = self._swap_all(args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(*args, **kwargs)
        if not torch.compiler.is_compiling() and _mutates_captured_tensor(func, args, kwargs):
            # E.g. BatchNorm's num_batches_tracked.add_(1): no tangent involved, so run it
            # on the plain tensors, outside the functorch transforms.
            with torch._C._DisableFuncTorch():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _factored_linear(self, input, weight, bias=None):
        """linear(x, W + Σ_k t_k u_k w_k^T, b') = x W^T + b' + Σ_k t_k (x·w_k) u_k^T.

        Differentiated in t at t = 0, the tangent along e_k is x_t W^T + b'_t + (x w_k) u_k^T:
        O(B (d_in + d_out)) per tangent for the weight's part instead of a B×d_in×d_out matmul.
        """
        primal, u, w, t = self.factored[id(weight)]
        self.used.add(id(weight))
        input = self._swap(input)
        output = _ConstantWeightLinear.apply(input, primal) + ((input @ w.T) * t) @ u
        return output if bias is None else output + self._swap(bias)

    def _batch_norm(self, input, running_mean=None, running_var=None, weight=None, bias=None,
                    training=False, momentum=0.1, eps=1e-5):
        if not (training and running_mean is not None and running_var is not None):
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        # The in-place running-stat update cannot happen inside the transform: normalize with
        # the batch statistics here and hand the statistics out (as jvp's aux output).
        if self.record_side_effects:
            dims = [d for d in range(input.dim()) if d != 1]
            self.batch_norm_updates.append((running_mean, running_var, momentum))
            self.batch_norm_statistics.append((input.mean(dims), input.var(dims, correction=1)))
        return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)


def _mutates_captured_tensor(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if not name.endswith("_") or name.startswith("__") or not args or not isinstance(args[0], torch.Tensor):
        return False
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return not any(is_functorch_wrapped_tensor(t) for t in tensors)


def _gram_block(a: torch.Tensor, b: torch.Tensor, columns: int = 2**16) -> torch.Tensor:
    """a b^T in float64, ``(k_a, n) x (k_b, n) -> (k_a, k_b)``, ``columns`` of n at a time
    (no float64 copy of a whole chunk)."""
    block = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], columns):
        block += a[:, start:start + columns].double() @ b[:, start:start + columns].double().T
    return block


def _sum_of_outer_products(coefficients: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k c_k u_k w_k^T for c (K,), u (K, rows), w (K, cols) -> (rows, cols).

    K = 1 as ``torch.outer`` (a matmul with inner dimension 1 runs far below memory speed).
    """
    if coefficients.numel() == 1:
        return torch.outer(u[0] * coefficients[0], w[0])
    return (coefficients.unsqueeze(1) * u).T @ w


class _ConstantWeightLinear(torch.autograd.Function):
    """y = x W^T for a weight without tangent, with the forward-mode rule y_t = x_t W^T.

    torch's own rule for ``linear``/``addmm`` also multiplies by the (zero) tangent of the
    constant weight, one or two wasted matmuls per layer (measured: the jvp of a linear
    layer in x alone cost 3-5× its primal on the CPU). Only the factored path uses it,
    which runs eagerly (a custom ``jvp`` is dropped under torch.compile, pytorch 192985).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight):
        return input @ weight.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1]

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent):
        return input_tangent @ ctx.weight.T

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError("fwdgrad's forward-mode linear has no backward pass")


class _Rank1Substitutes:
    """id(p) -> the forward-mode tensor standing for parameter p in the factored path.

    Dense parameters (vectors, convolution kernels) are differentiated directly: their
    substitute is given. A factored matrix used other than by ``F.linear`` (e.g. a packed
    attention projection) gets θ + Σ_k t_k u_k w_k^T, formed on first use only.
    """

    def __init__(self, parameters, parts, t, dense: dict[int, torch.Tensor]):
        self.parameters, self.parts, self.t = parameters, parts, t
        self.index = {id(p): i for i, p in enumerate(parameters)}
        self.cache = dict(dense)

    def get(self, key: int):
        substitute = self.cache.get(key)
        if substitute is not None or key not in self.index:
            return substitute
        position = self.index[key]
        parameter = self.parameters[position]
        u, w = self.parts[position]
        direction = (self.t.unsqueeze(1) * u).T @ w
        self.cache[key] = parameter.detach() + direction.reshape(parameter.shape)
        return self.cache[key]

    def values(self):
        return [self.get(id(p)) for p in self.parameters]


def _update_running_statistics(updates, statistics) -> None:
    """running <- (1 - momentum) running + momentum batch_statistic (unbiased variance)."""
    for (running_mean, running_var, momentum), (mean, var) in zip(updates, statistics):
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


_NO_RULE = re.compile(r"forward AD with (\S+) that does not support it")


@contextmanager
def _explain_missing_forward_rules():
    try:
        yield
    except NotImplementedError as error:
        match = _NO_RULE.search(str(error))
        if match is None:
            raise
        raise RuntimeError(
            f"operator {match.group(1)!r} has no forward-mode AD rule in torch {torch.__version__}, so a "
            "forward gradient cannot pass through it. Replace it by operations that have one, wrap it in a "
            "torch.autograd.Function with a jvp staticmethod, or use fwdgrad.Backprop for this model."
        ) from error


def _math_attention():
    """Select scaled_dot_product_attention's math backend: the others lack forward-mode rules."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def batched_jvp(
    function: Callable,
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    has_aux: bool = False,
):
    """All K Jacobian-vector products of ``function`` at ``primals`` in one pass.

    ``vmap`` over ``jvp`` with ``randomness="same"`` (one dropout mask for all tangents).

    Args:
        function: maps ``len(primals)`` tensors to a tensor (and aux, if ``has_aux``).
        primals: the point, tensors of shapes ``shape_i``.
        tangents: tensors of shapes ``(K, *shape_i)``.

    Returns:
        ``(value, directional_derivatives[, aux])``; the value and aux are those of the
        primal (K-independent), the directional derivatives have shape ``(K, *out_shape)``.
    """
    num_tangents = tangents[0].shape[0]
    if num_tangents == 1:
        result = jvp(function, tuple(primals), tuple(t[0] for t in tangents), has_aux=has_aux)
        return (result[0], result[1].unsqueeze(0), *result[2:])
    result = vmap(lambda *ts: jvp(function, tuple(primals), ts, has_aux=has_aux), randomness="same")(*tangents)
    value, derivatives = result[0][0], result[1]
    if has_aux:
        return value, derivatives, tree_map_only(torch.Tensor, lambda t: t[0], result[2])
    return value, derivatives


def _jvp_with_inputs(function, primals, tangents, inputs):
    """:func:`batched_jvp` of ``params -> function(params, inputs)``: the unit ``mode="compiled"``
    hands to ``torch.compile`` (outside vmap/jvp), the inputs as graph inputs."""
    return batched_jvp(lambda *params: function(params, inputs), primals, tangents, has_aux=True)


def _check_finite(loss: torch.Tensor, directional_derivatives: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is not finite ({loss.item()}); lower the learning rate or check the inputs")
    if not torch.isfinite(directional_derivatives).all():
        bad = (~torch.isfinite(directional_derivatives)).nonzero().flatten().tolist()
        raise RuntimeError(
            f"directional derivatives along tangents {bad} are not finite "
            f"({directional_derivatives.flatten()[bad].tolist()}); the loss is {loss.item()}"
        )


class ForwardGradient:
    """Forward-gradient estimator: ``fg.backward(closure)`` in place of ``loss.backward()``.

    Args:
        model: an ``nn.Module`` or an iterable of parameters used by the closure's code.
            Only tensors with ``requires_grad=True`` are differentiated and updated.
        num_tangents: K >= 1 tangents per step.
        aggregation: how to combine them, see :data:`fwdgrad.aggregation.AGGREGATIONS`
            (``"frog"`` = orthogonal projection).
        sampler: tangent distribution, see :data:`fwdgrad.tangents.SAMPLERS`
            (``rademacher`` and ``rank1`` are the cheap unbiased ones on the CPU).
        normalize_tangents: scale every tangent to unit norm (over all parameters).
        scaling_correction: the chi-distribution correction of the norm (``sum``, ``mean``,
            ``orthogonal_projection``).
        seed: seeds a private generator (reproducible tangents); ``None`` uses torch's
            global RNG.
        chunk_size: evaluate the K tangents in chunks of at most this many (bounds memory).
            With an independent sampler (``normal``, ``rademacher``, ``rank1``; no
            ``ensure_independent``) chunk c of a step is drawn from its own seed
            (derived from a per-step seed and c) and, by default, *regenerated* instead
            of stored: once for the directional derivatives, once more for the update
            g = V^T c (and, for ``frog``, for the Gram matrix V V^T), so the step holds
            O(chunk_size × n) tangent entries instead of O(K × n).
        angle, max_length, ensure_independent: options of the ``angle`` and
            ``varying_length`` samplers and linear-independence resampling.
        top_k_tolerance: the cosine margin of ``mean_of_top_k``.
        mode: execution of the batched forward-mode pass: ``eager``; ``compiled``
            (``torch.compile`` around ``vmap(jvp(...))``, CUDA graphs on CUDA via
            ``mode="reduce-overhead"``); ``auto`` = eager on the CPU (compiling costs
            tens of seconds per input shape there, repaid only by long runs: choose
            ``compiled`` for those, see the README) and, on CUDA, compiled when the batch is passed as
            ``backward(loss_fn, *inputs)`` (eager otherwise), falling back to eager with
            a warning if compilation fails.
        regenerate_tangents: ``None`` (default) regenerates chunked tangents whenever the
            sampler allows it; ``False`` stores them (the materialized reference path,
            same tangents for the same seed); ``True`` insists (error if impossible).
        factored: with ``sampler="rank1"``, keep every matrix tangent as its factors
            u, w and differentiate t -> f(θ + Σ_k t_k v_k): a linear layer's tangent term
            is (x·w_k) u_k^T (O(B (d_in + d_out)) instead of a B×d_in×d_out matmul) and
            the update is Σ_k c_k u_k w_k^T, so no K×n tangent matrix exists. ``None``
            (default): on for rank1 when K <= 64, eager mode, no chunks or normalization;
            ``False``: the dense reference path (same tangents for the same seed).

    ``perturbation="activity"`` perturbs layer outputs instead of weights (per-sample
    losses; see :class:`fwdgrad.activity.ActivityForwardGradient`, which it returns).

    After ``backward``, ``last_directional_derivatives`` (K,) holds the d_k of the step.
    """

    # keyword arguments of torch.compile for mode="compiled" (None: inductor; on CUDA with
    # mode="reduce-overhead", i.e. CUDA graphs); e.g. {"backend": "aot_eager"} to check capture
    compile_options: dict | None = None

    def __new__(cls, *args, perturbation: str = "weight", **kwargs):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; valid choices: {', '.join(PERTURBATIONS)}")
        if perturbation == "activity" and cls is ForwardGradient:
            from fwdgrad.activity import ActivityForwardGradient

            return super().__new__(ActivityForwardGradient)
        return super().__new__(cls)

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        num_tangents: int = 1,
        aggregation: str = "mean",
        sampler: str = "normal",
        normalize_tangents: bool = False,
        scaling_correction: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        *,
        angle: float | None = None,
        max_length: float | None = None,
        ensure_independent: bool = False,
        top_k_tolerance: float = 0.1,
        perturbation: str = "weight",
        mode: str = "auto",
        regenerate_tangents: bool | None = None,
        factored: bool | None = None,
    ):
        _check_num_tangents(num_tangents)
        _check_sampler(sampler)
        self.aggregation = resolve_aggregation(aggregation)
        if scaling_correction and self.aggregation not in SCALING_CORRECTED:
            raise ValueError(
                f"scaling_correction=True is defined for aggregation in {', '.join(SCALING_CORRECTED)}, "
                f"got aggregation={aggregation!r}"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.module = model if isinstance(model, torch.nn.Module) else None
        self.parameters = collect_parameters(model)
        self.num_tangents = num_tangents
        self.sampler = sampler
        self.normalize_tangents = normalize_tangents
        self.scaling_correction = scaling_correction
        self.seed = seed
        self.chunk_size = chunk_size
        self.sampler_options = dict(angle=angle, max_length=max_length, ensure_independent=ensure_independent)
        self.top_k_tolerance = top_k_tolerance
        self.shapes = [p.shape for p in self.parameters]
        self.dim = sum(p.numel() for p in self.parameters)
        self.device = self.parameters[0].device
        self.dtype = self.parameters[0].dtype
        for p in self.parameters[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self._same_dtype = all(p.dtype == self.dtype for p in self.parameters)
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
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
        self._step_seeds = torch.Generator()
        if seed is not None:
            self._step_seeds.manual_seed(seed)
        self.requested_mode = mode
        self.mode = ("compiled" if self.device.type == "cuda" else "eager") if mode == "auto" else mode
        # rank-1 tangents of linear layers kept as factors (never materialized): eager only
        can_factor = sampler == "rank1" and not normalize_tangents and not chunked and not ensure_independent
        if factored and not can_factor:
            raise ValueError(
                "factored=True needs sampler='rank1' without normalize_tangents, ensure_independent or "
                f"chunk_size < num_tangents; got sampler={sampler!r}, normalize_tangents={normalize_tangents}, "
                f"chunk_size={chunk_size}, ensure_independent={ensure_independent}"
            )
        # the factored linear costs O(K^2 B d_out) under vmap over e_k: only for moderate K
        auto_factor = mode != "compiled" and num_tangents <= FACTORED_MAX_TANGENTS
        self.factored = can_factor and factored is not False and (factored or auto_factor)
        if self.factored:
            self.mode = "eager"
        self._compiled_jvp = None
        self.last_directional_derivatives: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ForwardGradient(num_tangents={self.num_tangents}, aggregation={self.aggregation!r}, "
            f"sampler={self.sampler!r}, parameters={self.dim}, mode={self.mode!r})"
        )

    # ---- tangents ---------------------------------------------------------------------

    def _chunk_bounds(self) -> list[tuple[int, int]]:
        chunk = self.chunk_size or self.num_tangents
        return [(start, min(start + chunk, self.num_tangents)) for start in range(0, self.num_tangents, chunk)]

    def _draw_flat(self, num_tangents: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(num_tangents, n)`` tangents in the parameters' common dtype."""
        return sample_flat_tangents(
            num_tangents, self.dim, self.sampler, generator=generator, device=self.device, dtype=self.dtype,
            normalize=self.normalize_tangents, shapes=self.shapes, **self.sampler_options,
        )

    def _next_step_seed(self) -> int:
        # drawn on the CPU (no device sync); torch's global CPU RNG when unseeded
        generator = self._step_seeds if self.seed is not None else None
        return int(torch.randint(0, 2**62, (), generator=generator))

    def _chunk_tangents(self, step_seed: int, index: int) -> torch.Tensor:
        """Chunk ``index`` of the step's tangents, ``(stop - start, n)``, from its own seed."""
        start, stop = self._chunk_bounds()[index]
        seed = (step_seed + (index + 1) * 0x9E3779B97F4A7C15) % 2**63
        return self._draw_flat(stop - start, torch.Generator(self.device).manual_seed(seed))

    def _sample_flat_step(self) -> torch.Tensor:
        """All K tangents of a step as one ``(K, n)`` matrix (materialized)."""
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
        return self._split(self._sample_flat_step())

    # ---- directional derivatives --------------------------------------------------------

    def _batched_jvp(self, function, primals, tangents, inputs):
        # auto compiles only when the batch comes as inputs: a closure capturing a new
        # batch every step would recompile every step
        if self.mode == "eager" or (self.requested_mode == "auto" and not inputs):
            return _jvp_with_inputs(function, primals, tangents, inputs)
        if self._compiled_jvp is None:
            options = {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
            if self.compile_options is not None:
                options = self.compile_options
            self._compiled_jvp = torch.compile(_jvp_with_inputs, dynamic=False, **options)
        try:
            result = self._compiled_jvp(function, primals, tangents, inputs)
            # CUDA-graph outputs are overwritten by the next replay: hand out copies (K + a few numbers)
            return tree_map_only(torch.Tensor, torch.clone, result) if self.device.type == "cuda" else result
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, loudly
            if self.requested_mode != "auto":
                raise
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eagerly", stacklevel=3)
            self.mode = "eager"
            return _jvp_with_inputs(function, primals, tangents, inputs)

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
        ``substitutes(differentiated) -> (id(p) -> tensor mapping, factored)`` replace them
        (the factored rank-1 path differentiates in t ∈ R^K, θ + Σ_k t_k v_k).
        """
        primals = tuple(p.detach() for p in self.parameters) if primals is None else primals
        ids = [id(p) for p in self.parameters]
        used: set[int] = set()
        updates: list = []
        losses, derivatives = [], []
        buffers = rng_state = None
        if num_chunks > 1:
            rng_state = _rng_state(self.device)
            if self.module is not None:
                buffers = [(b, b.clone()) for b in self.module.buffers()]
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(_math_attention())
            stack.enter_context(_explain_missing_forward_rules())
            for index, chunk_tangents in enumerate(chunks):
                first = index == 0
                if not first:
                    _set_rng_state(self.device, rng_state)
                    for buffer, saved in buffers or ():
                        buffer.copy_(saved)

                def function(params, inputs, _first=first):
                    if substitutes is None:
                        mode = _ForwardModeContext(dict(zip(ids, params)), _first, self.parameters)
                    else:
                        mapping, factored = substitutes(params)
                        mode = _ForwardModeContext(mapping, _first, self.parameters, factored)
                    with mode:
                        loss = _scalar_loss(closure(*inputs))
                    used.update(mode.used)
                    if _first:
                        updates.extend(mode.batch_norm_updates)
                    return loss, mode.batch_norm_statistics

                loss, derivative, statistics = self._batched_jvp(function, primals, chunk_tangents, tuple(inputs))
                if first:
                    first_statistics = statistics
                losses.append(loss)
                derivatives.append(derivative)
            # after the buffers' last restore: the step's single running-statistics update
            _update_running_statistics(updates, first_statistics)
        loss, derivatives = losses[0], torch.cat(derivatives)
        if not used:
            raise ValueError(
                "the closure never used the parameters given to ForwardGradient; it must compute the loss "
                "from them (e.g. by calling the model they belong to)"
            )
        _check_finite(loss, derivatives)
        return loss, derivatives, used

    # ---- the step -------------------------------------------------------------------------

    def _scaling_factor(self) -> float:
        if not self.scaling_correction:
            return 1.0
        tangent_norm = None
        if self.aggregation != "orthogonal_projection":
            tangent_norm = expected_tangent_norm(self.sampler, self.dim, self.normalize_tangents)
        return scaling_correction_factor(self.aggregation, self.num_tangents, self.dim, tangent_norm)

    def backward(self, closure: Callable[..., torch.Tensor], *inputs: object) -> torch.Tensor:
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
        """
        if self.factored:
            loss, derivatives, updates, used = self._factored_step(closure, inputs)
            self.last_directional_derivatives = derivatives
            for parameter, update in zip(self.parameters, updates):
                if id(parameter) in used:
                    _accumulate_grad(parameter, update, owned=True)
            return loss.detach()
        if self.regenerate_tangents:
            loss, derivatives, update, used = self._regenerated_step(closure, inputs)
        else:
            tangents = self._sample_flat_step()
            loss, derivatives, used = self._directional_derivatives(
                closure, [self._split(tangents[start:stop]) for start, stop in self._chunk_bounds()],
                len(self._chunk_bounds()), inputs,
            )
            if self.num_tangents == 1 and self.aggregation in ("sum", "mean", "max", "max_normalized",
                                                               "mean_of_top_k", "orthogonal_projection"):
                # K = 1: every aggregation but mean_times_dim is c = d (the projection onto
                # span(v) is (d / ||v||^2) v: handled below), so skip the general machinery.
                coefficient = derivatives.to(self.dtype)
                if self.aggregation == "orthogonal_projection":
                    coefficient = coefficient / tangents.square().sum()
                update = tangents[0] * (coefficient * self._scaling_factor())
            else:
                tangent_norm = None
                if self.scaling_correction and self.aggregation != "orthogonal_projection":
                    tangent_norm = expected_tangent_norm(self.sampler, self.dim, self.normalize_tangents)
                update = aggregate_flat(
                    tangents, derivatives.to(self.dtype), self.aggregation, scaling_correction=self.scaling_correction,
                    tangent_norm=tangent_norm, top_k_tolerance=self.top_k_tolerance,
                )
        self.last_directional_derivatives = derivatives
        self._accumulate(update, used)
        return loss.detach()

    def _regenerated_step(self, closure, inputs):
        """Two passes over regenerated chunks: (1) d, ||v_k||^2 and G = V V^T; (2) g = V^T c.

        Memory: one chunk of tangents (two while the Gram matrix's off-diagonal blocks
        G_ij = V_i V_j^T are formed, regenerating V_j for j < i; in float64 only a slice
        of columns at a time).
        """
        step_seed = self._next_step_seed()
        bounds = self._chunk_bounds()
        num = self.num_tangents
        need_gram = self.aggregation == "orthogonal_projection"
        need_norms = self.aggregation in ("max_normalized", "mean_of_top_k")
        gram = torch.zeros(num, num, dtype=torch.float64, device=self.device) if need_gram else None
        squared_norms = torch.zeros(num, dtype=torch.float64, device=self.device) if need_norms else None

        def first_pass():
            for index, (start, stop) in enumerate(bounds):
                chunk = self._chunk_tangents(step_seed, index)
                if need_norms:
                    squared_norms[start:stop] = chunk.double().square().sum(-1)
                if need_gram:
                    gram[start:stop, start:stop] = _gram_block(chunk, chunk)
                    for other, (other_start, other_stop) in enumerate(bounds[:index]):
                        block = _gram_block(chunk, self._chunk_tangents(step_seed, other))
                        gram[start:stop, other_start:other_stop] = block
                        gram[other_start:other_stop, start:stop] = block.T
                yield self._split(chunk)

        loss, derivatives, used = self._directional_derivatives(closure, first_pass(), len(bounds), inputs)
        coefficients = aggregation_coefficients(
            self.aggregation, derivatives.double(), squared_norms=squared_norms, gram=gram, dim=self.dim,
            top_k_tolerance=self.top_k_tolerance,
        ).to(self.dtype) * self._scaling_factor()
        update = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for index, (start, stop) in enumerate(bounds):
            update.addmv_(self._chunk_tangents(step_seed, index).T, coefficients[start:stop])
        return loss, derivatives, update, used

    def _factored_step(self, closure, inputs):
        """Rank-1 tangents as factors: differentiate t -> f(θ + Σ_k t_k v_k) at t = 0.

        v_k = u_k w_k^T for every matrix (its linear layers never form v_k, see
        :meth:`_ForwardModeContext._factored_linear`; other uses get the dense θ + Σ t_k v_k),
        N(0, I) entries for the other tensors; the tangent along t is e_k, so the k-th
        derivative is d_k = ∇f·v_k. The aggregation needs the Gram matrix only through
        <u_i w_i^T, u_j w_j^T> = (u_i·u_j)(w_i·w_j), and the update of a matrix is
        Σ_k c_k u_k w_k^T = (c ⊙ U)^T W: no K × n tangent matrix is ever formed.
        The draw is the one of ``sampler="rank1"`` (same seed, same tangents).
        """
        num = self.num_tangents
        factors = rank1_factors((num,), self.shapes, self.generator, self.device, self.dtype)
        parts = split_rank1_factors(factors, self.shapes)
        is_factored = [w is not None and p.dim() == 2 for p, (u, w) in zip(self.parameters, parts)]
        # the other parameters are differentiated directly, along their (dense) rank1 tangents
        dense = [i for i, flag in enumerate(is_factored) if not flag]
        dense_tangents = []
        for i in dense:
            u, w = parts[i]
            tangent = u if w is None else u.unsqueeze(-1) * w.unsqueeze(-2)
            dense_tangents.append(tangent.reshape(num, *self.shapes[i]))

        def substitutes(differentiated):
            t, *dense_substitutes = differentiated
            factored = {
                id(self.parameters[i]): (self.parameters[i].detach(), *parts[i], t)
                for i, flag in enumerate(is_factored) if flag
            }
            given = {id(self.parameters[i]): tensor for i, tensor in zip(dense, dense_substitutes)}
            return _Rank1Substitutes(self.parameters, parts, t, given), factored

        primals = (torch.zeros(num, device=self.device, dtype=self.dtype),
                   *[self.parameters[i].detach() for i in dense])
        directions = [torch.eye(num, device=self.device, dtype=self.dtype), *dense_tangents]
        loss, derivatives, used = self._directional_derivatives(
            closure, [directions], 1, inputs, primals=primals, substitutes=substitutes
        )
        gram = squared_norms = None
        if self.aggregation in ("orthogonal_projection", "max_normalized", "mean_of_top_k"):
            gram = sum(
                (u.double() @ u.double().T) * (w.double() @ w.double().T) if w is not None
                else u.double() @ u.double().T
                for u, w in parts
            )
            squared_norms = gram.diagonal()
        coefficients = aggregation_coefficients(
            self.aggregation, derivatives.double(), squared_norms=squared_norms, gram=gram, dim=self.dim,
            top_k_tolerance=self.top_k_tolerance,
        ).to(self.dtype) * self._scaling_factor()
        updates = [
            (_sum_of_outer_products(coefficients, u, w) if w is not None else coefficients @ u).reshape(p.shape)
            for p, (u, w) in zip(self.parameters, parts)
        ]
        return loss, derivatives, updates, used

    def _accumulate(self, update: torch.Tensor, used: set[int]) -> None:
        """p.grad += g for every parameter the closure used; g is the flat ``(n,)`` update."""
        parts = split_flat(update, self.shapes)
        if len(used) == len(self.parameters) and self._same_dtype and all(p.grad is not None for p in self.parameters):
            torch._foreach_add_([p.grad for p in self.parameters], parts)  # one call, not one per tensor
            return
        for parameter, part in zip(self.parameters, parts):
            if id(parameter) in used:
                _accumulate_grad(parameter, part, owned=True)


def _rng_state(device: torch.device):
    state = torch.get_rng_state()
    if device.type == "cuda":
        return state, torch.cuda.get_rng_state(device)
    return state, None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Backprop:
    """The baseline: ``Backprop(model).backward(closure)`` is ``closure().backward()``.

    It uses reverse-mode autograd (a backward pass); same interface as ForwardGradient.
    """

    def __init__(self, model: torch.nn.Module | Iterable[torch.Tensor]):
        self.parameters = collect_parameters(model)

    def __repr__(self) -> str:
        return f"Backprop(parameters={sum(p.numel() for p in self.parameters)})"

    def backward(self, closure: Callable[..., torch.Tensor], *inputs: object) -> torch.Tensor:
        """Evaluate ``closure(*inputs)`` with autograd and accumulate the exact gradient into ``.grad``."""
        with torch.enable_grad():
            loss = _scalar_loss(closure(*inputs))
            if not loss.requires_grad:
                raise ValueError("the closure's loss does not depend on any trainable parameter")
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss is not finite ({loss.item()})")
            loss.backward(inputs=self.parameters)
        return loss.detach()


def forward_gradient(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_tangents: int = 1,
    aggregation: str = "mean",
    sampler: str = "normal",
    generator: torch.Generator | None = None,
    normalize: bool = False,
    scaling_correction: bool = False,
    **sampler_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward gradient of a function of one tensor.

    g = aggregate(V, V ∇f(x)) with V the K tangents (rows in R^n, n = x.numel()); for
    K = 1, normal tangents and ``mean``: g = (∇f(x)·v) v, E[g] = ∇f(x).

    Args:
        f: maps ``x`` to a scalar tensor.
        x: the point, any shape.
        num_tangents, aggregation, sampler, normalize, scaling_correction: as in
            :class:`ForwardGradient`; ``generator`` drives the sampler.

    Returns:
        ``(f(x), g)`` with g of the shape of ``x``.
    """
    _check_num_tangents(num_tangents)
    method = resolve_aggregation(aggregation)
    (tangents,) = sample_tangents(
        num_tangents, [x.shape], sampler, generator=generator, device=x.device, dtype=x.dtype,
        normalize=normalize, **sampler_options,
    )
    with torch.no_grad(), _explain_missing_forward_rules():
        value, derivatives = batched_jvp(lambda y: _scalar_loss(f(y)), (x.detach(),), (tangents,))
    _check_finite(value, derivatives)
    tangent_norm = None
    if scaling_correction and method != "orthogonal_projection":
        tangent_norm = expected_tangent_norm(sampler, x.numel(), normalize)
    (estimate,) = aggregate(
        [tangents], derivatives, method, scaling_correction=scaling_correction, tangent_norm=tangent_norm
    )
    return value, estimate


def cosine_similarity(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Cosine between two parameter-shaped lists, over the concatenation of all tensors."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norm_a = math.sqrt(sum(float(x.double().square().sum()) for x in a))
    norm_b = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return float(dot) / (norm_a * norm_b)
