"""Fast-mode rules of the layers: linear, convolution, norms, pooling, dropout, attention.

With T_x ``(K, B, ...)`` the K tangents of a layer's input, T_W those of its weight (dense
``(K, *W.shape)`` or rank-1 factors u_k w_k^T, :class:`fwdgrad.core.dual.Factored`):

- linear y = x W^T + c: T_y = T_x W^T (one matmul over the K·B stacked rows) + x T_W^T
  (rank-1: (x·w_k) u_k^T, O(B (d_in + d_out)); dense: one batched matmul) + T_c;
- convolution y = conv(x, W) + c: T_y = conv(T_x, W) (the K·B inputs stacked in one call)
  + conv(x, T_W) (the K weight tangents as one convolution with K·C_out output channels;
  rank-1: K output channels conv(x, w_k), then ⊗ u_k) + T_c;
- batch norm in training mode (weight space), x̂ = (x - μ) / σ over the batch:
  T_x̂ = (T_c - x̂ mean(x̂ T_c)) / σ with T_c = T - mean(T), the derivative through the batch
  statistics as forward AD computes it; running statistics recorded, updated once per step
  outside the pass (as :class:`fwdgrad.core.parameter_substitution.ParameterSubstitution`
  does). In eval mode an affine map. Layer norm: the same over the normalized dimensions;
  y = x̂ γ + β adds x̂ T_γ + T_β;
- max pooling: T gathered at the primal's argmax; average pooling: the same pooling of T;
- dropout: one mask for the primal and all K tangents;
- attention softmax(q kᵀ s) v: T_A = A ⊙ (T_S - Σ A T_S), T_out = T_A v + A T_v, with
  T_S = (T_q kᵀ + q T_kᵀ) s; ``nn.MultiheadAttention``'s forward runs as its projections,
  reshapes and this attention (:func:`multi_head_attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fwdgrad.core.dual import Factored, align, fallback, full, is_channels_last, layout_like, on_batch, rule


def _empty(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialized ``(K, B, C, H, W)`` tangent tensor; ``channels_last``: laid out so that its
    ``(K·B, C, H, W)`` view is channels-last, the layout the CPU's convolution kernels compute in
    (measured 10-30% faster than NCHW for the K·B stacked tangent inputs). Every rule keeps a
    tangent's layout (elementwise ops follow their first operand), so tangents that start
    channels-last at the first convolution stay so through the network."""
    if not channels_last or len(shape) != 5:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    k, b, c, h, w = shape
    return torch.empty((k * b, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2).unflatten(0, (k, b))


def _as(tangent, like):
    return tangent if tangent is None or tangent.dtype == like.dtype else tangent.to(like.dtype)


def _add(total, term):
    return term if total is None else total + term


# ---- linear and convolution ------------------------------------------------------------------

@rule(F.linear)
def linear(mode, func, input, weight, bias=None):
    """The terms in the order of torch's forward formulas (addmm: T_c + T_x Wᵀ + x T_Wᵀ; a factored
    weight, :class:`fwdgrad.core.factored.FactoredLinear`: x Wᵀ + (x·w) uᵀ, then + c), so that with
    one tangent the sums round as the eager path's do: the same update to the last bit, hence
    the same training run (checked: 20 SGD steps of the Baydin MLP, normal and rank-1 tangents)."""
    num_tangents = mode.num_tangents
    input_tangent, weight_tangent = mode.tangent(input), mode.weight_tangent(weight)
    bias_tangent = None if bias is None else mode.tangent(bias)
    if isinstance(weight_tangent, Factored):  # the primal as the eager factored path forms it: x W^T, then + c
        output = F.linear(input, weight)
        output = output if bias is None else output + bias
    else:
        output = func(input, weight, bias)
    rows = input.reshape(-1, input.shape[-1])  # (N, d_in)
    width = (rows.shape[0], output.shape[-1])
    tangent = None  # (K, N, d_out)
    if input_tangent is not None:
        tangent = F.linear(_as(input_tangent, output), weight).reshape(num_tangents, *width)
    if bias_tangent is not None:
        bias_tangent = _as(bias_tangent, output).unsqueeze(1)
    if isinstance(weight_tangent, Factored):
        projected = (rows @ weight_tangent.w.to(rows.dtype).T).T.unsqueeze(-1)  # (K, N, 1): x·w_k
        term = projected * weight_tangent.u.to(output.dtype).unsqueeze(1)  # (x·w_k) u_k^T
        tangent = term if tangent is None else tangent.add_(term)
    elif weight_tangent is not None:
        dense = _as(weight_tangent, output)
        term = rows.mm(dense[0].T).unsqueeze(0) if num_tangents == 1 else torch.matmul(rows, dense.transpose(-1, -2))
        if tangent is None:  # T_c + x T_W^T, as (T_c + 0) + x T_W^T rounds
            tangent = term
        else:
            if bias_tangent is not None:
                tangent.add_(bias_tangent)
            tangent.add_(term)
            bias_tangent = None
    if bias_tangent is not None:
        tangent = full(bias_tangent, width) if tangent is None else tangent.add_(bias_tangent)
    return mode.register(output, None if tangent is None else tangent.reshape(num_tangents, *output.shape), owned=True)


def _weight_term(func, input, weight, weight_tangent, stride, padding, dilation, groups, dtype, tangent):
    """``tangent`` + conv(x, T_W) for all K, ``(K, B, C_out, *S)`` (``(K, C_out, *S)`` for an
    unbatched x); ``tangent`` is None or a fresh tensor of that shape, updated in place."""
    num_tangents = weight_tangent.num_tangents if isinstance(weight_tangent, Factored) else weight_tangent.shape[0]
    out_channels, batched = weight.shape[0], input.dim() == weight.dim()
    if isinstance(weight_tangent, Factored) and groups == 1:
        # rank-1: conv(x, u w^T) = u ⊗ conv(x, w): K output channels, one per tangent
        kernels = weight_tangent.w.to(dtype).reshape(num_tangents, *weight.shape[1:])
        responses = func(input, kernels, None, stride, padding, dilation, 1)  # (B, K, *S)
        responses = (responses.transpose(0, 1) if batched else responses).unsqueeze(1 + int(batched))
        spatial = responses.dim() - 2 - int(batched)
        u = weight_tangent.u.to(dtype).reshape(num_tangents, *([1] * int(batched)), out_channels, *([1] * spatial))
        if tangent is None:
            shape = (num_tangents, *responses.shape[1:1 + int(batched)], out_channels, *responses.shape[-spatial:])
            return torch.mul(responses, u, out=_empty(shape, responses, channels_last=True))
        return tangent.addcmul_(responses, u)
    dense = weight_tangent.dense() if isinstance(weight_tangent, Factored) else weight_tangent
    # K·C_out kernels, ordered (group, tangent, channel of the group) so that groups keep their inputs
    per_group = out_channels // groups
    kernels = _as(dense, input).reshape(num_tangents, groups, per_group, *weight.shape[1:]).transpose(0, 1)
    responses = func(input, kernels.reshape(-1, *weight.shape[1:]), None, stride, padding, dilation, groups)
    spatial = responses.shape[1 + int(batched):]
    lead = responses.shape[:1] if batched else ()
    responses = responses.reshape(*lead, groups, num_tangents, per_group, *spatial)
    order = (2, 0, 1, 3) if batched else (1, 0, 2)
    responses = responses.permute(*order, *range(len(order), responses.dim()))
    responses = responses.reshape(num_tangents, *lead, out_channels, *spatial)
    if tangent is None:
        return _empty(responses.shape, responses, channels_last=True).copy_(responses)
    return tangent.add_(responses)


@rule(F.conv1d, F.conv2d, F.conv3d)
def convolution(mode, func, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    output = func(input, weight, bias, stride, padding, dilation, groups)
    input_tangent, weight_tangent = mode.tangent(input), mode.weight_tangent(weight)
    bias_tangent = None if bias is None else mode.tangent(bias)
    tangent = None
    if input_tangent is not None:
        tangent = on_batch(lambda t: func(t, weight, None, stride, padding, dilation, groups),
                           _as(input_tangent, output), weight.dim())
    if weight_tangent is not None:
        tangent = _weight_term(func, input, weight, weight_tangent, stride, padding, dilation, groups, output.dtype,
                               tangent)
    if bias_tangent is not None:
        channel_dim = 1 if input.dim() == weight.dim() else 0
        bias_tangent = _as(bias_tangent, output).reshape(
            mode.num_tangents, *([1] * channel_dim), -1, *([1] * (output.dim() - channel_dim - 1)))
        tangent = full(bias_tangent, output.shape) if tangent is None else tangent.add_(bias_tangent)
    return mode.register(output, tangent, owned=True)


# ---- normalization ---------------------------------------------------------------------------

def _affine_tangent(mode, tangent, normalized, weight, bias, scale_shape, output):
    """T_x̂ γ + x̂ T_γ + T_β (``tangent`` = T_x̂, a fresh tensor updated in place, or None);
    γ, β viewed as ``scale_shape``. Returns ``(tangents, fresh)``."""
    weight_tangent = None if weight is None else mode.tangent(weight)
    bias_tangent = None if bias is None else mode.tangent(bias)
    ndim = normalized.dim()
    if tangent is not None and weight is not None:
        tangent.mul_(weight.reshape(scale_shape))
    if weight_tangent is not None:
        weight_tangent = align(_as(weight_tangent, output).reshape(-1, *scale_shape), ndim)
        tangent = normalized * weight_tangent if tangent is None else tangent.addcmul_(normalized, weight_tangent)
    if bias_tangent is not None:
        bias_tangent = align(_as(bias_tangent, output).reshape(-1, *scale_shape), ndim)
        if tangent is None:
            return full(bias_tangent, output.shape), False
        tangent.add_(bias_tangent)
    return (None, False) if tangent is None else (full(tangent, output.shape), True)


def _through_statistics(tangent, normalized, dims, inverse_std):
    """T_x̂ = (T_c - x̂ mean(x̂ T_c)) / σ, T_c = T - mean(T) (means over ``dims`` of T); a fresh tensor."""
    centered = tangent - tangent.mean(dims, keepdim=True)
    projection = (centered * normalized).mean(dims, keepdim=True)
    return centered.addcmul_(normalized, projection, value=-1).mul_(inverse_std)


def _per_channel(tangent, normalized, dims):
    """mean(T) and mean(x̂ T) over ``dims`` (the primal's), ``(K, *1, C, *1)``, one tangent at a time
    (a product of x̂ with all K tangents at once would be a K-sized temporary)."""
    mean = tangent.mean([d + 1 for d in dims], keepdim=True)
    projection = torch.stack([(t * normalized).mean(dims, keepdim=True) for t in tangent])
    return mean, projection


def _batch_norm_tangent(mode, tangent, normalized, inverse_std, weight, bias, training, output):
    """T_y = T a + x̂ b + c per channel, in two passes over the K tangents.

    y = x̂ γ + β; in training x̂ = (x - μ) / σ with the batch statistics, whose tangents give
    T_x̂ = (T - mean(T) - x̂ mean(x̂ T)) / σ, hence a = γ / σ, b = T_γ - mean(x̂ T) a,
    c = T_β - mean(T) a; in eval mode (running statistics) a = γ / σ, b = T_γ, c = T_β.
    """
    shape = inverse_std.shape  # (1, C, 1, ...)
    scale = inverse_std if weight is None else inverse_std * weight.reshape(shape)
    weight_tangent = None if weight is None else mode.tangent(weight)
    bias_tangent = None if bias is None else mode.tangent(bias)
    slope = None if weight_tangent is None else _as(weight_tangent, output).reshape(-1, *shape)
    offset = None if bias_tangent is None else _as(bias_tangent, output).reshape(-1, *shape)
    if tangent is not None and training:
        mean, projection = _per_channel(tangent, normalized, [0, *range(2, output.dim())])
        slope = _add(slope, -projection * scale)
        offset = _add(offset, -mean * scale)
    if slope is None and offset is None:
        return None if tangent is None else tangent * scale
    if slope is None:
        return full(offset, output.shape) if tangent is None else (tangent * scale).add_(offset)
    base = torch.zeros((), dtype=output.dtype, device=output.device) if offset is None else offset
    result = torch.empty_like(tangent) if tangent is not None else \
        torch.empty((slope.shape[0], *output.shape), dtype=output.dtype, device=output.device)
    torch.addcmul(base, normalized, slope, out=result)  # in the layout of the input's tangents
    return result if tangent is None else result.addcmul_(tangent, scale)


@rule(F.batch_norm)
def batch_norm(mode, func, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    shape = (1, input.shape[1], *([1] * (input.dim() - 2)))
    if not training:
        output = func(input, running_mean, running_var, weight, bias, False, momentum, eps)
        inverse_std = torch.rsqrt(running_var + eps).reshape(shape)
        mean = running_mean.reshape(shape)
    else:
        if running_mean is not None and running_var is not None and mode.record_side_effects:
            # the in-place running-statistics update happens once, after the pass (as in the eager path)
            dims = [0, *range(2, input.dim())]
            mode.batch_norm_updates.append((running_mean, running_var, momentum))
            mode.batch_norm_statistics.append((input.mean(dims), input.var(dims, correction=1)))
        output, mean, inverse_std = torch.native_batch_norm(input, weight, bias, None, None, True, momentum or 0.0,
                                                            eps)
        inverse_std, mean = inverse_std.reshape(shape), mean.reshape(shape)
    tangent = _as(mode.tangent(input), input)
    normalized = (input - mean) * inverse_std
    if tangent is not None:
        normalized = layout_like(normalized, tangent)
    tangent = _batch_norm_tangent(mode, tangent, normalized, inverse_std, weight, bias, training, output)
    return mode.register(output, tangent, owned=tangent is not None and tangent.dim() == output.dim() + 1)


@rule(F.layer_norm)
def layer_norm(mode, func, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    output, mean, inverse_std = torch.native_layer_norm(input, normalized_shape, weight, bias, eps)
    normalized = (input - mean) * inverse_std
    tangent = _as(mode.tangent(input), input)
    if tangent is not None:
        dims = tuple(range(-len(normalized_shape), 0))
        tangent = _through_statistics(tangent, normalized, dims, inverse_std)
    tangent, fresh = _affine_tangent(mode, tangent, normalized, weight, bias, tuple(normalized_shape), output)
    return mode.register(output, tangent, owned=fresh)


# ---- pooling, padding, dropout ---------------------------------------------------------------

def _max_pool(spatial: int, adaptive: bool):
    def pool(mode, func, input, *args, **kwargs):
        names = ("output_size", "return_indices") if adaptive else \
            ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
        wanted = kwargs.get("return_indices", False)
        kwargs["return_indices"] = True
        output, indices = func(input, *args, **kwargs)
        tangent = _as(mode.tangent(input), output)
        flat = tangent.flatten(-spatial)
        index = layout_like(indices, tangent).flatten(-spatial)
        index = index.unsqueeze(0).expand(tangent.shape[0], *indices.shape[:-spatial], -1)
        pooled = _empty((tangent.shape[0], *output.shape), tangent, is_channels_last(tangent))
        torch.gather(flat, -1, index, out=pooled.flatten(-spatial))
        mode.register(output, pooled, owned=True)
        return (output, indices) if wanted else output

    return pool


for _spatial, _functions in ((1, (F.max_pool1d, F.max_pool1d_with_indices)),
                             (2, (F.max_pool2d, F.max_pool2d_with_indices)),
                             (3, (F.max_pool3d, F.max_pool3d_with_indices))):
    rule(*_functions)(_max_pool(_spatial, adaptive=False))
for _spatial, _functions in ((1, (F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices)),
                             (2, (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices)),
                             (3, (F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices))):
    rule(*_functions)(_max_pool(_spatial, adaptive=True))


_BATCHED_NDIM = {F.avg_pool1d: 3, F.avg_pool2d: 4, F.avg_pool3d: 5, F.adaptive_avg_pool1d: 3,
                 F.adaptive_avg_pool2d: 4, F.adaptive_avg_pool3d: 5}


@rule(*_BATCHED_NDIM)
def average_pool(mode, func, input, *args, **kwargs):
    """Average pooling is linear: T_y = pool(T_x), the K·B tangent inputs stacked."""
    output = func(input, *args, **kwargs)
    tangent = on_batch(lambda t: func(t, *args, **kwargs), _as(mode.tangent(input), output), _BATCHED_NDIM[func])
    return mode.register(output, tangent, owned=True)


@rule(F.pad)
def pad(fast, func, input, pad, *args, **kwargs):
    """Padding is linear (zeros for the tangents of a constant pad)."""
    options = {**dict(zip(("mode", "value"), args)), **kwargs}
    padding_mode = options.get("mode", "constant")
    output = func(input, pad, **options)
    tangent = _as(fast.tangent(input), output)
    if padding_mode == "constant":
        return fast.register(output, func(tangent, pad, "constant", 0.0), owned=True)
    padded_dims = len(pad) // 2  # reflect/replicate/circular take (N, C, *padded) inputs
    return fast.register(output, on_batch(lambda t: func(t, pad, padding_mode), tangent, padded_dims + 2)
                         if tangent.dim() > padded_dims + 2 else func(tangent, pad, padding_mode), owned=True)


@rule(F.dropout)
def dropout(mode, func, input, p=0.5, training=True, inplace=False):
    """One mask for the primal and every tangent: T_y = T_x ⊙ m / (1 - p)."""
    tangent = mode.tangent(input)
    if not training or p == 0:
        return mode.register(func(input, p, training, inplace), tangent)
    if p == 1:
        output = func(input, p, training, inplace)
        return mode.register(output, torch.zeros_like(tangent), owned=True)
    if input.device.type == "cpu":
        # what aten's dropout does on the CPU (the same random numbers): noise ~ Bernoulli(1 - p) / (1 - p)
        noise = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
        output = input.mul_(noise) if inplace else input * noise
        return mode.register(output, tangent * noise, owned=True)
    output, mask = torch.native_dropout(input, p, True)
    if inplace:
        output = input.copy_(output)
    return mode.register(output, tangent * mask * (1 / (1 - p)), owned=True)


# ---- attention -------------------------------------------------------------------------------

@rule(F.scaled_dot_product_attention)
def attention(mode, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    options = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if dropout_p or enable_gqa or (attn_mask is not None and mode.tangent(attn_mask) is not None) or query.dim() < 2:
        return fallback(mode, func, (query, key, value), options)
    factor = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, -1)
    output = torch.matmul(weights, value)
    query_tangent, key_tangent, value_tangent = (_as(mode.tangent(t), output) for t in (query, key, value))
    ndim = scores.dim()
    score_tangent = None
    if query_tangent is not None:
        score_tangent = torch.matmul(align(query_tangent, ndim), key.transpose(-2, -1))
    if key_tangent is not None:
        score_tangent = _add(score_tangent, torch.matmul(query, align(key_tangent, ndim).transpose(-2, -1)))
    tangent = None
    if score_tangent is not None:
        score_tangent = score_tangent * factor
        weight_tangent = weights * (score_tangent - (weights * score_tangent).sum(-1, keepdim=True))
        tangent = torch.matmul(weight_tangent, value)
    if value_tangent is not None:
        tangent = _add(tangent, torch.matmul(weights, align(value_tangent, ndim)))
    return mode.register(output, full(tangent, output.shape), owned=True)


@rule(F.multi_head_attention_forward)
def multi_head_attention(mode, func, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                         bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                         key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                         q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                         average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention``'s forward as its operations (packed projection, heads, attention,
    output projection), each through its fast rule. Other configurations (separate projection
    weights, key/value biases, masks, attention weights asked for, dropout) fall back."""
    arguments = (query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                 add_zero_attn, dropout_p, out_proj_weight, out_proj_bias)
    options = dict(training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                   attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
                   k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
                   average_attn_weights=average_attn_weights, is_causal=is_causal)
    if (need_weights or use_separate_proj_weight or bias_k is not None or bias_v is not None or add_zero_attn
            or key_padding_mask is not None or attn_mask is not None or is_causal or static_k is not None
            or static_v is not None or (training and dropout_p > 0) or query.dim() != 3 or key is not value):
        return fallback(mode, func, arguments, options)
    call = mode.call
    target_length, batch, embed = query.shape
    source_length, head_dim = key.shape[0], embed // num_heads
    if query is key:
        projected = call(F.linear, query, in_proj_weight, in_proj_bias)
        q, k, v = call(torch.Tensor.chunk, projected, 3, -1)
    else:
        weights = call(torch.Tensor.split, in_proj_weight, [embed, 2 * embed])
        biases = (None, None) if in_proj_bias is None else call(torch.Tensor.split, in_proj_bias, [embed, 2 * embed])
        q = call(F.linear, query, weights[0], biases[0])
        k, v = call(torch.Tensor.chunk, call(F.linear, key, weights[1], biases[1]), 2, -1)

    def heads(tensor, length):  # (length, B, E) -> (B, heads, length, head_dim)
        return call(torch.Tensor.permute, call(torch.Tensor.reshape, tensor, length, batch, num_heads, head_dim),
                    1, 2, 0, 3)

    attended = call(F.scaled_dot_product_attention, heads(q, target_length), heads(k, source_length),
                    heads(v, source_length))
    attended = call(torch.Tensor.reshape, call(torch.Tensor.permute, attended, 2, 0, 1, 3), target_length * batch,
                    embed)
    output = call(F.linear, attended, out_proj_weight, out_proj_bias)
    return call(torch.Tensor.view, output, target_length, batch, output.shape[1]), None
