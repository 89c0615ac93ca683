"""``python -m fwdgrad <experiment>`` (and ``torchrun ... -m fwdgrad <experiment>``): the ``fwdgrad`` command."""

import sys

from fwdgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
