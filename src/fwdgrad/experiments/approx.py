"""``fwdgrad approx``: how well does each forward gradient approximate a known gradient?

For a known gradient g ∈ R^n (``true_gradient=ones``: g = (1, ..., 1); ``random``: one fixed
draw g ~ N(0, I_n) per n), K tangents V ∈ R^{K×n} and the directional derivatives
d = V g, every aggregation ĝ = aggregate(V, d) is compared with g by

    cosine similarity  cos = ĝ·g / (||ĝ|| ||g||)      and   norm ratio  ||ĝ|| / ||g||.

d = V g is computed as a matrix product: it is exactly what forward mode returns for the
linear function f(x) = g·x (∇f = g), which ``tests/test_approx.py`` checks against
``torch.func.jvp``; skipping the function evaluation lets a whole grid cell (all samples) be
one batched computation, tangents ``(S, K, n)``. All aggregations of a cell share the same
tangents (:func:`fwdgrad.studies.functions.aggregate_batched`: the projection on the smaller Gram matrix).
The scaling-corrected norm ratio is the uncorrected one times
:func:`fwdgrad.core.aggregation.scaling_correction_factor` (the correction is that positive factor,
so the cosine does not change); it is reported for sum, mean and the projection.

Studies: ``grid`` (the multi-tangent paper's Section 4.1: n = 2^0..2^14, K = 2^0..2^10) and
``angles`` (Section 4.3: n = 64, K ∈ {4, 16, 64}, tangents at 15..90° to the first).

Sample-count rule: a cell gets ``num_samples`` samples unless S·K·n would exceed
``max_entries`` tangent entries; then S = max(``min_samples``, floor(max_entries / (K·n))).

Outputs in the run directory: ``raw.csv`` (one row per sample and method), ``summary.csv``
(mean, std and 95% confidence interval, Student t, of the cosine and the norm ratio per cell),
figures ``cosine_vs_n_<sampler>.png`` and ``norm_ratio_vs_n_<sampler>.png`` (one panel per
method, one line per K) or ``angles.png``, and ``timing.txt``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from fwdgrad.core.aggregation import SCALING_CORRECTED, resolve_aggregation, scaling_correction_factor
from fwdgrad.core.tangents import SAMPLERS, expected_tangent_norm, sample_flat_tangents
from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import run
from fwdgrad.experiments.plots import save_figure
from fwdgrad.studies.descent import aggregate_batched
from fwdgrad.train.atomic import atomic_write_text, replacing, write_csv

STUDIES = ("grid", "angles")
TRUE_GRADIENTS = ("ones", "random")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RAW_COLUMNS = (
    "true_gradient", "sampler", "angle", "normalize", "aggregation", "n", "k", "sample", "cosine", "norm_ratio",
    "norm_ratio_scaled",
)
SUMMARY_COLUMNS = (
    "true_gradient", "sampler", "angle", "normalize", "aggregation", "scaling_correction", "n", "k", "samples",
    "cosine_mean", "cosine_std", "cosine_ci95_low", "cosine_ci95_high",
    "norm_ratio_mean", "norm_ratio_std", "norm_ratio_ci95_low", "norm_ratio_ci95_high",
)


def true_gradient(kind: str, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The known gradient g of shape ``(n,)``: all ones, or one N(0, I) draw seeded by ``seed``."""
    if kind == "ones":
        return torch.ones(dim, dtype=dtype)
    if kind == "random":
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed + 7919 * dim), dtype=dtype)
    raise UsageError(f"unknown true_gradient {kind!r}; valid choices: {', '.join(TRUE_GRADIENTS)}")


def samples_for(num_tangents: int, dim: int, num_samples: int, max_entries: int, min_samples: int) -> int:
    """The sample-count rule: num_samples, or max(min_samples, max_entries // (K n)) if S K n > max_entries."""
    if num_samples * num_tangents * dim <= max_entries:
        return num_samples
    return min(num_samples, max(min_samples, max_entries // (num_tangents * dim)))


@dataclass
class CellResult:
    """cosine and norm ratio ``(S,)`` per aggregation, for one (n, K, sampler, normalize) cell."""

    cosine: dict[str, torch.Tensor]
    norm_ratio: dict[str, torch.Tensor]


def approximation_quality(
    gradient: torch.Tensor,
    num_tangents: int,
    aggregations: Sequence[str],
    num_samples: int,
    sampler: str = "normal",
    normalize: bool = False,
    angle: float | None = None,
    generator: torch.Generator | None = None,
    chunk_entries: int = 2**24,
) -> CellResult:
    """Cosine similarity and norm ratio of ĝ = aggregate(V, V g) to g, for S samples of V.

    Shapes: gradient g ``(n,)``; V ``(S, K, n)`` drawn in chunks of at most ``chunk_entries``
    entries; returns ``(S,)`` tensors per aggregation (all aggregations see the same V).
    """
    dim = gradient.shape[0]
    methods = [resolve_aggregation(method) for method in aggregations]
    chunk = max(1, chunk_entries // (num_tangents * dim))
    cosines: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
    ratios: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
    gradient_norm = torch.linalg.vector_norm(gradient)
    for begin in range(0, num_samples, chunk):
        count = min(chunk, num_samples - begin)
        tangents = sample_flat_tangents(
            num_tangents, dim, sampler, batch_shape=(count,), generator=generator, dtype=gradient.dtype,
            normalize=normalize, angle=angle,
        )
        # d = V g: what forward mode gives for f(x) = g·x (see the module docstring)
        derivatives = tangents @ gradient
        for method in methods:
            estimate = aggregate_batched(tangents, derivatives, method)
            estimate_norm = torch.linalg.vector_norm(estimate, dim=-1)
            cosines[method].append(((estimate @ gradient) / (estimate_norm * gradient_norm)).double())
            ratios[method].append((estimate_norm / gradient_norm).double())
    return CellResult({m: torch.cat(v) for m, v in cosines.items()}, {m: torch.cat(v) for m, v in ratios.items()})


def scaled_ratio_factor(method: str, num_tangents: int, dim: int, sampler: str, normalize: bool) -> float | None:
    """The scaling-correction factor of ``method`` for these tangents, or None where undefined."""
    method = resolve_aggregation(method)
    if method not in SCALING_CORRECTED:
        return None
    if method == "orthogonal_projection":
        return scaling_correction_factor(method, num_tangents, dim, None)
    try:
        norm = expected_tangent_norm(sampler, dim, normalize)
    except ValueError:
        return None
    return scaling_correction_factor(method, num_tangents, dim, norm)


def mean_std_ci(values: torch.Tensor, level: float = 0.95) -> tuple[float, float, float, float]:
    """mean, std (n-1), and the Student-t confidence interval mean ± t_{(1+level)/2, S-1} std / sqrt(S)."""
    from scipy.special import stdtrit  # Student-t quantile (lighter import than scipy.stats)

    values = values[torch.isfinite(values)]
    count = values.numel()
    if count == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if count == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(values.std())
    half = float(stdtrit(count - 1, (1 + level) / 2)) * std / math.sqrt(count)
    return mean, std, mean - half, mean + half


def _cells(cfg: DictConfig) -> list[tuple[str, float | None, bool, int, int]]:
    """(sampler, angle, normalize, n, k) of every cell of the study."""
    def positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must contain integers >= 1, got {value!r}")
        return value

    if cfg.study not in STUDIES:
        raise UsageError(f"unknown study {cfg.study!r}; valid choices: {', '.join(STUDIES)}")
    cells = []
    if cfg.study == "grid":
        for sampler in cfg.samplers:
            if sampler not in SAMPLERS or sampler == "angle":
                valid = ", ".join(s for s in SAMPLERS if s != "angle")
                raise UsageError(f"unknown sampler {sampler!r} for study=grid; valid choices: {valid} "
                                 "(angle: use study=angles)")
            for normalize in cfg.normalize:
                for n in cfg.dims:
                    for k in cfg.ks:
                        n, k = positive("dims", n), positive("ks", k)
                        if sampler in ("standard_basis", "varying_length") and k > n:
                            continue  # these samplers draw k distinct basis directions
                        cells.append((sampler, None, bool(normalize), n, k))
    else:
        options = cfg.angles
        n = positive("angles.n", options.n)
        for angle in options.angles:
            if not 0 < float(angle) < 180:
                raise UsageError(f"angles must lie in (0, 180) degrees, got {angle!r}")
            for k in options.ks:
                cells.append(("angle", float(angle), False, n, positive("angles.ks", k)))
    return cells


def approx(cfg: DictConfig) -> list[list]:
    """Run the study; write raw.csv, summary.csv, figures and timing.txt to the working directory."""
    from tqdm import tqdm

    if cfg.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    if cfg.true_gradient not in TRUE_GRADIENTS:
        raise UsageError(f"unknown true_gradient {cfg.true_gradient!r}; valid choices: {', '.join(TRUE_GRADIENTS)}")
    for name in ("num_samples", "min_samples", "max_entries", "chunk_entries"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {name}={cfg[name]!r}")
    aggregations = [resolve_aggregation(method) for method in cfg.aggregations]
    cells = _cells(cfg)
    dtype = DTYPES[cfg.dtype]
    generator = torch.Generator().manual_seed(cfg.seed)
    output = os.getcwd()
    raw_lines: list[str] = []
    summary: list[list] = []
    began, began_cpu = time.perf_counter(), time.process_time()
    work = [samples_for(k, n, cfg.num_samples, cfg.max_entries, cfg.min_samples) * k * n for *_, n, k in cells]
    with tqdm(total=sum(work), desc=f"approx {cfg.study}", unit="entry", unit_scale=True, mininterval=1.0) as bar:
        for (sampler, angle, normalize, n, k), entries in zip(cells, work):
            bar.set_postfix_str(f"{sampler} normalize={normalize} n={n} k={k}")
            gradient = true_gradient(cfg.true_gradient, n, cfg.seed, dtype)
            samples = samples_for(k, n, cfg.num_samples, cfg.max_entries, cfg.min_samples)
            result = approximation_quality(gradient, k, aggregations, samples, sampler, normalize, angle, generator,
                                           cfg.chunk_entries)
            angle_text = "" if angle is None else f"{angle:g}"
            for method in aggregations:
                cosine, ratio = result.cosine[method], result.norm_ratio[method]
                factor = scaled_ratio_factor(method, k, n, sampler, normalize)
                prefix = f"{cfg.true_gradient},{sampler},{angle_text},{normalize},{method},{n},{k},"
                scaled = [""] * samples if factor is None else [f"{value:.6g}" for value in (ratio * factor).tolist()]
                raw_lines += [f"{prefix}{index},{c:.6g},{r:.6g},{s}"
                              for index, (c, r, s) in enumerate(zip(cosine.tolist(), ratio.tolist(), scaled))]
                key = [cfg.true_gradient, sampler, angle_text, normalize, method]
                summary.append(key + [False, n, k, samples, *mean_std_ci(cosine), *mean_std_ci(ratio)])
                if factor is not None:
                    summary.append(key + [True, n, k, samples, *mean_std_ci(cosine), *mean_std_ci(ratio * factor)])
            bar.update(entries)
    elapsed, elapsed_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    _write_raw(os.path.join(output, "raw.csv"), raw_lines)
    write_csv(summary, os.path.join(output, "summary.csv"), SUMMARY_COLUMNS)
    threads = torch.get_num_threads()
    timing = (f"study={cfg.study} cells={len(cells)} methods/cell={len(aggregations)} "
              f"entries={sum(work)} wall_seconds={elapsed:.1f} cpu_seconds={elapsed_cpu:.1f} torch_threads={threads}\n")
    atomic_write_text(timing, os.path.join(output, "timing.txt"))
    if cfg.plot:
        if cfg.study == "grid":
            for sampler in dict.fromkeys(cell[0] for cell in cells):
                plot_vs_n(summary, sampler, "cosine", os.path.join(output, f"cosine_vs_n_{sampler}.png"))
                plot_vs_n(summary, sampler, "norm_ratio", os.path.join(output, f"norm_ratio_vs_n_{sampler}.png"))
        else:
            plot_angles(summary, os.path.join(output, "angles.png"))
    print(timing, end="")
    print(f"wrote raw.csv, summary.csv and figures to {output}")
    return summary


def _write_raw(path: str, lines: list[str]) -> None:
    """raw.csv from pre-formatted lines (90 MB for the full grid: no csv module per row)."""
    with replacing(path) as temporary, open(temporary, "w") as file:
        file.write(",".join(RAW_COLUMNS) + "\n")
        file.write("\n".join(lines))
        file.write("\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _index(column: str) -> int:
    return SUMMARY_COLUMNS.index(column)


def plot_vs_n(summary: list[list], sampler: str, metric: str, path: str) -> None:
    """One panel per (aggregation, normalize, scaling correction), one line per K: metric vs n."""
    plt = _pyplot()
    rows = [row for row in summary if row[_index("sampler")] == sampler]
    if metric == "cosine":  # the cosine does not depend on the scaling correction
        rows = [row for row in rows if not row[_index("scaling_correction")]]
    panels = list(dict.fromkeys(
        (row[_index("aggregation")], row[_index("normalize")], row[_index("scaling_correction")]) for row in rows
    ))
    ks = sorted({row[_index("k")] for row in rows})
    columns = 4
    lines = math.ceil(len(panels) / columns)
    figure, axes_grid = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False,
                                     sharex=True, sharey=metric == "cosine")
    colors = plt.get_cmap("viridis")
    for axes, (aggregation, normalize, scaled) in zip(axes_grid.flat, panels):
        for index, k in enumerate(ks):
            points = sorted(
                (row[_index("n")], row[_index(f"{metric}_mean")]) for row in rows
                if (row[_index("aggregation")], row[_index("normalize")], row[_index("scaling_correction")])
                == (aggregation, normalize, scaled) and row[_index("k")] == k
            )
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], color=colors(index / max(1, len(ks) - 1)),
                          label=f"K={k}", linewidth=1)
        axes.set_xscale("log", base=2)
        if metric == "norm_ratio":
            axes.set_yscale("log")
        title = aggregation.replace("orthogonal_projection", "projection (frog)")
        title += ", unit tangents" if normalize else ""
        title += ", scaling correction" if scaled else ""
        axes.set_title(title, fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
    for axes in axes_grid.flat[len(panels):]:
        axes.axis("off")
    for axes in axes_grid[:, 0]:
        axes.set_ylabel("mean cosine similarity" if metric == "cosine" else "mean ||ĝ|| / ||∇f||")
    for axes in axes_grid[-1]:
        axes.set_xlabel("n")
    axes_grid.flat[0].legend(fontsize=6, ncol=2)
    figure.suptitle(f"{metric.replace('_', ' ')} vs n, {sampler} tangents", y=1.0)
    figure.tight_layout()
    save_figure(figure, path)


def plot_angles(summary: list[list], path: str) -> None:
    """Cosine and norm ratio vs angle to the first tangent, one line per (aggregation, K)."""
    plt = _pyplot()
    rows = [row for row in summary if not row[_index("scaling_correction")]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = dict.fromkeys((row[_index("aggregation")], row[_index("k")]) for row in rows)
    aggregations = list(dict.fromkeys(aggregation for aggregation, _ in series))
    ks = sorted({k for _, k in series})
    styles = ["-", "--", ":", "-."]
    for aggregation, k in series:
        # colour: aggregation; line style: K
        look = dict(color=plt.get_cmap("tab10")(aggregations.index(aggregation) % 10),
                    linestyle=styles[ks.index(k) % len(styles)])
        points = sorted((float(row[_index("angle")]), row[_index("cosine_mean")], row[_index("norm_ratio_mean")])
                        for row in rows if (row[_index("aggregation")], row[_index("k")]) == (aggregation, k))
        label = f"{aggregation.replace('orthogonal_projection', 'frog')} K={k}"
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label, **look)
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", markersize=3, label=label, **look)
    n = rows[0][_index("n")]
    left.set_title(f"cosine similarity, n = {n}")
    right.set_title(f"norm ratio ||ĝ|| / ||∇f||, n = {n}")
    right.set_yscale("log")
    for axes in (left, right):
        axes.set_xlabel("angle to the first tangent (degrees)")
        axes.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=6, ncol=3)
    save_figure(figure, path)


def main(argv: list[str]) -> int:
    return run(approx, "approx", argv, "approx")
