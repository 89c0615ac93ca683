"""fwdgrad train: accuracy above chance, exact resume, clipping, schedules, lr=auto, clean errors."""

import csv
import json
import math
import os

import pytest
import torch

from fwdgrad.experiments import train
from fwdgrad.train.trainer import METRIC_COLUMNS, TIMING_COLUMNS, build_scheduler, clip_gradient_norm

QUICK = ["progress=false", "tensorboard=false"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as file:
        return list(csv.DictReader(file))


def test_short_bp_run_on_mnist5k_beats_chance(tmp_path):
    # measured: test accuracy 0.878 / 0.880 / 0.874 for seeds 0 / 1 / 2 (2 epochs, fc width 64, lr 0.1);
    # chance is 0.10
    run_dir = str(tmp_path / "bp")
    assert train.main(["model=fc", "model.width=64", "epochs=2", "lr=0.1", f"run_dir={run_dir}", *QUICK]) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["test_accuracy_last"] > 0.75
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"] and list(rows[0]) == list(METRIC_COLUMNS)
    best = rows[summary["best_epoch"] - 1]
    assert summary["test_accuracy_at_best_val"] == float(best["test_accuracy"])
    assert summary["best_val_loss"] == min(float(r["val_loss"]) for r in rows)
    assert summary["lr"] == 0.1 and summary["train_size"] == 3500 and summary["test_size"] == 1000
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert not [f for f in os.listdir(run_dir) if f.startswith(".tmp-")]  # atomic writes left no temp file


def test_short_activity_perturbation_run_on_mnist5k_learns(tmp_path):
    # `fwdgrad train gradient.perturbation=activity`: per-sample losses reach the estimator
    # (reduction='none'), tangents on the layer outputs, local weight updates. Measured test
    # accuracy 0.647 / 0.752 / 0.719 for seeds 0 / 1 / 2 (2 epochs, fc width 64, frog K=16,
    # lr 0.3); chance is 0.10
    run_dir = str(tmp_path / "activity")
    overrides = ["model=fc", "model.width=64", "epochs=2", "gradient=frog", "gradient.num_tangents=16",
                 "gradient.perturbation=activity", "lr=0.3", f"run_dir={run_dir}", *QUICK]
    assert train.main(overrides) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["test_accuracy_last"] > 0.5


class Interrupt(Exception):
    pass


def interrupt_after_epoch_1(trainer, row):
    if row["epoch"] == 1:
        raise Interrupt


def test_resume_reproduces_the_uninterrupted_metrics(tmp_path):
    # frog (tangent generator), momentum (optimizer state), per-step decay (scheduler state),
    # shuffled batches (loader generator): everything a resume has to restore
    overrides = ["model=fc", "model.width=32", "gradient=frog", "gradient.num_tangents=2", "lr=0.2",
                 "optimizer=sgd_momentum", "scheduler=exponential", "scheduler.decay=0.01", "epochs=3",
                 "max_steps_per_epoch=6", "max_grad_norm=5.0", *QUICK]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*overrides, f"run_dir={whole}"]) == 0
    cfg = train.compose("train", overrides)
    with pytest.raises(Interrupt):
        train.run_training(cfg, parts, callbacks=[interrupt_after_epoch_1], verbose=False)
    assert len(read_metrics(parts)) == 1 and not os.path.exists(os.path.join(parts, "summary.json"))
    assert train.main([f"resume={parts}", "progress=false"]) == 0
    expected, got = read_metrics(whole), read_metrics(parts)
    assert len(got) == 3
    for a, b in zip(expected, got):
        assert {k: v for k, v in a.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in b.items() if k not in TIMING_COLUMNS}
    final_whole = torch.load(os.path.join(whole, "checkpoint.pt"), weights_only=True)["model"]
    final_parts = torch.load(os.path.join(parts, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(final_whole[k], final_parts[k]) for k in final_whole)


def test_resume_with_regenerated_tangents_is_exact(tmp_path):
    # chunk_size < K: each step's tangents come from a per-step seed generator, which the
    # checkpoint must hold besides the tangent generator
    overrides = ["model=fc", "model.width=16", "gradient=frog", "gradient.num_tangents=4", "gradient.chunk_size=2",
                 "lr=0.5", "epochs=3", "max_steps_per_epoch=4", *QUICK]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*overrides, f"run_dir={whole}"]) == 0
    cfg = train.compose("train", overrides)
    trainer, _ = train.build_trainer(cfg, parts)
    assert trainer.estimator.regenerate_tangents  # the path whose seeds must be restored
    with pytest.raises(Interrupt):
        train.run_training(cfg, parts, callbacks=[interrupt_after_epoch_1], verbose=False)
    assert train.main([f"resume={parts}"]) == 0
    strip = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_metrics(whole)]
    assert [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_metrics(parts)] == strip


def test_clipping_really_clips():
    torch.manual_seed(0)
    parameters = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    grads = [torch.randn(3, 4) * 10, torch.randn(5) * 10]
    for p, g in zip(parameters, grads):
        p.grad = g.clone()
    norm_before = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert clip_gradient_norm(parameters, 2.0) == pytest.approx(norm_before)
    clipped = torch.cat([p.grad.reshape(-1) for p in parameters])
    assert float(clipped.norm()) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(clipped, torch.cat([g.reshape(-1) for g in grads]) * 2.0 / norm_before)
    clip_gradient_norm(parameters, 100.0)  # below the bound: unchanged
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in parameters]), clipped)


def test_clipping_bounds_the_training_update(tmp_path):
    """With plain SGD, each step moves the parameters by lr·g, so ||Δθ|| <= lr·max_norm."""
    cfg = train.compose("train", ["model=fc", "model.width=16", "gradient=fg", "gradient.num_tangents=1", "lr=0.5",
                                  "max_grad_norm=0.01", "epochs=1", "max_steps_per_epoch=1", *QUICK])
    trainer, _ = train.build_trainer(cfg, str(tmp_path))
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.parameters])
    trainer.fit()
    after = torch.cat([p.detach().reshape(-1) for p in trainer.parameters])
    assert trainer.last_gradient_norm > 0.01  # the fg estimate was larger than the bound...
    assert float((after - before).norm()) == pytest.approx(0.5 * 0.01, rel=1e-4)  # ...and was clipped


def test_schedules_follow_their_formulas():
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=0.3)
    scheduler = build_scheduler("exponential", optimizer, decay=0.05)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * math.exp(-0.05 * 7))
    optimizer = torch.optim.SGD([parameter], lr=0.3)
    scheduler = build_scheduler("cosine", optimizer, epochs=4)
    for _ in range(1):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2)


def test_early_stopping_on_validation_loss(tmp_path):
    cfg = train.compose("train", ["data=synthetic", "data.num_samples=32", "model=fc", "model.width=8", "lr=0.1",
                                  "patience=2", "epochs=10", *QUICK])
    trainer, _ = train.build_trainer(cfg, str(tmp_path))
    for epoch, val_loss in enumerate([1.0, 0.9, 0.95, 0.91], start=1):
        trainer._end_epoch({c: 0.0 for c in METRIC_COLUMNS} | {"epoch": epoch, "val_loss": val_loss})
        assert trainer.state.stopped_early == (epoch == 4)  # two epochs without beating 0.9
    assert trainer.state.best_epoch == 2
    assert trainer.fit().epoch == 4  # fit does not train past the stop


def test_lr_auto_reads_the_papers_table():
    rows = list(csv.DictReader(open(os.path.join(os.path.dirname(train.__file__), "..", "train", "reference_lrs",
                                                 "fc_nns.csv"))))
    expected = next(float(r["lr"]) for r in rows
                    if (r["model"], r["gradient_approach"], r["k"]) == ("fc_w=1024", "frog", "16.0"))
    cfg = train.compose("train", ["model=baydin_mlp", "gradient=frog", "gradient.num_tangents=16", "lr=auto"])
    lr, source = train.resolve_lr(cfg)
    assert lr == expected and "fc_nns.csv" in source
    with pytest.raises(ValueError, match="fashion_mnist"):
        train.resolve_lr(train.compose("train", ["data=fashion_mnist", "lr=auto"]))


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "tb")
    assert train.main(["model=fc", "model.width=16", "lr=0.1", "epochs=2", "max_steps_per_epoch=3",
                       "progress=false", f"run_dir={run_dir}"]) == 0
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("val/loss")]
    assert logged == pytest.approx([float(r["val_loss"]) for r in read_metrics(run_dir)], rel=1e-6)
    assert len(events.Scalars("train/step_loss")) == 6


@pytest.mark.parametrize("override, message", [
    ("model.name=lenet", "valid choices: baydin_mlp"),
    ("data.name=imagenet", "valid choices: mnist"),
    ("gradient.name=sgd", "valid choices: bp, fg, frog"),
    ("optimizer.name=lbfgs", "valid choices: sgd, adam, adamw"),
    ("scheduler.name=warmup", "valid choices: constant"),
    ("gradient.num_tangents=0", "num_tangents must be an integer >= 1"),
    ("lr=-1", "lr must be a positive number"),
])
def test_bad_values_exit_with_a_message(tmp_path, capsys, override, message):
    extra = ["gradient=fg"] if "num_tangents" in override else []
    extra += [] if override.startswith("lr=") else ["lr=0.1"]
    code = train.main([*extra, override, "model=fc", "model.width=8", f"run_dir={tmp_path}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_config_group_option_exits_2_with_the_options(tmp_path, capsys):
    code = train.main(["model=lenet", f"run_dir={tmp_path}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "Could not find 'model/lenet'" in err and "baydin_mlp" in err


def test_absent_data_directory_offline(tmp_path, capsys, monkeypatch):
    from fwdgrad.train import dataset_files

    # a machine with a copy in the system folder (/usr/share/datasets/mnist) would find it
    monkeypatch.setitem(dataset_files.SYSTEM_FOLDERS, "mnist", (str(tmp_path / "system"),))
    code = train.main(["data=mnist", f"data.data_dir={tmp_path}/nothing", "data.download=false", "lr=0.1",
                       f"run_dir={tmp_path}/run", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path}/nothing" in err and "ossci-datasets" in err and "Traceback" not in err


def test_unknown_config_group_option_lists_choices(tmp_path, capsys):
    code = train.main(["model=lenet", f"run_dir={tmp_path}", *QUICK])
    err = capsys.readouterr().err
    assert code != 0 and "baydin_mlp" in err and "Traceback" not in err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train.main([f"resume={tmp_path}/nothing", *QUICK]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_divergence_is_reported_not_a_traceback(tmp_path, capsys):
    code = train.main(["model=fc", "model.width=8", "lr=1e8", "epochs=1", "max_steps_per_epoch=20",
                       f"run_dir={tmp_path}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "diverged at lr=1e+08" in err and "Traceback" not in err


def test_val_fraction_zero_trains_on_every_training_image(tmp_path, capsys):
    run_dir = str(tmp_path / "all")
    assert train.main(["model=fc", "model.width=16", "lr=0.1", "epochs=2", "data.val_fraction=0", "patience=1",
                       f"run_dir={run_dir}", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "no validation split" in out and "4,000 training images" in out
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["train_size"] == 4000 and summary["val_size"] == 0  # mnist5k: 3,500 + its 500 validation images
    assert summary["steps"] == 2 * math.ceil(4000 / 64)  # every training image, every epoch
    assert summary["validation"] is False and summary["best_val_loss"] is None
    assert summary["epochs_completed"] == 2  # patience ignored: no early stopping without validation
    rows = read_metrics(run_dir)
    assert all(r["val_loss"] == "" and r["val_accuracy"] == "" for r in rows)
    assert not os.path.exists(os.path.join(run_dir, "best_model.pt"))


def test_val_fraction_zero_on_a_real_dataset_keeps_every_image(tmp_path):
    from fwdgrad.train import data
    from test_data import write_mnist

    write_mnist(str(tmp_path), "MNIST", num_train=20, num_test=10)
    splits = data.load_dataset("mnist", data_dir=str(tmp_path), download=False, val_fraction=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 0, 10)
    with pytest.raises(ValueError, match="val_fraction must be in \\[0, 1\\)"):
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False, val_fraction=1.5)
    with pytest.raises(ValueError, match="mnist5k has a fixed validation split"):
        data.load_dataset("mnist5k", val_fraction=0.3)
