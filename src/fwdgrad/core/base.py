"""What every forward-gradient estimator shares, whatever space its tangents live in.

A forward-gradient estimator (``fg.backward(closure)`` in place of ``loss.backward()``) is
four independent choices:

1. **where the tangents live**: one subclass of :class:`ForwardGradient` per perturbation
   space, declared as ``class WeightForwardGradient(ForwardGradient, perturbation="weight")``
   (:mod:`fwdgrad.core.weight`: the parameters; :mod:`fwdgrad.core.activity`: layer outputs).
   ``ForwardGradient(model, perturbation=name)`` constructs the subclass registered
   under that name (:mod:`fwdgrad.core.estimators` imports them all, so all are registered).
   A new space (e.g. a block's activities with local losses) is a new subclass in its
   own module, imported by :mod:`fwdgrad.core.estimators`; it implements ``backward`` and
   ``sample_tangents`` with the shared machinery (:mod:`fwdgrad.core.forward_mode`,
   :mod:`fwdgrad.core.execution`, :mod:`fwdgrad.core.aggregation`).
2. **how the tangents are drawn**: a sampler of :mod:`fwdgrad.core.tangents`, through the
   space's ``sample_tangents`` (the weight space's ``step_tangents``): the one method a
   subclass overrides to supply tangents computed otherwise ("gradient guesses").
3. **how the batched jvp executes**: :mod:`fwdgrad.core.execution` (eager, compiled, chunked),
   :mod:`fwdgrad.core.regenerated`, :mod:`fwdgrad.core.factored`.
4. **how the directional derivatives are combined**: :mod:`fwdgrad.core.aggregation`, after
   :meth:`ForwardGradient.combine_directional_derivatives` (the hook for combining them
   across processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fwdgrad.core.aggregation import SCALING_CORRECTED, check_top_k_tolerance, resolve_aggregation
from fwdgrad.core.forward_mode import collect_parameters
from fwdgrad.core.tangents import _check_num_tangents, _check_sampler


class ForwardGradient:
    """Forward-gradient estimator: ``fg.backward(closure)`` in place of ``loss.backward()``.

    ``ForwardGradient(model, ...)`` perturbs the weights
    (:class:`fwdgrad.core.weight.WeightForwardGradient`); ``perturbation="activity"`` perturbs
    layer outputs instead (per-sample losses; :class:`fwdgrad.core.activity.ActivityForwardGradient`).

    Args:
        model: an ``nn.Module`` or an iterable of parameters used by the closure's code.
            Only tensors with ``requires_grad=True`` are differentiated and updated.
        num_tangents: K >= 1 tangents per step.
        aggregation: how to combine them, see :data:`fwdgrad.core.aggregation.AGGREGATIONS`
            (``"frog"`` = orthogonal projection).
        sampler: tangent distribution, see :data:`fwdgrad.core.tangents.SAMPLERS`
            (``rademacher`` and ``rank1`` are the cheap unbiased ones on the CPU).
        normalize_tangents: scale every tangent to unit norm (over all parameters).
        scaling_correction: the chi-distribution correction of the norm (``sum``, ``mean``,
            ``orthogonal_projection``).
        seed: seeds a private generator (reproducible tangents); ``None`` uses torch's
            global RNG.
        chunk_size: evaluate the K tangents in chunks of at most this many (bounds memory).
            With an independent sampler (``normal``, ``rademacher``, ``rank1``; no
            ``ensure_independent``) chunk c of a step is drawn from its own seed
            (derived from a per-step seed and c) and, by default, *regenerated* instead
            of stored: once for the directional derivatives, once more for the update
            g = V^T c (and, for ``frog``, for the Gram matrix V V^T), so the step holds
            O(chunk_size × n) tangent entries instead of O(K × n).
        angle, max_length, ensure_independent: options of the ``angle`` and
            ``varying_length`` samplers and linear-independence resampling.
        top_k_tolerance: the cosine margin of ``mean_of_top_k``, a finite number >= 0.
        perturbation: ``"weight"`` (default) or ``"activity"``: where the tangents live.
        mode, regenerate_tangents, factored: how the weight space's batched jvp executes,
            see :class:`fwdgrad.core.weight.WeightForwardGradient`.

    After ``backward``, ``last_directional_derivatives`` holds the d_k of the step.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the random generators
    the estimator owns (checkpoints).
    """

    # d of this process -> d of all processes: set by the wrappers of fwdgrad.distributed.parallel
    # (DataParallel, TangentParallel) on the estimator they wrap; None: one process
    combiner: Callable[[torch.Tensor], torch.Tensor] | None = None
    # keyword arguments of torch.compile for mode="compiled" (None: inductor; on CUDA with
    # mode="reduce-overhead", i.e. CUDA graphs); e.g. {"backend": "aot_eager"} to check capture
    compile_options: dict | None = None
    # the name under which a subclass is registered, and the subclasses by name
    perturbation: str | None = None
    _spaces: dict[str, type[ForwardGradient]] = {}

    def __init_subclass__(cls, perturbation: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if perturbation is not None:
            cls.perturbation = perturbation
            ForwardGradient._spaces[perturbation] = cls

    def __new__(cls, *args, perturbation: str = "weight", **kwargs):
        if perturbation not in ForwardGradient._spaces:
            raise ValueError(
                f"unknown perturbation {perturbation!r}; valid choices: {', '.join(sorted(ForwardGradient._spaces))}"
            )
        if cls is ForwardGradient:
            cls = ForwardGradient._spaces[perturbation]
        return super().__new__(cls)

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        num_tangents: int = 1,
        aggregation: str = "mean",
        sampler: str = "normal",
        normalize_tangents: bool = False,
        scaling_correction: bool = False,
        seed: int | None = None,
        chunk_size: int | None = None,
        *,
        angle: float | None = None,
        max_length: float | None = None,
        ensure_independent: bool = False,
        top_k_tolerance: float = 0.1,
        perturbation: str | None = None,  # consumed by __new__, which picks the class
    ):
        _check_num_tangents(num_tangents)
        _check_sampler(sampler)
        self.aggregation = resolve_aggregation(aggregation)
        if scaling_correction and self.aggregation not in SCALING_CORRECTED:
            raise ValueError(
                f"scaling_correction=True is defined for aggregation in {', '.join(SCALING_CORRECTED)}, "
                f"got aggregation={aggregation!r}"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        check_top_k_tolerance(top_k_tolerance)
        self.module = model if isinstance(model, torch.nn.Module) else None
        self.parameters = collect_parameters(model)
        self.num_tangents = num_tangents
        self.sampler = sampler
        self.normalize_tangents = normalize_tangents
        self.scaling_correction = scaling_correction
        self.seed = seed
        self.chunk_size = chunk_size
        self.sampler_options = dict(angle=angle, max_length=max_length, ensure_independent=ensure_independent)
        self.top_k_tolerance = top_k_tolerance
        self.device = self.parameters[0].device
        self.dtype = self.parameters[0].dtype
        for p in self.parameters[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.last_directional_derivatives: torch.Tensor | None = None

    # ---- what a perturbation space implements ---------------------------------------------

    def sample_tangents(self) -> list[torch.Tensor]:
        """The K tangents of the next step, one ``(K, ...)`` tensor per perturbed tensor."""
        raise NotImplementedError(f"{type(self).__name__} does not define its tangents")

    def backward(self, closure, *inputs: object) -> torch.Tensor:
        """Estimate the gradient of ``closure(*inputs)``, add it to ``.grad``; return the loss."""
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    # ---- extension points -----------------------------------------------------------------

    def combine_directional_derivatives(self, directional_derivatives: torch.Tensor) -> torch.Tensor:
        """The step's directional derivatives as the aggregation sees them: this process's -> all.

        Called once per step between the forward-mode pass and the aggregation; the
        identity here (one process). The hook for ``torch.distributed``:

        - data parallel (each process its share of the batch, the same tangents from the
          same seed): ``all_reduce`` of the K numbers (mean over processes) gives d of the
          mean loss, and every process then computes the same update;
        - tangent parallel (each process a slice of the K tangents): ``all_gather`` along
          dim 0, in tangent order; the update then needs every tangent (regenerated from
          the shared per-step seed, :mod:`fwdgrad.core.regenerated`).

        Per-sample directional derivatives (activity space, d ``(K, B)``) are aggregated per
        sample: data parallel leaves them alone and all-reduces ``.grad`` afterwards, as
        DistributedDataParallel does; tangent parallel gathers them along dim 0 too.

        Shapes: ``(K_local, *batch)`` -> ``(K, *batch)``; the same tangents' d on every process.
        Here: ``self.combiner(d)`` when a wrapper of :mod:`fwdgrad.distributed.parallel` has set one
        (``DataParallel``, ``TangentParallel``), else the identity.
        """
        return directional_derivatives if self.combiner is None else self.combiner(directional_derivatives)

    # ---- checkpoints ----------------------------------------------------------------------

    def random_generators(self) -> dict[str, torch.Generator | None]:
        """Every random generator the estimator owns, by name (``None``: torch's global RNG)."""
        return {"tangent_generator": self.generator}

    def state_dict(self) -> dict[str, torch.Tensor | str | None]:
        """The estimator's state: the state of every generator it owns, and ``execution``, how its
        batched jvp runs (``eager``, ``compiled``, ``fast``; for estimators that have a ``mode``).

        Tensors (``torch.Generator.get_state()``), strings and ``None`` only, so a checkpoint
        holding it loads with ``torch.load(weights_only=True)``. Unseeded estimators draw from
        torch's global RNG, which is not theirs to save. The execution is saved because
        ``mode="auto"`` resolves by device (and may resolve otherwise in a later version): a
        resumed run computes with the execution it started with, so its updates are the same
        to the last bit.
        """
        state = {
            name: None if generator is None else generator.get_state()
            for name, generator in self.random_generators().items()
        }
        if getattr(self, "mode", None) is not None:
            state["execution"] = self.mode
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the generators (and the execution) from :meth:`state_dict` (same estimator configuration).

        A state without ``execution`` (saved before it was recorded) keeps this estimator's.
        """
        state = dict(state)
        execution = state.pop("execution", None)
        generators = self.random_generators()
        if set(state) != set(generators):
            raise ValueError(
                f"the state has entries {sorted(state)}, but {type(self).__name__} owns {sorted(generators)}"
            )
        for name, generator in generators.items():
            if (state[name] is None) != (generator is None):
                raise ValueError(
                    f"{name}: the state was saved by an estimator {'without' if state[name] is None else 'with'} "
                    f"a seed, this one has {'none' if generator is None else 'one'}; construct it with the same seed"
                )
        if execution is not None and getattr(self, "mode", None) not in (None, execution):
            if getattr(self, "requested_mode", "auto") != "auto":
                raise ValueError(
                    f"the state was saved by an estimator executing mode={execution!r}; this one was built with "
                    f"mode={self.requested_mode!r}: build it with mode={execution!r} (or 'auto') to resume exactly"
                )
            self._set_execution(execution)
        for name, generator in generators.items():
            if generator is not None:
                generator.set_state(state[name].cpu())

    def _set_execution(self, mode: str) -> None:
        """Run the batched jvp as ``mode`` from now on (a resumed ``mode="auto"`` estimator)."""
        self.mode = mode
