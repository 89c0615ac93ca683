"""``fwdgrad optimize``: plain gradient descent on closed-form functions with bp / fg / frog.

Studies (``study=...``), each one command:

- ``single``: one function (``function=``, ``n=``) with the ``gradient`` group (bp | fg | frog
  and its options), ``seeds`` runs side by side as one batched tensor program.
- ``section42``: the multi-tangent paper's Section 4.2: sphere, Rosenbrock, Styblinski-Tang ×
  n ∈ {1, 2, 4, ..., 1024} × {bp, fg K=1, fg-mean K, frog K for K ∈ {2, 4, 16}} × 5 runs,
  early stopping after 50 non-improving steps, 25,000 steps for Rosenbrock and 1,000
  otherwise (the paper's code, Helmholtz-AI-Energy/frog, ``function_optimization``).
- ``angles``: Section 4.3: Styblinski-Tang, n = 64, K ∈ {16, 64}, fg-mean with tangents at
  15..90° to the first, and frog.
- ``baydin``: Baydin et al.'s 2-D runs, bp / fg K=1 / frog K=1 side by side. Beale as the
  public reproduction orobix/fwdgrad runs it by default (``configs/global_optim_config.yaml``:
  seed 42, lr 0.01, 1,000 iterations; start ``torch.rand(2)`` after ``torch.manual_seed(42)``
  = (0.8823, 0.9150), every tangent ``torch.randn`` from the same RNG): run r starts from the
  point drawn that way with seed 42 + r and draws its tangents from the same generator, so
  run 0 of ``fg K=1`` is that code's run. Rosenbrock from (-1, 0), 25,000 steps, lr 5e-4 is
  fwdgrad's own setting (orobix/fwdgrad configures Beale only; its lr 0.01 diverges on
  Rosenbrock), labelled so.

Default learning rates are the multi-tangent paper's search results (Flügel et al. 2024,
arXiv 2410.17764; tables ``math`` and ``math__custom_tangents`` of Helmholtz-AI-Energy/frog,
``lrs/``, commit 7beb8cb; see ``fwdgrad/train/reference_lrs/README.md``); ``lr=...`` overrides.

Outputs in the run directory: ``steps.csv`` (study, function, n, method, lr, run, step,
value, gap = f - f(x*), distance = ||x - x*||, wall_time_s), ``summary.csv`` (best and final
value, gap and distance per run), figures ``values_<function>_n<n>.png`` (gap vs step, log
scale, one line per method), ``contour_<function>.png`` for 2-D functions (trajectories of
run 0 of every method), and for the studies ``table.md`` and a study figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig, OmegaConf

from fwdgrad.experiments.common import gradient_options, method_label
from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import run
from fwdgrad.experiments.optimize_figures import final_table, plot_contour, plot_final_vs, plot_values
from fwdgrad.experiments.optimize_runs import Method, Runs
from fwdgrad.studies.descent import DescentResult, GradientSpec, gradient_descent, repeat_start
from fwdgrad.studies.functions import TestFunction, get_function
from fwdgrad.train.atomic import atomic_write_text, write_csv
from fwdgrad.train.reference_lrs import gradient_approach, reference_lr

STUDIES = ("single", "section42", "angles", "baydin")
STEP_COLUMNS = ("study", "function", "n", "method", "lr", "run", "step", "value", "gap", "distance", "wall_time_s")
SUMMARY_COLUMNS = (
    "study", "function", "n", "method", "lr", "run", "steps", "best_value", "final_value", "best_gap", "final_gap",
    "final_distance", "wall_time_s",
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# methods and learning rates
# ---------------------------------------------------------------------------------------------
def method_from_gradient(gradient: DictConfig) -> Method:
    """The ``gradient`` config group (conf/gradient/*.yaml) as a :class:`Method`."""
    if gradient.get("name") == "bp":
        return Method("bp", GradientSpec("bp"))
    options = gradient_options(gradient)
    if options.get("perturbation", "weight") != "weight":
        raise UsageError(
            f"gradient.perturbation={options['perturbation']!r} has no meaning for a closed-form function "
            "(there are no activities); use weight"
        )
    known = {field.name for field in fields(GradientSpec)}
    spec = GradientSpec(name=gradient.name, **{key: value for key, value in options.items() if key in known})
    label = method_label(gradient)
    if spec.sampler != "normal":
        label += f" {spec.sampler}" + (f" {spec.angle:g}°" if spec.angle is not None else "")
    if spec.normalize_tangents:
        label += " normalized"
    if spec.scaling_correction:
        label += " scaled"
    return Method(label, spec)


def _gradient_config(name: str, num_tangents: int = 1, aggregation: str = "mean", **extra) -> DictConfig:
    if name == "bp":
        return OmegaConf.create({"name": "bp"})
    return OmegaConf.create({"name": name, "num_tangents": num_tangents, "aggregation": aggregation, **extra})


def section42_methods(ks: Sequence[int]) -> list[Method]:
    """bp, fg K=1, then fg-mean K and frog K for every K (the paper's Section 4.2 list)."""
    configs = [_gradient_config("bp"), _gradient_config("fg", 1)]
    for k in ks:
        configs += [_gradient_config("fg", k, "mean"), _gradient_config("frog", k, "orthogonal_projection")]
    return [method_from_gradient(config) for config in configs]


def default_lr(function: str, n: int, spec: GradientSpec) -> float:
    """The paper's learning rate for this function, n and method (see the module docstring).

    ``math`` table: bp, fg-mean and frog with plain normal tangents. ``math__custom_tangents``
    (Styblinski-Tang, n = 64): fg-mean with tangents at a fixed angle; frog there uses the
    normal-tangent row, because span{u, cos θ u + sin θ w_k} = span{u, w_2, ..., w_K} is a
    uniformly random K-dim subspace whatever θ is, so the projection does not depend on θ.
    """
    try:
        if spec.name == "bp":
            return reference_lr("math", function=function, n=n, gradient_approach="bp", k=None)
        approach = gradient_approach(spec.name, spec.aggregation)
        if spec.normalize_tangents or spec.scaling_correction or spec.sampler not in ("normal", "angle"):
            raise LookupError(
                f"the paper's learning rates are for un-normalized normal tangents without scaling correction, "
                f"not sampler={spec.sampler!r}, normalize_tangents={spec.normalize_tangents}, "
                f"scaling_correction={spec.scaling_correction}"
            )
        if spec.sampler == "angle":
            criteria = dict(function=function, n=n, gradient_approach=approach, k=spec.num_tangents)
            if approach == "fg-mean":
                criteria["optimizer"] = (
                    f"FG(k={spec.num_tangents},agg=mean,normalize=False,sampler=specific_angle_{spec.angle:g})"
                )
            return reference_lr("math__custom_tangents", **criteria)
        return reference_lr("math", function=function, n=n, gradient_approach=approach, k=spec.num_tangents)
    except LookupError as error:
        message = str(error).strip("'\"").removesuffix(" Pass an explicit lr instead.")
        raise UsageError(
            f"no reference learning rate for function={function}, n={n}: {message} Set lr=<value> explicitly."
        ) from None


# ---------------------------------------------------------------------------------------------
# one batch of runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomStart:
    """Run r starts at ``torch.rand(n)`` drawn from a generator seeded ``seed + r`` (float32, as
    ``torch.manual_seed(seed); torch.rand(n)``) and draws its tangents from that generator."""

    seed: int


def run_method(
    study: str, function: TestFunction, n: int, method: Method, lr: float | None, steps: int, start, num_runs: int,
    seed: int, patience: int, dtype: torch.dtype, progress=None, source: str = "",
) -> Runs:
    """``num_runs`` runs of gradient descent as one batch; the runs draw their tangents from one
    generator seeded with ``seed`` (run i is row i of the batch). With a :class:`RandomStart`,
    each run separately, from its own start and generator."""
    if lr is None:
        lr = default_lr(function.name, n, method.spec)
    if not lr > 0:
        raise UsageError(f"lr must be > 0, got lr={lr!r}")
    options = dict(patience=patience, record_positions=n == 2, minimizer=function.minimizer(n, dtype=dtype),
                   progress=progress)
    if isinstance(start, RandomStart):
        results = []
        for run_index in range(num_runs):
            generator = torch.Generator().manual_seed(start.seed + run_index)
            point = torch.rand(n, generator=generator).to(dtype)
            results.append(gradient_descent(function, point.unsqueeze(0), method.spec, lr, steps, generator=generator,
                                            **options))
        result = DescentResult.side_by_side(results)
    else:
        start_point = make_start(function, n, start, dtype)
        generator = torch.Generator().manual_seed(seed)
        result = gradient_descent(function, repeat_start(start_point, num_runs), method.spec, lr, steps,
                                  generator=generator, **options)
    return Runs(study, function, n, method, lr, result.values, result.distances, result.wall_time, result.last_step,
                result.positions, source)


def make_start(function: TestFunction, n: int, start, dtype: torch.dtype) -> torch.Tensor:
    """``start=null``: the function's default; a number: every coordinate; a list: the point."""
    if start is None:
        return function.default_start(n, dtype=dtype)
    if isinstance(start, (int, float)):
        return torch.full((n,), float(start), dtype=dtype)
    start = list(start)
    if len(start) != n:
        raise UsageError(f"start has {len(start)} coordinates but n={n}; give n numbers, one number or null")
    return torch.tensor([float(value) for value in start], dtype=dtype)


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return value


def _jobs(cfg: DictConfig) -> list[tuple[TestFunction, int, Method, float | None, int, object, int]]:
    """(function, n, method, lr, steps, start, runs) for every batch the study runs."""
    study = cfg.study
    if study not in STUDIES:
        raise UsageError(f"unknown study {study!r}; valid choices: {', '.join(STUDIES)}")
    runs = _check_positive_int("seeds", cfg.seeds)
    jobs = []
    if study == "single":
        function = get_function(cfg.function)
        n = _check_positive_int("n", cfg.n)
        function.check_dim(n)
        steps = function.steps if cfg.steps is None else cfg.steps
        jobs.append((function, n, method_from_gradient(cfg.gradient), cfg.lr, steps, cfg.start, runs, ""))
    elif study == "section42":
        options = cfg.section42
        methods = section42_methods([_check_positive_int("section42.ks", k) for k in options.ks])
        for name in options.functions:
            function = get_function(name)
            steps = function.steps if cfg.steps is None else cfg.steps
            for n in options.dims:
                for method in methods:
                    jobs.append((function, _check_positive_int("section42.dims", n), method, cfg.lr, steps, None, runs,
                                 ""))
    elif study == "angles":
        options = cfg.angles
        function = get_function(options.function)
        n = _check_positive_int("angles.n", options.n)
        steps = function.steps if cfg.steps is None else cfg.steps
        for k in options.ks:
            k = _check_positive_int("angles.ks", k)
            for angle in options.angles:
                gradient = _gradient_config("fg", k, "mean", sampler="angle", angle=float(angle))
                jobs.append((function, n, method_from_gradient(gradient), cfg.lr, steps, None, runs, ""))
            frog = method_from_gradient(_gradient_config("frog", k, "orthogonal_projection"))
            # the study's frog rows live in math__custom_tangents (normal tangents: the span, hence
            # the projection, does not depend on the angle; see default_lr)
            lr = cfg.lr
            if lr is None:
                try:
                    lr = reference_lr(
                        "math__custom_tangents", function=function.name, n=n, gradient_approach="frog", k=k
                    )
                except LookupError as error:
                    raise UsageError(f"{error} Set lr=<value> explicitly.") from None
            jobs.append((function, n, frog, lr, steps, None, runs, ""))
    else:  # baydin
        methods = [method_from_gradient(_gradient_config(name, 1, aggregation))
                   for name, aggregation in (("bp", "mean"), ("fg", "mean"), ("frog", "orthogonal_projection"))]
        for setting in cfg.baydin.runs:
            function = get_function(setting.function)
            start = RandomStart(int(setting.start_seed)) if setting.start == "random" else list(setting.start)
            for method in methods:
                jobs.append((function, 2, method, setting.lr, setting.steps, start, runs, setting.get("source", "")))
    # resolve every default learning rate now: a missing one is an error before any compute
    return [(f, n, m, default_lr(f.name, n, m.spec) if lr is None else lr, steps, start, r, source)
            for f, n, m, lr, steps, start, r, source in jobs]


def optimize(cfg: DictConfig) -> list[Runs]:
    """Run the configured study; write CSVs, figures and tables to the working directory."""
    from tqdm import tqdm

    if cfg.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    _check_positive_int("log_every", cfg.log_every)
    if not isinstance(cfg.patience, int) or cfg.patience < 0:
        raise UsageError(f"patience must be an integer >= 0 (0: no early stopping), got {cfg.patience!r}")
    jobs = _jobs(cfg)
    for _, _, _, _, steps, _, _, _ in jobs:
        if not isinstance(steps, int) or steps < 1:
            raise UsageError(f"steps must be an integer >= 1, got steps={steps!r}")
    patience = 0 if cfg.study == "baydin" else cfg.patience
    dtype = DTYPES[cfg.dtype]
    output = os.getcwd()
    all_runs: list[Runs] = []
    step_rows: list[list] = []
    summary_rows: list[list] = []
    with tqdm(total=sum(job[4] for job in jobs), desc=f"optimize {cfg.study}", unit="step", mininterval=1.0) as bar:
        for function, n, method, lr, steps, start, runs, source in jobs:
            bar.set_postfix_str(f"{function.name} n={n} {method.label}")
            before = bar.n
            result = run_method(cfg.study, function, n, method, lr, steps, start, runs, cfg.seed, patience, dtype,
                                progress=bar.update, source=source)
            all_runs.append(result)
            bar.update(steps - (bar.n - before))
            # each finished configuration is on disk at once: a long study shows its results as it goes
            step_rows += result.step_rows(cfg.log_every)
            summary_rows += result.summary_rows()
            write_csv(step_rows, os.path.join(output, "steps.csv"), STEP_COLUMNS)
            write_csv(summary_rows, os.path.join(output, "summary.csv"), SUMMARY_COLUMNS)
            final = result.values[result.last_step, torch.arange(result.values.shape[1])]
            bar.write(f"{function.name} n={n} {method.label}: final f = {float(final.double().mean()):.6g} "
                      f"(mean of {runs} runs), {float(result.wall_time[-1]):.1f} s")
    if cfg.plot:
        groups: dict[tuple[str, int], list[Runs]] = {}
        for runs in all_runs:
            groups.setdefault((runs.function.name, runs.n), []).append(runs)
        largest = max(n for _, n in groups)
        for (name, n), group in groups.items():
            if cfg.study != "section42" or n == largest:
                plot_values(group, os.path.join(output, f"values_{name}_n{n}.png"))
            if n == 2 and cfg.study in ("single", "baydin"):
                plot_contour(group, os.path.join(output, f"contour_{name}.png"))
        if cfg.study == "section42":
            plot_final_vs(all_runs, lambda r: r.n, "n", lambda r: r.function.name,
                          os.path.join(output, "final_gap_vs_n.png"), log_x=True)
        if cfg.study == "angles":
            plot_final_vs([r for r in all_runs if r.method.spec.sampler == "angle"], lambda r: r.method.spec.angle,
                          "angle to the first tangent (degrees)", lambda r: "fg-mean with tangents at a fixed angle",
                          os.path.join(output, "final_gap_vs_angle.png"), log_x=False,
                          line_key=lambda r: f"fg-mean K={r.method.spec.num_tangents}")
    if cfg.study == "section42":
        largest = max(runs.n for runs in all_runs)
        title = f"Final value f(x), n = {largest}, mean ± std over {cfg.seeds} runs"
        table = final_table([r for r in all_runs if r.n == largest], lambda r: r.method.label,
                            lambda r: r.function.name, title)
    elif cfg.study == "angles":
        table = final_table(all_runs, lambda r: "frog (normal tangents)" if r.method.spec.name == "frog"
                            else f"fg-mean, tangents at {r.method.spec.angle:g}°",
                            lambda r: f"K={r.method.spec.num_tangents}",
                            f"Final value f(x), {all_runs[0].function.name} n = {all_runs[0].n}, "
                            f"mean ± std over {cfg.seeds} runs")
    else:
        table = final_table(all_runs, lambda r: r.method.label,
                            lambda r: f"{r.function.name} n={r.n}" + (f" ({r.source})" if r.source else ""),
                            f"Final value f(x), mean ± std over {cfg.seeds} runs")
    atomic_write_text(table, os.path.join(output, "table.md"))
    print(table)
    print(f"wrote steps.csv, summary.csv, table.md and figures to {output}")
    return all_runs


def main(argv: list[str]) -> int:
    return run(optimize, "optimize", argv, "optimize")

