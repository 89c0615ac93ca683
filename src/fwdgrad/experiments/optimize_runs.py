"""What one ``fwdgrad optimize`` study produces: the methods it compares and the runs of each."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fwdgrad.studies.descent import GradientSpec
from fwdgrad.studies.functions import TestFunction


@dataclass(frozen=True)
class Method:
    """A gradient estimator as the tables name it, e.g. ``frog K=16``."""

    label: str
    spec: GradientSpec


@dataclass
class Runs:
    """S runs of one method on one function: the tensors of :class:`fwdgrad.studies.functions.DescentResult`."""

    study: str
    function: TestFunction
    n: int
    method: Method
    lr: float
    values: torch.Tensor
    distances: torch.Tensor
    wall_time: torch.Tensor
    last_step: torch.Tensor
    positions: torch.Tensor | None
    source: str = ""  # whose setting this is (the baydin study names it)

    @property
    def gaps(self) -> torch.Tensor:
        return self.values.double() - self.function.minimum_value(self.n)

    def step_rows(self, log_every: int) -> list[list]:
        rows = []
        gaps = self.gaps
        prefix = [self.study, self.function.name, self.n, self.method.label, self.lr]
        for run_index in range(self.values.shape[1]):
            last = int(self.last_step[run_index])
            logged = sorted({*range(0, last + 1, max(1, log_every)), last})
            for step in logged:
                rows.append(prefix + [
                    run_index, step, float(self.values[step, run_index]), float(gaps[step, run_index]),
                    float(self.distances[step, run_index]), round(float(self.wall_time[step]), 6),
                ])
        return rows

    def summary_rows(self) -> list[list]:
        rows = []
        gaps = self.gaps
        for run_index in range(self.values.shape[1]):
            last = int(self.last_step[run_index])
            values = self.values[: last + 1, run_index]
            best = int(torch.where(values.isnan(), torch.inf, values).argmin())
            rows.append([
                self.study, self.function.name, self.n, self.method.label, self.lr, run_index, last,
                float(values[best]), float(values[last]), float(gaps[best, run_index]),
                float(gaps[last, run_index]), float(self.distances[last, run_index]),
                round(float(self.wall_time[last]), 6),
            ])
        return rows
