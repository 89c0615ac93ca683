"""``fwdgrad train | compare | bench`` under ``torchrun``: the option ``distributed=none|data|tangent``.

- :func:`session`: under torchrun (``RANK``/``WORLD_SIZE`` set) the command runs inside one
  default process group (:func:`fwdgrad.distributed.run.initialize`: gloo on the CPU,
  NCCL for CUDA tensors, ``cuda:LOCAL_RANK``), destroyed when it ends.
- :func:`shared_run_dir`: every process uses rank 0's run directory (Hydra's default name
  holds the time, which the processes would read at different moments).
- :func:`distribute`: the estimator wrapped for the mode (:mod:`fwdgrad.distributed.parallel`),
  backprop under DistributedDataParallel, the training data sharded for ``data``.
- :func:`check_mode`: one-line errors for what cannot work (a distributed mode without
  torchrun, several processes without a mode, tangent parallelism of backprop or of
  activity perturbation).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from fwdgrad.core.estimators import Backprop
from fwdgrad.core.weight import WeightForwardGradient
from fwdgrad.distributed import run as distributed_run
from fwdgrad.distributed.parallel import DataParallel, TangentParallel, ddp_module
from fwdgrad.distributed.run import PARALLELISMS, DistributedRun
from fwdgrad.experiments.errors import UsageError


def mode(cfg: DictConfig) -> str:
    """``cfg.distributed`` (``none`` for configs written before the option existed)."""
    value = cfg.get("distributed", "none") or "none"
    if value not in PARALLELISMS:
        raise UsageError(f"unknown distributed mode {value!r}; valid choices: {', '.join(PARALLELISMS)}")
    return value


@contextmanager
def session(cfg: DictConfig) -> Iterator[DistributedRun | None]:
    """The command's process group under torchrun (None without torchrun)."""
    launch = distributed_run.launch_environment()
    if launch is None:
        if mode(cfg) != "none":
            raise UsageError(f"distributed={mode(cfg)} needs a torchrun launch (RANK and WORLD_SIZE are not set): "
                             f"torchrun --nproc_per_node=N -m fwdgrad <command> distributed={mode(cfg)} ...")
        yield None
        return
    device = distributed_run.rank_device(str(cfg.device))
    distributed_run.initialize(device, str(cfg.get("distributed_backend", "auto")))
    try:
        yield DistributedRun()
    except BaseException:
        distributed_run.shutdown(wait_for_peers=False)
        raise
    distributed_run.shutdown()


def shared_run_dir(run: DistributedRun | None, run_dir: str) -> str:
    """Rank 0's ``run_dir`` on every process; a different, empty one Hydra made here is removed."""
    if run is None:
        return run_dir
    shared = run.broadcast_object(run_dir)
    if os.path.abspath(shared) != os.path.abspath(run_dir) and os.path.isdir(run_dir) and not os.listdir(run_dir):
        os.rmdir(run_dir)
    return shared


def restarted_run_of(run: DistributedRun | None, run_dir: str, config_file: str = "config.yaml") -> bool:
    """Is this a torchrun restart (``--max-restarts``) of a run that already wrote ``run_dir``
    (its ``config_file``)? Then the command resumes it from its last checkpoint instead of
    refusing the directory."""
    launch = distributed_run.launch_environment()
    if run is None or launch is None or launch.restart_count == 0:
        return False
    return bool(run.run_on_writer(lambda: os.path.isfile(os.path.join(run_dir, config_file))))


def check_mode(cfg: DictConfig, run: DistributedRun | None) -> DistributedRun | None:
    """The DistributedRun the training loop uses (None: one process); UsageError for a bad combination."""
    value = mode(cfg)
    if value == "none":
        if run is not None and run.world_size > 1:
            raise UsageError(f"launched by torchrun with {run.world_size} processes but distributed=none: every "
                             "process would train the same run alone; give distributed=data or distributed=tangent")
        return None
    if run is None:
        raise UsageError(f"distributed={value} needs a torchrun launch: torchrun --nproc_per_node=N -m fwdgrad "
                         f"<command> distributed={value} ...")
    gradient = cfg.gradient
    if value == "tangent" and gradient.get("name") == "bp":
        raise UsageError("distributed=tangent splits the K tangents of a forward gradient among the processes; "
                         "gradient=bp has none: use distributed=data (DistributedDataParallel)")
    if value == "tangent" and gradient.get("perturbation", "weight") != "weight":
        raise UsageError("distributed=tangent needs weight-space tangents (gradient.perturbation=weight); "
                         f"perturbation={gradient.get('perturbation')!r} draws tangents per sample: "
                         "use distributed=data")
    return run


def distribute(cfg: DictConfig, run: DistributedRun | None, model: torch.nn.Module, estimator, bundle, device):
    """``(model, estimator, bundle)`` for the mode: the estimator wrapped, backprop's model under
    DistributedDataParallel, the training loader sharded for ``data`` (unchanged for ``none``)."""
    if run is None:
        return model, estimator, bundle
    buffers = str(cfg.get("buffer_sync", "average"))
    if mode(cfg) == "tangent":
        return model, TangentParallel(estimator), bundle
    train_loader = distributed_run.shard_training_loader(bundle.train_loader, int(cfg.seed))
    bundle = dataclasses.replace(bundle, train_loader=train_loader)
    if isinstance(estimator, Backprop):
        module = ddp_module(model, device=device)
        return module, DataParallel(Backprop(module), module=module, buffers=buffers), bundle
    return model, DataParallel(estimator, buffers=buffers), bundle


def communication(estimator, run: DistributedRun | None) -> dict:
    """What a summary says about the processes and the bytes they handed to the collectives."""
    if run is None:
        return {"distributed": "none", "world_size": 1}
    per_step = estimator.counter.per_step()
    return {
        "distributed": "tangent" if isinstance(estimator, TangentParallel) else "data",
        "world_size": run.world_size,
        "backend": str(torch.distributed.get_backend()),
        "traffic": estimator.traffic,
        "bytes_per_step": sum(per_step.values()),
        "bytes_per_step_by_category": per_step,
        "bytes_setup": estimator.counter.bytes.get("setup", 0),
        "weight_space": isinstance(getattr(estimator, "estimator", None), WeightForwardGradient),
    }
