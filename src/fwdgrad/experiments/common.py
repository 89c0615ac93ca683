"""What every experiment shares: the ``gradient`` config group turned into an estimator.

The ``gradient`` group (``conf/gradient/{bp,fg,frog,local}.yaml``) mirrors the arguments of
:class:`fwdgrad.ForwardGradient`; ``bp`` selects :class:`fwdgrad.Backprop`, ``local``
:class:`fwdgrad.LocalForwardGradient` (local losses).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from fwdgrad import Backprop, ForwardGradient, LocalForwardGradient
from fwdgrad.core.aggregation import resolve_aggregation
from fwdgrad.core.guesses import GUESSES, InputSpanForwardGradient
from fwdgrad.core.simulated import SimulatedActivityForwardGradient, SimulatedForwardGradient
from fwdgrad.experiments.errors import UsageError
from fwdgrad.local.guess import LOCAL_GUESSES, LocalGuessForwardGradient

GRADIENTS = ("bp", "fg", "frog", "local")
# keys of the gradient group passed to ForwardGradient as they are
_ESTIMATOR_KEYS = (
    "num_tangents", "aggregation", "sampler", "normalize_tangents", "scaling_correction", "chunk_size",
    "angle", "max_length", "perturbation", "mode",
)
# keys that only activity perturbation (fwdgrad.core.activity.ActivityForwardGradient) takes
_ACTIVITY_KEYS = ("tangent_sharing", "perturbed_modules", "after_activation")
# keys of gradient=local passed to LocalForwardGradient as they are (blocks: see build_estimator)
_LOCAL_KEYS = (
    "num_tangents", "aggregation", "sampler", "normalize_tangents", "scaling_correction", "chunk_size",
    "group_size", "last_group_size", "patches", "head", "head_pool", "mixing_sites", "batch_norm", "mode",
)

# lr=auto for gradient=local: learning rates measured with fwdgrad on mnist5k (SGD, batch 64), by model: for
# local_fg of conf/compare.yaml (docs/local-losses.md) and, by an lr-search, for gradient.guess=local (docs/guesses.md)
LOCAL_LRS = {"baydin_mlp": 0.3}
# keys of gradient=local gradient.guess=local passed to LocalGuessForwardGradient (no groups or patches: the guess
# is the block-wise head loss's gradient, which the group/patch losses' gradients add up to)
_LOCAL_GUESS_KEYS = ("num_tangents", "aggregation", "sampler", "chunk_size", "head", "head_pool")


def gradient_options(gradient: DictConfig) -> dict:
    """Keyword arguments of ForwardGradient from the ``gradient`` group (not for ``bp``)."""
    name = gradient.get("name")
    if name not in GRADIENTS:
        raise UsageError(f"unknown gradient {name!r}; valid choices: {', '.join(GRADIENTS)}")
    keys = _ESTIMATOR_KEYS
    if name == "local":
        keys = _LOCAL_KEYS
    elif gradient.get("perturbation") == "activity":
        keys += _ACTIVITY_KEYS
    options = {key: gradient[key] for key in keys if gradient.get(key) is not None}
    options = OmegaConf.to_container(OmegaConf.create(options), resolve=True)
    num_tangents = options.get("num_tangents", 1)
    if not isinstance(num_tangents, int) or num_tangents < 1:
        raise UsageError(f"gradient.num_tangents must be an integer >= 1, got {num_tangents!r}")
    if "aggregation" in options:
        options["aggregation"] = resolve_aggregation(options["aggregation"])
    return options


def build_estimator(gradient: DictConfig, model: torch.nn.Module | Iterable[torch.Tensor], seed: int | None = None,
                    *, model_name: str | None = None, input_shape: tuple[int, ...] | None = None):
    """The estimator of a ``gradient`` config: ``Backprop(model)`` for ``bp``;
    ``LocalForwardGradient`` for ``local`` (blocks: ``gradient.blocks``, or the model zoo's
    split of ``model_name``; ``input_shape``: one sample's shape), with ``gradient.guess=local``
    :class:`fwdgrad.local.guess.LocalGuessForwardGradient`; with ``gradient.guess=input_span``,
    :class:`fwdgrad.core.guesses.InputSpanForwardGradient`; with ``gradient.simulated=true``, the
    labelled simulation with one backward pass (:mod:`fwdgrad.core.simulated`); else
    ``ForwardGradient(model, **options)``."""
    if gradient.get("name") == "bp":
        return Backprop(model)
    options = gradient_options(gradient)
    if gradient.get("name") == "local":
        blocks = gradient.get("blocks")
        blocks = model_name if blocks is None else OmegaConf.to_container(OmegaConf.create({"b": blocks}))["b"]
        if input_shape is None:
            raise UsageError("gradient=local needs the input shape of one sample (input_shape=...)")
        guess = gradient.get("guess")
        if guess is None:
            return LocalForwardGradient(model, blocks, input_shape, seed=seed, **options)
        if guess not in LOCAL_GUESSES:
            raise UsageError(f"unknown gradient.guess {guess!r} for gradient=local; valid choices: "
                             f"{', '.join(LOCAL_GUESSES)} (or null: local losses)")
        if options.get("scaling_correction"):
            raise UsageError("gradient.guess=local takes no gradient.scaling_correction (it rescales isotropic random "
                             "tangents; the guess is not one)")
        return LocalGuessForwardGradient(model, blocks, input_shape, seed=seed,
                                         **{key: options[key] for key in _LOCAL_GUESS_KEYS if key in options})
    guess = gradient.get("guess")
    if guess is not None:
        if guess not in GUESSES:
            raise UsageError(f"unknown gradient.guess {guess!r}; valid choices: {', '.join(GUESSES)} (or null); "
                             f"{', '.join(LOCAL_GUESSES)} goes with gradient=local")
        if options.get("perturbation", "weight") != "weight" or gradient.get("simulated"):
            raise UsageError("gradient.guess=input_span is a weight-space forward-mode estimator; it takes neither "
                             "gradient.perturbation=activity nor gradient.simulated=true")
        options.pop("perturbation", None)
        return InputSpanForwardGradient(model, seed=seed, **options)
    if gradient.get("simulated"):
        perturbation = options.pop("perturbation", "weight")
        if perturbation == "activity":
            return SimulatedActivityForwardGradient(model, seed=seed, **options)
        options.pop("mode", None)
        return SimulatedForwardGradient(model, seed=seed, **options)
    return ForwardGradient(model, seed=seed, **options)


def method_label(gradient: DictConfig) -> str:
    """Short name of a gradient config as tables and the paper write it.

    ``bp``; ``fg K=1`` (one tangent); ``fg-mean K=16`` (other aggregations by name:
    ``fg-max K=4``); ``frog K=16``; activity perturbation appends `` (activity)``; local
    losses: :func:`local_label`.
    """
    if gradient.get("name") == "bp":
        return "bp"
    options = gradient_options(gradient)
    if gradient.get("name") == "local":
        return local_label(options, gradient.get("guess"))
    num_tangents = options.get("num_tangents", 1)
    aggregation = options.get("aggregation", "mean")
    if aggregation == "orthogonal_projection":
        label = f"frog K={num_tangents}"
    elif num_tangents == 1 and aggregation == "mean":
        label = "fg K=1"
    else:
        label = f"fg-{aggregation} K={num_tangents}"
    if options.get("perturbation", "weight") == "activity":
        label += " (activity)"
    if gradient.get("simulated"):
        label += " (simulated: backprop)"
    if gradient.get("guess") == "input_span":
        label += " (input-span guesses)"
    return label


def local_label(options: dict, guess: str | None = None) -> str:
    """``local fg K=1 (groups of 4)``; other aggregations by name (``local frog K=4``), ``block-wise``
    without groups, `` x 2x2 patches`` with patches; the local guess: ``local guess K=1``,
    ``local guess + 3 random, frog K=4``."""
    num_tangents = options.get("num_tangents", 1)
    aggregation = options.get("aggregation", "mean")
    kind = {"orthogonal_projection": "frog", "mean": "fg"}.get(aggregation, f"fg-{aggregation}")
    if guess is not None:
        if num_tangents == 1:
            return "local guess K=1"
        return f"local guess + {num_tangents - 1} random, {kind} K={num_tangents}"
    group_size = options.get("group_size", 4)
    groups = "block-wise" if group_size is None else f"groups of {group_size}"
    patches = options.get("patches", 1)
    details = [groups] + ([f"{patches}x{patches} patches"] if patches > 1 else [])
    head = options.get("head", "linear")
    if head != "linear":
        pool = options.get("head_pool", 2)
        details.append(f"{head} heads {pool}x{pool}")
    mixing = options.get("mixing_sites", "own_loss")
    if mixing != "own_loss":
        details.append({"guess": "mixing sites: block loss along a guess",
                        "block_loss": "mixing sites on the block loss"}.get(mixing, mixing))
    if options.get("batch_norm", "differentiated") != "differentiated":
        details.append("BatchNorm statistics constant")
    return f"local {kind} K={num_tangents} ({', '.join(details)})"
