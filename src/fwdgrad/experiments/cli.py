"""The ``fwdgrad`` command: ``fwdgrad <experiment> [hydra overrides]``.

Each experiment lives in ``fwdgrad.experiments.<module>`` and exposes
``main(argv: list[str]) -> int``; its Hydra config is ``fwdgrad/conf/<config>.yaml``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module under fwdgrad.experiments, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "a 30-second forward-gradient demo: backprop vs forward gradients on a small MLP"),
    "optimize": ("optimize", "gradient descent on closed-form functions with bp / fg / frog"),
    "approx": ("approx", "approximation quality (cosine, norm ratio) of every aggregation and sampler"),
    "train": ("train", "train a network with bp / fg / frog (checkpoints, resume, metrics)"),
    "compare": ("compare", "train one model with several gradients side by side: the main job"),
    "lr-search": ("lr_search", "learning-rate search with Optuna (resumable, shareable storage)"),
    "bench": ("bench", "time and peak memory per training step, every method vs backprop"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: fwdgrad <experiment> [key=value ...] [-m] [--help]",
        "",
        "Train and optimize with forward gradients (true forward-mode AD, no backward pass).",
        "",
        "experiments:",
    ]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in SUBCOMMANDS.items()]
    lines += [
        "",
        "Every experiment is a Hydra app: `fwdgrad <experiment> --help` lists its options,",
        "key=value overrides any of them, -m sweeps comma-separated values (multirun).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fwdgrad: unknown experiment {name!r}; valid choices: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fwdgrad.experiments.{SUBCOMMANDS[name][0]}")
    return int(module.main(rest) or 0)


def exit_process(code: int) -> None:
    """End the process with ``code``; a torchrun worker skips the interpreter's teardown.

    By then a worker's results are written, its TensorBoard writer closed and its process
    group destroyed (after a barrier). Tearing down the interpreter after a gloo run now and
    then aborts the process in C++ ("terminate called without an active exception", SIGABRT,
    no Python frame; 4 of 32 two-process activity-mode `fwdgrad train` runs here), and torchrun then reports the whole
    launch as failed. ``os._exit`` after flushing the streams skips that teardown.
    """
    from fwdgrad.distributed.run import launch_environment

    if launch_environment() is None:
        sys.exit(code)
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
