"""Perturbation sites: the outputs of chosen modules, where tangents on activities live.

Activity perturbation (:mod:`fwdgrad.activity`) and any space of activities (a block's
outputs, with local losses) perturb the outputs z_m of chosen modules m: the forward
hooks of :class:`OutputHooks` add the differentiated perturbation δ_m to z_m (jvp at
δ = 0) and record each module's input, for its local derivative
(:mod:`fwdgrad.local_derivatives`). :func:`select_modules` resolves the user's choice of
modules.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class OutputHooks:
    """Forward hooks on the perturbed modules.

    ``record`` mode (the shape probe) stores the output shapes; ``perturb`` mode adds the
    i-th perturbation δ_i to the i-th output and records the module's input (returned as
    jvp's aux output, i.e. as plain tensors).
    """

    def __init__(self, modules: dict[torch.nn.Module, str]):
        self.modules = modules
        self.handles = []
        self.shapes: list[torch.Size] = []
        self.calls: list[torch.nn.Module] = []
        self.deltas: Sequence[torch.Tensor] | None = None
        self.inputs: list[torch.Tensor] = []          # flat tensor leaves of every call's (args, kwargs)
        self.input_specs: list = []                   # (non-tensor leaves, tensor positions, treespec)

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
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.input_specs.append(([None if i in positions else leaf for i, leaf in enumerate(leaves)], positions, spec))
        self.inputs.extend(leaves[i] for i in positions)
        return _replace_output(output, tensor + self.deltas[index])

    def recorded_inputs(self, tensors: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """Rebuild every call's (args, kwargs) from the plain tensors jvp returned as aux."""
        result, cursor = [], 0
        for leaves, positions, spec in self.input_specs:
            leaves = list(leaves)
            for position in positions:
                leaves[position] = tensors[cursor]
                cursor += 1
            result.append(tree_unflatten(leaves, spec))
        return result


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
