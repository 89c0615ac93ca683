"""The error every command reports in one line, without a traceback (see :mod:`~fwdgrad.experiments.hydra_app`)."""


class UsageError(ValueError):
    """Bad configuration or input, reported without a traceback."""
