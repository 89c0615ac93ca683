"""Peak memory of a block of code, on CUDA and on the CPU.

- CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated when the block
  started (the caching allocator's exact count of live tensor bytes).
- CPU: torch has no allocation counter there, so a background thread samples the
  process's resident set size (``/proc/self/statm``) every ``interval`` seconds and the
  result is the peak above the level at the start. Large tensors are ``mmap``-ed and
  returned to the system when freed, so this follows tensor memory closely; it is an
  approximation (sampling may miss very short peaks, the allocator may keep small blocks).
  Where ``/proc`` is missing the CPU measure is ``nan``.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """Current resident set size of this process in bytes, or None without /proc."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def return_free_heap_to_the_system() -> bool:
    """glibc's ``malloc_trim(0)``: give the heap's free pages back to the system, once.

    Without it, memory freed by earlier work in the process (another method of
    ``fwdgrad compare``) is reused without growing the resident set, and a CPU peak
    measured above the start reads ~0. Unlike fixing the mmap threshold (what
    ``fwdgrad.bench.benchmark.release_freed_memory_to_the_system`` does in its own process), it
    does not slow the steps that follow. Returns False where unavailable (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.megabytes`` (peak above the start).

    Args:
        device: where the work runs (``"cpu"``, ``"cuda"``, a ``torch.device``).
        interval: CPU sampling period in seconds.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def megabytes(self) -> float:
        return self.bytes / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        return_free_heap_to_the_system()  # memory freed by earlier work must not be reused unseen
        self._start = resident_bytes()
        if self._start is not None:
            self._peak = self._start
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            current = resident_bytes() or 0
            self._peak = max(self._peak, current)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = float(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, resident_bytes() or 0)
            self.bytes = float(self._peak - self._start)


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"
