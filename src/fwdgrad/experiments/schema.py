"""Types of every command's options: Hydra structured configs.

Each YAML file under ``fwdgrad/conf`` extends one of these dataclasses (its defaults list
starts with ``/schema/<group>/<name>@_here_``), registered in Hydra's ConfigStore by
:func:`register` under the group ``schema``. Hydra then converts and checks every value,
from the YAML files and from the command line alike: ``epochs=abc`` or
``gradient.scaling_correction=maybe`` stop before anything runs, naming the key and the
expected type, and a key that no schema declares is refused. Booleans accept YAML's
spellings (``true/false``, ``yes/no``, ``on/off``, ``1/0``).

Values with a closed set of choices (``gradient.aggregation``, ``device``, ...) are typed as
strings and checked against their choices by the code that uses them, which names the
valid ones. ``Any`` marks options that take more than one type (``lr``: a number or
``auto``; ``resume``: a boolean or a directory; ``start``: a number or a list).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fwdgrad.experiments.errors import UsageError
from fwdgrad.experiments.schema_groups import (  # noqa: E402 (the groups, typed in their own module)
    AdamConfig,
    BackpropConfig,
    CheckedFileDataConfig,
    CosineSchedulerConfig,
    ExponentialSchedulerConfig,
    FcModelConfig,
    FileDataConfig,
    ForwardGradientConfig,
    LocalGradientConfig,
    LocalMixerModelConfig,
    Mnist5kDataConfig,
    ModelConfig,
    SchedulerConfig,
    SgdConfig,
    StepSchedulerConfig,
    SyntheticDataConfig,
    VitModelConfig,
)

# ----------------------------------------------------------------------------- commands


@dataclass
class TrainConfig:
    """``fwdgrad train`` (the groups are typed by their own schemas)."""

    data: Any = MISSING
    model: Any = MISSING
    gradient: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    lr: Any = "auto"
    epochs: int = 10
    batch_size: int = 64
    max_grad_norm: float | None = None
    patience: int | None = None
    min_delta: float = 0.0
    max_steps_per_epoch: int | None = None
    max_eval_batches: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    resume: Any = False
    run_dir: str | None = None
    # under torchrun (fwdgrad.experiments.launch): none | data | tangent; gloo/nccl; BatchNorm statistics
    distributed: str = "none"
    distributed_backend: str = "auto"
    buffer_sync: str = "average"


def _all_optional(schemas: tuple[type, ...], name: str) -> type:
    """The fields of all ``schemas``, each optional and None by default: the keys a method's
    gradient may set, typed, whatever its name (None = the schema's default, see :func:`typed_gradient`)."""
    fields, seen = [], set()
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if f.name not in seen:
                seen.add(f.name)
                fields.append((f.name, hints[f.name] | None if hints[f.name] is not Any else Any, field(default=None)))
    return dataclasses.make_dataclass(name, fields)


MethodGradientConfig = _all_optional((ForwardGradientConfig, LocalGradientConfig), "MethodGradientConfig")


@dataclass
class MethodConfig:
    """One method of ``fwdgrad compare``: a gradient config (finally typed by its name, see
    :func:`typed_gradient`), optionally its own lr, optimizer and scheduler (a name of
    ``conf/optimizer`` / ``conf/scheduler``, or a mapping), and ``models``: per zoo model, the
    keys of this entry that the model overrides (the configuration measured best on it)."""

    gradient: MethodGradientConfig = field(default_factory=MethodGradientConfig)
    lr: Any = None
    optimizer: Any = None
    scheduler: Any = None
    models: Any = None


@dataclass
class CompareConfig(TrainConfig):
    methods: Any = field(default_factory=list)  # a list of method keys; one key alone (methods=bp) too
    # entries are checked by MethodConfig's fields when a method is built (compare.method_config):
    # typed as MethodConfig here, OmegaConf refuses `+method_configs.new={gradient: {...}}`
    method_configs: dict[str, Any] = field(default_factory=dict)
    plot: bool = True


@dataclass
class SearchConfig:
    lr_min: float = 1e-5
    lr_max: float = 1.0
    trials: int = 10
    study_name: str = "lr-search"
    storage: str | None = None
    pruner: str = "median"
    startup_trials: int = 2
    sampler_seed: int = 0
    heartbeat_interval: int = 30
    grace_period: int = 120
    max_retry: int | None = 2
    plot: bool = True


@dataclass
class LrSearchConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class BenchConfig:
    device: str = "auto"
    workloads: list[str] = field(default_factory=lambda: ["baydin_mlp_64"])
    methods: list[str] = field(default_factory=list)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    modes: list[str] = field(default_factory=lambda: ["eager"])
    samplers: list[str] = field(default_factory=lambda: ["normal"])
    warmup: int = 3
    repetitions: int = 10
    memory_steps: int = 2
    threads: int | None = None
    tf32: bool = False
    plot: bool = True
    profile: bool = False
    distributed: str = "none"
    distributed_backend: str = "auto"


@dataclass
class Section42Config:
    functions: list[str] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)


@dataclass
class AngleStudyConfig:
    function: str = "styblinski-tang"
    n: int = 64
    ks: list[int] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)


@dataclass
class BaydinStudyConfig:
    runs: list[Any] = field(default_factory=list)


@dataclass
class OptimizeConfig:
    gradient: Any = MISSING
    study: str = "single"
    function: str = "sphere"
    n: int = 2
    steps: int | None = None
    lr: float | None = None
    start: Any = None
    seeds: int = 5
    seed: int = 0
    patience: int = 50
    dtype: str = "float32"
    log_every: int = 1
    plot: bool = True
    section42: Section42Config = field(default_factory=Section42Config)
    angles: AngleStudyConfig = field(default_factory=AngleStudyConfig)
    baydin: BaydinStudyConfig = field(default_factory=BaydinStudyConfig)


@dataclass
class ApproxAngleStudyConfig:
    n: int = 64
    ks: list[int] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)


@dataclass
class ApproxConfig:
    study: str = "grid"
    true_gradient: str = "ones"
    dims: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    samplers: list[str] = field(default_factory=lambda: ["normal"])
    normalize: list[bool] = field(default_factory=lambda: [False, True])
    aggregations: list[str] = field(default_factory=list)
    num_samples: int = 1000
    max_entries: int = 2**23
    min_samples: int = 10
    chunk_entries: int = 2**24
    seed: int = 0
    dtype: str = "float32"
    plot: bool = True
    angles: ApproxAngleStudyConfig = field(default_factory=ApproxAngleStudyConfig)


# (group, name) -> schema; the YAML files name them as /schema/<group>/<name>@_here_
SCHEMAS: dict[tuple[str, str], type] = {
    ("gradient", "bp"): BackpropConfig,
    ("gradient", "fg"): ForwardGradientConfig,
    ("gradient", "local"): LocalGradientConfig,
    ("data", "files"): FileDataConfig,
    ("data", "checked_files"): CheckedFileDataConfig,
    ("data", "mnist5k"): Mnist5kDataConfig,
    ("data", "synthetic"): SyntheticDataConfig,
    ("model", "plain"): ModelConfig,
    ("model", "fc"): FcModelConfig,
    ("model", "vit"): VitModelConfig,
    ("model", "localmixer"): LocalMixerModelConfig,
    ("optimizer", "sgd"): SgdConfig,
    ("optimizer", "adam"): AdamConfig,
    ("scheduler", "plain"): SchedulerConfig,
    ("scheduler", "cosine"): CosineSchedulerConfig,
    ("scheduler", "exponential"): ExponentialSchedulerConfig,
    ("scheduler", "step"): StepSchedulerConfig,
    ("command", "train"): TrainConfig,
    ("command", "compare"): CompareConfig,
    ("command", "lr_search"): LrSearchConfig,
    ("command", "bench"): BenchConfig,
    ("command", "optimize"): OptimizeConfig,
    ("command", "approx"): ApproxConfig,
}
# the schema of a gradient config, by its name (compare's method_configs hold several)
GRADIENT_SCHEMAS = {"bp": BackpropConfig, "fg": ForwardGradientConfig, "frog": ForwardGradientConfig,
                    "local": LocalGradientConfig}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=f"schema/{group}", name=name, node=schema)


def typed_gradient(gradient, where: str):
    """``gradient`` (a mapping with ``name``; keys set to None are left out) checked and
    converted by the schema of its name (:data:`GRADIENT_SCHEMAS`).

    Raises ValueError naming ``where.<key>`` and the problem (unknown key, wrong type).
    """
    name = gradient.get("name") if hasattr(gradient, "get") else None
    schema = GRADIENT_SCHEMAS.get(name)
    if schema is None:
        raise UsageError(f"{where}.name: unknown gradient {name!r}; valid choices: {', '.join(GRADIENT_SCHEMAS)}")
    given = {key: value for key, value in OmegaConf.to_container(OmegaConf.create(gradient)).items()
             if value is not None}
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), given)
    except OmegaConfBaseException as error:
        key = f"{where}.{error.full_key}" if getattr(error, "full_key", None) else where
        message = str(error).strip().splitlines()[0]
        raise UsageError(f"{key}: {message}") from error
