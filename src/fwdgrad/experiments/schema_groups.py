"""Types of the config groups: ``conf/gradient``, ``conf/data``, ``conf/model``, ``conf/optimizer``, ``conf/scheduler``.

The dataclasses that the groups' YAML files extend (their defaults list starts with
``/schema/<group>/<name>@_here_``); :mod:`fwdgrad.experiments.schema` registers them and types
the commands built from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class BackpropConfig:
    name: str = "bp"


@dataclass
class ForwardGradientConfig:
    """The arguments of :class:`fwdgrad.ForwardGradient` (``name`` fg or frog)."""

    name: str = "fg"
    num_tangents: int = 1
    aggregation: str = "mean"
    sampler: str = "normal"
    normalize_tangents: bool = False
    scaling_correction: bool = False
    chunk_size: int | None = None
    angle: float | None = None
    max_length: float | None = None
    mode: str = "auto"
    perturbation: str = "weight"
    tangent_sharing: str = "per_sample"
    perturbed_modules: Any = None
    after_activation: bool = False
    simulated: bool = False
    guess: str | None = None


@dataclass
class LocalGradientConfig:
    """The arguments of :class:`fwdgrad.LocalForwardGradient` (``name`` local): local losses."""

    name: str = "local"
    blocks: Any = None  # null: the model zoo's split of model.name; or a list of blocks
    num_tangents: int = 1
    aggregation: str = "mean"
    sampler: str = "rademacher"
    normalize_tangents: bool = False
    scaling_correction: bool = False
    chunk_size: int | None = None
    group_size: int | None = 4
    last_group_size: int | None = 1
    patches: int = 1
    head: str = "linear"  # linear | normalized | conv | mlp (fwdgrad.local.heads)
    head_pool: int = 2  # the grid a normalized / conv / mlp head pools a feature map to
    mixing_sites: str = "own_loss"  # own_loss | guess | block_loss: what a site that mixes the block's units learns
    batch_norm: str = "differentiated"  # differentiated | constant: a site's estimate through a BatchNorm's statistics
    mode: str = "auto"  # auto | eager | fast: how the blocks' forward-mode passes run
    guess: str | None = None  # local: the local-loss gradient as the global loss's tangent (fwdgrad.local.guess)


@dataclass
class _Loader:
    eval_batch_size: int = 1000
    train_eval_samples: int = 5000
    num_workers: int = 0


@dataclass
class FileDataConfig(_Loader):
    """A real dataset read from files in ``data_dir`` (mnist, fashion_mnist, cifar10, svhn; mnist and
    fashion_mnist also from the system folder, :data:`fwdgrad.train.dataset_files.SYSTEM_FOLDERS`)."""

    name: str = MISSING
    data_dir: str = "data"
    download: bool = True
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class CheckedFileDataConfig(FileDataConfig):
    """A dataset whose files have published checksums (cifar10, svhn)."""

    verify_checksums: bool = True


@dataclass
class Mnist5kDataConfig(_Loader):
    name: str = "mnist5k"
    val_fraction: float | None = None  # null: the fixed split (50 per class); 0: no validation, 4,000 train


@dataclass
class SyntheticDataConfig(_Loader):
    name: str = "synthetic"
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    num_samples: int = 1024
    split_seed: int = 0
    val_fraction: float | None = None  # 0: no validation split


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class FcModelConfig:
    name: str = "fc"
    width: int = 256


@dataclass
class VitModelConfig:
    name: str = "vit"
    patch_size: int = 4


@dataclass
class LocalMixerModelConfig:
    name: str = "localmixer"
    blocks: int = 4
    channels: int = 512
    grid: int | None = None  # patches per side; null: 8 on 32-pixel images (M/8/16), 1 otherwise (M/1/16)
    groups: int = 16


@dataclass
class SgdConfig:
    name: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "constant"


@dataclass
class CosineSchedulerConfig:
    name: str = "cosine"
    min_lr: float = 0.0


@dataclass
class ExponentialSchedulerConfig:
    name: str = "exponential"
    decay: float = 1e-4


@dataclass
class StepSchedulerConfig:
    name: str = "step"
    step_size: int = 10
    gamma: float = 0.1
