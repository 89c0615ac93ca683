"""The IDX format of MNIST and Fashion-MNIST: parse a file, and check that it holds what its role needs.

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/; ``.gz`` compressed or not) is
a header and raw numbers::

    bytes 0, 1    0x00 0x00
    byte 2        type of the values (:data:`IDX_TYPES`): 0x08 uint8, 0x09 int8, 0x0B int16,
                  0x0C int32, 0x0D float32, 0x0E float64
    byte 3        number of dimensions d >= 1
    4 d bytes     the sizes n_1 ... n_d, big-endian uint32
    the rest      n_1 * ... * n_d values, big-endian, row-major

so a file of ``d`` dimensions holds exactly ``4 + 4 d + n_1 ... n_d * itemsize`` bytes.
:func:`read_idx` checks all of it; :func:`read_images_and_labels` checks the pair of files of
one split (images uint8 ``N x H x W`` of the expected size, labels uint8 ``N`` in
``0 .. num_classes - 1``, the same N). Every refusal is a one-line ``ValueError`` naming the
file, what is wrong (expected against found) and the caller's ``remedy``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import torch

IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
             0x0E: torch.float64}
_TYPE_CODES = {dtype: code for code, dtype in IDX_TYPES.items()}


def _refuse(path: str, problem: str, remedy: str) -> ValueError:
    return ValueError(f"{os.path.abspath(path)}: {problem}; {remedy}")


def _describe(dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} (type 0x{_TYPE_CODES[dtype]:02x})"


def _read_bytes(path: str, remedy: str) -> bytes:
    if not path.endswith(".gz"):
        with open(path, "rb") as file:
            return file.read()
    with open(path, "rb") as raw, gzip.open(raw, "rb") as file:
        try:
            return file.read()
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # truncated, not gzip, corrupt
            raise _refuse(path, f"not a complete gzip archive ({type(error).__name__}: {error})", remedy) from None


def read_idx(path: str, *, dtype: torch.dtype | None = None, ndim: int | None = None,
             remedy: str = "re-download it") -> torch.Tensor:
    """Parse the IDX file ``path`` (``.gz`` too) into a tensor of the header's shape and type.

    Args:
        path: the file.
        dtype, ndim: what the caller needs (e.g. ``torch.uint8`` and 3 for images); a file
            whose header says otherwise is refused before its values are parsed. None: any.
        remedy: the end of every refusal's message (how to get a good copy).

    Returns:
        a tensor of shape ``(n_1, ..., n_d)`` and the header's type.

    Raises:
        ValueError: not a complete gzip archive; a magic number other than 00 00 <known
            type> <d >= 1>; another type or number of dimensions than ``dtype``, ``ndim``;
            a file size other than the header's ``4 + 4 d + n_1 ... n_d * itemsize`` bytes.
    """
    data = _read_bytes(path, remedy)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES or data[3] == 0:
        raise _refuse(path, f"not an IDX file: its magic number is {data[:4].hex(' ') or 'missing (empty file)'}, "
                      f"expected 00 00 <type: {', '.join(f'{code:02x}' for code in IDX_TYPES)}> <dimensions >= 1>",
                      remedy)
    found, dimensions = IDX_TYPES[data[2]], data[3]
    if dtype is not None and found != dtype:
        raise _refuse(path, f"holds {_describe(found)} values, expected {_describe(dtype)}", remedy)
    if ndim is not None and dimensions != ndim:
        raise _refuse(path, f"has {dimensions} dimensions, expected {ndim}", remedy)
    offset = 4 + 4 * dimensions
    if len(data) < offset:
        raise _refuse(path, f"truncated header: {dimensions} dimensions need {offset} bytes, the file has "
                      f"{len(data)}", remedy)
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dimensions)]
    expected = math.prod(shape) * found.itemsize
    if len(data) - offset != expected:
        raise _refuse(path, f"the header's shape {' x '.join(map(str, shape))} of {_describe(found)} needs "
                      f"{offset + expected:,} bytes, the file has {len(data):,}"
                      + (" (truncated)" if len(data) - offset < expected else ""), remedy)
    if expected == 0:
        return torch.empty(shape, dtype=found)
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=offset)
    if found.itemsize > 1:  # IDX is big-endian
        values = values.view(-1, found.itemsize).flip(1)
    return values.reshape(-1).view(found).reshape(shape).clone()


def read_images_and_labels(
    images_path: str, labels_path: str, *, image_size: tuple[int, int] = (28, 28), num_classes: int = 10,
    remedy: str = "re-download them",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's two IDX files: images ``(N, H, W)`` uint8 and labels ``(N,)`` int64.

    Besides :func:`read_idx`'s checks: images uint8 with 3 dimensions and
    ``(H, W) == image_size``; labels uint8 with 1 dimension, as many as the images, each
    in ``0 .. num_classes - 1``. A refusal (``ValueError``) names the file at fault.
    """
    images = read_idx(images_path, dtype=torch.uint8, ndim=3, remedy=remedy)
    if tuple(images.shape[1:]) != tuple(image_size):
        raise _refuse(images_path, f"images of {images.shape[1]} x {images.shape[2]} pixels, expected "
                      f"{image_size[0]} x {image_size[1]}", remedy)
    labels = read_idx(labels_path, dtype=torch.uint8, ndim=1, remedy=remedy)
    if len(labels) != len(images):
        raise _refuse(labels_path, f"{len(labels):,} labels, expected one per image: {len(images):,} (the images in "
                      f"{os.path.abspath(images_path)})", remedy)
    outside = (labels >= num_classes).nonzero().flatten()
    if len(outside):
        index = int(outside[0])
        raise _refuse(labels_path, f"label {int(labels[index])} at index {index} outside the classes "
                      f"0..{num_classes - 1} ({len(outside):,} of {len(labels):,} labels outside)", remedy)
    return images, labels.long()
