"""``fwdgrad lr-search``: learning-rate search with Optuna, resumable and shareable.

Each trial draws lr log-uniformly from ``[search.lr_min, search.lr_max]`` (TPE), trains with
:func:`fwdgrad.experiments.train.run_training` into ``<run dir>/trials/<number>/`` and returns
its best validation loss (the objective, minimized). After every epoch the trial reports its
validation loss; the median pruner stops trials worse than the median of earlier trials at
the same epoch.

Storage: ``sqlite:///<run dir>/optuna.db`` by default, so rerunning with the same
``run_dir`` continues the study; any Optuna storage URL (e.g. PostgreSQL) lets several
machines search one study together. Writes ``trials.csv`` (every trial), ``best_lr.json``
and ``lr_search.png``.

Several processes on one study (any number, started together or not):

- **Creation race.** The first processes to open a new SQLite study race to create its
  tables and its row; the losers' errors (``IntegrityError``, "table already exists",
  ``DuplicatedStudyError``) are retried until the study loads.
- **Budget.** ``search.trials`` counts the study's *finished* (COMPLETE or PRUNED) trials
  over all processes: the study ends with exactly that many. Before starting a trial a
  process counts the finished, RUNNING and WAITING trials (other processes' work in
  progress); when they fill the budget it waits for them instead of starting one, and
  stops when the study holds ``search.trials`` finished trials. Two processes can still
  start a trial at the same moment, so a new trial first counts the trials created before
  it (lower number) that are not FAIL: if they already fill the budget, it is *over
  budget*: not trained, it ends in state FAIL with the user attribute
  ``over_budget=True`` and does not count. (A trial's number is fixed at creation under a
  lock on the study row, so the trials before it are a well-defined set.)
- **Killed processes.** The storage records a heartbeat of every running trial each
  ``search.heartbeat_interval`` seconds (kept by ``study.optimize``'s heartbeat thread). A
  RUNNING trial whose heartbeat is older than ``search.grace_period`` (its process died) is
  marked FAIL by the next process that starts a trial or waits, and re-queued as a WAITING
  trial with the same lr (up to ``search.max_retry`` times), which the next free process runs.
  A RUNNING trial that never had a heartbeat (created by ask/tell, or by an fwdgrad before
  heartbeats) is never failed automatically; a process waiting for it says so and how to end it.
- **Sampler seeds.** Trial number n draws with ``TPESampler(seed=search.sampler_seed + n)``:
  concurrent processes run different trial numbers, hence different draws, and one process
  alone is reproducible (same seed, same history -> same lr).

A bad ``search.storage`` (not a URL, unknown database, driver not installed, unreachable
server, unwritable file) is reported in one line naming the value and what a valid URL
looks like.

Optuna is called directly: the Hydra Optuna sweeper pins optuna < 3, whose SQLite
storage fails under SQLAlchemy 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import run
from fwdgrad.experiments.plots import save_figure
from fwdgrad.experiments.train import TrainingDiverged, directory_arguments, hydra_run_dir, run_training
from fwdgrad.train.atomic import atomic_write_text, write_csv

PRUNERS = ("median", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# states of trials that are or will be worked on: they count towards search.trials
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
STORAGE_EXAMPLES = ("sqlite:////absolute/path/optuna.db (a file in a writable directory), "
                    "postgresql://user:password@host/database or mysql+pymysql://user@host/database "
                    "(with that driver installed), or null for <run dir>/optuna.db")
# opening a new study from several processes at once: retries of the losers of the race
CREATION_ATTEMPTS = 30


def _check(search: DictConfig) -> None:
    low, high = search.lr_min, search.lr_max
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low < high):
        raise UsageError(f"search.lr_min and search.lr_max must satisfy 0 < lr_min < lr_max, got {low!r}, {high!r}")
    if not isinstance(search.trials, int) or search.trials < 1:
        raise UsageError(f"search.trials must be an integer >= 1, got {search.trials!r}")
    if search.pruner not in PRUNERS:
        raise UsageError(f"unknown search.pruner {search.pruner!r}; valid choices: {', '.join(PRUNERS)}")
    for key in ("heartbeat_interval", "grace_period"):
        value = search[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"search.{key} must be a whole number of seconds >= 1, got {value!r}")
    if search.grace_period <= search.heartbeat_interval:
        raise UsageError(f"search.grace_period ({search.grace_period}) must exceed search.heartbeat_interval "
                         f"({search.heartbeat_interval}), or live trials would be taken for dead ones")
    retries = search.max_retry
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        raise UsageError(f"search.max_retry must be null (no limit) or an integer >= 0, got {retries!r}")


class PerTrialSeededSampler(optuna.samplers.BaseSampler):
    """Trial number n samples with ``make_sampler(seed + n)`` (default: a TPE sampler).

    A sampler seeded once per process would make processes started with the same seed draw
    the same values; seeding by trial number keeps one process reproducible and lets
    concurrent processes (which run different trial numbers) draw different values. TPE's
    model comes from the study's trials in the storage, so nothing else is lost.
    """

    def __init__(self, seed: int, make_sampler=None):
        self.seed = seed
        self.make_sampler = make_sampler or (lambda s: optuna.samplers.TPESampler(seed=s))
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        sampler = self._samplers.get(trial.number)
        if sampler is None:
            sampler = self._samplers[trial.number] = self.make_sampler(self.seed + trial.number)
        return sampler

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:  # the seeds are the trial numbers: nothing to reseed
        pass


class _OverBudget(Exception):
    """A trial created when the trials before it already fill ``search.trials``."""


class _QuietOverBudget(logging.Filter):
    """Drops Optuna's failure warnings (with traceback) for over-budget trials: we print our own line."""

    def __init__(self):
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    # SQLAlchemy appends "(Background on this error at: ...)" lines and the SQL
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _lost_creation_race(error: BaseException) -> bool:
    """Errors of a process that lost the race to create a new study's tables or row."""
    import sqlalchemy.exc

    if isinstance(error, (sqlalchemy.exc.IntegrityError, optuna.exceptions.DuplicatedStudyError)):
        return True
    text = " ".join(str(e) for e in _causes(error))
    return isinstance(error, (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError)) and (
        "already exists" in text or "database is locked" in text
    )


def open_storage(url: str, search: DictConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a bad URL raises UsageError naming it and valid forms."""
    if url.strip() in ("sqlite://", "sqlite:///:memory:"):
        raise UsageError(f"search.storage {url!r} is an in-memory database, lost at exit and not shared between "
                         f"processes; give a file or a server: {STORAGE_EXAMPLES}")
    # other processes hold SQLite's write lock for a moment: wait for it instead of failing
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, retry callback
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=search.heartbeat_interval,
            grace_period=search.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=search.max_retry),
        )


def open_study(url: str, search: DictConfig, pruner, sampler) -> optuna.Study:
    """Create or load the study; tolerates other processes creating it at the same moment."""
    for attempt in range(CREATION_ATTEMPTS):
        try:
            storage = open_storage(url, search)
            return optuna.create_study(study_name=search.study_name, storage=storage, load_if_exists=True,
                                       direction="minimize", pruner=pruner, sampler=sampler)
        except UsageError:
            raise
        except Exception as error:  # noqa: BLE001 - anything failing here is a storage problem: one line
            if _lost_creation_race(error) and attempt + 1 < CREATION_ATTEMPTS:
                time.sleep(0.05 + 0.2 * random.random())  # the winner finishes in milliseconds
                continue
            detail = _first_line(error)
            cause = error.__cause__ or error.__context__
            if cause is not None and str(cause).strip().splitlines()[0] not in detail:  # e.g. the missing driver
                detail += f"; {_first_line(cause)}"
            raise UsageError(f"search.storage {url!r}: cannot open the Optuna storage ({detail}); "
                             f"a valid storage is {STORAGE_EXAMPLES}") from error
    raise AssertionError("not reached")


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def search_lr(cfg: DictConfig, run_dir: str) -> dict:
    """Run (or continue, or join) the study; return ``{"best_lr", "best_val_loss", "best_trial", "trials", ...}``.

    Returns when the study holds ``search.trials`` finished trials (those of every process).
    """
    search = cfg.search
    _check(search)
    if cfg.data.get("val_fraction") == 0:
        raise UsageError("lr-search minimizes the validation loss; data.val_fraction=0 leaves no validation split "
                         "(give a fraction, or the dataset's default)")
    budget = search.trials
    os.makedirs(run_dir, exist_ok=True)
    storage = search.storage or f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'optuna.db'))}"
    if not isinstance(storage, str):
        raise UsageError(f"search.storage must be a URL string or null, got {storage!r}; a valid storage is "
                         f"{STORAGE_EXAMPLES}")
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0)
              if search.pruner == "median" else optuna.pruners.NopPruner())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, search, pruner, PerTrialSeededSampler(search.sampler_seed))
    quiet = _QuietOverBudget()
    optuna_logger = logging.getLogger("optuna.study._optimize")
    optuna_logger.addFilter(quiet)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"study {search.study_name!r} in {storage}: {done} finished trials of {budget}")
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "search"])
    OmegaConf.set_struct(train_cfg, False)

    started: list[int] = []  # storage ids of the trials this process began, newest last

    def objective(trial: optuna.Trial) -> float:
        started.append(trial._trial_id)
        trials = study.get_trials(deepcopy=False)
        before = [t for t in trials if t.number < trial.number and t.state in COUNTED]
        if len(before) >= budget:
            trial.set_user_attr("over_budget", True)
            quiet.numbers.add(trial.number)
            print(f"trial {trial.number}: over budget ({len(before)} trials before it already fill search.trials="
                  f"{budget}; another process started one at the same moment): not trained, left FAIL")
            raise _OverBudget
        lr = trial.suggest_float("lr", search.lr_min, search.lr_max, log=True)
        trial_cfg = train_cfg.copy()
        trial_cfg.lr = lr

        def report(trainer, row):
            trial.report(row["val_loss"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {row['val_loss']:.4f} at epoch {row['epoch']}")

        trial_dir = os.path.join(run_dir, "trials", str(trial.number))
        # the system attribute RetryHeartbeatStaleTrialCallback gives a re-queued trial
        retried = next(t for t in trials if t.number == trial.number).system_attrs.get("failed_trial")
        note = f" (retry of trial {retried}, whose process died)" if retried is not None else ""
        try:
            summary = run_training(trial_cfg, trial_dir, callbacks=[report], verbose=False)
        except optuna.TrialPruned:
            print(f"trial {trial.number}: lr {lr:.4g} pruned{note}")
            raise
        except TrainingDiverged as error:  # a diverging lr (non-finite loss) is a bad lr, not a crash
            print(f"trial {trial.number}: lr {lr:.4g} diverged ({error}){note}")
            return math.inf
        value = summary["best_val_loss"]
        print(f"trial {trial.number}: lr {lr:.4g} best validation loss {value:.4f} "
              f"(test accuracy there {summary['test_accuracy_at_best_val']:.4f}){note}")
        return value

    try:
        _run_until_budget(study, objective, budget, poll_seconds=min(5.0, search.heartbeat_interval),
                          started=started, grace_period=search.grace_period)
    finally:
        optuna_logger.removeFilter(quiet)
    return _summarize(study, search, storage, run_dir)


def _run_until_budget(study: optuna.Study, objective, budget: int, poll_seconds: float, started: list[int],
                      grace_period: int) -> None:
    """Start trials (one ``study.optimize`` call each, for its heartbeat) until ``budget`` trials are finished.

    ``started`` receives the storage id of each trial the objective begins. When another process
    took a trial of this one for dead (its heartbeats came later than the grace period: a
    starved machine) it has marked it FAIL and re-queued its lr, and Optuna refuses to record the
    result here; that trial is reported in one line and the loop goes on (the retry counts).
    """
    waiting_for_others = False
    while True:
        _fail_stale_trials(study)  # a dead process's RUNNING trial -> FAIL, re-queued as WAITING
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        queued = sum(t.state == TrialState.WAITING for t in trials)
        if finished >= budget:
            return
        if queued or finished + running < budget:
            waiting_for_others = False
            try:
                study.optimize(objective, n_trials=1, catch=(_OverBudget,))
            except (ValueError, AssertionError) as error:
                if not started or not _failed_elsewhere(study, started[-1], error):
                    raise
                number = study._storage.get_trial(started[-1]).number
                print(f"trial {number}: another process marked it FAIL while it ran here (no heartbeat seen for "
                      f"search.grace_period={grace_period} s: the machine is too busy for that grace period, raise "
                      "it) and re-queued its lr; its result here is dropped, the retry counts")
            continue
        if not waiting_for_others:
            numbers = [t.number for t in trials if t.state == TrialState.RUNNING]
            print(f"{finished} finished and {running} running trials fill search.trials={budget}: waiting for "
                  f"trials {numbers} of other processes (a dead process's trial is retried here once its heartbeat "
                  "is older than search.grace_period; a trial without heartbeats, from ask/tell or an older "
                  "fwdgrad, is never failed automatically: end it with study.tell(<number>, state=TrialState.FAIL))")
            waiting_for_others = True
        time.sleep(poll_seconds)


def _failed_elsewhere(study: optuna.Study, trial_id: int, error: BaseException) -> bool:
    """Optuna's refusal to record this process's result for a trial already FAIL in the storage.

    Optuna raises ValueError("Cannot tell a FAIL trial."); when the objective had returned a
    value, its bookkeeping then raises an AssertionError whose context is that ValueError.
    """
    refused = any(isinstance(e, ValueError) and str(e).startswith("Cannot tell a") for e in _causes(error))
    return refused and study._storage.get_trial(trial_id).state == TrialState.FAIL


def _summarize(study: optuna.Study, search: DictConfig, storage: str, run_dir: str) -> dict:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        reported = trial.intermediate_values
        rows.append({
            "number": trial.number, "state": trial.state.name, "lr": trial.params.get("lr"),
            "best_val_loss": trial.value if trial.value is not None else min(reported.values(), default=None),
            "epochs": max(reported, default=0),
        })
    write_csv(rows, os.path.join(run_dir, "trials.csv"), ("number", "state", "lr", "best_val_loss", "epochs"))
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.value is not None and math.isfinite(t.value)]
    if not completed:
        raise UsageError(f"no trial of study {search.study_name!r} completed with a finite loss; widen the lr range")
    best = min(completed, key=lambda t: t.value)
    finished = sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    result = {"best_lr": best.params["lr"], "best_val_loss": best.value, "best_trial": best.number,
              "trials": len(rows), "finished_trials": finished, "study_name": search.study_name, "storage": storage}
    atomic_write_text(json.dumps(result, indent=2), os.path.join(run_dir, "best_lr.json"))
    print(f"best lr {result['best_lr']:.6g} (trial {best.number}, best validation loss {best.value:.4f}) "
          f"over {finished} finished trials ({len(rows)} in the study)")
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
    if cfg.get("distributed", "none") != "none":
        raise UsageError(f"lr-search runs its trials as separate processes (start several on one study); "
                         f"distributed={cfg.distributed} is an option of train, compare and bench")
    return search_lr(cfg, hydra_run_dir())


def main(argv: list[str]) -> int:
    """``fwdgrad lr-search [key=value ...]``; ``--help`` lists every option."""
    return run(_task, "lr_search", argv, "lr-search", arguments=directory_arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
