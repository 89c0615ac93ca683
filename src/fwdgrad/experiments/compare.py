"""``fwdgrad compare``: one model, several gradient estimators, side by side.

Each method in ``methods`` (keys of ``method_configs`` in ``fwdgrad/conf/compare.yaml``:
a ``gradient`` config and optionally an ``lr``) is trained by
:func:`fwdgrad.experiments.train.run_training` with the same seed (same initialization,
same data order) into ``<run dir>/<method>/``. Then:

- a table is printed: method, test accuracy (last epoch and best-validation epoch), final
  training loss, ms per step (estimator step + optimizer step), ratio to bp's ms per
  step *measured in the same run*, peak memory of a training epoch above its start;
- ``compare.csv`` holds the table, ``compare.png`` the per-epoch training loss,
  validation loss and test accuracy curves, one line per method.

``resume=<run dir>`` finishes an interrupted comparison with the config it was started with
(``compare.yaml``): finished methods are read back from their ``summary.json``, an
interrupted one continues from its checkpoint, the others train.

Under ``torchrun ... -m fwdgrad compare distributed=data`` every method trains on all the
processes (backprop under DistributedDataParallel), rank 0 decides about and writes the
run directory, and the table gains the bytes each process handed to the collectives per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

from omegaconf import DictConfig, OmegaConf

from fwdgrad.experiments import launch, rundir
from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.hydra_app import CONFIG_DIR, run
from fwdgrad.experiments.plots import save_figure
from fwdgrad.experiments.schema import MethodConfig, typed_gradient
from fwdgrad.experiments.train import directory_arguments, hydra_run_dir, run_training
from fwdgrad.train.atomic import write_csv

TABLE_COLUMNS = (
    "method", "test_accuracy_last", "test_accuracy_at_best_val", "final_train_loss", "ms_per_step", "ratio_to_bp",
    "peak_memory_mb", "lr", "epochs_completed", "steps", "lr_source", "world_size", "bytes_per_step",
)


# a method key becomes a directory name: letters, digits, _ . - only (no path separators, no "..")
METHOD_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


METHOD_CONFIG_KEYS = [f.name for f in dataclasses.fields(MethodConfig)]


def method_keys(cfg: DictConfig) -> list[str]:
    """``cfg.methods`` as a list of keys (a single key given as ``methods=bp`` included)."""
    methods = cfg.methods
    keys = [methods] if isinstance(methods, str) else list(methods)
    if not keys:
        raise UsageError("methods is empty; list at least one of: " + ", ".join(cfg.method_configs))
    for key in keys:
        if not isinstance(key, str) or not METHOD_KEY.fullmatch(key) or ".." in key:
            raise UsageError(f"method key {key!r} is not a valid name: it becomes a directory name, so use letters, "
                             "digits, '_', '.' and '-' only (no '/' or '..')")
    if len(set(keys)) != len(keys):
        raise UsageError(f"methods lists a key twice: {keys}")
    return keys


def method_config(cfg: DictConfig, key: str) -> DictConfig:
    """The train config of method ``key``: ``cfg`` with its ``gradient`` (and ``lr``, ``optimizer``,
    ``scheduler``) replaced, after the entry's ``models.<cfg.model.name>`` overrides."""
    methods = cfg.method_configs
    if key not in methods:
        raise UsageError(f"unknown method {key!r} in methods; valid choices: {', '.join(methods)} "
                         "(or define it under method_configs)")
    entry = _checked_entry(methods[key], f"method_configs.{key}")
    if "gradient" not in entry:
        raise UsageError(f"method_configs.{key} needs a 'gradient' entry (e.g. {{name: fg, num_tangents: 4}})")
    model_name = cfg.model.get("name")
    per_model = entry.get("models")
    if per_model is not None and not isinstance(per_model, DictConfig):
        raise UsageError(f"method_configs.{key}.models must map model names to overrides, got {per_model!r}")
    if per_model is not None and model_name in per_model:
        where = f"method_configs.{key}.models.{model_name}"
        override = _checked_entry(per_model[model_name], where, nested=False)
        # unstructured: a model may set gradient keys the entry does not list
        entry = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(entry)),
                                OmegaConf.create(OmegaConf.to_container(override)))
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("methods", "method_configs", "plot")])
    OmegaConf.set_struct(train_cfg, False)
    train_cfg.gradient = typed_gradient(entry.gradient, f"method_configs.{key}.gradient")
    if entry.get("lr") is not None:
        train_cfg.lr = entry.lr
    for group in ("optimizer", "scheduler"):
        if entry.get(group) is not None:
            train_cfg[group] = _group_config(group, entry[group], f"method_configs.{key}.{group}")
    return train_cfg


def _model_overrides(cfg: DictConfig, key: str) -> str:
    """The per-model settings method ``key`` takes on ``cfg.model.name``, as ``a.b=v, ...`` ('' for none)."""
    per_model = cfg.method_configs[key].get("models") or {}
    override = per_model.get(cfg.model.get("name")) if isinstance(per_model, DictConfig) else None
    if override is None:
        return ""
    leaves = rundir.differences({}, OmegaConf.to_container(override, resolve=True))
    return ", ".join(f"{name}={value}" for name, (_, value) in leaves.items())


def _checked_entry(entry, where: str, nested: bool = True) -> DictConfig:
    if not isinstance(entry, DictConfig):
        raise UsageError(f"{where} must be a mapping with 'gradient' (and optionally 'lr'), got {entry!r}")
    keys = METHOD_CONFIG_KEYS if nested else [k for k in METHOD_CONFIG_KEYS if k != "models"]
    unknown = [k for k in entry if k not in keys]
    if unknown:
        raise UsageError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(keys)}")
    return entry


def _group_config(group: str, value, where: str) -> DictConfig:
    """An optimizer / scheduler given by name (``conf/<group>/<name>.yaml``) or as a mapping with ``name``."""
    if isinstance(value, str):
        path = os.path.join(CONFIG_DIR, group, f"{value}.yaml")
        if not os.path.isfile(path):
            names = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))
            raise UsageError(f"{where}: unknown {group} {value!r}; valid choices: {', '.join(names)}")
        loaded = OmegaConf.load(path)
        # the group's own defaults first (sgd_momentum extends sgd), then the file's keys; schemas ("/...") are
        # applied when the train config is checked
        inherited = [_group_config(group, parent, where) for parent in loaded.get("defaults", [])
                     if isinstance(parent, str) and parent != "_self_" and not parent.startswith("/")]
        return OmegaConf.merge(*inherited, OmegaConf.create({k: v for k, v in loaded.items() if k != "defaults"}))
    if not isinstance(value, DictConfig) or "name" not in value:
        raise UsageError(f"{where} must be a name of conf/{group} or a mapping with 'name', got {value!r}")
    return _group_config(group, value.name, where) if len(value) == 1 else \
        OmegaConf.merge(_group_config(group, value.name, where), value)


def compare(cfg: DictConfig, run_dir: str, resume: bool = False, resume_keys=None, overrides=(),
            distributed=None) -> list[dict]:
    """Train every method of ``cfg.methods`` into ``run_dir/<method>``; return one summary per method.

    The comparison's config is saved as ``run_dir/compare.yaml``. With ``resume`` it is read
    back from there (command-line changes as :func:`fwdgrad.experiments.rundir.resume_config`
    allows: more epochs, methods added); finished methods are read back from their
    ``summary.json`` (or continued when ``epochs`` grew), an interrupted one continues from its
    checkpoint, a method not started yet trains with the comparison's config.

    ``distributed`` (a torchrun launch): rank 0 makes the decisions that read the run
    directory and hands them to every process; only rank 0 writes and prints.
    """
    cfg, changes = rundir.open_run(run_dir, cfg, resume, resume_keys, "compare.yaml", "comparison", distributed)
    # what reads the filesystem is decided once, by rank 0 under torchrun
    decide = (lambda function: function()) if distributed is None else distributed.run_on_writer
    writer = distributed is None or distributed.is_writer
    keys = method_keys(cfg)
    # check every entry of method_configs (listed or not: a typo anywhere is an error) before training any
    configs = {key: method_config(cfg, key) for key in [*keys, *(k for k in cfg.method_configs if k not in keys)]}
    configs = {key: configs[key] for key in keys}
    for key in keys:
        applied = _model_overrides(cfg, key)
        if applied and writer:
            print(f"{key} on {cfg.model.name}: {applied} (method_configs.{key}.models.{cfg.model.name})")
    os.makedirs(run_dir, exist_ok=True)
    if writer:
        rundir.save_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True), "compare.yaml", resume, overrides, changes)
    say = print if writer else (lambda *args, **kwargs: None)
    summaries = []
    for index, key in enumerate(keys):
        method_dir = os.path.join(run_dir, key)
        summary_path = os.path.join(method_dir, "summary.json")
        say(f"[{index + 1}/{len(keys)}] ", end="")
        summary = decide(lambda: _finished_summary(summary_path, configs[key].epochs) if resume else None)
        if summary is not None:
            summaries.append(summary)
            say(f"{summary['method']}: finished earlier, read {summary_path}")
            continue
        started = resume and decide(lambda: os.path.exists(os.path.join(method_dir, "config.yaml")))
        summaries.append(run_training(configs[key], method_dir, resume=started, description=f"{key} ",
                                      overrides=overrides, distributed=distributed))
    if not writer:
        return summaries
    rows = table_rows(summaries)
    write_csv(rows, os.path.join(run_dir, "compare.csv"), TABLE_COLUMNS)
    print()
    print(format_table(rows, summaries[0]))
    if cfg.get("plot", True):
        path = plot_curves(summaries, os.path.join(run_dir, "compare.png"))
        print(f"wrote {path}")
    print(f"wrote {os.path.join(run_dir, 'compare.csv')}")
    return summaries


def _finished_summary(summary_path: str, epochs: int) -> dict | None:
    """The summary of a method that finished its epochs (or stopped early), else None."""
    if not os.path.exists(summary_path):
        return None
    try:
        with open(summary_path, encoding="utf-8") as file:
            summary = json.load(file)
        finished = summary["epochs_completed"] >= epochs or summary["stopped_early"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"resume: {os.path.abspath(summary_path)} is not a summary this comparison wrote "
                         f"({type(error).__name__}); delete it to train that method again") from None
    return summary if finished else None


def table_rows(summaries: list[dict]) -> list[dict]:
    """One row per method; ``ratio_to_bp`` = ms per step / bp's ms per step (nan without bp)."""
    bp = next((s for s in summaries if s["method"] == "bp"), None)
    rows = []
    for s in summaries:
        row = {key: s.get(key) for key in TABLE_COLUMNS}
        row["ratio_to_bp"] = s["ms_per_step"] / bp["ms_per_step"] if bp else math.nan
        rows.append(row)
    return rows


def _number(value: float | None) -> str:
    """A table cell: 4 decimals, or — where there is no value (no validation split)."""
    return "—" if value is None else f"{value:.4f}"


def format_table(rows: list[dict], first: dict) -> str:
    """The printed table (markdown, so it can be pasted into a README)."""
    header = ("| method | test acc (last) | test acc (best val) | final train loss | ms/step | × bp | "
              "peak MB | lr |")
    distributed = any(r.get("bytes_per_step") is not None for r in rows)
    if distributed:  # under torchrun: what each process handed to the collectives per step
        header += " bytes/step |"
    lines = [
        f"{first['model']} on {first['dataset']}, {first['epochs_completed']} epochs, device: {first['device_name']}"
        + (f", {first.get('world_size')} processes (distributed={first.get('distributed')})" if distributed else ""),
        header, "|" + "---|" * (9 if distributed else 8),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['test_accuracy_last']:.4f} | {_number(r['test_accuracy_at_best_val'])} | "
            f"{r['final_train_loss']:.4f} | {r['ms_per_step']:.1f} | {r['ratio_to_bp']:.2f} | "
            f"{r['peak_memory_mb']:.1f} | {r['lr']:.3g} |"
            + (f" {r['bytes_per_step']:,.0f} |" if distributed else "")
        )
    return "\n".join(lines)


def plot_curves(summaries: list[dict], path: str) -> str:
    """Training loss, validation loss and test accuracy per epoch, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_loss", "training loss (mean over the epoch's steps)"), ("val_loss", "validation loss"),
              ("test_accuracy", "test accuracy"))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in summaries:
        epochs = [row["epoch"] for row in s["history"]]
        for axis, (key, _) in zip(axes, panels):
            points = [(epoch, row[key]) for epoch, row in zip(epochs, s["history"]) if row[key] is not None]
            if points:  # no validation curve without a validation split
                axis.plot(*zip(*points), marker="o", label=s["method"])
    for axis, (key, title) in zip(axes, panels):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if key != "test_accuracy":
            axis.set_yscale("log")
    axes[-1].legend()
    first = summaries[0]
    figure.suptitle(f"{first['model']} on {first['dataset']}: backprop vs forward gradients ({first['device_name']})")
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def _task(cfg: DictConfig) -> list[dict]:
    if cfg.resume not in (True, False):
        raise UsageError(f"resume must be true, false or a run directory, got {cfg.resume!r}")
    overrides = rundir.command_line_overrides()
    with launch.session(cfg) as distributed:
        run_dir = launch.shared_run_dir(distributed, hydra_run_dir())
        resume = bool(cfg.resume) or launch.restarted_run_of(distributed, run_dir, "compare.yaml")
        return compare(cfg, run_dir, resume=resume, resume_keys=rundir.override_keys(overrides),
                       overrides=overrides, distributed=distributed)


def main(argv: list[str]) -> int:
    """``fwdgrad compare [key=value ...]``; ``--help`` lists every option."""
    return run(_task, "compare", argv, "compare", arguments=directory_arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
