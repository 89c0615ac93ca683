"""Atomic file output: every result, table, figure and checkpoint fwdgrad writes goes here.

Each function writes to a temporary file in the destination's directory and then
``os.replace``-s it onto the destination, so a reader (or a resumed run after a crash)
sees either the old file or the new one, never a torn one. Files end up readable by all
(0644), as a plain ``open(..., "w")`` would leave them.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

TEMPORARY_PREFIX = ".tmp-"


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, else it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix="-" + os.path.basename(path))
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_temporaries(directory: str) -> list[str]:
    """Delete the temporary files :func:`replacing` left in ``directory`` when its process was
    killed mid-write (``.tmp-*``); returns their names. Call it only where no other process
    writes into ``directory`` (a run directory that this process owns)."""
    try:
        names = [name for name in os.listdir(directory) if name.startswith(TEMPORARY_PREFIX)]
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)
    return names


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with replacing(path) as temporary, open(temporary, "w", newline="") as file:
        file.write(text)


def atomic_save(obj: object, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints)."""
    import torch

    with replacing(path) as temporary:
        torch.save(obj, temporary)


def write_csv(rows: Iterable[dict] | Iterable[Sequence], path: str, columns: Sequence[str] | None = None) -> None:
    """CSV with a header row, written atomically.

    ``rows`` are dicts (keys not in ``columns`` ignored; header from the first row when
    ``columns`` is None) or sequences in the order of ``columns``.
    """
    rows = list(rows)
    buffer = io.StringIO()
    if rows and not isinstance(rows[0], dict):
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        columns = list(columns or (rows[0].keys() if rows else []))
        dict_writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        dict_writer.writeheader()
        dict_writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), path)

