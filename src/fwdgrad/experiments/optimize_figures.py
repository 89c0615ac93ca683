"""The figures and tables of ``fwdgrad optimize``: gap vs step, contours, final gaps vs n or angle."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fwdgrad.experiments.optimize_runs import Runs
from fwdgrad.experiments.plots import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_values(all_runs: Sequence[Runs], path: str) -> None:
    """Gap f(x_t) - f(x*) vs step on a log scale, median over runs with a min-max band."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for runs in all_runs:
        gaps = runs.gaps.clamp_min(1e-16)
        steps = torch.arange(gaps.shape[0])
        median = gaps.nanmedian(dim=1).values
        low = torch.where(gaps.isnan(), torch.inf, gaps).amin(1)
        high = torch.where(gaps.isnan(), -torch.inf, gaps).amax(1)
        (line,) = axes.plot(steps, median, label=runs.method.label, linewidth=1.2)
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    first = all_runs[0]
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("f(x) - f(x*)")
    axes.set_title(f"{first.function.name}, n = {first.n}: median of {first.values.shape[1]} runs (band: min..max)")
    axes.legend(fontsize=8, ncol=2)
    axes.grid(True, which="both", alpha=0.3)
    save_figure(figure, path)


def plot_contour(all_runs: Sequence[Runs], path: str) -> None:
    """Contour of a 2-D function (log-spaced levels) with run 0's trajectory of every method."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    function = all_runs[0].function
    (x_low, x_high), (y_low, y_high) = function.plot_box
    for runs in all_runs:  # widen the box so every trajectory fits
        points = runs.positions[:, 0][~runs.positions[:, 0].isnan().any(-1)]
        x_low, x_high = min(x_low, float(points[:, 0].min())), max(x_high, float(points[:, 0].max()))
        y_low, y_high = min(y_low, float(points[:, 1].min())), max(y_high, float(points[:, 1].max()))
    grid_x, grid_y = torch.meshgrid(
        torch.linspace(x_low, x_high, 300, dtype=torch.float64),
        torch.linspace(y_low, y_high, 300, dtype=torch.float64),
        indexing="xy",
    )
    with torch.no_grad():
        surface = function(torch.stack([grid_x, grid_y], -1)) - function.minimum_value(2) + 1e-3
    figure, axes = plt.subplots(figsize=(7, 5.5))
    levels = torch.logspace(math.log10(float(surface.min())), math.log10(float(surface.max())), 30)
    contour = axes.contourf(grid_x, grid_y, surface, levels=levels.numpy(), norm=LogNorm(), cmap="viridis", alpha=0.8)
    figure.colorbar(contour, ax=axes, label="f(x) - f(x*) + 1e-3")
    for runs in all_runs:
        path_xy = runs.positions[:, 0]
        path_xy = path_xy[~path_xy.isnan().any(-1)]
        axes.plot(path_xy[:, 0], path_xy[:, 1], label=f"{runs.method.label} (lr {runs.lr:g})", linewidth=1.3)
    axes.plot(*runs.positions[0, 0], "ko", label="start")
    axes.plot(*function.minimizer(2), "r*", markersize=14, label="minimum")
    axes.set_title(f"{function.name}: trajectories of run 0")
    axes.legend(fontsize=8)
    save_figure(figure, path)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def final_table(all_runs: Sequence[Runs], row_key, column_key, title: str) -> str:
    """Markdown table of the mean ± std over runs of the final value."""
    cells: dict = {}
    rows, columns = [], []
    for runs in all_runs:
        row, column = row_key(runs), column_key(runs)
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []
        finals = [float(runs.values[int(last), index]) for index, last in enumerate(runs.last_step)]
        cells[row, column] = _mean_std(finals)
    lines = [title, "", "| method | " + " | ".join(str(column) for column in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        entries = []
        for column in columns:
            if (row, column) not in cells:
                entries.append("")
                continue
            mean, std = cells[row, column]
            entries.append(f"{mean:.6g} ± {std:.2g}")
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def plot_final_vs(
    all_runs: Sequence[Runs], x_key, x_label: str, panel_key, path: str, log_x: bool, line_key=None
) -> None:
    """Mean final gap vs ``x_key`` (n or angle), one panel per ``panel_key``, one line per
    ``line_key`` (default: the method's label). Gaps below 1e-8 (float32 resolution at the
    minimum) are drawn at 1e-8."""
    line_key = line_key or (lambda runs: runs.method.label)
    plt = _pyplot()
    panels = list(dict.fromkeys(panel_key(runs) for runs in all_runs))
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axes, panel in zip(axes_list[0], panels):
        lines: dict[str, list] = {}
        for runs in all_runs:
            if panel_key(runs) != panel:
                continue
            finals = [float(runs.gaps[int(last), index]) for index, last in enumerate(runs.last_step)]
            lines.setdefault(line_key(runs), []).append((x_key(runs), max(_mean_std(finals)[0], 1e-8)))
        for label, points in lines.items():
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
        axes.set_yscale("log")
        if log_x:
            axes.set_xscale("log", base=2)
        axes.set_xlabel(x_label)
        axes.set_ylabel("final f(x) - f(x*) (mean over runs)")
        axes.set_title(str(panel))
        axes.grid(True, which="both", alpha=0.3)
    axes_list[0][-1].legend(fontsize=7)
    save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# the studies
# ---------------------------------------------------------------------------------------------
