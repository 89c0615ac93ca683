"""The fast forward mode: the primal and its K tangents computed together, without dual tensors.

``torch.func.jvp`` under ``vmap`` (:func:`fwdgrad.core.forward_mode.batched_jvp`) is exact for
any operation, but pays for its generality: functorch's wrappers and batching rules on
every operation, torch's forward rule of ``linear`` multiplying by the (zero) tangent of a
constant weight, a rank-1 weight tangent formed as a dense matrix. :class:`FastForward`
computes the same directional derivatives with one rule per operation instead
(:mod:`fwdgrad.core.dual_rules`, :mod:`fwdgrad.core.dual_layers`): a linear layer's K
tangents are one matmul of the ``(K·B, d_in)`` stacked input tangents, plus (x·w_k) u_k^T for
rank-1 weight tangents or one batched matmul x V_k^T for dense ones; a convolution's K
weight tangents are one convolution with K·C_out output channels (K for rank-1 ones);
an elementwise σ gives σ(x) and σ'(x) ⊙ T; BatchNorm in training mode differentiates
through the batch statistics as forward AD does.

Any other operation on a tensor with tangents falls back to PyTorch's forward-mode AD for
that one operation (``torch.autograd.forward_ad`` for K = 1, ``vmap`` over ``torch.func.jvp``
for K > 1; :func:`fallback`), so every ``nn.Module`` still works.

How a value's tangents are held: a table ``id(tensor) -> (weak reference, T)``; the primal
is the plain tensor the closure's code sees (shapes, dtypes, Python control flow unchanged).
The table entry dies with the tensor. Parameters (weight space) have their tangents given
up front, dense or :class:`fwdgrad.core.dual.Factored`.

The API mirrors ``torch.autograd.forward_ad``::

    with FastForward(num_tangents=K) as mode:
        z = mode.make_dual(x, tangents)          # tangents (K, *x.shape)
        y = module(z)
        primal, tangents_of_y = mode.unpack(y)   # (K, *y.shape), None if unconnected
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch.overrides import TorchFunctionMode

import fwdgrad.core.dual_layers  # noqa: F401 - registers the layer rules
import fwdgrad.core.dual_rules  # noqa: F401 - registers the elementwise, shape and loss rules
from fwdgrad.core.dual import ACTIVE, RULES, Factored, fallback, layout_like

# queries whose result carries no tangent (shapes, dtypes, comparisons): run on the primal
_NO_TANGENT_NAMES = {
    "dim", "size", "numel", "stride", "is_contiguous", "is_floating_point", "element_size", "data_ptr",
    "item", "tolist", "__len__", "__bool__", "__format__", "__repr__", "__hash__", "storage_offset",
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "argmax", "argmin", "isfinite", "isnan", "isinf", "sign", "is_nonzero", "nonzero", "all", "any",
    "detach", "get_device", "is_complex", "is_signed", "has_names", "nelement", "ndimension",
}


def _no_tangent(func) -> bool:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property: shapes and flags, never differentiated (T and mT have rules)
        return getattr(getattr(func, "__self__", None), "__name__", None) not in ("T", "mT", "H", "mH", "real", "imag")
    return name in _NO_TANGENT_NAMES


class _Scaled:
    """T ⊙ factor, not formed yet (:meth:`FastForward.register_scaled`); ``source`` a weak
    reference to the value T belongs to, ``storage`` T's storage."""

    __slots__ = ("source", "tangent", "factor", "storage")

    def __init__(self, source, tangent, factor, storage):
        self.source, self.tangent, self.factor, self.storage = source, tangent, factor, storage


class FastForward(TorchFunctionMode):
    """A ``TorchFunctionMode`` computing every operation's primal and its K tangents together.

    Args:
        num_tangents: K.
        parameter_tangents: ``id(parameter) -> tangents`` (``(K, *p.shape)`` tensor or
            :class:`~fwdgrad.core.dual.Factored`): the weight space's differentiated inputs.
        parameters: the parameters of ``parameter_tangents`` (kept alive, checked by identity).
        record_side_effects: False for the second and later chunks of one step: BatchNorm's
            running statistics are then not recorded again.

    After the pass: ``used`` (ids of the parameters the closure touched),
    ``batch_norm_updates`` and ``batch_norm_statistics`` (as
    :class:`fwdgrad.core.parameter_substitution.ParameterSubstitution` records them).
    """

    def __init__(self, num_tangents: int, parameter_tangents: Mapping | None = None, parameters=(),
                 record_side_effects: bool = True):
        super().__init__()
        self.num_tangents = num_tangents
        self.parameter_tangents = dict(parameter_tangents or {})
        self.parameters = list(parameters)
        self.record_side_effects = record_side_effects
        self.used: set[int] = set()
        self.batch_norm_updates: list = []
        self.batch_norm_statistics: list = []
        # id(tensor) -> (weak reference, tangents, storage pointer if owned); owners: storage -> id
        self._table: dict[int, tuple] = {}
        self._owners: dict[int, int] = {}
        self._shared: set[int] = set()  # storages that some value's tangents shared (views): never updated in place

    def __enter__(self):
        ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        ACTIVE.remove(self)
        return super().__exit__(*exc)

    # ---- the tangents of values ---------------------------------------------------------------

    def register(self, tensor: torch.Tensor, tangent, owned: bool = False) -> torch.Tensor:
        """Record ``tangent`` ``(K, *tensor.shape)`` as the tangents of ``tensor``; returns ``tensor``.

        ``owned``: the tangent is a fresh tensor (no view of another value's tangents), so an
        in-place operation on ``tensor`` may update it in place (:meth:`owns`). A tangent that
        shares its storage with an owned one makes both shared.
        """
        key, table, owners = id(tensor), self._table, self._owners
        entry = table.get(key)
        if entry is not None and entry[0]() is not tensor:
            entry = None
        if entry is not None and entry[2] is not None and owners.get(entry[2]) == key:
            del owners[entry[2]]
        if tangent is None:
            if entry is not None:
                del table[key]
            return tensor
        storage = None
        if isinstance(tangent, torch.Tensor) and tangent.numel():
            storage = tangent.untyped_storage().data_ptr()
            holder = owners.get(storage)
            if holder is not None and holder != key:  # a view of an owned tangent: now shared by both
                del owners[storage]
                table[holder] = (*table[holder][:2], None)
                owned = False
            if not owned:
                self._shared.add(storage)
        if entry is None:
            def forget(reference, key=key):
                dead = table.get(key)
                if dead is not None and dead[0] is reference:
                    del table[key]
                    if dead[2] is not None and owners.get(dead[2]) == key:
                        del owners[dead[2]]

            reference = weakref.ref(tensor, forget)
        else:
            reference = entry[0]
        if owned and storage is not None and all(step or size == 1 for step, size in zip(tangent.stride(),
                                                                                    tangent.shape)):
            owners[storage] = key  # (an expanded tensor, stride 0, cannot be updated in place)
        table[key] = (reference, tangent, storage if key == owners.get(storage) else None)
        return tensor

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s tangents are its own (registered fresh, no other value shares them)."""
        self.weight_tangent(tensor)  # a scaled tangent is formed first
        entry = self._table.get(id(tensor))
        return entry is not None and entry[2] is not None

    def register_scaled(self, tensor: torch.Tensor, source: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Record T_source ⊙ ``factor`` as the tangents of ``tensor`` (an elementwise map's output,
        ``factor`` = σ'(source)), formed when first read: in place, without a K-sized allocation,
        if by then ``source`` has died and its tangents were its own (``z = conv(x); y = relu(z)``
        in an ``nn.Sequential``), else as a new tensor."""
        tangent = self.tangent(source)
        factor = layout_like(factor, tangent)
        if not self.owns(source):
            return self.register(tensor, tangent * factor, owned=True)
        storage = tangent.untyped_storage().data_ptr()
        # the source's tangents are no longer its own: a later in-place op on the source, or another
        # map of it, must not change them while this map is pending
        reference, _, owned = self._table[id(source)]
        if owned is not None and self._owners.get(owned) == id(source):
            del self._owners[owned]
        self._table[id(source)] = (reference, tangent, None)
        return self.register(tensor, _Scaled(weakref.ref(source), tangent, factor, storage))

    def _resolve(self, tensor: torch.Tensor, scaled: _Scaled) -> torch.Tensor:
        if scaled.source() is None and scaled.storage not in self._shared:
            tangent = scaled.tangent.mul_(scaled.factor)  # nothing else holds these tangents any more
        else:
            tangent = scaled.tangent * scaled.factor
        self.register(tensor, tangent, owned=True)
        return tangent

    make_dual = register

    def weight_tangent(self, tensor: torch.Tensor):
        """The tangents of ``tensor`` as held: a tensor, :class:`Factored` (parameters), or ``None``."""
        entry = self._table.get(id(tensor))
        if entry is not None:
            return self._resolve(tensor, entry[1]) if type(entry[1]) is _Scaled else entry[1]
        tangent = self.parameter_tangents.get(id(tensor))
        if tangent is not None:
            self.used.add(id(tensor))
        return tangent

    def tangent(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The tangents of ``tensor``, ``(K, *tensor.shape)``, or ``None`` for a constant."""
        tangent = self.weight_tangent(tensor)
        return tangent.dense() if isinstance(tangent, Factored) else tangent

    def unpack(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(primal, tangents)`` of a value: what ``forward_ad.unpack_dual`` is to a dual tensor."""
        return tensor, self.tangent(tensor)

    def _carries_tangent(self, value) -> bool:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key in self._table:
                return True
            if key in self.parameter_tangents:
                self.used.add(key)
                return True
            return False
        if isinstance(value, (list, tuple)):
            return any(self._carries_tangent(v) for v in value)
        return False

    def carries_tangent(self, args, kwargs) -> bool:
        return any(self._carries_tangent(a) for a in args) or any(self._carries_tangent(v) for v in kwargs.values())

    # ---- dispatch ---------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.call(func, *args, **(kwargs or {}))

    def call(self, func, *args, **kwargs):
        """``func(*args, **kwargs)`` with tangents: its rule, the fallback, or the plain call
        when no input carries tangents. Rules call it for the operations they are built of."""
        if not self.carries_tangent(args, kwargs) or _no_tangent(func):
            return func(*args, **kwargs)
        rule = RULES.get(func)
        if rule is None:
            return fallback(self, func, args, kwargs)
        return rule(self, func, *args, **kwargs)


def fast_batched_jvp(function, primals, tangents, inputs: tuple):
    """:func:`fwdgrad.core.forward_mode.jvp_with_inputs` in the fast mode: ``function(primals,
    inputs) -> (value, aux)``; returns ``(value, tangents of value (K, *value.shape), aux)``.

    The primals (fresh tensors the caller owns) carry ``tangents`` ``(K, *shape_i)`` each (or
    :class:`Factored`). Usable as the ``run`` of :func:`fwdgrad.core.execution.chunked_batched_jvp`.
    """
    num_tangents = tangents[0].num_tangents if isinstance(tangents[0], Factored) else tangents[0].shape[0]
    with FastForward(num_tangents) as mode:
        for primal, tangent in zip(primals, tangents):
            mode.register(primal, tangent)
        value, aux = function(tuple(primals), inputs)
        value, value_tangent = mode.unpack(value)
    if value_tangent is None:
        value_tangent = torch.zeros((num_tangents, *value.shape), dtype=value.dtype, device=value.device)
    return value, value_tangent, aux
