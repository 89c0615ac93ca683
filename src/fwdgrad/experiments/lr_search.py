"""``fwdgrad lr-search``: learning-rate search with Optuna, resumable and shareable.

Each trial draws lr log-uniformly from ``[search.lr_min, search.lr_max]`` (TPE sampler,
seeded), trains with :func:`fwdgrad.experiments.train.run_training` into
``<run dir>/trials/<number>/`` and returns its best validation loss (the objective,
minimized). After every epoch the trial reports its validation loss; the median pruner
stops trials worse than the median of earlier trials at the same epoch.

Storage: ``sqlite:///<run dir>/optuna.db`` by default, so rerunning with the same
``run_dir`` continues the study until it holds ``search.trials`` finished trials; any
Optuna storage URL (e.g. PostgreSQL) lets several machines search one study together.
Writes ``trials.csv`` (every trial), ``best_lr.json`` and ``lr_search.png``.

Optuna is called directly: the Hydra Optuna sweeper pins optuna < 3, whose SQLite
storage fails under SQLAlchemy 2.
"""

from __future__ import annotations

import json
import math
import os
import sys

from omegaconf import DictConfig, OmegaConf

from fwdgrad.atomic import atomic_write_text, save_figure, write_csv
from fwdgrad.experiments.hydra_app import UsageError, run
from fwdgrad.experiments.train import TrainingDiverged, directory_arguments, hydra_run_dir, run_training

PRUNERS = ("median", "none")


def _check(search: DictConfig) -> None:
    low, high = search.lr_min, search.lr_max
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low < high):
        raise UsageError(f"search.lr_min and search.lr_max must satisfy 0 < lr_min < lr_max, got {low!r}, {high!r}")
    if not isinstance(search.trials, int) or search.trials < 1:
        raise UsageError(f"search.trials must be an integer >= 1, got {search.trials!r}")
    if search.pruner not in PRUNERS:
        raise UsageError(f"unknown search.pruner {search.pruner!r}; valid choices: {', '.join(PRUNERS)}")


def search_lr(cfg: DictConfig, run_dir: str) -> dict:
    """Run (or continue) the study; return ``{"best_lr", "best_val_loss", "best_trial", "trials"}``."""
    import optuna

    search = cfg.search
    _check(search)
    os.makedirs(run_dir, exist_ok=True)
    storage = search.storage or f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'optuna.db'))}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0)
              if search.pruner == "median" else optuna.pruners.NopPruner())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=search.study_name, storage=storage, load_if_exists=True, direction="minimize", pruner=pruner,
    )
    # a continued study (or another machine) must not replay the first run's random draws
    study.sampler = optuna.samplers.TPESampler(seed=search.sampler_seed + len(study.get_trials(deepcopy=False)))
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    remaining = max(0, search.trials - done)
    print(f"study {search.study_name!r} in {storage}: {done} finished trials, running {remaining} more")
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "search"])
    OmegaConf.set_struct(train_cfg, False)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", search.lr_min, search.lr_max, log=True)
        trial_cfg = train_cfg.copy()
        trial_cfg.lr = lr

        def report(trainer, row):
            trial.report(row["val_loss"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {row['val_loss']:.4f} at epoch {row['epoch']}")

        trial_dir = os.path.join(run_dir, "trials", str(trial.number))
        try:
            summary = run_training(trial_cfg, trial_dir, callbacks=[report], verbose=False)
        except optuna.TrialPruned:
            print(f"trial {trial.number}: lr {lr:.4g} pruned")
            raise
        except TrainingDiverged as error:  # a diverging lr (non-finite loss) is a bad lr, not a crash
            print(f"trial {trial.number}: lr {lr:.4g} diverged ({error})")
            return math.inf
        value = summary["best_val_loss"]
        print(f"trial {trial.number}: lr {lr:.4g} best validation loss {value:.4f} "
              f"(test accuracy there {summary['test_accuracy_at_best_val']:.4f})")
        return value

    if remaining:
        study.optimize(objective, n_trials=remaining, catch=())
    rows = []
    for trial in study.get_trials(deepcopy=False):
        reported = trial.intermediate_values
        rows.append({
            "number": trial.number, "state": trial.state.name, "lr": trial.params.get("lr"),
            "best_val_loss": trial.value if trial.value is not None else min(reported.values(), default=None),
            "epochs": max(reported, default=0),
        })
    write_csv(rows, os.path.join(run_dir, "trials.csv"), ("number", "state", "lr", "best_val_loss", "epochs"))
    completed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.value is not None and math.isfinite(t.value)]
    if not completed:
        raise UsageError(f"no trial of study {search.study_name!r} completed with a finite loss; widen the lr range")
    best = min(completed, key=lambda t: t.value)
    result = {"best_lr": best.params["lr"], "best_val_loss": best.value, "best_trial": best.number,
              "trials": len(rows), "study_name": search.study_name, "storage": storage}
    atomic_write_text(json.dumps(result, indent=2), os.path.join(run_dir, "best_lr.json"))
    print(f"best lr {result['best_lr']:.6g} (trial {best.number}, best validation loss {best.value:.4f}) "
          f"over {len(rows)} trials")
    if search.plot:
        print(f"wrote {plot_trials(rows, os.path.join(run_dir, 'lr_search.png'))}")
    print(f"wrote {run_dir}/ (trials.csv, best_lr.json)")
    return result


def plot_trials(rows: list[dict], path: str) -> str:
    """Best validation loss against lr (log scale), pruned trials marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(r["lr"], r["best_val_loss"]) for r in rows if r["state"] == state and r["best_val_loss"] is not None
                  and math.isfinite(r["best_val_loss"])]
        if points:
            axis.scatter(*zip(*points), marker=marker, label=state.lower())
    pruned = [r["lr"] for r in rows if r["state"] == "PRUNED"]
    for lr in pruned:
        axis.axvline(lr, color="grey", alpha=0.2)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("best validation loss")
    axis.set_title("lr search (pruned trials: grey lines)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def _task(cfg: DictConfig) -> dict:
    return search_lr(cfg, hydra_run_dir())


def main(argv: list[str]) -> int:
    """``fwdgrad lr-search [key=value ...]``; ``--help`` lists every option."""
    return run(_task, "lr_search", directory_arguments(argv), "lr-search")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
