"""What the fast forward mode's rules share: tangents side by side with the primal.

The fast execution (:mod:`fwdgrad.core.fast_forward`) carries a value x of the closure
together with its K tangents T ``(K, *x.shape)``, T[k] = ∂x/∂θ · v_k, as two plain tensors
(no dual tensors, no ``vmap``), and computes every operation's primal and its K tangents
with one rule per operation:

    y = f(x),   T_y = J_f(x) T_x     (all K at once: T_x has the tangents as a leading dimension)

A rule is ``rule(mode, *args, **kwargs) -> output``: it computes the primal output with the
operation itself and registers the output's tangents with ``mode.register(output, T)``;
``mode.tangent(x)`` gives the tangents of an input (``None``: a constant).
``mode.weight_tangent(p)`` gives a parameter's tangents as they are held: a dense
``(K, *p.shape)`` tensor or :class:`Factored` rank-1 factors (u_k w_k^T never formed).

This module holds the registry (:data:`RULES`, :func:`rule`), the tangent types and the
shape helpers; the rules are in :mod:`fwdgrad.core.dual_rules` (shapes, elementwise maps,
reductions, losses) and :mod:`fwdgrad.core.dual_layers` (linear, convolution, norms,
pooling, dropout, attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch.utils._pytree import tree_flatten, tree_unflatten

# func -> rule(mode, *args, **kwargs): filled by the rule modules when they are imported
RULES: dict[Callable, Callable] = {}
# the fast modes entered and not yet left, innermost last (see active_tangent)
ACTIVE: list = []


def rule(*funcs: Callable | None):
    """Register the decorated function as the rule of every torch function in ``funcs``
    (aliases: ``torch.relu``, ``torch.Tensor.relu``, ``F.relu``; ``None`` entries are skipped,
    for functions a torch version lacks)."""

    def register(function: Callable) -> Callable:
        for func in funcs:
            if func is not None:
                RULES[func] = function
        return function

    return register


def method(name: str) -> Callable | None:
    """``torch.Tensor.<name>`` if this torch has it."""
    return getattr(torch.Tensor, name, None)


def active_tangent(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tangents of ``tensor`` in the innermost fast mode entered, ``None`` if none."""
    return ACTIVE[-1].tangent(tensor) if ACTIVE else None


class Factored:
    """K rank-1 tangents u_k w_k^T of a parameter of shape ``shape``, kept as factors.

    ``u`` ``(K, shape[0])``, ``w`` ``(K, prod(shape[1:]))`` (:func:`fwdgrad.core.tangents.rank1_layout`).
    ``dense()`` forms ``(K, *shape)`` (for operations without a factored rule), once.
    """

    __slots__ = ("u", "w", "shape", "_dense")

    def __init__(self, u: torch.Tensor, w: torch.Tensor, shape: torch.Size):
        self.u, self.w, self.shape, self._dense = u, w, torch.Size(shape), None

    @property
    def num_tangents(self) -> int:
        return self.u.shape[0]

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = (self.u.unsqueeze(-1) * self.w.unsqueeze(-2)).reshape(self.num_tangents, *self.shape)
        return self._dense


# ---- the fallback: PyTorch's forward-mode AD for one operation -----------------------------------


def _out_of_place(func):
    """The out-of-place twin of an in-place method (``mul_`` -> ``mul``, ``__iadd__`` -> ``__add__``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], None)
    if name.endswith("_") and not name.endswith("__"):
        return getattr(torch.Tensor, name[:-1], None)
    return None


def fallback(mode, func, args: tuple, kwargs: dict):
    """``func`` with its tangents by ``torch.autograd.forward_ad`` (K = 1) or ``vmap(jvp)`` (K > 1).

    The inputs with tangents become the differentiated inputs of that single operation;
    every floating-point output gets its tangents registered. An in-place method runs
    out of place, and its result is copied into the first argument.
    """
    in_place = _out_of_place(func)
    if in_place is not None and isinstance(args[0], torch.Tensor):
        result = fallback(mode, in_place, args, kwargs)
        target = args[0]
        target.copy_(result)
        return mode.register(target, mode.tangent(result))
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves)
                 if isinstance(leaf, torch.Tensor) and mode.tangent(leaf) is not None]
    primals = tuple(leaves[i] for i in positions)
    tangents = tuple(mode.tangent(leaves[i]).to(leaves[i].dtype) for i in positions)

    def call(*inputs):
        filled = list(leaves)
        for position, tensor in zip(positions, inputs):
            filled[position] = tensor
        call_args, call_kwargs = tree_unflatten(filled, spec)
        return func(*call_args, **call_kwargs)

    if mode.num_tangents == 1:
        with forward_ad.dual_level():
            output = call(*(forward_ad.make_dual(p, t[0]) for p, t in zip(primals, tangents)))
            out_leaves, out_spec = tree_flatten(output)
            unpacked = [forward_ad.unpack_dual(leaf) if isinstance(leaf, torch.Tensor) else None for leaf in out_leaves]
        primal_leaves = [leaf if pair is None else pair.primal for leaf, pair in zip(out_leaves, unpacked)]
        tangent_leaves = [None if pair is None or pair.tangent is None else pair.tangent.unsqueeze(0)
                          for pair in unpacked]
    else:
        structure = {}

        def tensor_outputs(*inputs):  # jvp returns tensors only: keep the other leaves aside
            out_leaves, structure["spec"] = tree_flatten(call(*inputs))
            structure["leaves"] = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in out_leaves]
            tensors = tuple(leaf for leaf in out_leaves if isinstance(leaf, torch.Tensor))
            return tensors or (torch.zeros(()),)

        outputs, output_tangents = torch.func.vmap(
            lambda *ts: torch.func.jvp(tensor_outputs, primals, ts), randomness="same")(*tangents)
        out_spec, outputs, output_tangents = structure["spec"], iter(outputs), iter(output_tangents)
        primal_leaves, tangent_leaves = [], []
        for leaf in structure["leaves"]:
            primal_leaves.append(next(outputs)[0] if leaf is None else leaf)
            tangent_leaves.append(next(output_tangents) if leaf is None else None)
    for primal, tangent in zip(primal_leaves, tangent_leaves):
        if isinstance(primal, torch.Tensor) and primal.is_floating_point() and tangent is not None:
            mode.register(primal, tangent)
    return tree_unflatten(primal_leaves, out_spec)


def align(tangent: torch.Tensor, ndim: int) -> torch.Tensor:
    """View tangents ``(K, *s)`` as ``(K, 1, ..., 1, *s)`` with ``ndim`` dimensions after K, so
    that they broadcast against an output of ``ndim`` dimensions as the primal ``s`` does."""
    missing = ndim - (tangent.dim() - 1)
    return tangent if missing <= 0 else tangent.reshape(tangent.shape[0], *([1] * missing), *tangent.shape[1:])


def full(tangent: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Tangents ``(K, *s)`` broadcast to ``(K, *shape)`` (a view where possible)."""
    aligned = align(tangent, len(shape))
    target = (tangent.shape[0], *shape)
    return aligned if aligned.shape == target else aligned.expand(target)


def shift(dim: int, ndim: int) -> int:
    """Dimension ``dim`` of a primal with ``ndim`` dimensions, as a dimension of its tangents."""
    return dim + 1 if dim >= 0 else dim


def shift_dims(dims, ndim: int):
    """:func:`shift` for an int, a sequence of ints or ``None`` (every dimension of the primal)."""
    if dims is None:
        return tuple(range(1, ndim + 1))
    if isinstance(dims, int):
        return shift(dims, ndim)
    return tuple(shift(d, ndim) for d in dims)


def on_batch(function: Callable[[torch.Tensor], torch.Tensor], tangent: torch.Tensor, batched_ndim: int):
    """Apply ``function`` (an operation on a batch ``(N, ...)``) to tangents ``(K, *s)``: with the
    K tangents of a batched primal merged into the batch, ``(K·N, ...)``, or, for an unbatched
    primal (``len(s) == batched_ndim - 1``), with K as the batch."""
    if tangent.dim() == batched_ndim:
        return function(tangent)
    lead = tangent.shape[:2]
    return function(tangent.reshape(lead.numel(), *tangent.shape[2:])).unflatten(0, lead)


def is_channels_last(tangent: torch.Tensor) -> bool:
    """Tangents ``(K, B, C, H, W)`` whose ``(K·B, C, H, W)`` view is channels-last (see
    :func:`fwdgrad.core.dual_layers.convolution`)."""
    return tangent.dim() == 5 and tangent.stride(2) == 1 and tangent.shape[2] > 1


def layout_like(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """A primal-shaped factor ``(B, C, H, W)`` in the layout of the tangents it multiplies: an
    elementwise op between differently laid out operands runs at a fraction of memory speed."""
    if primal.dim() == 4 and is_channels_last(tangent) and not primal.is_contiguous(memory_format=torch.channels_last):
        return primal.contiguous(memory_format=torch.channels_last)
    return primal
