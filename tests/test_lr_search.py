"""fwdgrad lr-search: the study, the best lr and the trial table; a rerun continues the study; several
processes on one study finish exactly its budget; a killed process's trial is retried; bad storage URLs."""

import csv
import json
import logging
import os
import subprocess
import sys
import time

import optuna
import pytest

from fwdgrad.experiments import lr_search

TINY = ["model=fc", "model.width=16", "epochs=2", "max_steps_per_epoch=3", "search.lr_min=0.001",
        "search.lr_max=0.5"]


def read_trials(run_dir):
    with open(os.path.join(run_dir, "trials.csv"), newline="") as file:
        return list(csv.DictReader(file))


def test_two_trials_then_a_rerun_continues_the_study(tmp_path):
    run_dir = str(tmp_path / "search")
    assert lr_search.main([*TINY, "search.trials=2", f"run_dir={run_dir}"]) == 0
    trials = read_trials(run_dir)
    assert len(trials) == 2 and all(r["state"] == "COMPLETE" for r in trials)
    assert all(0.001 <= float(r["lr"]) <= 0.5 for r in trials)
    best = json.load(open(os.path.join(run_dir, "best_lr.json")))
    winner = min(trials, key=lambda r: float(r["best_val_loss"]))
    assert best["best_lr"] == float(winner["lr"]) and best["best_val_loss"] == float(winner["best_val_loss"])
    # the objective is the trial's best validation loss, as its own run recorded it
    with open(os.path.join(run_dir, "trials", winner["number"], "metrics.csv"), newline="") as file:
        assert best["best_val_loss"] == min(float(r["val_loss"]) for r in csv.DictReader(file))

    assert lr_search.main([*TINY, "search.trials=3", f"run_dir={run_dir}"]) == 0
    again = read_trials(run_dir)
    assert len(again) == 3 and again[:2] == trials  # same study, one more trial
    assert again[2]["lr"] not in {r["lr"] for r in trials}  # not a replay of the first run's draws
    study = optuna.load_study(study_name="lr-search", storage=f"sqlite:///{run_dir}/optuna.db")
    assert len(study.trials) == 3


def test_bad_search_range_is_a_clear_error(tmp_path, capsys):
    assert lr_search.main(["search.lr_min=1.0", "search.lr_max=0.1", f"run_dir={tmp_path}"]) == 2
    assert "0 < lr_min < lr_max" in capsys.readouterr().err


# ---------------------------------------------------------------------------- several processes, one study

QUICK = ["model=fc", "model.width=16", "epochs=1", "max_steps_per_epoch=3", "progress=false", "tensorboard=false",
         "search.plot=false", "search.heartbeat_interval=1", "search.grace_period=2"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def command(*overrides):
    return [sys.executable, "-m", "fwdgrad", "lr-search", *overrides]


def environment():
    """The parent's environment with this checkout's src first on PYTHONPATH (the code under test)."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def load(run_dir):
    return optuna.load_study(study_name="lr-search", storage=f"sqlite:///{run_dir}/optuna.db")


def test_two_processes_on_a_new_study_finish_exactly_the_budget(tmp_path):
    run_dir = str(tmp_path / "shared")
    # the budget, not dead processes, is under test: a grace period no busy CI machine's heartbeat misses
    overrides = [*QUICK, "search.trials=3", "search.grace_period=60", f"run_dir={run_dir}"]
    processes = [subprocess.Popen(command(*overrides), env=environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    trials = load(run_dir).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 3
    # every other trial is one a simultaneous start put over the budget: never trained
    for trial in trials:
        trained = os.path.exists(os.path.join(run_dir, "trials", str(trial.number), "metrics.csv"))
        assert trained == (trial.state in FINISHED), (trial.number, trial.state)
        if trial.state not in FINISHED:
            assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["over_budget"]
    # per-trial sampler seeds: the two processes did not draw the same learning rates
    lrs = [t.params["lr"] for t in finished]
    assert len(set(lrs)) == 3
    # both processes waited for the study to be complete before reporting it
    for output in outputs:
        assert "over 3 finished trials" in output and "Traceback" not in output


def test_a_trial_started_at_the_same_moment_elsewhere_is_over_budget(tmp_path, monkeypatch, capsys):
    """The race the budget check before a trial cannot close: another process creates (and here
    finishes) the last trial of the budget between this process's check and its ``study.ask``."""
    ask = optuna.Study.ask
    rivals = []

    def ask_after_a_rival(study, *args, **kwargs):
        if not rivals:
            rival = ask(study)
            rival.suggest_float("lr", 0.001, 0.5, log=True)
            study.tell(rival, 2.5)
            rivals.append(rival.number)
        return ask(study, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "ask", ask_after_a_rival)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)  # Optuna's loggers do not propagate to the root
    run_dir = str(tmp_path / "race")
    try:
        assert lr_search.main([*QUICK, "search.trials=1", f"run_dir={run_dir}"]) == 0
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert "trial 1: over budget" in capsys.readouterr().out
    assert not [r for r in records if r.exc_info]  # our one line, not Optuna's failure warning with traceback
    rival, late = load(run_dir).trials
    assert rival.number == rivals[0] == 0 and rival.state == optuna.trial.TrialState.COMPLETE
    assert late.state == optuna.trial.TrialState.FAIL and late.user_attrs == {"over_budget": True}
    assert late.params == {} and not os.path.exists(os.path.join(run_dir, "trials", "1"))  # never trained
    assert json.load(open(os.path.join(run_dir, "best_lr.json")))["best_val_loss"] == 2.5


def test_the_trial_of_a_killed_process_is_failed_and_retried_with_its_lr(tmp_path, capsys):
    run_dir = str(tmp_path / "killed")
    slow = subprocess.Popen(command(*QUICK, "epochs=500", "search.trials=1", f"run_dir={run_dir}"),
                            env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # until trial 0 is training (its lr drawn)
            assert slow.poll() is None and time.monotonic() < deadline
            if os.path.exists(os.path.join(run_dir, "trials", "0", "metrics.csv")):
                break
            time.sleep(0.1)
    finally:
        slow.kill()  # SIGKILL: no cleanup, the trial stays RUNNING in the storage
        slow.wait()
    (orphan,) = load(run_dir).trials
    assert orphan.state == optuna.trial.TrialState.RUNNING
    # the next run (here in this process) waits out the grace period, fails the trial and retries it
    assert lr_search.main([*QUICK, "search.trials=1", f"run_dir={run_dir}"]) == 0
    dead, retry = load(run_dir).trials
    assert dead.number == 0 and dead.state == optuna.trial.TrialState.FAIL  # heartbeat stopped: marked FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.params["lr"] == orphan.params["lr"]  # the same lr, trained to the end this time
    assert "retry of trial 0" in capsys.readouterr().out


@pytest.mark.parametrize("ending", ["returned", "pruned"])
def test_a_trial_another_process_took_for_dead_is_retried_not_a_crash(tmp_path, monkeypatch, capsys, ending):
    """On a starved machine a live trial's heartbeats can come later than the grace period: another
    process then marks it FAIL and re-queues its lr while it still runs here, and Optuna refuses the
    result (ValueError, or an AssertionError after a returned value). One line, and the retry runs."""
    run_dir = str(tmp_path / "starved")
    train = lr_search.run_training
    taken = []

    def train_then_be_taken_for_dead(cfg, trial_dir, **kwargs):
        summary = train(cfg, trial_dir, **kwargs)
        if not taken:  # what fail_stale_trials does in the other process
            study = load(run_dir)
            (running,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            study._storage.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(running._trial_id))
            taken.append(running.number)
            if ending == "pruned":
                raise optuna.TrialPruned("pruned just as it was taken for dead")
        return summary

    monkeypatch.setattr(lr_search, "run_training", train_then_be_taken_for_dead)
    assert lr_search.main([*QUICK, "search.trials=1", f"run_dir={run_dir}"]) == 0
    assert "trial 0: another process marked it FAIL while it ran here" in capsys.readouterr().out
    dead, retry = load(run_dir).trials
    assert taken == [0] and dead.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.params["lr"] == dead.params["lr"]


@pytest.mark.parametrize("storage, cause", [
    ("nosuchdb://host/db", "Can't load plugin"),
    ("optuna.db", "Could not parse"),
    ("postgresql://user@127.0.0.1:1/db", "Failed to import DB access module"),  # no driver installed here
    ("sqlite:///{tmp}/a_file/optuna.db", "unable to open database file"),  # a directory that cannot exist
    ("sqlite:///{tmp}/garbage.db", "file is not a database"),
    ("sqlite://", "in-memory database"),
])
def test_a_bad_storage_url_is_a_one_line_error(tmp_path, capsys, storage, cause):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "garbage.db").write_bytes(b"not sqlite" * 100)
    storage = storage.format(tmp=tmp_path)
    assert lr_search.main([f"search.storage={storage}", f"run_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"fwdgrad lr-search: error: search.storage {storage!r}")
    assert cause in error and "sqlite:////absolute/path/optuna.db" in error


def test_heartbeat_settings_are_checked(tmp_path, capsys):
    assert lr_search.main(["search.heartbeat_interval=5", "search.grace_period=5", f"run_dir={tmp_path}"]) == 2
    assert "search.grace_period (5) must exceed search.heartbeat_interval (5)" in capsys.readouterr().err


def test_per_trial_seeds_differ_between_processes_and_repeat_in_one():
    def first_draws(make_sampler):
        """Two processes (two Study objects on one storage) each start a trial at the same moment."""
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="s", storage=storage)
        processes = [optuna.load_study(study_name="s", storage=storage, sampler=make_sampler()) for _ in range(2)]
        trials = [study.ask() for study in processes]
        return [trial.suggest_float("lr", 1e-5, 1.0, log=True) for trial in trials]

    shared = first_draws(lambda: optuna.samplers.TPESampler(seed=0))
    assert shared[0] == shared[1]  # the defect: one seed per process, the same lr in both
    per_trial = first_draws(lambda: lr_search.PerTrialSeededSampler(0))
    assert per_trial[0] != per_trial[1]
    assert per_trial == first_draws(lambda: lr_search.PerTrialSeededSampler(0))  # reproducible
    # trial n draws what TPESampler(seed=n) draws for it
    assert per_trial[1] == first_draws(lambda: optuna.samplers.TPESampler(seed=1))[1]
