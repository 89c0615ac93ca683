"""What a training run measures after each epoch, and where it is written.

``metrics.csv`` (one row per epoch, :data:`METRIC_COLUMNS`) and TensorBoard scalars, written by
the process that writes files; :func:`evaluate` gives the loss and accuracy of one split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from fwdgrad.train.atomic import write_csv

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
    "epoch_seconds", "ms_per_step", "peak_memory_mb", "steps",
)
# columns that measure the machine, not the optimization: they differ between two identical runs
TIMING_COLUMNS = ("epoch_seconds", "ms_per_step", "peak_memory_mb")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, max_batches: int | None = None,
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over ``loader``'s ``(x, y)`` batches."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for index, (x, y) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan
    return total_loss / count, correct / count


class MetricsWriter:
    """``metrics.csv`` and TensorBoard of one run directory; only the process that writes files has one.

    ``metrics.csv`` is rewritten whole (atomically) after every epoch, so it always holds
    exactly the epochs of the checkpoint next to it. TensorBoard (``tensorboard=True``) gets
    every step's loss (``train/step_loss``) and every epoch's columns (``train/``, ``val/``,
    ``test/``, ``perf/``); a resumed run drops the points after ``resumed_at_step`` (those of
    an interrupted epoch) and keeps the rest.
    """

    def __init__(self, run_dir: str, tensorboard: bool, resumed_at_step: int = 0):
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                              purge_step=resumed_at_step + 1 if resumed_at_step else None)

    def step_loss(self, value: float, step: int) -> None:
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("train/step_loss", value, step)

    def epoch(self, history: list[dict], epoch: int) -> None:
        """After epoch ``epoch``: ``metrics.csv`` with all of ``history``, TensorBoard with its last row."""
        write_csv(history, self.csv_path, METRIC_COLUMNS)
        if self._tensorboard is None:
            return
        row = history[-1]
        for key in METRIC_COLUMNS[1:]:
            if row[key] is None:  # no validation split
                continue
            split, _, name = key.partition("_")
            tag = f"{split}/{name}" if split in ("train", "val", "test") else f"perf/{key}"
            self._tensorboard.add_scalar(tag, row[key], epoch)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
