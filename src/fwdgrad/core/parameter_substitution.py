"""Weight space: how the closure sees the differentiated parameters.

While the closure runs inside the forward-mode transforms, :class:`ParameterSubstitution`
(a ``TorchFunctionMode``) hands every torch operation the forward-mode counterpart of each
parameter tensor it receives. This works for an ``nn.Module`` and for a bare iterable of
parameters alike, whatever code the closure calls. The same mode makes training-mode
modules work under the transforms:

- BatchNorm computes with batch statistics inside the transform; its running statistics
  are updated once per step, outside it (:func:`update_running_statistics`), exactly as
  one plain forward pass would.
- Other in-place updates of buffers (``num_batches_tracked``) run once, outside the
  transforms; with several chunks, a module's buffers are restored between chunks
  (:func:`fwdgrad.core.execution.chunked_batched_jvp`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only


class ParameterSubstitution(TorchFunctionMode):
    """Substitutes parameters by their forward-mode counterparts inside the closure.

    Args:
        substitutes: maps ``id(parameter)`` to the tensor the transform differentiates
            (anything with a ``get(id)``).
        record_side_effects: False for the second and later chunks of one step, whose
            buffer updates must not be applied again.
        parameters: the parameters, in the order of ``substitutes.values()``; under
            ``torch.compile`` they are matched by identity, not by ``id()``.
        linear_rules: ``id(weight) -> rule`` for weights whose ``F.linear`` has its own
            forward-mode formula: ``rule.linear(input, bias)`` computes the layer (the
            factored rank-1 tangents, :mod:`fwdgrad.core.factored`); the weight itself is never
            substituted then.
    """

    def __init__(self, substitutes, record_side_effects: bool, parameters: Sequence[torch.Tensor] = (),
                 linear_rules: Mapping | None = None):
        super().__init__()
        self.substitutes = substitutes
        self.pairs = list(zip(parameters, substitutes.values())) if linear_rules is None else []  # compiled mode
        self.linear_rules = linear_rules or {}
        self.record_side_effects = record_side_effects
        self.used: set[int] = set()
        self.batch_norm_updates: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.batch_norm_statistics: list[tuple[torch.Tensor, torch.Tensor]] = []

    def swap(self, tensor: torch.Tensor) -> torch.Tensor:
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
            return tree_map_only(torch.Tensor, self.swap, (args, kwargs))
        swap = self.swap
        args = tuple(swap(a) if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs:
            kwargs = {k: swap(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return args, kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.linear_rules:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            rule = self.linear_rules.get(id(weight))
            if rule is not None:
                self.used.add(id(weight))
                return self._linear_with_rule(rule, *args, **kwargs)
        args, kwargs = self._swap_all(args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(*args, **kwargs)
        if not torch.compiler.is_compiling() and _mutates_captured_tensor(func, args, kwargs):
            # E.g. BatchNorm's num_batches_tracked.add_(1): no tangent involved, so run it
            # on the plain tensors, outside the functorch transforms.
            with torch._C._DisableFuncTorch():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _linear_with_rule(self, rule, input, weight, bias=None):
        output = rule.linear(self.swap(input))
        return output if bias is None else output + self.swap(bias)

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


def update_running_statistics(updates, statistics) -> None:
    """running <- (1 - momentum) running + momentum batch_statistic (unbiased variance).

    ``updates``: ``(running_mean, running_var, momentum)`` per BatchNorm call, as
    :class:`ParameterSubstitution` recorded them; ``statistics``: the batch ``(mean, var)``
    of each call, as the jvp returned them (aux output).
    """
    for (running_mean, running_var, momentum), (mean, var) in zip(updates, statistics):
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
