"""Run a Hydra task from ``fwdgrad <experiment>`` with clean errors.

``run(task, config_name, argv, command)`` composes ``fwdgrad/conf/<config_name>.yaml``
(typed by :mod:`fwdgrad.experiments.schema`) with the overrides in ``argv`` and calls
``task(cfg)``. Bad input gets one line, ``fwdgrad <command>: error: ...``, and exit status 2,
never a traceback:

- what Hydra refuses before the task starts (an unknown option or key, a value of the
  wrong type, an output directory it cannot create): its message, condensed to one line;
- a ``UsageError`` (or ValueError / TypeError) raised by the task: its message;
- an ``OSError`` (unwritable or full output directory, a path that is a file): the
  operating system's reason and the path.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from fwdgrad.experiments import schema
from fwdgrad.experiments.errors import UsageError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
schema.register()


def one_line(message: str) -> str:
    """A (multi-line) error message as one line: its non-empty lines joined by '; '.

    A list under a header line ending in ':' (Hydra's "Available options in 'model':" and
    its tab-indented options) becomes ``header: a, b, c``. Hydra's hint about
    HYDRA_FULL_ERROR, its config search path and OmegaConf's ``object_type`` are dropped.
    """
    if "Traceback (most recent call last)" in message:
        # an exception inside Hydra (e.g. it could not create the output directory): its last line
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
        return errors[-1] if errors else lines[-1]
    parts: list[str] = []
    listing = False
    for raw in message.splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(("Set the environment variable HYDRA_FULL_ERROR", "object_type=")):
            listing = False
            continue
        if listing and raw.startswith(("\t", "  ")):
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    return "; ".join(parts)


def describe(error: BaseException) -> str:
    """The one-line message of an error the task raised."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return one_line(str(error)) or type(error).__name__


def run(task: Callable[[DictConfig], object], config_name: str, argv: list[str], command: str,
        arguments: Callable[[list[str]], list[str]] | None = None) -> int:
    """Run ``task`` on the composed config; ``arguments`` rewrites ``argv`` first (and may
    raise UsageError). Returns the exit status."""
    if arguments is not None:
        try:
            argv = arguments(argv)
        except UsageError as error:
            print(f"fwdgrad {command}: error: {describe(error)}", file=sys.stderr)
            return 2
    started = []
    real_stderr = sys.stderr
    # Hydra prints its own errors (several lines) on stderr before the task starts: keep them
    # to condense; the task's own output (progress bars, warnings) goes straight out.
    hydra_stderr = io.StringIO()

    def guarded(cfg: DictConfig):
        sys.stderr = real_stderr
        if not started:
            real_stderr.write(hydra_stderr.getvalue())  # anything Hydra said that was not an error
        started.append(True)
        try:
            return task(cfg)
        except (ValueError, TypeError, OSError) as error:
            if os.environ.get("RANK", "0") == "0":  # under torchrun: one line from rank 0, not one per process
                print(f"fwdgrad {command}: error: {describe(error)}", file=sys.stderr)
            sys.exit(2)

    app = hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)(guarded)
    saved = sys.argv
    sys.argv = [f"fwdgrad {command}", *argv]
    sys.stderr = hydra_stderr
    try:
        app()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not started:
            sys.stderr = real_stderr
            text = hydra_stderr.getvalue()
            if code == 1:
                # Hydra refused the overrides or the config (unknown option, wrong type): usage error
                print(f"fwdgrad {command}: error: {one_line(text)}", file=sys.stderr)
                return 2
            sys.stderr.write(text)
        return code
    finally:
        sys.argv = saved
        sys.stderr = real_stderr
    if not started:
        sys.stderr.write(hydra_stderr.getvalue())  # e.g. --help, --cfg job
    return 0
