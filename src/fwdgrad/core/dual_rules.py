"""Fast-mode rules of shape operations, elementwise maps, reductions, matmul and losses.

Every rule computes the primal with the operation itself and the K tangents T ``(K, *shape)``
of its output from those of its inputs (:mod:`fwdgrad.core.dual`):

- shapes (view, reshape, flatten, permute, transpose, expand, indexing, cat, stack, split):
  the same operation on T, with K as one more leading dimension;
- y = σ(x) elementwise: T_y = σ'(x) ⊙ T_x (ReLU: the mask x > 0; tanh: 1 - y²; sigmoid:
  y (1 - y); others: σ'(x) by forward AD of σ along ones);
- a ± b, a b, a / b (broadcasting): T = T_a ± T_b, T_a b + a T_b, (T_a - y T_b) / b;
- sum, mean: of T over the same dimensions; matmul: T_a b + a T_b;
- softmax y: T_y = y ⊙ (T - Σ y T); log_softmax: T - Σ softmax ⊙ T;
- cross_entropy / nll_loss with class targets: the loss is linear in the log-probabilities,
  so T_L = -Σ_n w_{y_n} T_logp[n, y_n] / (Σ_n w_{y_n} for ``mean``); mse_loss: 2 (x - y) T.

Anything else (an unusual signature too) goes to :func:`fwdgrad.core.fast_forward.fallback`,
PyTorch's forward-mode AD for that operation.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from fwdgrad.core.dual import align, fallback, full, layout_like, method, rule, shift, shift_dims


def _tangent(mode, value):
    return mode.tangent(value) if isinstance(value, torch.Tensor) else None


def _fallback(mode, func, args, kwargs):
    return fallback(mode, func, args, kwargs)


def _as(tangent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tangent if tangent.dtype == like.dtype else tangent.to(like.dtype)


# ---- shapes ----------------------------------------------------------------------------------

@rule(method("view"), method("reshape"), torch.reshape, method("flatten"), torch.flatten, method("unflatten"),
      torch.unflatten, method("squeeze"), torch.squeeze, method("unsqueeze"), torch.unsqueeze, method("view_as"),
      method("reshape_as"), method("contiguous"), method("clone"), torch.clone, method("ravel"), torch.ravel)
def reshaped(mode, func, x, *args, **kwargs):
    """Element order kept: T reshaped to ``(K, *y.shape)``."""
    output = func(x, *args, **kwargs)
    tangent = mode.tangent(x)
    return mode.register(output, None if tangent is None else tangent.reshape(tangent.shape[0], *output.shape))


def _transposed(tangent, func, ndim, args, kwargs):
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = func.__self__.__name__
    if name in ("transpose", "swapaxes", "swapdims"):
        first, second = (*args, *kwargs.values())[:2]
        return tangent.transpose(shift(first, ndim), shift(second, ndim))
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args or kwargs["dims"]
        return tangent.permute(0, *[d % ndim + 1 for d in dims])
    if name == "t":
        return tangent if ndim < 2 else tangent.transpose(1, 2)
    if name == "T":
        return tangent.permute(0, *range(ndim, 0, -1))
    return tangent.transpose(-2, -1)  # mT


@rule(method("transpose"), torch.transpose, method("swapaxes"), method("swapdims"), method("permute"), torch.permute,
      method("t"), torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__)
def transposed(mode, func, x, *args, **kwargs):
    output = func(x, *args, **kwargs)
    return mode.register(output, _transposed(mode.tangent(x), func, x.dim(), args, kwargs))


@rule(method("expand"), method("expand_as"), torch.broadcast_to, method("broadcast_to"))
def expanded(mode, func, x, *args, **kwargs):
    output = func(x, *args, **kwargs)
    return mode.register(output, full(mode.tangent(x), output.shape))


@rule(method("__getitem__"))
def getitem(mode, func, x, index):
    index = index if isinstance(index, tuple) else (index,)
    advanced = sum(isinstance(i, (torch.Tensor, list)) for i in index)
    if advanced > 1 or any(isinstance(i, torch.Tensor) and mode.tangent(i) is not None for i in index):
        return _fallback(mode, func, (x, index), {})
    output = func(x, index)
    return mode.register(output, mode.tangent(x)[(slice(None), *index)])


@rule(method("__setitem__"))
def setitem(mode, func, x, index, value):
    index = index if isinstance(index, tuple) else (index,)
    if sum(isinstance(i, (torch.Tensor, list)) for i in index) > 1:
        raise NotImplementedError("the fast forward mode assigns with one advanced index at most; use mode='eager'")
    tangent, value_tangent = mode.tangent(x), _tangent(mode, value)
    func(x, index, value)
    new = torch.zeros((mode.num_tangents, *x.shape), dtype=x.dtype, device=x.device) if tangent is None \
        else tangent.clone()
    selected = new[(slice(None), *index)]
    if value_tangent is None:
        selected.zero_()
    else:
        selected.copy_(full(_as(value_tangent, x), selected.shape[1:]))
    mode.register(x, new)


@rule(method("select"), torch.select, method("narrow"), torch.narrow)
def selected(mode, func, x, dim, *args):
    output = func(x, dim, *args)
    return mode.register(output, func(mode.tangent(x), shift(dim, x.dim()), *args))


@rule(method("split"), torch.split, method("chunk"), torch.chunk, method("unbind"), torch.unbind,
      method("split_with_sizes"), method("tensor_split"), torch.tensor_split)
def split(mode, func, x, *args, **kwargs):
    name = getattr(func, "__name__", "")
    positional = list(args)
    if name == "unbind":
        dim = positional[0] if positional else kwargs.pop("dim", 0)
        outputs, tangents = func(x, dim), func(mode.tangent(x), shift(dim, x.dim()))
    else:
        dim = positional.pop(1) if len(positional) > 1 else kwargs.pop("dim", 0)
        outputs = func(x, *positional, dim=dim, **kwargs)
        tangents = func(mode.tangent(x), *positional, dim=shift(dim, x.dim()), **kwargs)
    for output, tangent in zip(outputs, tangents):
        mode.register(output, tangent)
    return outputs


@rule(torch.cat, torch.concat, torch.stack)
def concatenated(mode, func, tensors, dim=0, **kwargs):
    output = func(tensors, dim, **kwargs)
    stacking = getattr(func, "__name__", "") == "stack"
    tangents = []
    for tensor in tensors:
        tangent = mode.tangent(tensor)
        tangents.append(torch.zeros((mode.num_tangents, *tensor.shape), dtype=output.dtype, device=output.device)
                        if tangent is None else _as(tangent, output))
    return mode.register(output, func(tangents, shift(dim, tensors[0].dim() + stacking)))


@rule(method("to"), method("float"), method("double"), method("half"), method("bfloat16"), method("type_as"),
      method("cpu"), method("cuda"))
def converted(mode, func, x, *args, **kwargs):
    output = func(x, *args, **kwargs)
    if output is x:
        return output
    tangent = mode.tangent(x)
    if not output.is_floating_point():
        return output
    return mode.register(output, tangent.to(device=output.device, dtype=output.dtype))


# ---- elementwise maps --------------------------------------------------------------------------

@rule(torch.relu, method("relu"), F.relu, torch.relu_, method("relu_"))
def relu(mode, func, x, inplace=False):
    tangent = mode.tangent(x)
    positive = x > 0
    # an in-place ReLU (torchvision's ResNet) updates x's own tangents in place (no K-sized allocation)
    if inplace or func is not F.relu and func.__name__ == "relu_":
        positive = layout_like(positive, tangent)
        tangent = tangent.mul_(positive) if mode.owns(x) else tangent * positive
        output = func(x, inplace=True) if func is F.relu else func(x)
        return mode.register(output, tangent, owned=True)
    return mode.register_scaled(func(x), x, positive)


@rule(torch.tanh, method("tanh"), F.tanh, torch.sigmoid, method("sigmoid"), F.sigmoid, torch.exp, method("exp"))
def closed_form_unary(mode, func, x):
    output = func(x)
    name = func.__name__
    if name == "tanh":
        slope = 1 - output * output
    elif name == "sigmoid":
        slope = output * (1 - output)
    else:
        slope = output
    return mode.register_scaled(output, x, slope)


@rule(F.gelu)
def gelu(mode, func, x, approximate="none"):
    if approximate != "none":
        return elementwise(mode, func, x, approximate=approximate)
    output = func(x)
    # gelu(x) = x Φ(x): gelu'(x) = Φ(x) + x φ(x)
    slope = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2)))) + x * torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return mode.register_scaled(output, x, slope)


@rule(F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus, F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid,
      F.mish, F.logsigmoid, F.softsign, torch.log, method("log"), torch.sqrt, method("sqrt"), torch.rsqrt,
      method("rsqrt"), torch.sin, method("sin"), torch.cos, method("cos"), torch.abs, method("abs"),
      torch.square, method("square"), torch.reciprocal, method("reciprocal"), method("pow"), torch.pow,
      method("__pow__"), torch.clamp, method("clamp"), torch.clip, method("clip"))
def elementwise(mode, func, x, *args, **kwargs):
    """σ'(x) by forward AD of σ along ones (σ elementwise, so that is its Jacobian's diagonal);
    K = 1: forward AD along the tangent itself."""
    if not isinstance(x, torch.Tensor) or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
        # e.g. pow(x, tensor), pow(2, x): not a unary map of x
        return _fallback(mode, func, (x, *args), kwargs)
    tangent = mode.tangent(x)
    direction = tangent[0] if tangent.shape[0] == 1 else torch.ones_like(x)
    options = {**kwargs, "inplace": False} if kwargs.get("inplace") else kwargs
    with forward_ad.dual_level():
        slope = forward_ad.unpack_dual(func(forward_ad.make_dual(x, _as(direction, x)), *args, **options)).tangent
    output = func(x, *args, **kwargs)
    if tangent.shape[0] == 1:
        return mode.register(output, slope.unsqueeze(0), owned=True)
    return mode.register_scaled(output, x, slope)


@rule(torch.neg, method("neg"), method("__neg__"), torch.negative)
def negated(mode, func, x):
    return mode.register(func(x), -mode.tangent(x), owned=True)


# ---- arithmetic ----------------------------------------------------------------------------------

_SWAPPED = {"__rsub__", "__rdiv__", "__rtruediv__"}
_IN_PLACE_ADD = {"add_", "sub_", "__iadd__", "__isub__"}


def _operation(name: str) -> str:
    return name.strip("_").removeprefix("i").removeprefix("r").replace("truediv", "div").rstrip("_")


@rule(torch.add, method("add"), method("__add__"), method("__radd__"), method("add_"), method("__iadd__"),
      torch.sub, method("sub"), method("__sub__"), method("__rsub__"), method("sub_"), method("__isub__"),
      torch.mul, method("mul"), method("__mul__"), method("__rmul__"), method("mul_"), method("__imul__"),
      torch.div, method("div"), method("__truediv__"), method("__rtruediv__"), method("__rdiv__"), method("div_"),
      method("__itruediv__"))
def arithmetic(mode, func, a, b, *args, **kwargs):
    name = getattr(func, "__name__", "")
    operation = _operation(name)
    if args or kwargs.get("rounding_mode") is not None or (set(kwargs) - {"alpha"}) or \
            not all(isinstance(v, (torch.Tensor, int, float, bool)) for v in (a, b)):
        return _fallback(mode, func, (a, b, *args), kwargs)
    left, right = (b, a) if name in _SWAPPED else (a, b)
    ndim = max(v.dim() if isinstance(v, torch.Tensor) else 0 for v in (left, right))
    left_tangent, right_tangent = (None if t is None else align(t, ndim) for t in (_tangent(mode, left),
                                                                                  _tangent(mode, right)))
    # computed before the operation, which may update a in place (a *= b needs the old a)
    if name in _IN_PLACE_ADD and operation in ("add", "sub") and left_tangent is not None and mode.owns(a) \
            and right_tangent is not None:  # a += b (a residual connection): a's own tangents updated in place
        alpha = kwargs.get("alpha", 1) * (-1 if operation == "sub" else 1)
        mode.tangent(a).add_(right_tangent, alpha=alpha)
        return mode.register(func(a, b, **kwargs), mode.tangent(a), owned=True)
    terms = []
    if operation in ("add", "sub"):
        alpha = kwargs.get("alpha", 1) * (-1 if operation == "sub" else 1)
        scaled = right_tangent if right_tangent is None or alpha == 1 else right_tangent * alpha
        terms = [left_tangent, scaled]
    elif operation == "mul":
        terms = [None if left_tangent is None else left_tangent * right,
                 None if right_tangent is None else right_tangent * left]
    else:  # div: (T_a - (a / b) T_b) / b
        terms = [None if left_tangent is None else left_tangent / right,
                 None if right_tangent is None else right_tangent * (-(left / right) / right)]
    first, second = terms
    tangent = first if second is None else second if first is None else first + second
    output = func(a, b, **kwargs)
    fresh = tangent is not left_tangent and tangent is not right_tangent
    return mode.register(output, full(_as(tangent, output), output.shape), owned=fresh)


@rule(torch.where)
def where(mode, func, condition, a, b):
    output = func(condition, a, b)
    tangents = [_tangent(mode, v) for v in (a, b)]
    zero = torch.zeros((), dtype=output.dtype, device=output.device)
    first, second = (zero if t is None else _as(t, output) for t in tangents)
    return mode.register(output, full(torch.where(condition, first, second), output.shape))


@rule(method("masked_fill"), torch.masked_fill)
def masked_fill(mode, func, x, mask, value):
    if isinstance(value, torch.Tensor) and mode.tangent(value) is not None:
        return _fallback(mode, func, (x, mask, value), {})
    return mode.register(func(x, mask, value), mode.tangent(x).masked_fill(mask, 0), owned=True)


# ---- reductions and matmul -----------------------------------------------------------------------

@rule(torch.sum, method("sum"), torch.mean, method("mean"))
def reduced(mode, func, x, dim=None, keepdim=False, *, dtype=None):
    output = func(x, dim=dim, keepdim=keepdim, dtype=dtype) if dim is not None else func(x, dtype=dtype)
    tangent = mode.tangent(x)
    reduce = getattr(torch, func.__name__)
    if dim is None:
        result = reduce(tangent.reshape(tangent.shape[0], -1), dim=1, dtype=dtype)
        return mode.register(output, result.reshape(tangent.shape[0], *output.shape))
    return mode.register(output, reduce(tangent, dim=shift_dims(dim, x.dim()), keepdim=keepdim, dtype=dtype))


@rule(torch.matmul, method("matmul"), method("__matmul__"), method("__rmatmul__"), torch.mm, method("mm"),
      torch.bmm, method("bmm"))
def matmul(mode, func, a, b):
    if getattr(func, "__name__", "") == "__rmatmul__":
        a, b = b, a
    if a.dim() < 2 or b.dim() < 2:
        return _fallback(mode, torch.matmul, (a, b), {})
    output = torch.matmul(a, b)
    left, right = mode.tangent(a), mode.tangent(b)
    tangent = None if left is None else torch.matmul(align(_as(left, output), output.dim()), b)
    if right is not None:
        term = torch.matmul(a, align(_as(right, output), output.dim()))
        tangent = term if tangent is None else tangent + term
    return mode.register(output, tangent, owned=True)


@rule(F.softmax, torch.softmax, method("softmax"), F.log_softmax, torch.log_softmax, method("log_softmax"))
def softmax(mode, func, x, dim=None, _stacklevel=3, dtype=None):
    if dim is None:
        return _fallback(mode, func, (x,), {"dim": dim, "dtype": dtype})
    output = func(x, dim, dtype=dtype) if dtype is not None else func(x, dim)
    tangent, axis = _as(mode.tangent(x), output), shift(dim, x.dim())
    if func.__name__ == "softmax":
        return mode.register(output, output * (tangent - (output * tangent).sum(axis, keepdim=True)), owned=True)
    return mode.register(output, tangent - (output.exp() * tangent).sum(axis, keepdim=True), owned=True)


# ---- losses ----------------------------------------------------------------------------------------

def _class_loss_tangent(log_probability_tangent, target, weight, ignore_index, reduction):
    """Tangents of nll_loss(logp, target): logp's tangents ``(K, N, C, ...)`` (or ``(K, C)``)
    picked at the targets, weighted, reduced as the loss is."""
    num_tangents = log_probability_tangent.shape[0]
    class_dim = 2 if target.dim() > 0 else 1
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    index = safe.unsqueeze(class_dim - 1).unsqueeze(0)
    index = index.expand(num_tangents, *index.shape[1:])
    picked = -log_probability_tangent.gather(class_dim, index).squeeze(class_dim)
    scale = valid.to(picked.dtype) if weight is None else weight[safe] * valid
    per_sample = picked * scale
    if reduction == "none":
        return per_sample
    total = per_sample.reshape(num_tangents, -1).sum(1)
    return total if reduction == "sum" else total / scale.sum()


@rule(F.cross_entropy, F.nll_loss)
def class_loss(mode, func, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
               reduction="mean", label_smoothing=0.0):
    simple = (size_average is None and reduce is None and label_smoothing == 0.0 and not target.is_floating_point()
              and mode.tangent(target) is None and (weight is None or mode.tangent(weight) is None)
              and input.dim() >= 1)
    options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    if func is F.cross_entropy:
        options["label_smoothing"] = label_smoothing
    if not simple:
        return _fallback(mode, func, (input, target), {**options, "size_average": size_average, "reduce": reduce})
    output = func(input, target, **options)
    tangent = _as(mode.tangent(input), input)
    if func is F.cross_entropy:  # log_softmax's tangent as torch's logsumexp_jvp computes it (the same rounding)
        class_dim = 1 if input.dim() >= 2 else 0
        exponentials = (input - input.amax(class_dim, keepdim=True)).exp()
        total = exponentials.sum(class_dim, keepdim=True)
        tangent = tangent - (exponentials * tangent).sum(class_dim + 1, keepdim=True) / total
    if tangent.shape[0] == 1:  # nll_loss is linear: its own kernel on the tangent, as the eager path runs it
        loss_tangent = F.nll_loss(tangent[0], target, weight, ignore_index=ignore_index, reduction=reduction)
        return mode.register(output, loss_tangent.unsqueeze(0), owned=True)
    return mode.register(output, _class_loss_tangent(tangent, target, weight, ignore_index, reduction), owned=True)


@rule(F.mse_loss)
def mse_loss(mode, func, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    if size_average is not None or reduce is not None or weight is not None or input.shape != target.shape:
        return _fallback(mode, func, (input, target), dict(size_average=size_average, reduce=reduce,
                                                             reduction=reduction, weight=weight))
    output = func(input, target, reduction=reduction)
    difference = _tangent(mode, input)
    target_tangent = _tangent(mode, target)
    if difference is None:
        difference = -target_tangent
    elif target_tangent is not None:
        difference = difference - target_tangent
    per_element = 2 * (input - target) * difference
    if reduction == "none":
        return mode.register(output, per_element, owned=True)
    total = per_element.reshape(per_element.shape[0], -1).sum(1)
    return mode.register(output, total if reduction == "sum" else total / input.numel(), owned=True)
