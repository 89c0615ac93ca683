"""How one block's forward-mode pass executes (local losses, :mod:`fwdgrad.local.estimator`).

:func:`block_jvp` runs a block on its (detached) input h with K tangents u on the output
z_m of one perturbation site m, and returns the block's output a and its tangents

    ȧ[k] = (∂a/∂z_m) u[k]          (shape (K, B, *a)),

the Jacobian-vector products of the rest of the block, in forward mode, with no autograd
graph (``torch.no_grad``). The other sites are not perturbed. The first pass of a step
also records every site's input (for its local derivative) and the batch statistics of
the block's BatchNorms (:func:`fwdgrad.local.blocks.constant_batch_statistics`).

Two executions, the same numbers:

- K = 1: ``torch.autograd.forward_ad``. The site's forward hook returns
  ``make_dual(z_m, u)``: the tangent enters without any arithmetic. (A ``torch.func.jvp``
  needs the site output to become z_m + δ with δ the differentiated input, one more
  elementwise op on a dual tensor, and every elementwise op on dual tensors costs ~0.27 ms
  of fixed overhead on a 2-core CPU in torch 2.14, against ~2 µs plain:
  ``docs/local/dual_op_overhead.py``.)
- K > 1: ``vmap`` over ``torch.func.jvp`` of δ ↦ block(h) with the site output z_m + δ
  (:func:`fwdgrad.core.execution.chunked_batched_jvp`: the primal once per chunk of
  ``chunk_size`` tangents, dropout masks replayed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

from fwdgrad.core.execution import chunked_batched_jvp, eager_batched_jvp
from fwdgrad.core.forward_mode import forward_mode_region, require_tangent
from fwdgrad.core.perturbation_sites import _output_tensor, _replace_output, flatten_call, unflatten_call
from fwdgrad.local.blocks import Block, constant_batch_statistics, is_training_batch_norm
from fwdgrad.local.reuse import RecordedOutputs, ReusedPrimals, reusable


class SiteHooks:
    """Forward hooks on a block's sites: call number ``perturbed`` gets ``perturb(z)`` as its
    output; with ``record``, every call's (args, kwargs) and output shape are kept."""

    def __init__(self, modules: dict[nn.Module, str], perturbed: int | None = None,
                 perturb: Callable[[torch.Tensor], torch.Tensor] | None = None, record: bool = True,
                 primal_of: Callable[[torch.Tensor], torch.Tensor] | None = None, outputs: bool = False):
        self.modules, self.perturbed, self.perturb, self.record = modules, perturbed, perturb, record
        # every call's primal output, for the block's later passes (fwdgrad.local.reuse)
        self.outputs = RecordedOutputs() if outputs else None
        self.primal_of = primal_of or (lambda tensor: tensor)
        self.handles = []
        self.calls: list[nn.Module] = []
        self.shapes: list[torch.Size] = []
        self.tensors: list[torch.Tensor] = []  # tensor leaves of every call's (args, kwargs)
        self.specs: list = []

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module, args, kwargs, output):
        tensor = _output_tensor(self.modules[module], output)
        index = len(self.calls)
        self.calls.append(module)
        self.shapes.append(tensor.shape)
        if self.outputs is not None:
            self.outputs.add(output, self.primal_of(tensor))
        if self.record and not kwargs and all(isinstance(arg, torch.Tensor) for arg in args):
            self.specs.append(len(args))  # the common case, without a pytree
            self.tensors.extend(args)
        elif self.record:
            entry, tensors = flatten_call(args, kwargs)
            self.specs.append(entry)
            self.tensors.extend(tensors)
        if index == self.perturbed:
            return _replace_output(output, self.perturb(tensor))
        return None

    def inputs(self, tensors: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """Every call's (args, kwargs), rebuilt around ``tensors`` (the recorded leaves, unwrapped)."""
        result, cursor = [], 0
        for entry in self.specs:
            if isinstance(entry, int):
                result.append((tuple(tensors[cursor:cursor + entry]), {}))
                cursor += entry
                continue
            call, cursor = unflatten_call(entry, tensors, cursor)
            result.append(call)
        return result


@dataclass
class BlockPass:
    """One site's pass: the block's output a ``(B, *a)`` and its tangents ȧ ``(K, B, *a)``; for
    the first pass also every site call's (args, kwargs) and the BatchNorms' statistics
    ``(module, mean, var, count)``."""

    output: torch.Tensor
    output_tangents: torch.Tensor
    inputs: list | None = None
    statistics: list | None = None
    outputs: RecordedOutputs | None = None  # every site call's primal output (first pass)
    calls: list | None = None  # the site modules in call order (first pass)

    def site_output(self, position: int) -> torch.Tensor | None:
        """Site call ``position``'s output in the first pass, if unchanged since; else ``None``."""
        return None if self.outputs is None else self.outputs.get(position)


def block_jvp(block: Block, sites: dict[nn.Module, str], position: int, h: torch.Tensor, tangents: torch.Tensor,
              first: bool, chunk_size: int | None = None, fast: bool = False,
              reuse: BlockPass | None = None, keep_outputs: bool = True) -> BlockPass:
    """The block's output and its tangents along ``tangents`` ``(K, B, *z_m)`` on site call ``position``.

    ``sites``: the block's modules that own parameters, with their names. ``first``: also
    record the sites' inputs and the batch statistics. ``chunk_size``: tangents per
    ``vmap`` pass when K > 1 (``None``: all K at once). ``fast``: the fast forward mode
    (:class:`fwdgrad.core.fast_forward.FastForward`: the primal and the K tangents side by side,
    one rule per operation, no dual tensors; all K at once) instead of PyTorch's forward AD.
    ``reuse``: the block's first pass on the same input (a later pass): its batch statistics
    are taken, not computed again, and with one tangent or the fast mode its primal values
    (:mod:`fwdgrad.local.reuse`). ``keep_outputs``: a first pass keeps every site call's primal
    output for them (off for a block with one site: nothing reuses them, and they would stay alive).

    Raises:
        ValueError: the block's output does not depend on the site's output.
    """
    if fast:
        return _fast_pass(block, sites, position, h, tangents, first, reuse, keep_outputs)
    if tangents.shape[0] == 1:
        return _dual_pass(block, sites, position, h, tangents[0], first, reuse, keep_outputs)
    return _vmapped_pass(block, sites, position, h, tangents, first, chunk_size, reuse)


def _reused(reuse: BlockPass | None, sites, position, hooks: SiteHooks, carries_tangent, make_dual, tangent_of,
            lead: int) -> ReusedPrimals | None:
    if reuse is None or reuse.outputs is None or not reusable(reuse.calls):
        return None
    variances = {module: var for module, _, var, _ in reuse.statistics if is_training_batch_norm(module)}
    return ReusedPrimals(sites, reuse.outputs, position, lambda: len(hooks.calls), carries_tangent, make_dual,
                         tangent_of, lead, variances)


def _dual_carries_tangent(args, kwargs) -> bool:
    return any(isinstance(value, torch.Tensor) and forward_ad.unpack_dual(value).tangent is not None
               for value in (*args, *kwargs.values()))


def _unconnected(block: Block) -> ValueError:
    return ValueError(f"the output of block {block.name!r} does not depend on one of its modules that own "
                      "parameters (no forward-mode tangent reaches it); every such module must feed the block's output")


def _dual_pass(block, sites, position, h, tangent, first, reuse=None, keep_outputs=True) -> BlockPass:
    recorded = [] if first else None
    # a copy of the tangent: an in-place op after the site (torchvision's ReLU(inplace=True)) changes a dual
    # tensor's tangent in place, and the caller's tangents must stay what it drew
    hooks = SiteHooks(sites, position, lambda z: forward_ad.make_dual(z, tangent.to(z.dtype, copy=True)), record=first,
                      primal_of=lambda t: forward_ad.unpack_dual(t).primal, outputs=first and keep_outputs)
    with ExitStack() as stack:
        if torch.is_grad_enabled():  # the caller may have entered the region once for all blocks
            forward_mode_region(stack)
        stack.enter_context(forward_ad.dual_level())
        stack.enter_context(hooks)
        stack.enter_context(constant_batch_statistics(block.modules, recorded, reuse and reuse.statistics))
        reused = _reused(reuse, sites, position, hooks, _dual_carries_tangent, forward_ad.make_dual,
                         lambda t: forward_ad.unpack_dual(t).tangent, 0)
        if reused is not None:
            stack.enter_context(reused)
        output = block.forward(h)
        primal, output_tangent = forward_ad.unpack_dual(output)
        if output_tangent is None:
            raise _unconnected(block)
        if not first:
            return BlockPass(primal, output_tangent.unsqueeze(0))
        inputs = hooks.inputs([forward_ad.unpack_dual(t).primal for t in hooks.tensors])
        statistics = [(module, mean, var, count) for module, mean, var, count in recorded]
        return BlockPass(primal, output_tangent.unsqueeze(0), inputs, statistics, hooks.outputs, hooks.calls)


def _fast_pass(block, sites, position, h, tangents, first, reuse=None, keep_outputs=True) -> BlockPass:
    from fwdgrad.core.fast_forward import FastForward

    recorded = [] if first else None
    with ExitStack() as stack:
        if torch.is_grad_enabled():  # the caller may have entered the region once for all blocks
            forward_mode_region(stack)
        mode = stack.enter_context(FastForward(tangents.shape[0]))
        # a new tensor object carries the tangents (make_dual does not own them: no in-place change to them)
        hooks = stack.enter_context(SiteHooks(sites, position, lambda z: mode.make_dual(z.view_as(z), tangents.to(
            z.dtype)), record=first, outputs=first and keep_outputs))
        stack.enter_context(constant_batch_statistics(block.modules, recorded, reuse and reuse.statistics))
        reused = _reused(reuse, sites, position, hooks, mode.carries_tangent, mode.make_dual, mode.tangent, 1)
        if reused is not None:
            stack.enter_context(reused)
        primal, output_tangents = mode.unpack(block.forward(h))
        if output_tangents is None:
            raise _unconnected(block)
        if not first:
            return BlockPass(primal, output_tangents)
        return BlockPass(primal, output_tangents, hooks.inputs(hooks.tensors), recorded, hooks.outputs, hooks.calls)


def _vmapped_pass(block, sites, position, h, tangents, first, chunk_size, reuse=None) -> BlockPass:
    made, counts = [], []

    def make_function(is_first: bool):
        record = first and is_first
        hooks = SiteHooks(sites, position, None, record=record)
        made.append(hooks)

        def function(deltas, inputs):
            hooks.perturb = lambda z: z + deltas[0]
            recorded = [] if record else None
            with hooks, constant_batch_statistics(block.modules, recorded, reuse and reuse.statistics):
                output = block.forward(h)
            try:
                require_tangent(output, "the site")
            except ValueError as error:
                raise _unconnected(block) from error
            if not record:
                return output, ()
            counts.extend((module, count) for module, _, _, count in recorded)
            return output, (hooks.tensors, [tensor for _, mean, var, _ in recorded for tensor in (mean, var)])

        return function

    num_tangents = tangents.shape[0]
    chunk = chunk_size or num_tangents
    starts = range(0, num_tangents, chunk)
    delta = torch.zeros(tangents.shape[1:], device=tangents.device, dtype=tangents.dtype)
    output, output_tangents, aux = chunked_batched_jvp(
        eager_batched_jvp, make_function, (delta,), ([tangents[s:s + chunk]] for s in starts), len(starts),
        device=h.device,
    )
    if not first:
        return BlockPass(output, output_tangents)
    tensors, stats = aux
    statistics = [(module, mean, var, count) for (module, count), mean, var in zip(counts, stats[0::2], stats[1::2])]
    return BlockPass(output, output_tangents, made[0].inputs(tensors), statistics)


def structure_pass(block: Block, sites: dict[nn.Module, str], h: torch.Tensor) -> SiteHooks:
    """A plain pass (no tangent, batch statistics as in the passes, running statistics
    untouched) that learns which sites the block calls, in order, and their output shapes."""
    hooks = SiteHooks(sites, record=False)
    with torch.no_grad(), hooks, constant_batch_statistics(block.modules):
        block.forward(h)
    return hooks


def record_pass(block: Block, sites: dict[nn.Module, str], h: torch.Tensor) -> BlockPass:
    """A plain pass that records what a first pass does (every site's inputs, the batch statistics)
    without a tangent: for a block whose every site has a loss of its own."""
    recorded = []
    hooks = SiteHooks(sites, record=True, outputs=True)
    with torch.no_grad(), hooks, constant_batch_statistics(block.modules, recorded):
        output = block.forward(h)
    return BlockPass(output, None, hooks.inputs(hooks.tensors), recorded, hooks.outputs, hooks.calls)


def site_output(module: nn.Module, args: tuple, kwargs: dict, statistics: list | None = None) -> torch.Tensor:
    """A site module's output at its recorded input (BatchNorm with its batch statistics as constants,
    as in the passes, ``statistics`` the first pass's; nothing recorded): the input of a mixing site's
    own loss."""
    given = None if statistics is None else [entry for entry in statistics if entry[0] is module]
    with torch.no_grad(), constant_batch_statistics([module], given=given):
        return _output_tensor(type(module).__name__, module(*args, **kwargs))
