"""A training loop for any gradient estimator, with metrics, checkpoints and exact resume.

One step (the estimator replaces ``loss.backward()``)::

    optimizer.zero_grad()
    loss = estimator.backward(lambda: cross_entropy(model(x), y))   # fills p.grad
    clip ||g||_2 to max_norm (optional);  optimizer.step();  scheduler.step() per step or per epoch

After every epoch :class:`Trainer` evaluates validation and test loss/accuracy, appends a
row to ``metrics.csv`` and TensorBoard, and writes ``checkpoint.pt`` atomically (temp file
in the same directory, then ``os.replace``) with its SHA-256 in ``checkpoint.pt.sha256``
(:mod:`fwdgrad.train.checkpoints`). The checkpoint holds everything the rest of
the run depends on: model, optimizer, scheduler, the estimator's tangent generator, torch
(CPU and CUDA), numpy and Python RNG states, the training DataLoader's shuffling
generator, the metric history and the early-stopping state. :meth:`Trainer.fit` on a run
directory with a checkpoint continues after its last epoch and ends with exactly the
losses and accuracies of an uninterrupted run (timings and memory naturally differ).

Only torch is imported at module level; tqdm and TensorBoard are imported when used.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fwdgrad.train.atomic import atomic_save, remove_temporaries
from fwdgrad.train.checkpoints import (
    CHECKPOINT_KEYS,
    CheckpointError,
    _estimator_state,
    _load_estimator_state,
    _rng_states,
    _set_rng_states,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    verify_digest,
)
from fwdgrad.train.metrics import METRIC_COLUMNS, TIMING_COLUMNS, MetricsWriter, evaluate
from fwdgrad.train.optim import (
    OPTIMIZERS,
    SCHEDULER_INTERVAL,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    clip_gradient_norm,
)
from fwdgrad.train.profiling import PeakMemory

# what `fwdgrad.training` held before the parts moved to optim, checkpoints and metrics
__all__ = [
    "CHECKPOINT_KEYS", "METRIC_COLUMNS", "OPTIMIZERS", "SCHEDULERS", "SCHEDULER_INTERVAL", "TIMING_COLUMNS",
    "CheckpointError", "TrainState", "Trainer", "build_optimizer", "build_scheduler", "clip_gradient_norm",
    "evaluate", "load_checkpoint", "resolve_device", "seed_everything",
]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``; ``cuda[:i]``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; valid choices: auto, cpu")
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}; valid choices: auto, cpu, cuda")


def _check_count(name: str, value: object, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' ' + alternative if alternative else ''}, got {value!r}")


@dataclass
class TrainState:
    """What a checkpoint restores besides the modules: progress, history, early stopping."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False


class Trainer:
    """Trains ``model`` with ``estimator`` (:class:`fwdgrad.ForwardGradient`, :class:`fwdgrad.Backprop`, ...).

    Args:
        model, estimator, optimizer, scheduler: the pieces of the loop; ``scheduler_interval``
            is ``"step"`` or ``"epoch"``.
        data: a :class:`fwdgrad.train.data.DataBundle` (train/val/test loaders, shuffling generator).
        run_dir: where ``metrics.csv``, ``checkpoint.pt``, ``best_model.pt`` and
            ``tensorboard/`` go.
        epochs: maximum number of epochs.
        device: where the model and batches live.
        max_grad_norm: clip the (estimated) gradient to this L2 norm; ``None``: no clipping.
        patience: stop after this many epochs without a validation-loss improvement larger
            than ``min_delta``; ``None``: never stop early.
        max_steps_per_epoch: cut epochs short (quick runs on slow hardware); ``None``: full.
        max_eval_batches: evaluate on at most this many batches of each eval loader.
            ``train_loss`` is the mean minibatch loss of the epoch's steps; ``train_accuracy``
            is measured at epoch end in eval mode on ``data.train_eval_loader``.
        progress: show a tqdm bar per epoch.
        callbacks: called as ``callback(trainer, row)`` after each epoch's checkpoint.
        metadata: plain values stored in every checkpoint (e.g. the run's config) and
            returned by :meth:`resume`.
        distributed: a :class:`fwdgrad.distributed.run.DistributedRun` when the loop runs on
            several processes (the estimator then wraps the step's collectives,
            :mod:`fwdgrad.distributed.parallel`): rank 0 alone writes files, shows progress and reads
            the checkpoint (broadcast to the others); evaluation is sharded and its sums
            all-reduced; a ``DistributedSampler`` gets ``set_epoch`` every epoch.

    Step time and memory: ``ms_per_step`` is the median over the epoch's timed steps of
    zero_grad + estimator + clipping + ``optimizer.step()``, each between two device
    synchronizations: the same unit as ``fwdgrad bench``. ``peak_memory_mb`` on CUDA is
    ``max_memory_allocated`` above the epoch's start over all steps (exact, free); on the
    CPU, where the resident size has to be sampled by a thread that would slow the timed
    steps, it is measured over the epoch's first ``memory_steps`` steps, which are not
    timed (if the epoch has no other step, they are timed too).
    """

    def __init__(
        self, model: torch.nn.Module, estimator, optimizer: torch.optim.Optimizer, scheduler, data, run_dir: str,
        epochs: int, device: torch.device | str = "cpu", scheduler_interval: str = "epoch",
        max_grad_norm: float | None = None, patience: int | None = None, min_delta: float = 0.0,
        max_steps_per_epoch: int | None = None, max_eval_batches: int | None = None, progress: bool = True,
        tensorboard: bool = True, callbacks: Iterable[Callable] = (), description: str = "",
        metadata: dict | None = None, memory_steps: int = 1, distributed=None,
    ):
        _check_count("epochs", epochs)
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or null, got {max_grad_norm!r}")
        for name, value in (("patience", patience), ("max_steps_per_epoch", max_steps_per_epoch),
                            ("max_eval_batches", max_eval_batches)):
            if value is not None:
                _check_count(name, value, "or null")
        _check_count("memory_steps", memory_steps)
        self.model, self.estimator, self.optimizer, self.scheduler = model, estimator, optimizer, scheduler
        self.data, self.run_dir, self.epochs = data, run_dir, epochs
        self.device = torch.device(device)
        self.scheduler_interval = scheduler_interval
        self.max_grad_norm, self.patience, self.min_delta = max_grad_norm, patience, min_delta
        self.max_steps_per_epoch, self.max_eval_batches = max_steps_per_epoch, max_eval_batches
        self.progress, self.tensorboard, self.callbacks = progress, tensorboard, list(callbacks)
        self.description = description
        self.metadata = dict(metadata or {})
        self.memory_steps = memory_steps
        self.distributed = distributed
        self.is_writer = distributed is None or distributed.is_writer
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.last_gradient_norm = math.nan
        self._metrics: MetricsWriter | None = None  # while fit runs, on the process that writes files
        os.makedirs(run_dir, exist_ok=True)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    def state_dict(self) -> dict:
        """Everything the rest of the run depends on, as tensors and plain values only."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "estimator": _estimator_state(self.estimator),
            "data_generator": self.data.generator.get_state(),
            "rng": _rng_states(),
            "state": vars(self.state).copy(),
            "metadata": self.metadata,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        _load_estimator_state(self.estimator, checkpoint["estimator"])
        self.data.generator.set_state(checkpoint["data_generator"])
        _set_rng_states(checkpoint["rng"])
        self.state = TrainState(**checkpoint["state"])

    def resume(self, verify: Callable[[dict], None] | None = None) -> dict | None:
        """Load ``run_dir/checkpoint.pt`` if present (:func:`load_checkpoint`: tensors and plain
        values only, the SHA-256 recorded when it was written); return its metadata, or None when
        there is no checkpoint.

        ``verify(metadata)`` runs before anything is restored (e.g. to refuse a checkpoint
        written with another configuration).
        """
        # the configuration is compared before the digest: a checkpoint copied from another run is named as such
        if self.distributed is None:
            if not os.path.exists(self.checkpoint_path):
                return None
            checkpoint = load_checkpoint(self.checkpoint_path, map_location=self.device, check_digest=False)
        else:  # rank 0 reads it, every process restores it (its tensors go to its own device)
            checkpoint = self.distributed.run_on_writer(
                lambda: load_checkpoint(self.checkpoint_path, "cpu", check_digest=False)
                if os.path.exists(self.checkpoint_path) else None)
            if checkpoint is None:
                return None
        metadata = checkpoint.get("metadata", {})
        if verify is not None:
            verify(metadata)
        if self.distributed is None:
            verify_digest(self.checkpoint_path)
        else:
            self.distributed.run_on_writer(lambda: verify_digest(self.checkpoint_path))
        try:
            self.load_state_dict(checkpoint)
        except (KeyError, RuntimeError, TypeError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{self.checkpoint_path} does not fit this run's model, optimizer or estimator "
                                  f"({reason[:200]})") from error
        return metadata

    # ------------------------------------------------------------------ the loop
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        """One training step: what ``ms_per_step`` and ``fwdgrad bench`` time."""
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self.estimator, "runs_model", False):
            # local losses (fwdgrad.local.estimator): the estimator runs the model block by block on the batch
            loss = self.estimator.backward(x, y)
        else:
            loss = self.estimator.backward(lambda: F.cross_entropy(self.model(x), y, reduction=reduction))
        if self.max_grad_norm is not None:
            self.last_gradient_norm = clip_gradient_norm(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        return loss

    def train_epoch(self) -> dict:
        """One pass over the training loader; returns mean loss, ms per step, steps, peak memory."""
        self.model.train()
        per_sample = getattr(self.estimator, "per_sample_loss", False)
        reduction = "none" if per_sample else "mean"
        loader = self.data.train_loader
        total = len(loader) if self.max_steps_per_epoch is None else min(len(loader), self.max_steps_per_epoch)
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: this epoch's permutation
            set_epoch(self.state.epoch)
        bar = None
        if self.progress and self.is_writer:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"{self.description}epoch {self.state.epoch + 1}/{self.epochs}",
                       leave=False, dynamic_ncols=True)
        # CUDA counts allocations exactly and for free: the whole epoch. The CPU needs a sampling
        # thread, which would slow the steps it overlaps: only the first steps, not timed.
        cpu = self.device.type != "cuda"
        memory_steps = min(self.memory_steps, total) if cpu else total
        losses, step_milliseconds = [], []
        peak = PeakMemory(self.device)
        with ExitStack() as measuring:
            for index, (x, y) in enumerate(loader):
                if index >= total:
                    break  # the loader's generator already drew this epoch's order: resume stays exact
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if index == 0:
                    measuring.enter_context(peak)
                self._sync()
                start = time.perf_counter()
                loss = self._step(x, y, reduction)
                self._sync()
                if not (cpu and index < memory_steps) or total <= memory_steps:
                    step_milliseconds.append(1e3 * (time.perf_counter() - start))
                if index == memory_steps - 1:
                    measuring.close()  # stops the sampling before the timed steps
                if self.scheduler_interval == "step":
                    self.scheduler.step()
                self.state.step += 1
                value = float(loss)
                losses.append(value)
                if not math.isfinite(value):
                    raise RuntimeError(f"training loss is {value} at step {self.state.step}; lower the learning rate")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                if self._metrics is not None:
                    self._metrics.step_loss(value, self.state.step)
        if bar is not None:
            bar.close()
        steps = len(losses)
        return {
            "train_loss": sum(losses) / max(1, steps),
            "ms_per_step": statistics.median(step_milliseconds) if step_milliseconds else math.nan,
            "peak_memory_mb": peak.megabytes,
            "steps": steps,
        }

    def fit(self, resume: bool = False) -> TrainState:
        """Train from the current state until ``epochs`` or early stopping.

        With ``resume``, load the checkpoint first (:meth:`resume`); a caller that wants to
        inspect the checkpoint's metadata calls :meth:`resume` itself, then ``fit()``.
        """
        if resume and self.resume() is None:
            raise FileNotFoundError(f"resume requested but there is no checkpoint at {self.checkpoint_path}")
        if self.is_writer:
            remove_temporaries(self.run_dir)  # left by a process killed while writing a checkpoint
            self._metrics = MetricsWriter(self.run_dir, self.tensorboard, resumed_at_step=self.state.step)
        try:
            while self.state.epoch < self.epochs and not self.state.stopped_early:
                lr = self.optimizer.param_groups[0]["lr"]
                start = time.perf_counter()
                row = {"epoch": self.state.epoch + 1, "lr": lr, **self.train_epoch()}
                evaluation = evaluate if self.distributed is None else self.distributed.evaluate
                row["train_accuracy"] = evaluation(
                    self.model, self.data.train_eval_loader, self.device, self.max_eval_batches)[1]
                row["val_loss"], row["val_accuracy"] = evaluation(
                    self.model, self.data.val_loader, self.device, self.max_eval_batches) \
                    if self.has_validation else (None, None)
                row["test_loss"], row["test_accuracy"] = evaluation(
                    self.model, self.data.test_loader, self.device, self.max_eval_batches)
                row["epoch_seconds"] = time.perf_counter() - start
                if self.scheduler_interval == "epoch":
                    self.scheduler.step()
                self._end_epoch(row)
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
        return self.state

    @property
    def has_validation(self) -> bool:
        """False without a validation split (``data.val_fraction=0``): no validation metrics, no
        early stopping, no ``best_model.pt``; the summary's "best" epoch is the last."""
        return len(self.data.val_loader.dataset) > 0

    def _end_epoch(self, row: dict) -> None:
        state = self.state
        state.epoch += 1
        state.history.append(row)
        if not self.has_validation:
            state.best_epoch = state.epoch
        elif row["val_loss"] < state.best_val_loss - self.min_delta:
            state.best_val_loss, state.best_epoch, state.epochs_without_improvement = row["val_loss"], state.epoch, 0
            if self.is_writer:
                atomic_save(self.model.state_dict(), os.path.join(self.run_dir, "best_model.pt"))
        else:
            state.epochs_without_improvement += 1
            if self.patience is not None and state.epochs_without_improvement >= self.patience:
                state.stopped_early = True
        if self._metrics is not None:
            self._metrics.epoch(state.history, state.epoch)
        if self.is_writer:
            save_checkpoint(self.state_dict(), self.checkpoint_path)
        for callback in self.callbacks:
            callback(self, row)

    def summary(self) -> dict:
        """Final and best-validation metrics (the row of the best-validation epoch; without a
        validation split, the validation entries are None and "best" is the last epoch)."""
        history = self.state.history
        last = history[-1]
        steps = sum(r["steps"] for r in history)
        best = history[self.state.best_epoch - 1] if self.state.best_epoch else last
        return {
            "epochs_completed": self.state.epoch,
            "steps": self.state.step,
            "stopped_early": self.state.stopped_early,
            "final_train_loss": last["train_loss"],
            "final_val_loss": last["val_loss"],
            "test_accuracy_last": last["test_accuracy"],
            "test_loss_last": last["test_loss"],
            "best_epoch": self.state.best_epoch,
            "best_val_loss": best["val_loss"],
            "validation": self.has_validation,
            "test_accuracy_at_best_val": best["test_accuracy"],
            "test_loss_at_best_val": best["test_loss"],
            "ms_per_step": sum(r["ms_per_step"] * r["steps"] for r in history) / max(1, steps),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
            "train_seconds": sum(r["epoch_seconds"] for r in history),
        }
