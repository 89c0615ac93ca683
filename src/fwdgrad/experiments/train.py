"""``fwdgrad train``: train one network with one gradient estimator (bp | fg | frog).

Config: ``fwdgrad/conf/train.yaml`` with the groups ``data`` (:mod:`fwdgrad.train.data`),
``model`` (:mod:`fwdgrad.train.models`), ``gradient`` (:mod:`fwdgrad.experiments.common`),
``optimizer`` and ``scheduler`` (:mod:`fwdgrad.train.trainer`). The loop, metrics and
checkpoints are :class:`fwdgrad.train.trainer.Trainer`'s; this module wires the config to it.

A run directory holds ``config.yaml`` (resolved), ``metrics.csv``, ``tensorboard/``,
``checkpoint.pt`` (every epoch, atomic), ``best_model.pt`` and ``summary.json``.
``resume=<run dir>`` (or ``resume=true run_dir=<run dir>``) continues it with its saved
config (:mod:`fwdgrad.experiments.rundir`: what may change on resume, what is refused); a
new run never writes into a directory that holds one.

Under ``torchrun --nproc_per_node=N -m fwdgrad train distributed=data|tangent ...``
(:mod:`fwdgrad.experiments.launch`) rank 0 decides about the run directory and writes it;
every process trains; a torchrun restart (``--max-restarts``) resumes the run's last
checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from fwdgrad.distributed import run as distributed_run
from fwdgrad.experiments import launch, rundir
from fwdgrad.experiments.common import LOCAL_LRS, build_estimator, method_label
from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import CONFIG_DIR, run
from fwdgrad.train import data as datasets
from fwdgrad.train import reference_lrs
from fwdgrad.train.atomic import atomic_write_text
from fwdgrad.train.models import build_model, count_parameters
from fwdgrad.train.profiling import device_name
from fwdgrad.train.trainer import (
    SCHEDULER_INTERVAL,
    Trainer,
    build_optimizer,
    build_scheduler,
    resolve_device,
    seed_everything,
)


class TrainingDiverged(UsageError):
    """The loss became non-finite: the learning rate is too large for this method."""


# keys of the data group that are not load_dataset arguments
_LOADER_KEYS = ("name", "eval_batch_size", "train_eval_samples", "num_workers")


def compose(config_name: str = "train", overrides: Iterable[str] = ()) -> DictConfig:
    """The config ``fwdgrad <command> overrides...`` would see (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def resolve_lr(cfg: DictConfig) -> tuple[float, str]:
    """The learning rate and where it came from: an explicit number, or ``auto`` from the paper's tables.

    ``auto``: ``fc`` (width w) and ``baydin_mlp`` (= fc of width 1024) use ``fc_nns.csv``
    (``fc_w=<w>``); ``resnet18`` and ``vit`` use ``sota_nns.csv``; dataset ``mnist`` or
    ``mnist5k`` -> ``mnist``, ``cifar10`` -> ``cifar10``; approach bp, fg-mean or frog with
    k = num_tangents. Tables from Flügel et al. 2024 (Helmholtz-AI-Energy/frog, lrs/).
    """
    lr = cfg.lr
    if lr != "auto":
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise UsageError(f"lr must be a positive number or 'auto', got {lr!r}")
        return float(lr), "lr from the config"
    model, dataset = cfg.model.name, cfg.data.name
    if cfg.gradient.name == "local":
        if model not in LOCAL_LRS or dataset not in ("mnist", "mnist5k"):
            raise UsageError(f"lr=auto: fwdgrad has measured local losses' learning rate for "
                             f"{', '.join(LOCAL_LRS)} on mnist5k only, not for model {model!r} on {dataset!r}; "
                             "pass lr=<number>")
        if cfg.gradient.get("guess") is not None:
            return LOCAL_LRS[model], (f"lr=auto: fwdgrad's measured lr for gradient.guess=local on {model} (an "
                                      "lr-search, docs/guesses.md)")
        return LOCAL_LRS[model], f"lr=auto: fwdgrad's measured lr for local losses on {model} (README)"
    if model in ("fc", "baydin_mlp"):
        table = "fc_nns"
        width = cfg.model.get("width", 256) if model == "fc" else 1024
        row_model = f"fc_w={width}"
    elif model in ("resnet18", "vit"):
        table, row_model = "sota_nns", model
    else:
        raise UsageError(f"lr=auto: the paper's tables have no learning rate for model {model!r} "
                         "(they cover fc, baydin_mlp, resnet18, vit); pass lr=<number>")
    row_dataset = {"mnist": "mnist", "mnist5k": "mnist", "cifar10": "cifar10"}.get(dataset)
    if row_dataset is None:
        raise UsageError(f"lr=auto: the paper's tables have no learning rate for dataset {dataset!r} "
                         "(they cover mnist, mnist5k as mnist, cifar10); pass lr=<number>")
    gradient = cfg.gradient
    try:
        approach = reference_lrs.gradient_approach(gradient.name, gradient.get("aggregation", "mean"))
        k = None if approach == "bp" else gradient.get("num_tangents", 1)
        value = reference_lrs.reference_lr(table, model=row_model, dataset=row_dataset, gradient_approach=approach, k=k)
    except LookupError as error:
        raise UsageError(f"lr=auto: {error.args[0]}") from error
    source = (f"lr=auto: {table}.csv row model={row_model} dataset={row_dataset} approach={approach} k={k} "
              "(Flügel et al. 2024, Helmholtz-AI-Energy/frog)")
    return value, source


def _load_data(cfg: DictConfig, seed: int) -> datasets.DataBundle:
    options = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _LOADER_KEYS}
    splits = datasets.load_dataset(cfg.data.name, **options)
    return datasets.make_loaders(
        splits, batch_size=cfg.batch_size, eval_batch_size=cfg.data.get("eval_batch_size", 1000), seed=seed,
        num_workers=cfg.data.get("num_workers", 0), train_eval_samples=cfg.data.get("train_eval_samples", 5000),
    )


def build_trainer(cfg: DictConfig, run_dir: str, callbacks: Iterable[Callable] = (), description: str = "",
                  metadata: dict | None = None, distributed=None):
    """Everything a run needs, from the config: ``(trainer, info)``; info says what was built.
    ``metadata`` goes into every checkpoint (the run's config). ``distributed``: the
    :class:`fwdgrad.distributed.run.DistributedRun` of a torchrun launch (see :mod:`launch`)."""
    distributed = launch.check_mode(cfg, distributed)
    device = resolve_device(str(cfg.device)) if distributed is None else distributed_run.rank_device(str(cfg.device))
    seed_everything(cfg.seed)
    bundle = _load_data(cfg, cfg.seed)
    model_options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = build_model(cfg.model.name, bundle.channels, bundle.image_size, bundle.num_classes, **model_options)
    model.to(device)
    estimator = build_estimator(cfg.gradient, model, seed=cfg.seed, model_name=cfg.model.name,
                                input_shape=(bundle.channels, bundle.image_size, bundle.image_size))
    # local losses' heads are the estimator's parameters: the optimizer updates them too
    auxiliary = list(getattr(estimator, "auxiliary_parameters", list)())
    model, estimator, bundle = launch.distribute(cfg, distributed, model, estimator, bundle, device)
    lr, lr_source = resolve_lr(cfg)
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer = build_optimizer(opt.pop("name"), [*model.parameters(), *auxiliary], lr, **opt)
    sched = OmegaConf.to_container(cfg.scheduler, resolve=True)
    name = sched.pop("name")
    if name not in SCHEDULER_INTERVAL:
        raise UsageError(f"unknown scheduler {name!r}; valid choices: {', '.join(SCHEDULER_INTERVAL)}")
    scheduler = build_scheduler(name, optimizer, epochs=cfg.epochs, **sched)
    trainer = Trainer(
        model, estimator, optimizer, scheduler, bundle, run_dir, epochs=cfg.epochs, device=device,
        scheduler_interval=SCHEDULER_INTERVAL[name], max_grad_norm=cfg.max_grad_norm, patience=cfg.patience,
        min_delta=cfg.min_delta, max_steps_per_epoch=cfg.max_steps_per_epoch, max_eval_batches=cfg.max_eval_batches,
        progress=cfg.progress, tensorboard=cfg.tensorboard, callbacks=callbacks, description=description,
        metadata=metadata, distributed=distributed,
    )
    info = {
        "method": method_label(cfg.gradient), "model": cfg.model.name, "parameters": count_parameters(model),
        "dataset": cfg.data.name, "train_size": len(bundle.splits.train), "val_size": len(bundle.splits.val),
        "test_size": len(bundle.splits.test), "data_source": bundle.splits.source, "lr": lr, "lr_source": lr_source,
        "device": str(device), "device_name": device_name(device), **launch.communication(estimator, distributed),
    }
    return trainer, info


def run_training(cfg: DictConfig, run_dir: str, resume: bool = False, callbacks: Iterable[Callable] = (),
                 description: str = "", verbose: bool = True, resume_keys: Iterable[str] | None = None,
                 overrides: Iterable[str] = (), distributed=None) -> dict:
    """Train per ``cfg`` in ``run_dir``; return the summary.

    A new run refuses a ``run_dir`` that already holds one (:func:`rundir.check_new_run_dir`).
    With ``resume`` the run continues with the configuration saved in ``run_dir/config.yaml``;
    ``cfg``'s values of ``resume_keys`` (the keys the command line set; None: every key) may
    change only what :data:`rundir.SAFE_ON_RESUME` allows (e.g. more epochs), and the change
    is recorded in ``resumes.yaml`` (with the command-line ``overrides``). A run killed
    before its first checkpoint restarts from the beginning with its saved configuration.

    ``distributed`` (a torchrun launch, :func:`launch.session`): rank 0 checks the directory
    and reads the saved configuration, and hands the outcome to every process; only rank 0
    writes and prints.
    """
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    cfg, changes = rundir.open_run(run_dir, cfg, resume, resume_keys, "config.yaml", "run", distributed)
    launch.check_mode(cfg, distributed)  # before anything is written
    writer = distributed is None or distributed.is_writer
    verbose = verbose and writer
    os.makedirs(run_dir, exist_ok=True)
    metadata = {"config": OmegaConf.to_yaml(cfg, resolve=True)}
    trainer, info = build_trainer(cfg, run_dir, callbacks, description, metadata=metadata, distributed=distributed)
    continued = resume and trainer.resume(
        verify=lambda saved: rundir.check_checkpoint_config(saved.get("config"), cfg, checkpoint_path)) is not None
    if writer:
        rundir.save_config(run_dir, metadata["config"], "config.yaml", resume, overrides, changes)
    if verbose:
        print(f"{info['method']} | {info['model']} ({info['parameters']:,} parameters) | {info['dataset']} "
              f"({info['train_size']}/{info['val_size']}/{info['test_size']}) | {info['device_name']}")
        if info["data_source"] is not None:
            print(f"{info['dataset']} read from {info['data_source']}")
        print(f"lr = {info['lr']:.6g} ({info['lr_source']})")
        if not trainer.has_validation:
            print(f"no validation split (data.val_fraction=0): training on all {info['train_size']:,} training "
                  "images; no validation metrics, early stopping is off"
                  + (f" (patience={cfg.patience} ignored)" if cfg.patience is not None else ""))
        if info["world_size"] > 1 or info["distributed"] != "none":
            print(f"distributed={info['distributed']}: {info['world_size']} processes ({info['backend']}), "
                  f"each step: {info['traffic']}")
        if resume:
            state = trainer.state
            applied = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            print(f"resuming {run_dir} after epoch {state.epoch} of {cfg.epochs}" if continued else
                  f"resuming {run_dir}: no epoch had finished, training from the start with its config",
                  f"({applied})" if applied else "")
            if state.epoch >= cfg.epochs or state.stopped_early:
                print(f"nothing left to train ({'stopped early' if state.stopped_early else 'all epochs done'}); "
                      "pass epochs=<more> to extend the run")
    try:
        state = trainer.fit()
    except RuntimeError as error:
        if "not finite" not in str(error) and "loss is nan" not in str(error) and "loss is inf" not in str(error):
            raise
        raise TrainingDiverged(f"{info['method']} diverged at lr={info['lr']:.6g} in epoch {trainer.state.epoch + 1} "
                               f"({error}); the last finished epoch's checkpoint is in {run_dir}") from error
    summary = {**info, **trainer.summary(), "run_dir": os.path.abspath(run_dir), "history": state.history,
               **launch.communication(trainer.estimator, trainer.distributed)}
    if writer:
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(run_dir, "summary.json"))
    if verbose:
        at_best = ""
        if summary["validation"]:
            at_best = (f", {summary['test_accuracy_at_best_val']:.4f} at the best-validation epoch "
                       f"({summary['best_epoch']})")
        print(f"test accuracy {summary['test_accuracy_last']:.4f} at the last epoch ({summary['epochs_completed']})"
              f"{at_best}; final training loss {summary['final_train_loss']:.4f}; {summary['ms_per_step']:.1f} ms/step"
              + (f"; {summary['bytes_per_step']:,.0f} bytes per step and process to the collectives"
                 if "bytes_per_step" in summary else ""))
        print(f"wrote {run_dir}/ (metrics.csv, summary.json, checkpoint.pt, tensorboard/)")
    return summary


def hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _task(cfg: DictConfig) -> dict:
    resume = cfg.resume
    if resume not in (True, False):
        raise UsageError(f"resume must be true, false or a run directory, got {resume!r}")
    overrides = rundir.command_line_overrides()
    with launch.session(cfg) as distributed:
        run_dir = launch.shared_run_dir(distributed, hydra_run_dir())
        resume = bool(resume) or launch.restarted_run_of(distributed, run_dir)
        return run_training(cfg, run_dir, resume=resume, resume_keys=rundir.override_keys(overrides),
                            overrides=overrides, distributed=distributed)


def directory_arguments(argv: list[str]) -> list[str]:
    """``run_dir=D`` and ``resume=D`` become Hydra's ``hydra.run.dir=D`` (and ``resume=true``).

    A D that is a file is refused here, before Hydra tries to create it."""
    result = []
    for argument in argv:
        key, sep, value = argument.partition("=")
        if sep and key in ("run_dir", "resume") and os.path.isfile(value):
            raise UsageError(f"{key}={value}: {os.path.abspath(value)} is a file, not a run directory")
        if sep and key == "run_dir" and value not in ("", "null"):
            result.append(f"hydra.run.dir={value}")
        elif sep and key == "resume" and value.lower() not in ("true", "false"):
            result += ["resume=true", f"hydra.run.dir={value}"]
        else:
            result.append(argument)
    return result


def main(argv: list[str]) -> int:
    """``fwdgrad train [key=value ...]``; ``--help`` lists every option."""
    return run(_task, "train", argv, "train", arguments=directory_arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
