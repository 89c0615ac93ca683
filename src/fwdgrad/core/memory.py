"""How much memory a step's tangents need, refused before anything is allocated.

K tangents of n entries each cost K × n × (bytes per entry); with K = 10⁹ on a 1.9 M-parameter
MLP that is 7.5 PB, and an allocation that large fails deep inside torch (or, on Linux, is
granted and then kills the process). :func:`check_fits` compares the estimate with the memory
the device has (CUDA: free memory of the device; CPU: ``MemAvailable`` of ``/proc/meminfo``,
else the physical memory) and raises a one-line ValueError naming the estimate, the memory
and the remedy. Estimates below 1 GiB are not checked (no system call on the hot path).
"""

from __future__ import annotations

import os

import torch

CHECK_ABOVE_BYTES = 1 << 30


def format_bytes(count: float) -> str:
    """``7.45e15`` -> ``'6.6 PiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(count) < 1024 or unit == "EiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def available_bytes(device: torch.device | str | None) -> int | None:
    """Memory a new allocation on ``device`` can get: CUDA free memory, CPU ``MemAvailable``
    (physical memory where ``/proc/meminfo`` is missing); None when it cannot be told."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(num_bytes: int, device: torch.device | str | None, what: str, remedy: str) -> None:
    """Raise ValueError when ``num_bytes`` (the estimate for ``what``) exceed the device's memory.

    The message reads ``{what} need about {estimate}, more than the {memory} available on
    {device}; {remedy}``.
    """
    if num_bytes < CHECK_ABOVE_BYTES:
        return
    available = available_bytes(device)
    if available is not None and num_bytes > available:
        where = torch.device(device if device is not None else "cpu")
        raise ValueError(f"{what} need about {format_bytes(num_bytes)} ({num_bytes:,} bytes), more than the "
                         f"{format_bytes(available)} available on {where}; {remedy}")


def element_size(dtype: torch.dtype | None) -> int:
    return (dtype or torch.get_default_dtype()).itemsize
