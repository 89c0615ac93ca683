"""fwdgrad lr-search: the study, the best lr and the trial table; a rerun continues the study."""

import csv
import json
import os

import optuna

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
