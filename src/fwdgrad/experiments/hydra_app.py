"""Run a Hydra task from ``fwdgrad <experiment>`` with clean errors.

``run(task, config_name, argv, command)`` composes ``fwdgrad/conf/<config_name>.yaml``
with the overrides in ``argv`` and calls ``task(cfg)``. A ``UsageError`` (or ValueError /
TypeError / FileNotFoundError) raised by the task is printed as one line,
``fwdgrad <command>: error: ...``, and the process exits with status 2: bad input gets a
message, not a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class UsageError(ValueError):
    """Bad configuration or input, reported without a traceback."""


def run(task: Callable[[DictConfig], object], config_name: str, argv: list[str], command: str) -> int:
    started = []

    def guarded(cfg: DictConfig):
        started.append(True)
        try:
            return task(cfg)
        except (UsageError, ValueError, TypeError, FileNotFoundError) as error:
            print(f"fwdgrad {command}: error: {error}", file=sys.stderr)
            sys.exit(2)

    app = hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)(guarded)
    saved = sys.argv
    sys.argv = [f"fwdgrad {command}", *argv]
    try:
        app()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        # Hydra reports a bad override or an unknown config group option (with the valid
        # options) and exits 1 before the task starts: that is a usage error, status 2
        return 2 if code == 1 and not started else code
    finally:
        sys.argv = saved
    return 0
