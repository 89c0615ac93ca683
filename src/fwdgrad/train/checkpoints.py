"""Checkpoints of a training run: what they hold, how they are read safely, the RNG states.

A checkpoint holds everything the rest of a run depends on (:data:`CHECKPOINT_KEYS`): model,
optimizer, scheduler, the estimator's generators, the data order's generator, every global RNG
(torch CPU and CUDA, numpy, Python) and the loop's progress. It is stored as tensors and plain
values only, so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``.

Integrity: :func:`save_checkpoint` records the file's SHA-256 next to it, in
``<checkpoint>.sha256`` (``sha256sum`` format: ``sha256sum -c checkpoint.pt.sha256`` checks it
by hand), and :func:`load_checkpoint` refuses a file whose digest is not the recorded one (a
bit flip on disk, a partial copy, an edit). The two files are replaced in an order that leaves
a verifying pair whenever the process is killed: the new digest is recorded (beside the old
file's), then the new file replaces the old one, then the old digest is dropped. A checkpoint
without a digest file (written before fwdgrad recorded them) is read unverified.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

import torch

from fwdgrad.train.atomic import atomic_write_text, replacing

DIGEST_SUFFIX = ".sha256"


def _rng_states() -> dict:
    """Every global RNG as tensors and plain values only (loadable with ``weights_only=True``)."""
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return states
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
    states["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(numpy.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        state = states["numpy"]
        numpy.random.set_state((state["kind"], state["keys"].numpy().astype(numpy.uint32), state["position"],
                                state["has_gauss"], state["cached_gaussian"]))


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded (crafted, corrupt, truncated, incomplete)."""


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "estimator", "data_generator", "rng", "state")


def load_checkpoint(path: str, map_location: torch.device | str | None = None, check_digest: bool = True) -> dict:
    """Load a :class:`Trainer` checkpoint with ``torch.load(weights_only=True)``.

    Only tensors and plain values (dicts, lists, numbers, strings) are accepted, so a
    crafted file cannot run code while it is read; such a file, a truncated or corrupt one,
    one whose SHA-256 differs from the one recorded when it was written (:func:`verify_digest`;
    ``check_digest=False`` leaves that check to the caller) and one that lacks a checkpoint's
    entries raise :class:`CheckpointError` naming the file.
    """
    import pickle
    import zipfile

    if check_digest:
        verify_digest(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise CheckpointError(f"cannot read {path} (not a torch checkpoint): the file is truncated or corrupt. "
                                  "Restore a copy, or delete it to train the run again from the start") from error
        raise CheckpointError(
            f"refused to load {path}: it holds {found.group(1)}, an object other than tensors and plain values, "
            "which could run code while loading; fwdgrad checkpoints never do. Delete the file, or restore the "
            "run's own checkpoint.pt"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot read {path} ({reason[:200]}): the file is truncated or corrupt. Restore a copy, or delete it "
            "to train the run again from the start"
        ) from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a fwdgrad training checkpoint (missing {', '.join(missing)})")
    return checkpoint


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _write_digests(path: str, digests: list[str]) -> None:
    name = os.path.basename(path)
    atomic_write_text("".join(f"{digest}  {name}\n" for digest in digests), path + DIGEST_SUFFIX)


def recorded_digests(path: str) -> list[str] | None:
    """The SHA-256 digests ``<path>.sha256`` accepts for ``path`` (None: no digest file)."""
    digest_path = path + DIGEST_SUFFIX
    if not os.path.exists(digest_path):
        return None
    try:
        with open(digest_path, encoding="ascii") as file:
            lines = [line.split() for line in file.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {digest_path} ({type(error).__name__}), the SHA-256 of {path}: restore "
                              "a copy, or delete both files to train the run again from the start") from error
    if not lines or not all(len(fields) == 2 and re.fullmatch(r"[0-9a-f]{64}", fields[0]) for fields in lines):
        raise CheckpointError(f"{digest_path} is not a SHA-256 digest file (lines '<64 hex digits>  <name>'): "
                              "restore a copy, or delete it and the checkpoint to train the run again from the start")
    return [fields[0] for fields in lines]


def verify_digest(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path``'s SHA-256 is one ``<path>.sha256`` records
    (nothing to check without that file)."""
    digests = recorded_digests(path)
    if digests is None or not os.path.isfile(path):
        return
    actual = file_sha256(path)
    if actual not in digests:
        raise CheckpointError(
            f"refused to load {path}: the file is truncated or corrupt, its SHA-256 ({actual[:16]}...) is not the "
            f"one recorded when it was written ({digests[0][:16]}..., {os.path.basename(path)}{DIGEST_SUFFIX}): a "
            "bit flip, a partial copy or an edit since. Restore a copy, or delete both files to train the run again "
            "from the start"
        )


def save_checkpoint(state: dict, path: str) -> str:
    """``torch.save(state)`` to ``path`` atomically, its SHA-256 in ``<path>.sha256``; returns the digest.

    The order keeps a verifying pair at every moment (see the module docstring).
    """
    with replacing(path) as temporary:
        torch.save(state, temporary)
        digest = file_sha256(temporary)
        try:
            current = recorded_digests(path) if os.path.exists(path) else None
        except CheckpointError:  # an unreadable digest file vouches for nothing: replaced below
            current = None
        _write_digests(path, [digest, *(current or [])[:1]])
    _write_digests(path, [digest])
    return digest


def _estimator_state(estimator) -> dict:
    """The estimator's own random state (``estimator.state_dict()``: its tangent and per-step
    seed generators), as tensors and plain values; {} for an estimator without one."""
    state_dict = getattr(estimator, "state_dict", None)
    return state_dict() if callable(state_dict) else {}


def _load_estimator_state(estimator, state: dict) -> None:
    load_state_dict = getattr(estimator, "load_state_dict", None)
    if callable(load_state_dict):
        load_state_dict(state)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
