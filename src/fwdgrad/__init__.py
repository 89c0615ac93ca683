"""fwdgrad: training and optimization with forward gradients, in true forward-mode AD.

Public API::

    fg = fwdgrad.ForwardGradient(model, num_tangents=16, aggregation="frog")
    loss = fg.backward(lambda: F.cross_entropy(model(x), y))  # fills p.grad
    optimizer.step()
"""

from fwdgrad.activity import ActivityForwardGradient
from fwdgrad.aggregation import AGGREGATIONS, aggregate, aggregate_flat, scaling_correction_factor
from fwdgrad.estimators import Backprop, ForwardGradient, cosine_similarity, forward_gradient
from fwdgrad.functions import FUNCTIONS, get_function
from fwdgrad.guesses import InputSpanForwardGradient
from fwdgrad.local import LocalForwardGradient
from fwdgrad.local_guess import LocalGuessForwardGradient
from fwdgrad.simulated import SimulatedActivityForwardGradient, SimulatedForwardGradient
from fwdgrad.tangents import SAMPLERS, sample_flat_tangents, sample_tangents

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "SAMPLERS",
    "ActivityForwardGradient",
    "Backprop",
    "FUNCTIONS",
    "InputSpanForwardGradient",
    "SimulatedActivityForwardGradient",
    "SimulatedForwardGradient",
    "ForwardGradient",
    "LocalForwardGradient",
    "LocalGuessForwardGradient",
    "aggregate",
    "aggregate_flat",
    "cosine_similarity",
    "forward_gradient",
    "get_function",
    "sample_flat_tangents",
    "sample_tangents",
    "scaling_correction_factor",
]
