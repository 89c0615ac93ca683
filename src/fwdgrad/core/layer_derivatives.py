"""Local derivatives: (∂z/∂θ_m)^T ĝ of ONE module with respect to its own parameters.

Activity perturbation (:mod:`fwdgrad.core.activity`) estimates ĝ ≈ ∇_z L for the outputs z of
the perturbed modules, then updates each module's direct parameters θ_m by the local
vector-Jacobian product

    θ_m.grad += (∂z/∂θ_m)^T ĝ      (summed over the batch),

a derivative of one layer at its recorded input h, never through other layers. Closed
forms for the common layers (:func:`local_parameter_gradients`), a one-module
``torch.func.vjp`` for the rest (:func:`isolated_module_vjp`). A future perturbation space
of blocks with local losses updates its parameters the same way.
"""

from __future__ import annotations

import torch
from torch.func import functional_call


def _sum_except(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.sum([d for d in range(tensor.dim()) if d != dim])


def _normalized_input(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """x̂ of a norm layer (the input before its affine map γ, β), or None for other modules."""
    if isinstance(module, torch.nn.LayerNorm):
        dims = tuple(range(h.dim() - len(module.normalized_shape), h.dim()))
        mean = h.mean(dims, keepdim=True)
        var = h.var(dims, correction=0, keepdim=True)
        return (h - mean) / torch.sqrt(var + module.eps)
    if isinstance(module, torch.nn.GroupNorm):
        grouped = h.reshape(h.shape[0], module.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, correction=0, keepdim=True)
        return ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(h.shape)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        shape = [1, -1] + [1] * (h.dim() - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (h - mean) / torch.sqrt(var + module.eps)
    return None


_CONV_WEIGHT = {
    torch.nn.Conv1d: torch.nn.grad.conv1d_weight,
    torch.nn.Conv2d: torch.nn.grad.conv2d_weight,
    torch.nn.Conv3d: torch.nn.grad.conv3d_weight,
}


def _closed_form(module, args, kwargs, output_gradient) -> dict[str, torch.Tensor] | None:
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    (h,) = args
    g = output_gradient
    kind = type(module)
    if kind is torch.nn.Linear:
        g2 = g.reshape(-1, module.out_features)
        result = {"weight": g2.transpose(0, 1) @ h.reshape(-1, module.in_features).to(g2.dtype)}
        if module.bias is not None:
            result["bias"] = g2.sum(0)
        return result
    if kind in _CONV_WEIGHT and module.padding_mode == "zeros" and not isinstance(module.padding, str) \
            and h.dim() == module.weight.dim():
        weight = _CONV_WEIGHT[kind](
            h.to(g.dtype), module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups
        )
        result = {"weight": weight}
        if module.bias is not None:
            result["bias"] = _sum_except(g, 1)
        return result
    if kind in (torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d) \
            and h.dim() >= 2:
        normalized = _normalized_input(module, h.to(g.dtype))
        if normalized is None:
            return None
        result = {}
        if module.weight is not None:
            result["weight"] = _sum_except(g * normalized, 1)
        if module.bias is not None:
            result["bias"] = _sum_except(g, 1)
        return result
    if kind is torch.nn.LayerNorm:
        normalized = _normalized_input(module, h.to(g.dtype))
        lead = g.dim() - len(module.normalized_shape)
        result = {}
        if module.weight is not None:
            result["weight"] = (g * normalized).sum(tuple(range(lead)))
        if getattr(module, "bias", None) is not None:
            result["bias"] = g.sum(tuple(range(lead)))
        return result
    return None


def isolated_module_vjp(
    module: torch.nn.Module, args: tuple, kwargs: dict, output_gradient: torch.Tensor
) -> dict[str, torch.Tensor]:
    """(∂z/∂θ_m)^T ĝ by ``torch.func.vjp`` of ONE module run alone on its recorded input.

    z = module(*args, **kwargs) (the first element if the module returns a tuple); θ_m are
    the module's *direct* trainable parameters (``recurse=False``). The module is re-run in
    isolation on the recorded input ``args`` (plain tensors, no tangents) and
    differentiated in reverse mode with respect to θ_m only: a one-layer local derivative,
    not backpropagation through the network (nothing before or after the module is
    involved). Used by activity perturbation for modules without a closed form below.

    Returns ``{name: gradient}`` for the direct parameters, each of the parameter's shape.
    """
    names = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    primals = {name: getattr(module, name).detach() for name in names}

    def output(parameters):
        result = functional_call(module, parameters, args, kwargs, strict=False)
        return result[0] if isinstance(result, (tuple, list)) else result

    _, pullback = torch.func.vjp(output, primals)
    (gradients,) = pullback(output_gradient.to(next(iter(primals.values())).dtype))
    return gradients


def local_parameter_gradients(
    module: torch.nn.Module, args: tuple, kwargs: dict, output_gradient: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Local vector-Jacobian product of one module w.r.t. its own direct parameters.

    For z = m(h; θ_m) with z of shape ``(B, *z_shape)`` and ĝ (``output_gradient``) of the
    same shape, returns (∂z/∂θ_m)^T ĝ summed over the batch, per direct parameter:

    - ``nn.Linear`` (z = h W^T + c, h ``(B, ..., in)``): W: ĝ^T h ``(out, in)``; c: Σ ĝ.
    - ``nn.Conv1d/2d/3d`` (zero padding): W: ``torch.nn.grad.convNd_weight(h, W.shape, ĝ,
      ...)``, the correlation of h with ĝ; c: Σ ĝ over batch and space.
    - ``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.BatchNorm*d`` with running statistics in
      eval mode (z = x̂ γ + β, x̂ the normalized input): γ: Σ ĝ x̂; β: Σ ĝ.
    - anything else: :func:`isolated_module_vjp`.

    Args:
        module: the module.
        args, kwargs: its recorded input in the forward pass (plain tensors).
        output_gradient: ĝ, shape of the module's output ``(B, *z_shape)``.

    Returns:
        ``{parameter name: gradient}`` (only parameters with ``requires_grad``).
    """
    gradients = _closed_form(module, args, kwargs, output_gradient)
    if gradients is None:
        return isolated_module_vjp(module, args, kwargs, output_gradient)
    return {name: g for name, g in gradients.items() if getattr(module, name).requires_grad}
