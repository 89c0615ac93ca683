"""Forward-mode machinery every perturbation space shares (weights, activities, ...).

- :func:`batched_jvp`: the K Jacobian-vector products of a function in one pass,
  ``vmap`` over ``torch.func.jvp``, the primal computed once.
- :func:`forward_mode_region`: what every forward-mode pass runs under (no autograd graph,
  the attention backend with a forward-mode rule, readable errors for missing rules).
- checks that turn silent failures into errors: a loss without a tangent
  (:func:`require_tangent`), non-finite losses, directional derivatives and updates.
- RNG-state helpers (a pass split into chunks replays the same dropout masks) and
  ``.grad`` accumulation as autograd does it.

Nothing here knows where the tangents live; the estimators (:mod:`fwdgrad.core.weight`,
:mod:`fwdgrad.core.activity`) import it, never the reverse.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import jvp, vmap
from torch.utils._pytree import tree_map_only

from fwdgrad.core.dual import active_tangent

Closure = Callable[[], torch.Tensor]

# torch registers its forward-AD decompositions with torch.jit.script on the first jvp and
# warns that TorchScript is deprecated; do that registration now, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401


# ---- parameters and .grad -------------------------------------------------------------


def collect_parameters(model: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct tensors with ``requires_grad=True`` of a module or an iterable."""
    candidates = model.parameters() if isinstance(model, torch.nn.Module) else model
    parameters, seen = [], set()
    for tensor in candidates:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"expected an nn.Module or an iterable of tensors, got an element of type {type(tensor).__name__}"
            )
        if tensor.requires_grad and id(tensor) not in seen:
            seen.add(id(tensor))
            parameters.append(tensor)
    if not parameters:
        raise ValueError("no trainable parameters: the model has no tensor with requires_grad=True")
    return parameters


def accumulate_grad(parameter: torch.Tensor, update: torch.Tensor, owned: bool = False) -> None:
    """p.grad += update, creating it when absent: what autograd does.

    ``owned``: the update is a fresh tensor nobody else holds, so it becomes ``.grad``
    without a copy.
    """
    if parameter.grad is None:
        update = update.detach().to(parameter.dtype)
        parameter.grad = update if owned else update.clone()
    else:
        parameter.grad.add_(update.to(parameter.grad.dtype))


# ---- the loss and the checks ----------------------------------------------------------


def scalar_loss(loss: object) -> torch.Tensor:
    """The closure's loss as a tensor of shape ``()``; a clear error for anything else."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the closure must return the loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
            "reduce it (e.g. .mean()) first"
        )
    return loss.reshape(())


def require_tangent(loss: torch.Tensor, differentiated: str, used: bool = True) -> None:
    """Raise unless ``loss`` carries a forward-mode tangent (call it inside the jvp'ed function).

    Without this, ``torch.func.jvp`` returns a zero derivative for an output that is not
    connected to the differentiated inputs (a ``.detach()``-ed or integer loss), and the
    estimator would silently write a zero ``.grad``. Inside ``jvp`` (also under ``vmap``
    and ``torch.compile``) a connected output is a dual tensor of the current forward-AD
    level: ``unpack_dual`` gives its tangent, ``None`` for an unconnected one (the test
    ``jvp(..., strict=True)`` makes, with our message). In the fast mode
    (:mod:`fwdgrad.core.fast_forward`) a connected output has tangents in the active mode's
    table. A connected loss whose derivative happens to be zero has a (zero) tangent and passes.

    Args:
        loss: the loss (or per-sample losses) the closure returned.
        differentiated: what the tangents live on, for the message ("the trainable parameters").
        used: whether the closure touched the differentiated inputs at all (if not, that is
            the error to report).
    """
    if not loss.is_floating_point():
        raise ValueError(
            f"the closure's loss has dtype {loss.dtype}; a forward gradient needs a floating-point loss "
            "(a comparison, a count or an argmax has no derivative): compute it with differentiable "
            "operations, e.g. F.cross_entropy(model(x), y)"
        )
    if forward_ad.unpack_dual(loss).tangent is not None or active_tangent(loss) is not None:
        return
    if not used:
        raise ValueError(
            "the closure never used the parameters given to ForwardGradient; it must compute the loss "
            "from them (e.g. by calling the model they belong to)"
        )
    raise ValueError(
        f"the closure's loss has no forward-mode tangent: it is not connected to {differentiated} (e.g. it was "
        "computed from .detach()-ed tensors, .item() or .data), so every directional derivative would be a "
        "silent zero. Compute the loss from the model's output without detaching it"
    )


def check_finite(loss: torch.Tensor, directional_derivatives: torch.Tensor) -> None:
    """RuntimeError if the loss or a directional derivative is NaN or infinite.

    The message stays one short line however many are bad: their count, the first three
    with their index (``tangent k``, or ``(tangent k, sample b)`` for per-sample ones).
    """
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is not finite ({loss.item()}); lower the learning rate or check the inputs")
    finite = torch.isfinite(directional_derivatives)
    if not finite.all():
        bad = (~finite).nonzero().tolist()
        axes = "tangent" if directional_derivatives.dim() <= 1 else "(tangent, sample)"
        shown = ", ".join(f"{index[0] if len(index) == 1 else tuple(index)}: "
                          f"{directional_derivatives[tuple(index)].item()}" for index in bad[:3])
        more = f", and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RuntimeError(
            f"{len(bad)} of {directional_derivatives.numel()} directional derivatives are not finite ({axes} "
            f"{shown}{more}); the loss is {loss.item():.6g}; lower the learning rate or check the inputs"
        )


def check_finite_coefficients(coefficients: torch.Tensor, aggregation: str, directional_derivatives) -> None:
    """RuntimeError if the aggregation's coefficients c are not all finite.

    For an update g = V^T c with finite tangents V (every sampler draws finite ones) this is
    the whole check of g, on K numbers instead of n: call it before g reaches ``.grad``.
    """
    if not torch.isfinite(coefficients).all():
        raise RuntimeError(
            f"aggregation {aggregation!r} produced non-finite coefficients c = {coefficients.flatten().tolist()} "
            f"from the finite directional derivatives d = {directional_derivatives.flatten().tolist()} "
            "(e.g. a zero tangent for max_normalized/mean_of_top_k/orthogonal_projection); .grad is unchanged"
        )


def check_finite_updates(updates: Sequence[torch.Tensor], aggregation: str, what: str) -> None:
    """RuntimeError if any of the updates (not of the form V^T c with known c) is not finite."""
    for index, update in enumerate(updates):
        if not torch.isfinite(update).all():
            raise RuntimeError(
                f"aggregation {aggregation!r} produced a non-finite {what} (number {index}, "
                f"{int((~torch.isfinite(update)).sum())} of {update.numel()} entries); .grad is unchanged"
            )


# ---- the region a forward-mode pass runs in -------------------------------------------

_NO_RULE = re.compile(r"forward AD with (\S+) that does not support it")


@contextmanager
def explain_missing_forward_rules():
    """Turn torch's NotImplementedError for an operator without a jvp rule into advice."""
    try:
        yield
    except NotImplementedError as error:
        match = _NO_RULE.search(str(error))
        if match is None:
            raise
        raise RuntimeError(
            f"operator {match.group(1)!r} has no forward-mode AD rule in torch {torch.__version__}, so a "
            "forward gradient cannot pass through it. Replace it by operations that have one, wrap it in a "
            "torch.autograd.Function with a jvp staticmethod, or use fwdgrad.Backprop for this model."
        ) from error


def math_attention():
    """Select scaled_dot_product_attention's math backend: the others lack forward-mode rules."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def forward_mode_region(stack: ExitStack) -> None:
    """Enter, on ``stack``: no autograd graph (pytorch 151782), math attention, rule errors explained."""
    stack.enter_context(torch.no_grad())
    stack.enter_context(math_attention())
    stack.enter_context(explain_missing_forward_rules())


# ---- RNG state ------------------------------------------------------------------------


def rng_state(device: torch.device):
    """torch's global RNG state (CPU, and the device's on CUDA): to replay a pass's randomness."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        return state, torch.cuda.get_rng_state(device)
    return state, None


def same_rng_state(state, other) -> bool:
    """Are two :func:`rng_state` results the same state?"""
    return torch.equal(state[0], other[0]) and (state[1] is None) == (other[1] is None) and (
        state[1] is None or torch.equal(state[1], other[1]))


def set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ---- the batched jvp ------------------------------------------------------------------


def batched_jvp(
    function: Callable,
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    has_aux: bool = False,
):
    """All K Jacobian-vector products of ``function`` at ``primals`` in one pass.

    ``vmap`` over ``jvp`` with ``randomness="same"`` (one dropout mask for all tangents);
    K = 1 is a plain ``jvp``.

    Args:
        function: maps ``len(primals)`` tensors to a tensor (and aux, if ``has_aux``).
        primals: the point, tensors of shapes ``shape_i``.
        tangents: tensors of shapes ``(K, *shape_i)``.

    Returns:
        ``(value, directional_derivatives[, aux])``; the value and aux are those of the
        primal (K-independent), the directional derivatives have shape ``(K, *out_shape)``.
    """
    num_tangents = tangents[0].shape[0]
    if num_tangents == 1:
        result = jvp(function, tuple(primals), tuple(t[0] for t in tangents), has_aux=has_aux)
        return (result[0], result[1].unsqueeze(0), *result[2:])
    result = vmap(lambda *ts: jvp(function, tuple(primals), ts, has_aux=has_aux), randomness="same")(*tangents)
    value, derivatives = result[0][0], result[1]
    if has_aux:
        return value, derivatives, tree_map_only(torch.Tensor, lambda t: t[0], result[2])
    return value, derivatives


def jvp_with_inputs(function, primals, tangents, inputs):
    """:func:`batched_jvp` of ``params -> function(params, inputs)`` (with aux): the unit
    ``mode="compiled"`` hands to ``torch.compile`` (outside vmap/jvp), the inputs as graph inputs."""
    return batched_jvp(lambda *params: function(params, inputs), primals, tangents, has_aux=True)
