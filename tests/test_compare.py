"""fwdgrad compare: one table row per method, ratios to bp of the same run, figure, resume."""

import csv
import json
import os

import pytest

from fwdgrad.experiments import compare

TINY = ["model=fc", "model.width=16", "epochs=2", "max_steps_per_epoch=3", "progress=false", "tensorboard=false"]


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_compare_table_figure_and_resume(tmp_path, capsys):
    run_dir = str(tmp_path / "cmp")
    assert compare.main([*TINY, "methods=[bp,frog4]", "lr=0.1", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    rows = read_csv(os.path.join(run_dir, "compare.csv"))
    assert [r["method"] for r in rows] == ["bp", "frog K=4"]
    summaries = [json.load(open(os.path.join(run_dir, key, "summary.json"))) for key in ("bp", "frog4")]
    assert float(rows[0]["ratio_to_bp"]) == 1.0
    assert float(rows[1]["ratio_to_bp"]) == pytest.approx(summaries[1]["ms_per_step"] / summaries[0]["ms_per_step"])
    for row, key in zip(rows, ("bp", "frog4")):
        last = read_csv(os.path.join(run_dir, key, "metrics.csv"))[-1]
        assert float(row["test_accuracy_last"]) == float(last["test_accuracy"])
        assert float(row["final_train_loss"]) == float(last["train_loss"])
        assert float(row["peak_memory_mb"]) >= 0
    assert "| frog K=4 |" in out and "× bp" in out
    with open(os.path.join(run_dir, "compare.png"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    configs = [open(os.path.join(run_dir, key, "config.yaml")).read() for key in ("bp", "frog4")]
    assert "seed: 0" in configs[0] and "seed: 0" in configs[1]  # same initialization and data order

    # resume: finished methods are read back, not retrained
    assert compare.main([f"resume={run_dir}", *TINY[-2:], "methods=[bp,frog4]"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert read_csv(os.path.join(run_dir, "compare.csv")) == rows


def test_unknown_method_lists_choices(tmp_path, capsys):
    assert compare.main([*TINY, "methods=[bp,adam]", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'adam'" in err and "fg_mean16" in err and "Traceback" not in err


def test_a_methods_per_model_settings_apply_to_that_model_only(tmp_path, capsys):
    import yaml

    method = ("+method_configs.tuned={gradient:{name:local,group_size:4},lr:0.1,"
              "models:{fc:{gradient:{group_size:2,head:normalized},lr:0.02,optimizer:adam,scheduler:cosine}}}")
    run_dir = str(tmp_path / "fc")
    assert compare.main([*TINY, "methods=[tuned]", method, f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "tuned on fc: gradient.group_size=2, gradient.head=normalized, lr=0.02, optimizer=adam, " \
           "scheduler=cosine (method_configs.tuned.models.fc)" in out
    config = yaml.safe_load(open(os.path.join(run_dir, "tuned", "config.yaml")))
    assert config["lr"] == 0.02 and config["gradient"]["group_size"] == 2 and config["gradient"]["head"] == "normalized"
    assert config["optimizer"] == {"name": "adam", "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert config["scheduler"]["name"] == "cosine"
    # another model: the entry's own settings
    other = str(tmp_path / "mlp")
    assert compare.main(["model=baydin_mlp", *TINY[2:], "methods=[tuned]", method, f"run_dir={other}"]) == 0
    config = yaml.safe_load(open(os.path.join(other, "tuned", "config.yaml")))
    assert config["lr"] == 0.1 and config["gradient"]["group_size"] == 4 and config["optimizer"]["name"] == "sgd"


@pytest.mark.parametrize("models, fragment", [
    ("{fc:{epochs:3}}", "method_configs.tuned.models.fc.epochs: unknown key"),
    ("{fc:{optimizer:lion}}", "unknown optimizer 'lion'; valid choices: adam, adamw, sgd, sgd_momentum"),
    ("[fc]", "method_configs.tuned.models must map model names to overrides"),
])
def test_bad_per_model_settings_are_one_line(tmp_path, capsys, models, fragment):
    method = f"+method_configs.tuned={{gradient:{{name:bp}},models:{models}}}"
    code = compare.main([*TINY, "lr=0.1", "methods=[tuned]", method, f"run_dir={tmp_path}/c"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_an_optimizer_by_name_brings_the_configs_it_extends():
    """conf/optimizer/sgd_momentum.yaml extends sgd.yaml (its defaults list): a method given
    optimizer: sgd_momentum gets torch.optim.SGD's name with momentum 0.9, as train's optimizer=sgd_momentum."""
    from omegaconf import OmegaConf

    momentum = OmegaConf.to_container(compare._group_config("optimizer", "sgd_momentum", "where"))
    assert momentum == {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert OmegaConf.to_container(compare._group_config("optimizer", "adam", "where"))["name"] == "adam"
