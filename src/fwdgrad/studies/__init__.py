"""The closed-form studies: test functions with known gradients and gradient descent on them.

The functions of both papers (sphere, Rosenbrock, Styblinski-Tang, Beale, ...;
:mod:`~fwdgrad.studies.functions`) and batched descent on them with exact or forward-gradient
estimates (:mod:`~fwdgrad.studies.descent`).

May import: torch, fwdgrad.core.
"""

from fwdgrad.studies.descent import (
    DescentResult,
    GradientSpec,
    aggregate_batched,
    directional_derivatives,
    gradient_descent,
    gradient_estimate,
    repeat_start,
)
from fwdgrad.studies.functions import (
    FUNCTIONS,
    STYBLINSKI_TANG_MINIMIZER,
    STYBLINSKI_TANG_MINIMUM_PER_DIM,
    TestFunction,
    get_function,
)

# what fwdgrad.functions held before gradient descent moved to its own module
__all__ = [
    "FUNCTIONS", "STYBLINSKI_TANG_MINIMIZER", "STYBLINSKI_TANG_MINIMUM_PER_DIM", "DescentResult", "GradientSpec",
    "TestFunction", "aggregate_batched", "directional_derivatives", "get_function", "gradient_descent",
    "gradient_estimate", "repeat_start",
]
