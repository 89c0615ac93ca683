"""fwdgrad.train.profiling.PeakMemory on the CPU: the peak above the start follows what the block allocates."""
import sys

import pytest
import torch

from fwdgrad.train.profiling import PeakMemory, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or resident_bytes() is None,
                                reason="the CPU measure reads /proc/self/statm (Linux)")

MB = 2**20


def touch(megabytes: int) -> torch.Tensor:
    tensor = torch.empty(megabytes * MB // 4)
    tensor.fill_(1.0)  # pages count once written
    return tensor


def test_a_block_that_allocates_shows_about_that_much():
    with PeakMemory("cpu") as peak:
        tensor = touch(64)
    del tensor
    assert 60 <= peak.megabytes <= 64 + 48  # the tensor, plus allocator and sampler slack


def test_memory_freed_before_the_block_is_not_reused_unseen():
    """A model trained before the measure (as an earlier method of `fwdgrad compare` is) leaves freed
    heap memory; the block that allocates a gradient-sized set of tensors must still show it (the
    heap is trimmed when the measure starts: without it this read 0.09 MB)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    x = torch.randn(64, 784)
    for _ in range(5):
        model.zero_grad()
        model(x).sum().backward()
        noise = [torch.randn_like(p) for p in model.parameters()]
        del noise
    model.zero_grad(set_to_none=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / MB  # 7.1 MiB
    with PeakMemory("cpu") as peak:
        again = [torch.randn_like(p) for p in model.parameters()]
    del again
    assert peak.megabytes >= 0.8 * size, f"{peak.megabytes:.2f} MB seen for {size:.1f} MB allocated"
