"""``python -m fwdgrad <experiment>`` (and ``torchrun ... -m fwdgrad <experiment>``): the ``fwdgrad`` command."""

from fwdgrad.experiments.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
