"""The ``fwdgrad`` commands: thin Hydra entry points over the library, one module per command.

``fwdgrad <command>`` (:mod:`~fwdgrad.experiments.cli`) runs ``fwdgrad.experiments.<command>.main``
with the Hydra config ``fwdgrad/conf/<command>.yaml``; the typed schema of every config is in
:mod:`~fwdgrad.experiments.schema`. Plotting, Hydra, OmegaConf and Optuna live here and only here.

May import: anything. Nothing in the library imports this package (only ``python -m fwdgrad``).
"""
