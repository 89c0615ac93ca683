"""The files of the real datasets: where they are, how they are parsed, checked and downloaded.

- ``mnist``, ``fashion_mnist``: the four IDX files (``.gz`` too) in ``<data_dir>/MNIST/raw``
  (``FashionMNIST/raw``), parsed by :func:`read_idx`.
- ``cifar10``: the python pickled batches in ``<data_dir>/cifar-10-batches-py``, read with a
  restricted unpickler (:func:`read_cifar_batch`): a crafted file cannot run code.
- ``svhn``: ``<data_dir>/train_32x32.mat`` and ``test_32x32.mat`` (label 10 means digit 0).

The files are those torchvision downloads, in the same directories, so
``download=True`` fetches them with torchvision when they are missing and the network
allows; otherwise :func:`fwdgrad.train.data.load_dataset` raises ``FileNotFoundError`` naming the URLs and
the directory to fill. We parse the files ourselves (IDX, pickle, MATLAB ``.mat``).

Checksums (``verify_checksums=True``, the default): before parsing, the MD5 of every
CIFAR-10 batch and SVHN ``.mat`` file read is compared with the one published with the
dataset (:data:`CHECKSUMS`, copied from torchvision's ``CIFAR10.train_list``/``test_list``
and ``SVHN.split_list``); a mismatch is a ``ValueError`` naming the file, both checksums
and the remedy (re-download, or ``verify_checksums=False`` for a copy you trust).
MNIST and Fashion-MNIST have none: torchvision publishes the MD5s of the ``.gz``
archives only, not of the IDX files inside them, and an IDX file is raw numbers whose
header :func:`read_idx` checks against its size.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle

import torch

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


def download(name: str, data_dir: str) -> None:
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


def read_split(name: str, data_dir: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if name in _IDX_FOLDERS:
        return _read_idx_split(name, data_dir, split)
    if name == "cifar10":
        return _read_cifar10(data_dir, split, verify_checksums)
    return _read_svhn(data_dir, split, verify_checksums)
