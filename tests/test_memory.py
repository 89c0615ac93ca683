"""Tangents that cannot fit in memory are refused before anything is allocated."""

import pytest
import torch
from torch import nn

import fwdgrad
from fwdgrad.core.memory import available_bytes, check_fits, format_bytes
from fwdgrad.core.tangents import sample_flat_tangents

HUGE = 10**12


def test_format_bytes_uses_binary_units():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"


def test_the_cpu_has_a_memory_size_between_a_gibibyte_and_a_pebibyte():
    assert 2**30 < available_bytes("cpu") < 2**50


def test_small_requests_are_not_checked_and_huge_ones_are_refused():
    check_fits(2**20, "cpu", "a mebibyte", "nothing")
    with pytest.raises(ValueError, match=r"need about 888\.2 PiB \(1,000,000,000,000,000,000 bytes\).*; remedy"):
        check_fits(10**18, "cpu", "these", "remedy")


def test_a_weight_space_estimator_refuses_huge_k_at_construction_with_its_bytes():
    model = nn.Linear(100, 10)  # 1,010 parameters
    with pytest.raises(ValueError, match=rf"num_tangents={HUGE}: the tangents of 1,010 parameters need about .* "
                                         rf"\({HUGE * 1010 * 4:,} bytes\)"):
        fwdgrad.ForwardGradient(model, num_tangents=HUGE)
    # FROG adds its K x K float64 Gram matrix
    with pytest.raises(ValueError, match=rf"\({HUGE * 1010 * 4 + 8 * HUGE**2:,} bytes\)"):
        fwdgrad.ForwardGradient(model, num_tangents=HUGE, aggregation="frog")


def test_chunked_tangents_are_counted_chunk_by_chunk():
    model = nn.Linear(100, 10)
    fg = fwdgrad.ForwardGradient(model, num_tangents=10**6, chunk_size=4)  # 4 x 1,010 entries held
    assert fg.num_tangents == 10**6


def test_the_sampler_refuses_before_allocating():
    with pytest.raises(ValueError, match=r"num_tangents=1000000: 1,000,000,000,000 tangent entries need about"):
        sample_flat_tangents(10**6, 10**6, "normal")


def test_activity_tangents_are_refused_at_the_first_step_and_nothing_is_written():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    fg = fwdgrad.ForwardGradient(model, num_tangents=HUGE, perturbation="activity")
    with pytest.raises(ValueError, match="tangent entries need about"):
        fg.backward(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())


def test_local_losses_refuse_huge_k_at_the_first_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    local = fwdgrad.LocalForwardGradient(model, [[0, 1, 2], [3]], input_shape=(16,), num_tangents=HUGE, seed=0)
    with pytest.raises(ValueError, match="need about"):
        local.backward(torch.randn(4, 16), torch.randint(0, 3, (4,)))
