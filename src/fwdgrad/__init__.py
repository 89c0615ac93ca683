"""fwdgrad: training and optimization with forward gradients, in true forward-mode AD.

The library is four packages, each importing only torch and the packages before it:
:mod:`fwdgrad.core` (tangents, aggregations, forward-mode execution, the weight / activity
estimators), :mod:`fwdgrad.local` (local losses), :mod:`fwdgrad.distributed` (torch.distributed),
:mod:`fwdgrad.train` (Trainer, data, models, checkpoints); :mod:`fwdgrad.bench` and
:mod:`fwdgrad.studies` measure and study them; :mod:`fwdgrad.experiments` holds the commands.

Public API::

    fg = fwdgrad.ForwardGradient(model, num_tangents=16, aggregation="frog")
    loss = fg.backward(lambda: F.cross_entropy(model(x), y))  # fills p.grad
    optimizer.step()
"""

from fwdgrad import _moved

_moved.install()  # the import paths of the flat layout (fwdgrad.models, fwdgrad.local_blocks, ...) keep working

from fwdgrad.core.activity import ActivityForwardGradient  # noqa: E402
from fwdgrad.core.aggregation import AGGREGATIONS, aggregate, aggregate_flat, scaling_correction_factor  # noqa: E402
from fwdgrad.core.estimators import Backprop, ForwardGradient, cosine_similarity, forward_gradient  # noqa: E402
from fwdgrad.core.guesses import InputSpanForwardGradient  # noqa: E402
from fwdgrad.core.simulated import SimulatedActivityForwardGradient, SimulatedForwardGradient  # noqa: E402
from fwdgrad.core.tangents import SAMPLERS, sample_flat_tangents, sample_tangents  # noqa: E402
from fwdgrad.local import LocalForwardGradient, LocalGuessForwardGradient  # noqa: E402
from fwdgrad.studies.functions import FUNCTIONS, get_function  # noqa: E402

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
