"""Runs a user can trust: safe checkpoints, honest resume, protected run directories, typed
options and one-line errors (exit 2, no traceback) for bad input."""

import csv
import errno
import hashlib
import json
import os

import pytest
import torch
import yaml

from fwdgrad.experiments import bench, compare, demo, train
from fwdgrad.train.trainer import METRIC_COLUMNS, TIMING_COLUMNS

QUICK = ["model=fc", "model.width=16", "lr=0.1", "max_steps_per_epoch=3", "progress=false", "tensorboard=false"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as file:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(file)]


def digests(directory):
    """{relative path: sha256} of every file under ``directory``."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                result[os.path.relpath(path, directory)] = hashlib.sha256(file.read()).hexdigest()
    return result


def assert_one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch fc run, shared read-only by the tests that only need its files."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "one")
    assert train.main([*QUICK, "epochs=1", f"run_dir={run_dir}"]) == 0
    return run_dir


def copy_run(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return str(destination)


# ------------------------------------------------------------------------ checkpoints

def test_checkpoint_holds_only_tensors_and_plain_values(finished_run):
    checkpoint = torch.load(os.path.join(finished_run, "checkpoint.pt"), weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "estimator", "rng", "state", "metadata"}
    version, internal, _ = checkpoint["rng"]["python"]
    assert version == 3 and len(internal) == 625  # Python's Mersenne Twister state, as plain ints
    assert checkpoint["rng"]["numpy"]["keys"].shape == (624,)
    assert yaml.safe_load(checkpoint["metadata"]["config"])["model"]["width"] == 16


class WritesAFile:
    """Unpickling this object would create ``path``: a crafted checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "crafted")
    marker = str(tmp_path / "created-by-the-checkpoint")
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    checkpoint["state"]["history"].append(WritesAFile(marker))
    path = os.path.join(run_dir, "checkpoint.pt")
    torch.save(checkpoint, path)
    # whoever crafts the checkpoint can rewrite its digest too: loading must still run no code
    with open(path + ".sha256", "w") as file:
        file.write(f"{hashlib.sha256(open(path, 'rb').read()).hexdigest()}  checkpoint.pt\n")
    code = train.main([f"resume={run_dir}", "epochs=2"])
    assert_one_line_error(capsys, code, os.path.join(run_dir, "checkpoint.pt"), "refused")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_checkpoint_is_named_in_one_line(finished_run, tmp_path, capsys, damage):
    run_dir = copy_run(finished_run, tmp_path / damage)
    path = os.path.join(run_dir, "checkpoint.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint at all")
    code = train.main([f"resume={run_dir}", "epochs=2"])
    assert_one_line_error(capsys, code, path, "truncated or corrupt")


def test_an_orphan_temporary_file_is_removed_on_resume(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "orphan")
    orphan = os.path.join(run_dir, ".tmp-k1ll3d-checkpoint.pt")  # a kill -9 during an atomic write
    open(orphan, "wb").write(b"partial")
    assert train.main([f"resume={run_dir}", "epochs=2"]) == 0
    assert not os.path.exists(orphan)


def test_the_checkpoints_sha256_is_recorded_in_sha256sum_format(finished_run):
    path = os.path.join(finished_run, "checkpoint.pt")
    with open(path, "rb") as file:
        expected = hashlib.sha256(file.read()).hexdigest()
    with open(path + ".sha256") as file:
        assert file.read() == f"{expected}  checkpoint.pt\n"


def test_a_bit_flipped_checkpoint_is_refused_in_one_line(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "flipped")
    path = os.path.join(run_dir, "checkpoint.pt")
    data = bytearray(open(path, "rb").read())
    # a byte inside the first weight tensor's data (the zip stores it uncompressed): torch.load still reads it
    checkpoint = torch.load(path, weights_only=True)
    first = next(iter(checkpoint["model"].values())).contiguous().numpy().tobytes()
    offset = bytes(data).index(first[:64]) + 17
    data[offset] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert not torch.equal(next(iter(torch.load(path, weights_only=True)["model"].values())),
                           next(iter(checkpoint["model"].values())))  # it loads, silently different
    code = train.main([f"resume={run_dir}", "epochs=2"])
    assert_one_line_error(capsys, code, path, "SHA-256", "not the one recorded")


def test_a_kill_between_the_checkpoint_and_its_digest_leaves_a_verifying_pair(tmp_path, monkeypatch):
    from fwdgrad.train import checkpoints

    path = str(tmp_path / "checkpoint.pt")
    checkpoints.save_checkpoint({"step": torch.tensor(1)}, path)
    write = checkpoints._write_digests
    for kill_at in (1, 2):  # killed when the 1st / 2nd digest file of the next save is written
        calls = []

        def killed(*args, kill_at=kill_at, calls=calls):
            calls.append(args)
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            write(*args)

        monkeypatch.setattr(checkpoints, "_write_digests", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save_checkpoint({"step": torch.tensor(1 + kill_at)}, path)
        monkeypatch.setattr(checkpoints, "_write_digests", write)
        checkpoints.verify_digest(path)  # either file, with the digest file as it was left: no refusal
        step = int(torch.load(path, weights_only=True)["step"])
        assert step == (1 if kill_at == 1 else 1 + kill_at)
        with open(path, "rb") as file:
            assert hashlib.sha256(file.read()).hexdigest() in checkpoints.recorded_digests(path)


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("!!python/object/apply:os.system ['touch {marker}']\n", "not a configuration fwdgrad wrote"),
    ("model: !!python/object/apply:os.system ['touch {marker}']\n", "not a configuration fwdgrad wrote"),
    ("- a\n- b\n", "holds a list, not a mapping"),
    ("model: [fc\n", "not a configuration fwdgrad wrote"),
    (b"\xff\xfe\x00garbage", "cannot read"),
])
def test_an_unreadable_or_tagged_config_yaml_is_refused_in_one_line(finished_run, tmp_path, capsys, content,
                                                                     fragment):
    run_dir = copy_run(finished_run, tmp_path / "config")
    marker = tmp_path / "created-by-the-config"
    path = os.path.join(run_dir, "config.yaml")
    if isinstance(content, bytes):
        open(path, "wb").write(content)
    else:
        open(path, "w").write(content.format(marker=marker))
    before = digests(run_dir)
    code = train.main([f"resume={run_dir}", "epochs=2"])
    assert_one_line_error(capsys, code, path, fragment)
    assert not marker.exists()
    assert digests(run_dir) == before


def test_a_corrupt_summary_of_a_comparison_is_refused_in_one_line(tmp_path, capsys):
    run_dir = str(tmp_path / "cmp")
    config = ["model=fc", "model.width=8", "lr=0.05", "epochs=1", "max_steps_per_epoch=2", "methods=[bp]",
              "progress=false", "tensorboard=false", "plot=false"]
    assert compare.main([*config, f"run_dir={run_dir}"]) == 0
    summary = os.path.join(run_dir, "bp", "summary.json")
    open(summary, "w").write("{not json")
    capsys.readouterr()
    code = compare.main([f"resume={run_dir}"])
    assert_one_line_error(capsys, code, summary, "delete it")


def test_a_num_tangents_that_cannot_fit_is_refused_before_allocation(tmp_path, capsys):
    parameters = 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # QUICK's fc net
    code = train.main([*QUICK, "gradient=fg", "gradient.num_tangents=1000000000", f"run_dir={tmp_path}/huge"])
    assert_one_line_error(capsys, code, "num_tangents=1000000000", f"{10**9 * parameters * 4:,} bytes",
                          "lower num_tangents")
    assert not os.path.exists(os.path.join(tmp_path, "huge", "checkpoint.pt"))


# ------------------------------------------------------------------------ run directories

def test_a_used_run_dir_is_refused_and_left_byte_identical(finished_run, capsys):
    before = digests(finished_run)
    code = train.main([*QUICK, "epochs=1", "gradient=fg", f"run_dir={finished_run}"])
    assert_one_line_error(capsys, code, finished_run, "already holds a run", f"resume={finished_run}")
    assert digests(finished_run) == before


def test_resume_refuses_another_configuration_and_names_the_keys(finished_run, capsys):
    before = digests(finished_run)
    code = train.main([f"resume={finished_run}", "gradient=fg", "lr=0.01"])
    line = assert_one_line_error(capsys, code, "gradient.name: 'bp' -> 'fg'", "lr: 0.1 -> 0.01")
    assert "epochs" in line  # what may change instead
    assert digests(finished_run) == before


def test_resume_extends_epochs_exactly_and_records_it(tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*QUICK, "epochs=2", f"run_dir={whole}"]) == 0
    assert train.main([*QUICK, "epochs=1", f"run_dir={parts}"]) == 0
    assert train.main([f"resume={parts}", "epochs=2"]) == 0
    assert read_metrics(parts) == read_metrics(whole)
    assert yaml.safe_load(open(os.path.join(parts, "config.yaml")))["epochs"] == 2
    (entry,) = yaml.safe_load(open(os.path.join(parts, "resumes.yaml")))
    assert entry["changed"] == {"epochs": {"from": 1, "to": 2}} and "epochs=2" in entry["overrides"]


def test_a_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    bp_run, fg_run = str(tmp_path / "bp"), str(tmp_path / "fg")
    assert train.main([*QUICK, "epochs=1", f"run_dir={bp_run}"]) == 0
    assert train.main([*QUICK, "epochs=1", "gradient=fg", "lr=0.01", f"run_dir={fg_run}"]) == 0
    os.replace(os.path.join(bp_run, "checkpoint.pt"), os.path.join(fg_run, "checkpoint.pt"))
    code = train.main([f"resume={fg_run}", "epochs=2"])
    assert_one_line_error(capsys, code, "was written by a run with another configuration", "gradient.name")


def test_tensorboard_keeps_every_step_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "tb")
    overrides = [o for o in QUICK if o != "tensorboard=false"]
    assert train.main([*overrides, "epochs=1", f"run_dir={run_dir}"]) == 0
    assert train.main([f"resume={run_dir}", "epochs=2"]) == 0
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/step_loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2]


def test_compare_resume_trains_the_remaining_methods_with_the_comparisons_config(tmp_path, capsys):
    run_dir = str(tmp_path / "cmp")
    config = ["model=fc", "model.width=8", "epochs=1", "max_steps_per_epoch=2", "lr=0.05", "methods=[bp,fg1]",
              "progress=false", "tensorboard=false", "plot=false"]
    assert compare.main([*config, f"run_dir={run_dir}"]) == 0
    # as if it had been killed before fg1 started
    import shutil

    shutil.rmtree(os.path.join(run_dir, "fg1"))
    os.remove(os.path.join(run_dir, "compare.csv"))
    capsys.readouterr()
    assert compare.main([f"resume={run_dir}"]) == 0  # nothing but the directory: its own config
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 1
    fg1 = yaml.safe_load(open(os.path.join(run_dir, "fg1", "config.yaml")))
    assert fg1["model"] == {"name": "fc", "width": 8} and fg1["lr"] == 0.05 and fg1["epochs"] == 1
    summary = json.load(open(os.path.join(run_dir, "fg1", "summary.json")))
    assert summary["parameters"] == 784 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    rows = list(csv.DictReader(open(os.path.join(run_dir, "compare.csv"))))
    assert [r["method"] for r in rows] == ["bp", "fg K=1"]


def test_compare_resume_of_a_directory_without_a_comparison(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = compare.main([f"resume={empty}"])
    assert_one_line_error(capsys, code, "holds no comparison")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("methods, fragment", [("[bp,../x]", "'../x' is not a valid name"),
                                               ("[bp,bp]", "twice")])
def test_compare_method_keys_must_be_safe_directory_names(tmp_path, capsys, methods, fragment):
    code = compare.main([*QUICK, f"methods={methods}", f"run_dir={tmp_path}/c"])
    assert_one_line_error(capsys, code, fragment)
    assert not os.path.exists(tmp_path / "x")


def test_compare_takes_a_single_method_key(tmp_path):
    run_dir = str(tmp_path / "single")
    assert compare.main([*QUICK, "epochs=1", "methods=bp", "plot=false", f"run_dir={run_dir}"]) == 0
    assert [r["method"] for r in csv.DictReader(open(os.path.join(run_dir, "compare.csv")))] == ["bp"]


# ------------------------------------------------------------------------ typed options

def test_boolean_options_follow_yaml_spellings():
    cfg = train.compose("train", ["gradient=fg", "gradient.scaling_correction=no", "gradient.normalize_tangents=off",
                                  "tensorboard=no", "progress=yes"])
    assert cfg.gradient.scaling_correction is False and cfg.gradient.normalize_tangents is False
    assert cfg.tensorboard is False and cfg.progress is True


@pytest.mark.parametrize("override, fragments", [
    ("gradient.scaling_correction=maybe", ("gradient.scaling_correction", "not a valid bool")),
    ("epochs=abc", ("epochs", "could not be converted to Integer")),
    ("max_grad_norm=big", ("max_grad_norm", "could not be converted to Float")),
    ("gradient.num_tangent=4", ("num_tangent", "not in 'ForwardGradientConfig'")),
    ("model=lenet", ("Could not find 'model/lenet'", "baydin_mlp, fc")),
])
def test_a_value_of_the_wrong_type_is_one_line(tmp_path, capsys, override, fragments):
    code = train.main(["gradient=fg", override, f"run_dir={tmp_path}/r", "progress=false"])
    assert_one_line_error(capsys, code, *fragments)
    assert not os.path.exists(tmp_path / "r")


def test_the_documented_per_method_lr_override_works():
    # `++` sets a gradient key whether or not conf/compare.yaml's entry lists it
    cfg = train.compose("compare", ["method_configs.frog16.lr=0.5", "++method_configs.fg1.gradient.sampler=rank1"])
    assert compare.method_config(cfg, "frog16").lr == 0.5
    assert compare.method_config(cfg, "fg1").gradient.sampler == "rank1"
    assert compare.method_config(cfg, "bp").lr == cfg.lr  # the others keep the top-level lr


def test_a_new_method_can_be_added_on_the_command_line():
    new_method = "+method_configs.fg_max8={gradient:{name:fg,num_tangents:8,aggregation:max},lr:0.1}"
    cfg = train.compose("compare", [new_method])
    method = compare.method_config(cfg, "fg_max8")
    assert (method.gradient.num_tangents, method.gradient.aggregation, method.lr) == (8, "max", 0.1)
    assert method.gradient.sampler == "normal"  # the rest from the fg schema's defaults


def test_an_unknown_key_of_a_method_config_is_one_line(tmp_path, capsys):
    code = compare.main([*QUICK, "+method_configs.x={gradient:{name:fg},rate:1}", "methods=[x]",
                         f"run_dir={tmp_path}/c"])
    assert_one_line_error(capsys, code, "method_configs.x.rate", "gradient, lr")


def test_a_method_config_of_the_wrong_type_names_its_key(tmp_path, capsys):
    code = compare.main([*QUICK, "method_configs.frog16.gradient.num_tangents=abc", f"run_dir={tmp_path}/c"])
    assert_one_line_error(capsys, code, "method_configs.frog16.gradient.num_tangents")


# ------------------------------------------------------------------------ one-line errors

def test_bad_paths_and_counts_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_line_error(capsys, train.main([*QUICK, f"run_dir={a_file}"]), str(a_file), "is a file")
    assert_one_line_error(capsys, train.main([*QUICK, "run_dir=/proc/fwdgrad-cannot-be-created"]),
                          "/proc/fwdgrad-cannot-be-created")
    assert_one_line_error(capsys, train.main([*QUICK, "max_steps_per_epoch=0", f"run_dir={tmp_path}/m"]),
                          "max_steps_per_epoch must be an integer >= 1")
    assert_one_line_error(capsys, bench.main(["threads=0", "workloads=[tiny_fc]", f"hydra.run.dir={tmp_path}/b"]),
                          "threads must be an integer >= 1")
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--steps", "0"])
    assert_one_line_error(capsys, exit_.value.code, "--steps", "expected an integer >= 1")


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from fwdgrad.train import atomic
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "full" / "config.yaml"))

    monkeypatch.setattr(atomic, "replacing", full)
    code = train.main([*QUICK, f"run_dir={tmp_path}/full"])
    assert_one_line_error(capsys, code, "No space left on device", "config.yaml")


def test_metrics_columns_are_unchanged(finished_run):
    with open(os.path.join(finished_run, "metrics.csv")) as file:
        assert next(csv.reader(file)) == list(METRIC_COLUMNS)
