"""Activity perturbation: forward gradients in the space of layer outputs.

Weight perturbation (:class:`fwdgrad.ForwardGradient`, Baydin et al. 2022) draws tangents
v ∈ R^n over all n parameters and estimates ∇_θ L from d_k = ∇_θ L · v_k. Its cosine to
the true gradient is about sqrt(K / n) (n = 1.86 M for the Baydin MLP).

Activity perturbation (Ren et al. 2023, "Scaling Forward Gradient With Local Losses"; the
"node" mode of Flügel et al. 2024) perturbs the *outputs* z_m ∈ R^{B × a_m} of the perturbed
modules m = 1..M instead. For sample b, let z_b = (z_{1,b}, ..., z_{M,b}) ∈ R^a,
a = Σ_m a_m (a = 2,058 for the Baydin MLP), and L_b its loss:

1. Tangents u[k, b] ∈ R^a, k = 1..K, independent per sample (``tangent_sharing=
   "per_sample"``) or one set shared by the whole batch (``"shared"``, u[k, b] = u[k]).
2. One batched forward-mode pass: the module outputs become z_m + δ_m, the δ_m are the
   differentiated inputs of ``torch.func.jvp`` at δ = 0 with tangents u (``vmap`` over K),
   and the per-sample losses give the per-sample directional derivatives

       d[k, b] = ∇_{z_b} L_b · u[k, b]            (shape (K, B)),

   where ∇_{z_{m,b}} L_b is the *total* derivative of L_b with respect to z_{m,b} (through
   every later layer). No backward pass through the network.
3. Per-sample aggregation over the concatenation of all perturbed outputs (any method of
   :mod:`fwdgrad.core.aggregation`; the orthogonal projection solves one K×K system per
   sample): ĝ_{z_b} ≈ ∇_{z_b} L_b, shape (B, a).
4. Weight update of module m by its *local* vector-Jacobian product (the standard
   formulation of activity / node perturbation; a derivative of one layer with respect to
   its own parameters θ_m, at its recorded input h_m, never through other layers):

       θ_m.grad += (1/B) Σ_b (∂z_{m,b} / ∂θ_m)^T ĝ_{z_{m,b}}

   which estimates the gradient of the *mean* loss (1/B) Σ_b L_b, as weight perturbation
   with ``reduction="mean"`` does. Closed forms (:func:`local_parameter_gradients`):
   Linear z = h W^T + c: W.grad = ĝ^T h, c.grad = Σ ĝ; ConvNd: the weight derivative of the
   convolution (``torch.nn.grad.convNd_weight``) and Σ ĝ over batch and space; LayerNorm /
   GroupNorm / BatchNorm (eval statistics) z = x̂ γ + β: γ.grad = Σ ĝ x̂, β.grad = Σ ĝ with x̂
   the normalized input. Any other module falls back to :func:`isolated_module_vjp`: a
   ``torch.func.vjp`` of that single module, re-run alone on its recorded input, with
   respect to its own direct parameters only.

With K = a and linearly independent tangents the projection recovers ∇_{z_b} L_b exactly,
so the update equals the true gradient (a property the tests check).

Requirements: the closure returns per-sample losses (shape ``(B,)``), every perturbed
output has the batch as its first dimension, and no module couples samples (BatchNorm in
training mode, or with ``track_running_stats=False``, is refused with the options). The
tangent dimension a and the batch size are learnt from the first call (a shape probe: one
plain forward pass without transforms) and re-probed whenever they change. Parameters of
modules that are not perturbed receive no ``.grad``. A perturbed module may not contain
other perturbed modules (e.g. ``nn.MultiheadAttention`` owns ``in_proj_weight`` and
contains the ``out_proj`` Linear): its local derivative would run through them, so this is
refused with the options.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from fwdgrad.core.aggregation import aggregate, aggregation_coefficients, scaling_correction_factor
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.execution import chunked_batched_jvp, eager_batched_jvp
from fwdgrad.core.fast_forward import fast_batched_jvp
from fwdgrad.core.forward_mode import (
    accumulate_grad,
    check_finite,
    check_finite_updates,
    require_tangent,
    rng_state,
    set_rng_state,
)
from fwdgrad.core.layer_derivatives import isolated_module_vjp, local_parameter_gradients
from fwdgrad.core.perturbation_sites import (
    ActivationSiteHooks,
    OutputHooks,
    SitesChanged,
    following_activations,
    select_modules,
    site_activations,
    through_activation,
)
from fwdgrad.core.tangents import expected_tangent_norm, sample_flat_tangents, split_flat

__all__ = ["TANGENT_SHARING", "ActivityForwardGradient", "isolated_module_vjp", "local_parameter_gradients"]

TANGENT_SHARING = ("per_sample", "shared")
ACTIVITY_MODES = ("auto", "eager", "fast")
PerSampleClosure = Callable[[], torch.Tensor]


def _check_sample_independence(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) normalizes with batch "
                "statistics, which couples the samples of a batch, so per-sample directional derivatives "
                "(activity perturbation) are not defined. Options: put it in eval mode with running "
                "statistics (model.eval() or module.eval()), replace it by GroupNorm/LayerNorm, or use "
                "weight perturbation (perturbation='weight')"
            )


def _per_sample_losses(losses: object) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"the closure must return the per-sample losses as a torch.Tensor, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(
            f"activity perturbation needs the closure to return per-sample losses of shape (B,), got a tensor "
            f"of shape {tuple(losses.shape)}; e.g. F.cross_entropy(model(x), y, reduction='none')"
        )
    return losses


class ActivityForwardGradient(ForwardGradient, perturbation="activity"):
    """Forward gradient with tangents on layer outputs: ``fg.backward(per_sample_closure)``.

    See the module docstring for the formulas. Same arguments as
    :class:`fwdgrad.ForwardGradient` (``ForwardGradient(model, perturbation="activity")``
    returns this class), plus:

    Args:
        model: the ``nn.Module`` (activity perturbation needs its modules).
        perturbed_modules: which modules' outputs carry tangents and whose direct
            parameters are updated: ``None`` (default) = every module owning trainable
            parameters directly; or module names (``"0"``, ``"encoder.fc"``) and/or
            ``nn.Module`` subclasses (``nn.Linear``), alone or in a list.
        tangent_sharing: ``"per_sample"`` (default): independent tangents u[k, b] for every
            sample; ``"shared"``: one set u[k] for the whole batch (the multi-tangent paper's
            setting). Either way the aggregation is per sample. The default is chosen by
            measurement (``docs/activity/tangent_sharing.py``: Baydin MLP, mnist5k, fg-mean
            K=16, 3 epochs): at the paper's table lr, shared tangents give a lower test loss
            (paired t-test over seeds), but that lr is too small for 3 epochs; at 3× it, the
            better lr for both, per-sample tangents learn more and far more steadily across
            seeds (independent tangents average their noise over the batch in the weight
            update; shared ones do not). See the measured table there.
        after_activation: place the tangent of a perturbed module m after the elementwise
            activation σ that takes m's output (a = σ(z) + δ; the multi-tangent paper's code
            perturbs post-ReLU block outputs), found by a probe pass; modules without such
            an activation keep the tangent on their own output. The estimate ĝ_a of ∂L/∂a
            maps back to m's output by the elementwise derivative σ'(z) (one elementwise
            op, in forward mode): ĝ_z = σ'(z) ⊙ ĝ_a, then m's local update as usual.
            Unbiased either way; the variance differs (a tangent on a unit that σ silences
            still enters d after the activation, not before).
        mode: ``eager`` (``vmap`` over ``torch.func.jvp``), ``fast`` (the primal and the K
            tangents side by side, :mod:`fwdgrad.core.fast_forward`: the same d, computed
            with one rule per operation) or ``auto`` (fast on the CPU, eager elsewhere).
        regenerate_tangents, factored: must not be True (weight-space execution strategies;
            activity tangents are stored).

    The closure returns per-sample losses, shape ``(B,)``. ``backward`` returns their mean
    (detached) and adds the estimate of the mean loss's gradient to ``.grad``. After it,
    ``last_directional_derivatives`` is d ``(K, B)``, ``last_tangents`` the tangents (one
    ``(K, B, *z_m shape)`` tensor per perturbed output, in call order) and
    ``last_output_gradients`` the estimates ĝ_z (``(B, *z_m shape)`` each).
    """

    per_sample_loss = True

    def __init__(
        self,
        model: torch.nn.Module,
        *args,
        mode: str = "auto",
        regenerate_tangents: bool | None = None,
        factored: bool | None = None,
        perturbed_modules: str | type | Iterable[str | type] | None = None,
        tangent_sharing: str = "per_sample",
        after_activation: bool = False,
        **kwargs,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"activity perturbation needs an nn.Module (it perturbs the outputs of its modules), got "
                f"{type(model).__name__}; use perturbation='weight' for a bare iterable of parameters"
            )
        if tangent_sharing not in TANGENT_SHARING:
            raise ValueError(
                f"unknown tangent_sharing {tangent_sharing!r}; valid choices: {', '.join(TANGENT_SHARING)}"
            )
        if mode not in ACTIVITY_MODES:
            raise ValueError(
                f"activity perturbation runs its forward-mode pass eagerly or fast; got mode={mode!r}; "
                f"valid choices: {', '.join(ACTIVITY_MODES)}"
            )
        if regenerate_tangents:
            raise ValueError(
                "regenerate_tangents=True is a weight-perturbation option; activity tangents (K × B × activation "
                "size) are stored"
            )
        if factored:
            raise ValueError("factored=True is a weight-perturbation option (rank-1 factors of weight matrices)")
        # every other argument (num_tangents, aggregation, sampler, ...) as ForwardGradient takes it
        super().__init__(model, *args, **kwargs)
        self.requested_mode = mode
        # auto: fast on the CPU (measured faster, docs/speed-memory.md), eager elsewhere
        self.mode = ("fast" if self.device.type == "cpu" else "eager") if mode == "auto" else mode
        self.tangent_sharing = tangent_sharing
        self.after_activation = bool(after_activation)
        self._activations: dict[torch.nn.Module, torch.nn.Module] = {}  # module -> σ after it (after_activation)
        self.perturbed_modules = select_modules(model, perturbed_modules)
        self.parameters = [
            p for module in self.perturbed_modules for p in module.parameters(recurse=False) if p.requires_grad
        ]
        self.dim = None  # a = Σ_m a_m, the per-sample tangent dimension, known after the first call
        self._sites: list[torch.Size] | None = None
        self.last_tangents: list[torch.Tensor] | None = None
        self.last_output_gradients: list[torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"ActivityForwardGradient(num_tangents={self.num_tangents}, aggregation={self.aggregation!r}, "
            f"sampler={self.sampler!r}, tangent_sharing={self.tangent_sharing!r}, "
            f"perturbed_modules={list(self.perturbed_modules.values())}, activation_dim={self.dim})"
        )

    def _probe(self, closure: PerSampleClosure) -> list[torch.Size]:
        """One plain forward pass (no transforms, RNG restored) to learn the output shapes."""
        saved_rng = rng_state(self.device)
        outcome = []
        try:
            with torch.no_grad(), OutputHooks(self.perturbed_modules) as hooks:
                if self.after_activation:
                    self._activations = following_activations(
                        self.module, self.perturbed_modules, lambda: outcome.append(closure()))
                else:
                    outcome.append(closure())
                losses = _per_sample_losses(outcome[0])
        finally:
            set_rng_state(self.device, saved_rng)
        batch = losses.shape[0]
        for module, shape in zip(hooks.calls, hooks.shapes):
            if len(shape) == 0 or shape[0] != batch:
                raise ValueError(
                    f"activity perturbation needs the batch as the first dimension of every perturbed output; "
                    f"module {self.perturbed_modules[module]!r} outputs shape {tuple(shape)} while the closure "
                    f"returns {batch} per-sample losses. Leave it out of perturbed_modules"
                )
        never_called = [name for module, name in self.perturbed_modules.items() if module not in hooks.calls]
        if hooks.calls and never_called:
            warnings.warn(
                f"perturbed modules never called by the closure get no gradient: {', '.join(never_called)} (e.g. "
                "nn.MultiheadAttention uses its out_proj's weight without calling out_proj); leave them out of "
                "perturbed_modules or use perturbation='weight' for them",
                stacklevel=3,
            )
        if not hooks.calls:
            raise ValueError(
                "the closure never called a perturbed module "
                f"({', '.join(self.perturbed_modules.values())}); it must compute the losses with the model"
            )
        return list(hooks.shapes)

    def sample_tangents(self) -> list[torch.Tensor]:
        """K tangents on the perturbed outputs: one ``(K, B, *z_m shape)`` tensor per output.

        Drawn jointly over the concatenation of all outputs of one sample (a entries), so
        normalization and the standard basis refer to that whole vector; with
        ``tangent_sharing="shared"`` the batch dimension is an expanded view of one draw.
        (``rank1`` draws like ``normal`` here: the a entries form one vector, no matrices.)
        """
        if self._sites is None:
            raise RuntimeError("the output shapes are unknown before the first backward(closure)")
        batch = self._sites[0][0]
        shapes = [shape[1:] for shape in self._sites]
        dim = sum(math.prod(shape) for shape in shapes)
        batch_shape = (batch,) if self.tangent_sharing == "per_sample" else ()
        flat = sample_flat_tangents(
            self.num_tangents, dim, self.sampler, batch_shape=batch_shape, generator=self.generator,
            device=self.device, dtype=self.dtype, normalize=self.normalize_tangents, **self.sampler_options,
        )
        if self.tangent_sharing == "per_sample":
            flat = flat.transpose(0, 1)  # (B, K, a) -> (K, B, a)
        else:
            flat = flat.unsqueeze(1).expand(self.num_tangents, batch, dim)
        return split_flat(flat, shapes)

    def _site_hooks(self) -> OutputHooks | ActivationSiteHooks:
        """The hooks that place the perturbations: on the modules' outputs, or after their activations."""
        if self.after_activation:
            return ActivationSiteHooks(self.perturbed_modules, self._activations)
        return OutputHooks(self.perturbed_modules)

    def directional_derivatives(self, closure: PerSampleClosure, tangents: Sequence[torch.Tensor]):
        """Per-sample losses L ``(B,)``, d ``(K, B)`` with d[k, b] = ∇_{a_b} L_b · u[k, b] (a the
        perturbed sites), the updated module of each site, its recorded inputs, and per site
        the activation the tangent comes after with its input z, or None.

        The perturbations δ_i (zeros of the sites' shapes) are the primals of one
        ``vmap``-over-K ``jvp`` (in chunks of ``chunk_size`` tangents); the inputs of
        every perturbed call come back as jvp's aux output: a list of ``(args, kwargs)``.
        Raises ``SitesChanged`` if the sites' shapes differ from ``self._sites``.
        """
        primals = tuple(
            torch.zeros(shape, device=self.device, dtype=t.dtype) for shape, t in zip(self._sites, tangents)
        )
        num_tangents = tangents[0].shape[0]
        chunk = self.chunk_size or num_tangents
        starts = range(0, num_tangents, chunk)
        hooks_of_chunks = []

        def make_function(first: bool):
            hooks = self._site_hooks()
            hooks_of_chunks.append(hooks)

            def function(deltas, inputs):
                hooks.deltas = deltas
                with hooks:
                    losses = _per_sample_losses(closure())
                if len(hooks.calls) != len(deltas):
                    raise SitesChanged
                require_tangent(losses, "the perturbed modules' outputs")
                return losses, (hooks.inputs, getattr(hooks, "activation_inputs", []))

            return function

        run = fast_batched_jvp if self.mode == "fast" else eager_batched_jvp
        losses, derivatives, (inputs, activation_inputs) = chunked_batched_jvp(
            run, make_function, primals, ([t[start:start + chunk] for t in tangents] for start in starts),
            len(starts), device=self.device,
        )
        first = hooks_of_chunks[0]
        return (losses, derivatives, first.calls, first.recorded_inputs(inputs),
                site_activations(first, activation_inputs))

    def _aggregate(self, tangents: Sequence[torch.Tensor], derivatives: torch.Tensor, tangent_norm) -> list:
        """ĝ_{z_b} for every sample: tangents ``(K, B, *z_m)``, d ``(K, B)`` -> ``(B, *z_m)`` each.

        The orthogonal projection solves the B per-sample K×K Gram systems
        G_b c_b = d_b, G_b = U_b U_b^T summed over outputs in float64 (Cholesky, pseudo-inverse
        fallback: :func:`fwdgrad.core.aggregation.aggregation_coefficients`), then ĝ_b = U_b^T c_b.
        :func:`fwdgrad.core.aggregation.aggregate` would take its SVD path for these
        (B·K·a <= 2^22 entries), which costs 20× more here (154 ms vs 8 ms for B = 64,
        K = 16, a = 2,058 on one CPU core) for no accuracy a K×K system needs. Every
        other method goes through ``aggregate`` unchanged.
        """
        if self.aggregation != "orthogonal_projection":
            return aggregate(
                tangents, derivatives, self.aggregation, scaling_correction=self.scaling_correction,
                tangent_norm=tangent_norm, top_k_tolerance=self.top_k_tolerance,
            )
        num_tangents, batch = derivatives.shape
        views = [t.reshape(num_tangents, batch, -1).transpose(0, 1) for t in tangents]  # (B, K, a_m)
        # products in the tangents' dtype, summed and solved in float64 (as aggregate's Gram path)
        gram = sum((view @ view.transpose(-1, -2)).double() for view in views)
        coefficients = aggregation_coefficients(self.aggregation, derivatives.t().double(), gram=gram)
        factor = 1.0
        if self.scaling_correction:
            factor = scaling_correction_factor(self.aggregation, num_tangents, self.dim, None)
        return [
            ((coefficients.to(view.dtype).unsqueeze(-2) @ view).squeeze(-2) * factor).reshape(t.shape[1:])
            for view, t in zip(views, tangents)
        ]

    def backward(self, closure: PerSampleClosure) -> torch.Tensor:
        """Estimate the gradient of the mean of the per-sample losses; add it to ``.grad``.

        Args:
            closure: takes no arguments, returns the per-sample losses ``(B,)`` computed
                by the model (evaluated inside forward-mode transforms).

        Returns:
            The mean loss (detached, shape ``()``).

        Raises:
            ValueError: the losses are not floating-point, or have no forward-mode tangent
                (detached from the perturbed modules' outputs).
            RuntimeError: the loss, a directional derivative or an estimate ĝ is not finite
                (``.grad`` is unchanged then).
        """
        _check_sample_independence(self.module)
        if self._sites is None:
            self._sites = self._probe(closure)
        saved_rng = rng_state(self.device)
        tangents = self.sample_tangents()
        try:
            losses, derivatives, calls, inputs, activations = self.directional_derivatives(closure, tangents)
        except SitesChanged:
            # new batch size or input shape: learn the shapes again and redo the step
            set_rng_state(self.device, saved_rng)
            self._sites = self._probe(closure)
            tangents = self.sample_tangents()
            losses, derivatives, calls, inputs, activations = self.directional_derivatives(closure, tangents)
        if losses.shape[0] != self._sites[0][0]:
            raise ValueError(
                f"the closure returned {losses.shape[0]} per-sample losses but the perturbed outputs have batch "
                f"size {self._sites[0][0]}"
            )
        loss = losses.mean()
        check_finite(loss, derivatives)
        derivatives = self.combine_directional_derivatives(derivatives)
        self.dim = sum(math.prod(shape[1:]) for shape in self._sites)
        tangent_norm = None
        if self.scaling_correction and self.aggregation != "orthogonal_projection":
            tangent_norm = expected_tangent_norm(self.sampler, self.dim, self.normalize_tangents)
        output_gradients = self._aggregate(tangents, derivatives.to(self.dtype), tangent_norm)
        # ĝ is not the update itself (that is its local vjp), so check ĝ: B·a entries, not n
        check_finite_updates(output_gradients, self.aggregation, "output-gradient estimate ĝ_z")
        batch = losses.shape[0]
        output_gradients = [
            gradient if activation is None else through_activation(*activation, gradient)
            for gradient, activation in zip(output_gradients, activations)
        ]
        for module, (args, kwargs), output_gradient in zip(calls, inputs, output_gradients):
            # 1/B: the estimate is of the gradient of the mean loss
            gradients = local_parameter_gradients(module, args, kwargs, output_gradient / batch)
            for name, gradient in gradients.items():
                accumulate_grad(getattr(module, name), gradient)
        self.last_directional_derivatives = derivatives
        self.last_tangents = tangents
        self.last_output_gradients = output_gradients
        return loss.detach()
