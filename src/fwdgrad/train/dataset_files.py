"""The files of the real datasets: where they are, how they are parsed, checked and downloaded.

- ``mnist``, ``fashion_mnist``: the four IDX files (``.gz`` or not), looked for in
  ``<data_dir>/MNIST/raw`` (``FashionMNIST/raw``) first, then in the system folders of
  :data:`SYSTEM_FOLDERS`: the first folder that holds all four is read (:func:`locate`).
  Debian's package ``dataset-fashion-mnist`` installs Fashion-MNIST's in
  ``/usr/share/datasets/fashion-mnist``; Debian packages no MNIST, and
  ``/usr/share/datasets/mnist`` is where a copy put by hand is found. They are parsed and
  validated by :mod:`fwdgrad.train.idx` (magic number, type and dimensions, 28 x 28 images,
  as many labels as images, labels in 0..9, header against file size, complete gzip).
- ``cifar10``: the python pickled batches in ``<data_dir>/cifar-10-batches-py``, read with a
  restricted unpickler (:func:`read_cifar_batch`): a crafted file cannot run code.
- ``svhn``: ``<data_dir>/train_32x32.mat`` and ``test_32x32.mat`` (label 10 means digit 0).

The files are those torchvision downloads, in the same directories, so
``download=True`` fetches them with torchvision into ``data_dir`` (never into a system
folder) when they are missing everywhere and the network allows; otherwise
:func:`fwdgrad.train.data.load_dataset` raises ``FileNotFoundError`` naming the folders
looked in and how to get the files (the ``apt-get`` line, the URLs, the directory to fill).
We parse the files ourselves (IDX, pickle, MATLAB ``.mat``).

Checksums (``verify_checksums=True``, the default): before parsing, the MD5 of every
CIFAR-10 batch and SVHN ``.mat`` file read is compared with the one published with the
dataset (:data:`CHECKSUMS`, copied from torchvision's ``CIFAR10.train_list``/``test_list``
and ``SVHN.split_list``); a mismatch is a ``ValueError`` naming the file, both checksums
and the remedy (re-download, or ``verify_checksums=False`` for a copy you trust).
MNIST and Fashion-MNIST have none: torchvision publishes the MD5s of the ``.gz``
archives only (Debian's package may hold them gunzipped or recompressed), and an IDX file is
raw numbers whose header :func:`~fwdgrad.train.idx.read_idx` checks against its size.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import torch

from fwdgrad.train.idx import read_images_and_labels

_IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# where the IDX files are looked for after <data_dir>/<MNIST|FashionMNIST>/raw, in order (a test
# replaces them): Debian's dataset-fashion-mnist installs the four .gz files in the first;
# Debian packages no MNIST, the folder is the analogous one for a copy put there by hand
SYSTEM_FOLDERS = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}
# the Debian/Ubuntu package that installs a dataset into its SYSTEM_FOLDERS
_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gunzipped or not)",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the same four IDX files; gunzipped "
    "or not)",
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


def _find(folder: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    return None


def idx_folders(name: str, data_dir: str) -> list[str]:
    """The folders searched for ``name``'s IDX files, in order: ``<data_dir>/<MNIST|FashionMNIST>/raw``,
    then :data:`SYSTEM_FOLDERS`."""
    return [os.path.abspath(os.path.join(data_dir, _IDX_FOLDERS[name], "raw")), *SYSTEM_FOLDERS[name]]


def _idx_stems() -> list[str]:
    return [stem for split in ("train", "test") for stem in _IDX_FILES[split]]


def _idx_remedy(name: str, folder: str) -> str:
    """How to replace a bad file of ``name`` found in ``folder``."""
    if folder in SYSTEM_FOLDERS[name] and name in _PACKAGES:
        return (f"the file is damaged or not the original {name} file: reinstall the package "
                f"(sudo apt-get install --reinstall {_PACKAGES[name]})")
    if folder in SYSTEM_FOLDERS[name]:
        return f"the file is damaged or not the original {name} file: replace it with a fresh copy from {_URLS[name]}"
    return (f"the file is damaged or not the original {name} file: delete it and run with data.download=true, or "
            f"re-download it from {_URLS[name]} into {folder}")


def _read_idx_split(name: str, folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = (_find(folder, stem) for stem in _IDX_FILES[split])
    images, labels = read_images_and_labels(images_path, labels_path, image_size=(28, 28), num_classes=10,
                                            remedy=_idx_remedy(name, folder))
    return images.unsqueeze(1), labels


def _how_to_get(name: str, data_dir: str) -> str:
    """Where to put ``name``'s files and how to get them (the end of a not-found message)."""
    target = idx_folders(name, data_dir)[0] if name in _IDX_FOLDERS else os.path.abspath(data_dir)
    ways = []
    if name in _PACKAGES:
        ways.append(f"on Debian/Ubuntu install them with sudo apt-get install {_PACKAGES[name]} (into "
                    f"{SYSTEM_FOLDERS[name][0]})")
    ways.append(f"download {_URLS[name]} into {target} (data.download=true does it where the network allows)")
    ways.append("use data=mnist5k, which ships offline")
    return "; or ".join(ways)


def _search(name: str, data_dir: str) -> tuple[str | None, str]:
    """(the folder holding all of ``name``'s files or None, where it looked and what each folder lacks)."""
    if name in _IDX_FOLDERS:
        folders, stems = idx_folders(name, data_dir), _idx_stems()
        lacking = {folder: [stem + "[.gz]" for stem in stems if _find(folder, stem) is None] for folder in folders}
    else:
        folder = os.path.abspath(os.path.join(data_dir, "cifar-10-batches-py") if name == "cifar10" else data_dir)
        files = [*_CIFAR_BATCHES["train"], *_CIFAR_BATCHES["test"]] if name == "cifar10" else \
            ["train_32x32.mat", "test_32x32.mat"]
        folders, lacking = [folder], {folder: [f for f in files if not os.path.exists(os.path.join(folder, f))]}
    for folder in folders:
        if not lacking[folder]:
            return folder, ""
    described = [f"{folder} ({'lacks ' + ', '.join(lacking[folder]) if os.path.isdir(folder) else 'no such folder'})"
                 for folder in folders]
    return None, f"looked in {' and '.join(described)}"


def locate(name: str, data_dir: str) -> str:
    """The folder ``name``'s files are read from: for ``mnist``, ``fashion_mnist`` the first of
    :func:`idx_folders` that holds all four; for ``cifar10``, ``svhn`` the folder in ``data_dir``.

    Raises:
        FileNotFoundError: no folder holds them all; the one-line message names each folder
            looked in and what it lacks, and how to get the files.
    """
    folder, looked = _search(name, data_dir)
    if folder is None:
        raise FileNotFoundError(f"dataset {name!r} not found: {looked}; {_how_to_get(name, data_dir)}")
    return folder


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


def _read_cifar10(folder: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for batch_name in _CIFAR_BATCHES[split]:
        path = os.path.join(folder, batch_name)
        if verify_checksums:
            verify_checksum("cifar10", path)
        batch_images, batch_labels = read_cifar_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def _read_svhn(folder: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    path = os.path.join(folder, f"{split}_32x32.mat")
    if verify_checksums:
        verify_checksum("svhn", path)
    mat = scipy.io.loadmat(path)
    images = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).contiguous()  # (H, W, C, N) -> (N, C, H, W)
    labels = torch.as_tensor(mat["y"].astype("int64")).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as class 10
    return images.to(torch.uint8), labels


def download(name: str, data_dir: str) -> None:
    """Fetch the files with torchvision (it verifies their checksums) into ``data_dir``, never a system folder.

    Raises:
        FileNotFoundError: the download failed; the message says where the files were looked
            for, why the download failed, and the other ways to get them.
    """
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
        _, looked = _search(name, data_dir)
        raise FileNotFoundError(
            f"dataset {name!r} not found: {looked}; downloading it into {os.path.abspath(data_dir)} failed "
            f"({type(error).__name__}: {error}); {_how_to_get(name, data_dir)}"
        ) from error


def read_split(name: str, folder: str, split: str, verify_checksums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of ``split`` (train | test) from the
    folder :func:`locate` found; every file is validated (a ValueError names the file at fault)."""
    if name in _IDX_FOLDERS:
        return _read_idx_split(name, folder, split)
    if name == "cifar10":
        return _read_cifar10(folder, split, verify_checksums)
    return _read_svhn(folder, split, verify_checksums)
