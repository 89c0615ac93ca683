"""Learning rates found by the multi-tangent paper's search, shipped with the package.

Source: Flügel et al. 2024, "Beyond Backpropagation: Optimization with Multi-Tangent
Forward Gradients" (arXiv 2410.17764), public repository Helmholtz-AI-Energy/frog (MIT
licence), directory ``lrs/``, commit 7beb8cb (29 Jan 2025); see
``fwdgrad/train/reference_lrs/README.md``. All were found for plain SGD without momentum.

Tables: ``math`` (sphere / rosenbrock / styblinski-tang × n × approach × k),
``math__custom_tangents`` (styblinski-tang, n = 64, fixed-angle tangents),
``fc_nns`` (FC nets of width 256/1024/4096 on MNIST), ``sota_nns`` (ResNet18, ViT on
MNIST and CIFAR-10). ``gradient_approach`` is ``bp``, ``fg-mean`` or ``frog``.
"""

from __future__ import annotations

import csv
import functools
import os

TABLES = ("math", "math__custom_tangents", "fc_nns", "sota_nns")
_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_lrs")


@functools.cache
def load_table(table: str) -> tuple[dict[str, str], ...]:
    """All rows of one table as dicts of strings."""
    if table not in TABLES:
        raise ValueError(f"unknown learning-rate table {table!r}; valid choices: {', '.join(TABLES)}")
    with open(os.path.join(_DIR, f"{table}.csv"), newline="") as file:
        return tuple(csv.DictReader(file))


def _same(value: str, wanted) -> bool:
    if wanted is None:
        return value == ""
    try:
        return float(value) == float(wanted)
    except ValueError:
        return value == str(wanted)


def gradient_approach(gradient: str, aggregation: str = "mean") -> str:
    """The table's name for a method: ``bp``; ``frog`` (orthogonal projection); ``fg-mean``."""
    if gradient == "bp":
        return "bp"
    if gradient == "frog" or aggregation in ("frog", "orthogonal_projection"):
        return "frog"
    if aggregation == "mean":
        return "fg-mean"
    raise LookupError(
        f"the paper's tables have learning rates for bp, fg with mean aggregation and frog, not {aggregation!r}"
    )


def reference_lr(table: str, **criteria) -> float:
    """The learning rate of the row matching every ``column=value`` criterion.

    Numbers compare numerically (``k=16`` matches ``16.0``); ``k=None`` matches the empty
    k of ``bp`` rows. Raises ``LookupError`` naming the criteria and the available values.

    Example: ``reference_lr("math", function="sphere", n=64, gradient_approach="frog", k=16)``.
    """
    rows = load_table(table)
    matches = [row for row in rows if all(_same(row[key], value) for key, value in criteria.items())]
    if not matches:
        available = {key: sorted({row[key] for row in rows if key in row}) for key in criteria}
        raise LookupError(
            f"no learning rate in table {table!r} for {criteria}; available values: {available}. "
            "Pass an explicit lr instead."
        )
    return float(matches[0]["lr"])
