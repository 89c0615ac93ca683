"""Perturbation sites: the outputs of chosen modules, where tangents on activities live.

Activity perturbation (:mod:`fwdgrad.core.activity`) and any space of activities (a block's
outputs, with local losses) perturb the outputs z_m of chosen modules m: the forward
hooks of :class:`OutputHooks` add the differentiated perturbation δ_m to z_m (jvp at
δ = 0) and record each module's input, for its local derivative
(:mod:`fwdgrad.core.layer_derivatives`). :func:`select_modules` resolves the user's choice of
modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class SitesChanged(Exception):
    """The forward pass produced outputs of other shapes than the probe recorded."""


def _output_tensor(module_name: str, output) -> torch.Tensor:
    tensor = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(
            f"activity perturbation needs a floating-point tensor output (or a tuple whose first element is "
            f"one) from perturbed module {module_name!r}, got {type(tensor).__name__}; leave it out of "
            "perturbed_modules"
        )
    return tensor


def _replace_output(output, tensor: torch.Tensor):
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


def flatten_call(args, kwargs) -> tuple[tuple, list[torch.Tensor]]:
    """A call's (args, kwargs) as (non-tensor leaves, tensor positions, treespec) and its tensors."""
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    return ([None if i in positions else leaf for i, leaf in enumerate(leaves)], positions, spec), \
        [leaves[i] for i in positions]


def unflatten_call(entry: tuple, tensors: Sequence[torch.Tensor], cursor: int) -> tuple[tuple, int]:
    """The (args, kwargs) of :func:`flatten_call`'s ``entry`` around ``tensors[cursor:]``; the next cursor."""
    leaves, positions, spec = entry
    leaves = list(leaves)
    for position in positions:
        leaves[position] = tensors[cursor]
        cursor += 1
    return tree_unflatten(leaves, spec), cursor


class _InputRecord:
    """The (args, kwargs) of module calls as a flat list of tensors (what jvp can return as aux)
    plus what is needed to rebuild them."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []          # flat tensor leaves of every call's (args, kwargs)
        self.input_specs: list = []                   # (non-tensor leaves, tensor positions, treespec)

    def record(self, args, kwargs) -> None:
        entry, tensors = flatten_call(args, kwargs)
        self.input_specs.append(entry)
        self.inputs.extend(tensors)

    def recorded_inputs(self, tensors: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """Rebuild every call's (args, kwargs) from the plain tensors jvp returned as aux."""
        result, cursor = [], 0
        for entry in self.input_specs:
            call, cursor = unflatten_call(entry, tensors, cursor)
            result.append(call)
        return result


class InputHooks(_InputRecord):
    """Forward hooks that record the inputs and output shapes of ``modules`` (in call order),
    changing nothing."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        super().__init__()
        self.modules = list(modules)
        self.handles = []
        self.calls: list[torch.nn.Module] = []
        self.output_shapes: list[torch.Size] = []

    def __enter__(self):
        for module in self.modules:
            self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._output_hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module, args, kwargs):
        self.calls.append(module)
        self.record(args, kwargs)

    def _output_hook(self, module, args, output):
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        self.output_shapes.append(tensor.shape if isinstance(tensor, torch.Tensor) else None)


class OutputHooks(_InputRecord):
    """Forward hooks on the perturbed modules.

    ``record`` mode (the shape probe) stores the output shapes; ``perturb`` mode adds the
    i-th perturbation δ_i to the i-th output and records the module's input (returned as
    jvp's aux output, i.e. as plain tensors).
    """

    def __init__(self, modules: dict[torch.nn.Module, str]):
        super().__init__()
        self.modules = modules
        self.handles = []
        self.shapes: list[torch.Size] = []
        self.calls: list[torch.nn.Module] = []
        self.deltas: Sequence[torch.Tensor] | None = None

    def __enter__(self):
        for module in self.modules:
            self.handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module, args, kwargs, output):
        tensor = _output_tensor(self.modules[module], output)
        index = len(self.calls)
        self.calls.append(module)
        if self.deltas is None:
            self.shapes.append(tensor.shape)
            return None
        if index >= len(self.deltas) or self.deltas[index].shape != tensor.shape:
            raise SitesChanged
        self.record(args, kwargs)
        return _replace_output(output, tensor + self.deltas[index])


# elementwise activations: a tangent placed after one of them maps back to the output of the
# module before it by σ'(z) (one elementwise derivative, computed in forward mode)
ELEMENTWISE_ACTIVATIONS = (
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU, torch.nn.CELU, torch.nn.GELU,
    torch.nn.SiLU, torch.nn.Mish, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Softplus, torch.nn.Hardtanh,
    torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.LogSigmoid, torch.nn.Softsign, torch.nn.Tanhshrink,
)


def following_activations(model: torch.nn.Module, modules: Iterable[torch.nn.Module], run: Callable[[], object]
                          ) -> dict[torch.nn.Module, torch.nn.Module]:
    """{module: the elementwise activation module that takes its output, unchanged, as input},
    found by running ``run()`` (a plain forward pass) once. Modules whose output goes
    elsewhere first, or is changed in place before the activation (a residual ``+=``), are
    left out."""
    pending = _PendingOutputs()
    pairs: dict[torch.nn.Module, torch.nn.Module] = {}
    activations = [m for m in model.modules() if isinstance(m, ELEMENTWISE_ACTIVATIONS)]

    def before(activation, args):
        taken = pending.take(args)
        if taken is not None:
            pairs.setdefault(taken[0], activation)

    handles = [m.register_forward_hook(lambda module, args, output: pending.put(module, output)) for m in modules]
    handles += [a.register_forward_pre_hook(before) for a in activations]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return pairs


class _PendingOutputs:
    """Outputs of watched modules, to recognize one (the same tensor, not modified in place
    since) as the input of a later call; each carries a payload (e.g. the module's inputs)."""

    def __init__(self):
        self.outputs: dict[int, tuple[torch.nn.Module, torch.Tensor, int, object]] = {}

    def put(self, module: torch.nn.Module, output, payload: object = None) -> None:
        if isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (module, output, output._version, payload)

    def take(self, args) -> tuple[torch.nn.Module, object] | None:
        """(module, payload) if ``args[0]`` is a pending output, unchanged; it is then no longer pending."""
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        entry = self.outputs.get(id(tensor)) if tensor is not None else None
        if entry is None or entry[1] is not tensor or entry[2] != tensor._version:
            return None
        del self.outputs[id(tensor)]
        return entry[0], entry[3]


class ActivationSiteHooks(_InputRecord):
    """Tangents after the activation: the perturbation of module m's call goes on the output of
    the activation ``pairs[m]`` that takes m's output (a = σ(z) + δ), or on m's own output when
    m has no such activation. Records m's inputs (its local derivative) and, per site, the
    activation and its input z (the factor σ'(z) that maps ĝ_a back to ĝ_z).

    After the pass: ``calls`` (m per site, in site order), m's inputs via
    :meth:`recorded_inputs`, ``activations`` (σ module or None per site) and the flat
    tensors ``activation_inputs`` (one z per activation site).
    """

    def __init__(self, modules: dict[torch.nn.Module, str], pairs: dict[torch.nn.Module, torch.nn.Module]):
        super().__init__()
        self.modules, self.pairs = modules, pairs
        self.deltas: Sequence[torch.Tensor] | None = None
        self.handles = []
        self.calls: list[torch.nn.Module] = []
        self.activations: list[torch.nn.Module | None] = []
        self.activation_inputs: list[torch.Tensor] = []
        self.shapes: list[torch.Size] = []
        self._pending = _PendingOutputs()

    def __enter__(self):
        for module in self.modules:
            self.handles.append(module.register_forward_hook(self._module_hook, with_kwargs=True))
        for activation in set(self.pairs.values()):
            self.handles.append(activation.register_forward_hook(self._activation_hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _perturb(self, owner, args, kwargs, tensor, activation, z):
        index = len(self.calls)
        self.calls.append(owner)
        self.activations.append(activation)
        if z is not None:
            self.activation_inputs.append(z)
        self.record(args, kwargs)
        if self.deltas is None:
            self.shapes.append(tensor.shape)
            return tensor
        if index >= len(self.deltas) or self.deltas[index].shape != tensor.shape:
            raise SitesChanged
        return tensor + self.deltas[index]

    def _module_hook(self, module, args, kwargs, output):
        tensor = _output_tensor(self.modules[module], output)
        if module in self.pairs:
            self._pending.put(module, tensor, (args, kwargs))  # perturbed after its activation
            return None
        return _replace_output(output, self._perturb(module, args, kwargs, tensor, None, None))

    def _activation_hook(self, activation, args, output):
        taken = self._pending.take(args)
        if taken is None or self.pairs.get(taken[0]) is not activation:
            return None
        owner, (owner_args, owner_kwargs) = taken
        return self._perturb(owner, owner_args, owner_kwargs, output, activation, args[0])


def select_modules(model: torch.nn.Module, perturbed_modules) -> dict[torch.nn.Module, str]:
    """Resolve ``perturbed_modules`` to {module: name}, in ``named_modules`` order."""
    named = dict(model.named_modules())
    owners = {
        name: module for name, module in named.items()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    if perturbed_modules is None:
        selected = owners
    else:
        if isinstance(perturbed_modules, (str, type)):
            perturbed_modules = [perturbed_modules]
        selected = {}
        for entry in perturbed_modules:
            if isinstance(entry, str) and entry not in owners:
                # a config can only name types as strings: "Linear" / "nn.Linear" / "torch.nn.Linear"
                by_type = {type(m).__name__: type(m) for m in owners.values()}
                entry = by_type.get(entry.rsplit(".", 1)[-1], entry)
            if isinstance(entry, str):
                if entry not in owners:
                    raise ValueError(
                        f"perturbed_modules: {entry!r} is not a module of the model that owns trainable "
                        f"parameters nor the type name of one; valid names: {', '.join(owners) or '(none)'}; "
                        f"types: {', '.join(sorted({type(m).__name__ for m in owners.values()}))}"
                    )
                selected[entry] = owners[entry]
            elif isinstance(entry, type) and issubclass(entry, torch.nn.Module):
                matches = {name: m for name, m in owners.items() if isinstance(m, entry)}
                if not matches:
                    kinds = sorted({type(m).__name__ for m in owners.values()})
                    raise ValueError(
                        f"perturbed_modules: no module of type {entry.__name__} owns trainable parameters; "
                        f"types present: {', '.join(kinds)}"
                    )
                selected.update(matches)
            else:
                raise TypeError(
                    f"perturbed_modules entries must be module names (str) or nn.Module subclasses, got {entry!r}"
                )
        selected = {name: owners[name] for name in owners if name in selected}
    if not selected:
        raise ValueError("activity perturbation found no module that owns trainable parameters")
    def contains_others(name: str) -> bool:
        prefix = f"{name}." if name else ""
        return any(other != name and other.startswith(prefix) for other in selected)

    containers = [name for name in selected if contains_others(name)]
    if containers:
        # their local derivative would run through the layers inside them: not a local update
        described = ", ".join(
            f"{name or '(the model itself)'!r} ({type(selected[name]).__name__}, owns "
            f"{', '.join(n for n, _ in selected[name].named_parameters(recurse=False))})"
            for name in containers
        )
        leaves = [name for name in selected if name not in containers]
        raise ValueError(
            f"perturbed modules that own parameters and contain other perturbed modules: {described}. The derivative "
            "of their output with respect to their own parameters would run through other layers. Options: leave "
            f"them out, e.g. perturbed_modules={leaves!r} (their own parameters then get no gradient); perturb them "
            "and not the modules inside them; or use weight perturbation (perturbation='weight')"
        )
    return {module: name for name, module in selected.items()}


def site_activations(hooks, activation_inputs: Sequence[torch.Tensor]) -> list:
    """Per site: (σ, z) for a tangent placed after the activation σ(z), else None."""
    activations = getattr(hooks, "activations", None) or [None] * len(hooks.calls)
    inputs = iter(activation_inputs)
    return [None if activation is None else (activation, next(inputs)) for activation in activations]


def through_activation(activation: torch.nn.Module, z: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ĝ_z = σ'(z) ⊙ ĝ_a for an elementwise activation a = σ(z): σ'(z) is the forward-mode
    derivative of σ at z along ones (elementwise, so that is the diagonal of its Jacobian)."""
    with torch.no_grad():
        _, slope = torch.func.jvp(activation, (z,), (torch.ones_like(z),))
    return slope.to(gradient.dtype) * gradient
