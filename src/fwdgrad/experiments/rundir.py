"""Run directories of ``fwdgrad train`` and ``fwdgrad compare``: never overwritten, resumed honestly.

- A new run refuses a directory that already holds a run (any of :data:`RUN_FILES`) or a
  path that is a file, naming both ways out: ``resume=<dir>`` or another ``run_dir``.
- ``resume=<dir>`` continues the run with *its own* configuration (``config.yaml``; for a
  comparison ``compare.yaml``). Options given on the command line are compared with it:
  those in :data:`SAFE_ON_RESUME` (more epochs, early stopping, display, device, eval
  batching) are applied and recorded in ``resumes.yaml``; any other difference (model,
  gradient, lr, optimizer, data, seed, ...) is refused with the differing keys named.
- The checkpoint carries the configuration it was trained with, so a checkpoint from
  another run placed in the directory is refused too.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from fwdgrad.experiments.errors import UsageError
from fwdgrad.train.atomic import atomic_write_text

# what a run writes; one of them in a directory means the directory holds a run
RUN_FILES = ("config.yaml", "checkpoint.pt", "checkpoint.pt.sha256", "metrics.csv", "summary.json", "best_model.pt",
             "tensorboard", "compare.yaml", "compare.csv")
# options a resumed run may change: they extend or display the run, or say where it runs,
# but do not change what the finished epochs computed. Prefix match on dotted keys.
SAFE_ON_RESUME = ("epochs", "patience", "min_delta", "progress", "tensorboard", "device", "max_eval_batches",
                  "data.num_workers", "data.eval_batch_size", "plot", "methods", "distributed_backend")
# keys that say where and whether to resume, not what to train
NOT_COMPARED = ("resume", "run_dir", "hydra")


def read_saved_yaml(path: str, kind: type = dict):
    """The content of a YAML file a run wrote (``config.yaml``, ``compare.yaml``: a mapping;
    ``resumes.yaml``: a list), read with ``yaml.safe_load``: tags such as ``!!python/object``
    are refused, not constructed. An unreadable, empty, malformed or tagged file, or one of
    another kind, is a one-line UsageError naming the file."""
    import yaml

    remedy = "restore the run's own copy of it, or start a new run (another run_dir)"
    try:
        with open(path, encoding="utf-8") as file:
            content = yaml.safe_load(file)
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"resume: cannot read {os.path.abspath(path)} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]}); {remedy}") from None
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", None) or error).split())[:160]
        raise UsageError(f"resume: {os.path.abspath(path)} is not a configuration fwdgrad wrote ({problem}); "
                         f"{remedy}") from None
    if not isinstance(content, kind) or not content:
        found = "is empty" if content is None or content == {} or content == [] else \
            f"holds a {type(content).__name__}, not a {'mapping' if kind is dict else 'list'}"
        raise UsageError(f"resume: {os.path.abspath(path)} {found}; {remedy}")
    return content


def check_new_run_dir(run_dir: str) -> None:
    """Refuse a ``run_dir`` that is a file or already holds a run (nothing is written)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"run_dir {os.path.abspath(run_dir)} is a file, not a directory; give a directory path")
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if present:
        raise UsageError(
            f"run_dir {os.path.abspath(run_dir)} already holds a run ({', '.join(present)}); continue it with "
            f"resume={run_dir}, or give another run_dir. Nothing was changed"
        )


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys (or group names) that command-line overrides set, e.g. ``gradient`` for
    ``gradient=fg`` and ``gradient.num_tangents`` for ``+gradient.num_tangents=4``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = []
    for override in parsed:
        key = override.key_or_group
        if override.package:  # group@package=option
            key = override.package
        if key.split(".")[0] not in NOT_COMPARED:
            keys.append(key)
    return keys


def command_line_overrides() -> list[str]:
    """The overrides of the running Hydra command (``fwdgrad train a=b ...``), or [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _leaves(node, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of every leaf of a plain container (lists are leaves)."""
    if isinstance(node, dict):
        items = {}
        for key, value in node.items():
            items.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: node}


def _plain(config) -> dict:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def differences(saved, requested, keys: Iterable[str] | None = None) -> dict[str, tuple[object, object]]:
    """``{key: (saved value, requested value)}`` for every leaf that differs, among ``keys``
    (dotted keys or subtrees; None: all), ignoring :data:`NOT_COMPARED`."""
    old, new = _leaves(_plain(saved)), _leaves(_plain(requested))
    selected = sorted(set(old) | set(new))
    if keys is not None:
        keys = list(keys)
        selected = [k for k in selected if any(k == key or k.startswith(key + ".") for key in keys)]
    missing = object()
    changed = {}
    for key in selected:
        if key.split(".")[0] in NOT_COMPARED:
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changed[key] = (None if a is missing else a, None if b is missing else b)
    return changed


def is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_ON_RESUME)


def _describe(changes: dict[str, tuple[object, object]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def resume_config(saved: DictConfig, requested: DictConfig, keys: Iterable[str] | None, where: str
                  ) -> tuple[DictConfig, dict[str, tuple[object, object]]]:
    """The configuration a resumed run continues with: ``saved`` with the safe changes of
    ``requested`` (among ``keys``; None: all) applied; any other change is a UsageError.

    Returns ``(config, {key: (old, new)})`` of the applied changes.
    """
    changes = differences(saved, requested, keys)
    refused = {key: change for key, change in changes.items() if not is_safe(key)}
    if refused:
        raise UsageError(
            f"resume: {_describe(refused)} differ from the run's configuration ({where}). A resumed run continues "
            f"the same training; only {', '.join(SAFE_ON_RESUME)} may change. Start a new run (another run_dir) "
            "for a different configuration"
        )
    config = OmegaConf.create(_plain(saved))
    for key, (_, new) in changes.items():
        OmegaConf.update(config, key, new, force_add=True)
    return config, changes


def check_checkpoint_config(checkpoint_config: str | None, config: DictConfig, checkpoint_path: str) -> None:
    """Refuse a checkpoint trained with another configuration than the run's (safe keys aside)."""
    if not checkpoint_config:
        return
    import yaml

    try:
        saved = yaml.safe_load(checkpoint_config)
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise UsageError(f"resume: {checkpoint_path} records no readable configuration; it was not written by "
                         "this run. Restore the run's own checkpoint or start a new run")
    refused = {key: change for key, change in differences(OmegaConf.create(saved), config).items()
               if not is_safe(key)}
    if refused:
        raise UsageError(
            f"resume: {checkpoint_path} was written by a run with another configuration ({_describe(refused)}, "
            "checkpoint -> this run); it is not this run's checkpoint. Restore the run's own checkpoint or start "
            "a new run"
        )


def open_run(run_dir: str, cfg: DictConfig, resume: bool, resume_keys: Iterable[str] | None, saved_name: str,
             what: str, distributed=None) -> tuple[DictConfig, dict[str, tuple[object, object]]]:
    """The configuration a run in ``run_dir`` uses, and the changes a resume applies.

    A new run: ``cfg``, after :func:`check_new_run_dir`. A resumed one: the configuration
    saved in ``run_dir/<saved_name>`` with the safe changes of ``cfg`` (:func:`resume_config`);
    ``what`` names the run in the error when there is none ("run", "comparison").
    ``distributed`` (a torchrun launch): rank 0 reads the directory and decides; every
    process gets the same configuration.
    """
    if distributed is not None:
        def configuration():
            opened, changes = open_run(run_dir, cfg, resume, resume_keys, saved_name, what)
            return OmegaConf.to_yaml(opened, resolve=True), changes

        text, changes = distributed.run_on_writer(configuration)
        return OmegaConf.create(text), changes
    if not resume:
        check_new_run_dir(run_dir)
        return cfg, {}
    saved_path = os.path.join(run_dir, saved_name)
    if not os.path.isfile(saved_path):
        raise UsageError(f"resume: {os.path.abspath(run_dir)} holds no {what} (no {saved_name}); give the directory "
                         f"of an interrupted {what}, or start a new one with run_dir=<dir>")
    return resume_config(OmegaConf.create(read_saved_yaml(saved_path)), cfg, resume_keys, saved_path)


def save_config(run_dir: str, text: str, saved_name: str, resume: bool, overrides: Sequence[str],
                changes: dict[str, tuple[object, object]]) -> None:
    """Write the run's configuration (new run, or changed by the resume) and record a resume."""
    if changes or not resume:
        atomic_write_text(text, os.path.join(run_dir, saved_name))
    if resume:
        record_resume(run_dir, overrides, changes)


def record_resume(run_dir: str, overrides: Sequence[str], changes: dict[str, tuple[object, object]]) -> None:
    """Append this resume (time, command-line overrides, applied changes) to ``resumes.yaml``."""
    path = os.path.join(run_dir, "resumes.yaml")
    entries = read_saved_yaml(path, list) if os.path.exists(path) else []
    entries.append({
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "overrides": list(overrides),
        "changed": {key: {"from": old, "to": new} for key, (old, new) in changes.items()},
    })
    atomic_write_text(OmegaConf.to_yaml(OmegaConf.create(entries)), path)
