"""The import paths of fwdgrad's flat layout (before 0.2), kept working.

``import fwdgrad.models`` (or ``from fwdgrad.local import LocalForwardGradient``, ...) gives
the module that now holds that code, itself, not a copy: ``fwdgrad.models is
fwdgrad.train.models``, so attributes set on one (``monkeypatch``) are seen through the other.
An old module that was split points at the module of its main concept, which imports the
names of the parts split off (e.g. ``fwdgrad.training.load_checkpoint``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module (under fwdgrad) -> its module in the layout of packages
MOVED: dict[str, str] = {
    "tangents": "fwdgrad.core.tangents",
    "aggregation": "fwdgrad.core.aggregation",
    "forward_mode": "fwdgrad.core.forward_mode",
    "execution": "fwdgrad.core.execution",
    "factored": "fwdgrad.core.factored",
    "regenerated": "fwdgrad.core.regenerated",
    "parameter_substitution": "fwdgrad.core.parameter_substitution",
    "perturbation_sites": "fwdgrad.core.perturbation_sites",
    "base": "fwdgrad.core.base",
    "weight": "fwdgrad.core.weight",
    "activity": "fwdgrad.core.activity",
    "simulated": "fwdgrad.core.simulated",
    "guesses": "fwdgrad.core.guesses",
    "estimators": "fwdgrad.core.estimators",
    "local_derivatives": "fwdgrad.core.layer_derivatives",
    "local_blocks": "fwdgrad.local.blocks",
    "local_losses": "fwdgrad.local.losses",
    "local_execution": "fwdgrad.local.execution",
    "local_guess": "fwdgrad.local.guess",
    "collectives": "fwdgrad.distributed.collectives",
    "distributed_run": "fwdgrad.distributed.run",
    "distributed_benchmark": "fwdgrad.bench.distributed",
    "benchmark": "fwdgrad.bench.benchmark",
    "training": "fwdgrad.train.trainer",
    "data": "fwdgrad.train.data",
    "models": "fwdgrad.train.models",
    "atomic": "fwdgrad.train.atomic",
    "profiling": "fwdgrad.train.profiling",
    "reference_lrs": "fwdgrad.train.reference_lrs",
    "functions": "fwdgrad.studies",  # the package: functions and descent
    "cli": "fwdgrad.experiments.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``fwdgrad.<old name>`` and loads it as the module that holds the code now."""

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "fwdgrad" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name.rpartition(".")[2]])
        self._specs[spec.name] = module.__spec__  # the import system overwrites it next
        return module

    def exec_module(self, module) -> None:
        # the module ran when it was first imported under its own name; give it its own spec back
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the path finders: real modules win)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
