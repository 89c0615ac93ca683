"""Optimizers, learning-rate schedules and gradient clipping, by the names the configs use."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "exponential", "cosine", "step")
# the unit a scheduler's parameters are in, hence when it is stepped
SCHEDULER_INTERVAL = {"constant": "epoch", "exponential": "step", "cosine": "epoch", "step": "epoch"}
def build_optimizer(
    name: str, parameters: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, nesterov: bool = False,
    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (with or without momentum), ``Adam`` or ``AdamW``."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"the learning rate must be a positive number, got {lr!r}")
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, epochs: int = 1, decay: float = 1e-4, step_size: int = 1,
    gamma: float = 0.1, min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A learning-rate schedule; step it per :data:`SCHEDULER_INTERVAL` unit.

    - ``constant``: lr.
    - ``exponential``: Baydin et al.'s per-step decay lr·exp(-decay·step).
    - ``cosine``: min_lr + (lr - min_lr)(1 + cos(π·epoch/epochs))/2.
    - ``step``: lr·gamma^⌊epoch/step_size⌋.
    """
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "exponential":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: math.exp(-decay * step))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=min_lr)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    raise ValueError(f"unknown scheduler {name!r}; valid choices: {', '.join(SCHEDULERS)}")


def clip_gradient_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale all ``.grad`` by min(1, max_norm / ||g||_2), g the concatenation of them; return ||g|| before."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    factor = min(1.0, max_norm / (float(norm) + 1e-12))
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return float(norm)
