"""Execution with factored rank-1 tangents: no K × n tangent matrix is ever formed.

``sampler="rank1"`` draws v_k = u_k w_k^T for every parameter matrix (N(0, I) factors
u_k ∈ R^{d_out}, w_k ∈ R^{d_in}) and N(0, I) entries for the other tensors. Kept as
factors, the step differentiates

    t -> f(θ + Σ_k t_k v_k)   at t = 0,  t ∈ R^K,

along the tangents e_1..e_K, so the k-th derivative is d_k = ∇f·v_k. A linear layer
never forms v_k (:meth:`FactoredLinear.linear`):

    linear(x, W + Σ_k t_k u_k w_k^T) = x W^T + Σ_k t_k (x·w_k) u_k^T,

whose tangent along e_k costs O(B (d_in + d_out)) instead of a B × d_in × d_out matmul;
with ``mode="fast"`` the factors go to :mod:`fwdgrad.core.fast_forward` instead (no t, no
``vmap``: :class:`fwdgrad.core.dual.Factored`; a convolution's kernel u w^T gives the K
tangents as one convolution with K output channels);
a factored matrix used otherwise (e.g. a packed attention projection) gets the dense
θ + Σ_k t_k u_k w_k^T on first use. The aggregation needs the Gram matrix only through
<u_i w_i^T, u_j w_j^T> = (u_i·u_j)(w_i·w_j), and the update of a matrix is
Σ_k c_k u_k w_k^T = (c ⊙ U)^T W. The draw is the one of the stored ``rank1`` path (same
seed, same tangents). Eager or fast only: a custom ``autograd.Function.jvp`` is dropped under
``torch.compile`` (pytorch 192985).
"""

from __future__ import annotations

import torch

from fwdgrad.core.aggregation import aggregation_coefficients
from fwdgrad.core.base import ForwardGradient
from fwdgrad.core.execution import ForwardStep
from fwdgrad.core.fast_execution import rank1_tangents
from fwdgrad.core.forward_mode import check_finite_coefficients
from fwdgrad.core.tangents import rank1_factors, split_rank1_factors


class _ConstantWeightLinear(torch.autograd.Function):
    """y = x W^T for a weight without tangent, with the forward-mode rule y_t = x_t W^T.

    torch's own rule for ``linear``/``addmm`` also multiplies by the (zero) tangent of the
    constant weight, one or two wasted matmuls per layer (measured: the jvp of a linear
    layer in x alone cost 3-5× its primal on the CPU).
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


class FactoredLinear:
    """The ``F.linear`` rule of a weight W whose K tangents are u_k w_k^T, scaled by t.

    ``linear(x)`` = x W^T + Σ_k t_k (x·w_k) u_k^T, with W (d_out, d_in), u (K, d_out),
    w (K, d_in), t (K,) (the differentiated input); the bias is added by the caller
    (:class:`fwdgrad.core.parameter_substitution.ParameterSubstitution`).
    """

    __slots__ = ("weight", "u", "w", "t")

    def __init__(self, weight: torch.Tensor, u: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
        self.weight, self.u, self.w, self.t = weight, u, w, t

    def linear(self, input: torch.Tensor) -> torch.Tensor:
        return _ConstantWeightLinear.apply(input, self.weight) + ((input @ self.w.T) * self.t) @ self.u


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


def _sum_of_outer_products(coefficients: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k c_k u_k w_k^T for c (K,), u (K, rows), w (K, cols) -> (rows, cols).

    K = 1 as ``torch.outer`` (a matmul with inner dimension 1 runs far below memory speed).
    """
    if coefficients.numel() == 1:
        return torch.outer(u[0] * coefficients[0], w[0])
    return (coefficients.unsqueeze(1) * u).T @ w


def factored_step(fg: ForwardGradient, closure, inputs: tuple,
                  tangent_range: tuple[int, int] | None = None) -> ForwardStep:
    """The factored step of the module docstring: d from one jvp in (t, dense parameters).

    ``fg`` is the weight-space estimator (:class:`~fwdgrad.core.weight.WeightForwardGradient`)
    taking the step: its parameters, shapes, generator and aggregation.

    ``tangent_range=(start, stop)``: the jvp differentiates along tangents start..stop-1 only
    (t ∈ R^{stop - start}, d of that shape; tangent parallelism, :mod:`fwdgrad.distributed.parallel`);
    the factors of all K are drawn, and ``updates`` takes the d of all K.
    """
    num = fg.num_tangents
    parameters = fg.parameters
    factors = rank1_factors((num,), fg.shapes, fg.generator, fg.device, fg.dtype)
    all_parts = split_rank1_factors(factors, fg.shapes)
    first, last = (0, num) if tangent_range is None else tangent_range
    parts = [(u[first:last], None if w is None else w[first:last]) for u, w in all_parts]
    evaluated = last - first
    if fg.mode == "fast":  # the factors go to the fast mode's rules as they are (conv kernels too)
        loss, derivatives, used = fg._directional_derivatives(closure, [rank1_tangents(parameters, parts)], 1, inputs)
        return ForwardStep(loss, derivatives, used, _updates(fg, all_parts))
    is_factored = [w is not None and p.dim() == 2 for p, (u, w) in zip(parameters, parts)]
    # the other parameters are differentiated directly, along their (dense) rank1 tangents
    dense = [i for i, flag in enumerate(is_factored) if not flag]
    dense_tangents = []
    for i in dense:
        u, w = parts[i]
        tangent = u if w is None else u.unsqueeze(-1) * w.unsqueeze(-2)
        dense_tangents.append(tangent.reshape(evaluated, *fg.shapes[i]))

    def substitutes(differentiated):
        t, *dense_substitutes = differentiated
        linear_rules = {
            id(parameters[i]): FactoredLinear(parameters[i].detach(), *parts[i], t)
            for i, flag in enumerate(is_factored) if flag
        }
        given = {id(parameters[i]): tensor for i, tensor in zip(dense, dense_substitutes)}
        return _Rank1Substitutes(parameters, parts, t, given), linear_rules

    primals = (torch.zeros(evaluated, device=fg.device, dtype=fg.dtype), *[parameters[i].detach() for i in dense])
    directions = [torch.eye(evaluated, device=fg.device, dtype=fg.dtype), *dense_tangents]
    loss, derivatives, used = fg._directional_derivatives(
        closure, [directions], 1, inputs, primals=primals, substitutes=substitutes
    )

    return ForwardStep(loss, derivatives, used, _updates(fg, all_parts))


def _updates(fg: ForwardGradient, all_parts):
    """``updates(d)`` of the factored step: c from d (and the factors' Gram matrix), then
    g_p = Σ_k c_k u_k w_k^T per matrix (c @ u for the others)."""
    parameters = fg.parameters

    def updates(directional_derivatives: torch.Tensor) -> list[torch.Tensor]:
        gram = squared_norms = None
        if fg.aggregation in ("orthogonal_projection", "max_normalized", "mean_of_top_k"):
            gram = sum(
                (u.double() @ u.double().T) * (w.double() @ w.double().T) if w is not None
                else u.double() @ u.double().T
                for u, w in all_parts
            )
            squared_norms = gram.diagonal()
        coefficients = aggregation_coefficients(
            fg.aggregation, directional_derivatives.double(), squared_norms=squared_norms, gram=gram, dim=fg.dim,
            top_k_tolerance=fg.top_k_tolerance,
        ).to(fg.dtype) * fg._scaling_factor()
        check_finite_coefficients(coefficients, fg.aggregation, directional_derivatives)
        return [
            (_sum_of_outer_products(coefficients, u, w) if w is not None else coefficients @ u).reshape(p.shape)
            for p, (u, w) in zip(parameters, all_parts)
        ]

    return updates
