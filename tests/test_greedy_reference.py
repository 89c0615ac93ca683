"""docs/local/greedy_backprop_reference.py, the greedy-ceiling study tool: its block splits are the model."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from fwdgrad.train.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "greedy_reference", os.path.join(ROOT, "docs", "local", "greedy_backprop_reference.py"))
greedy = importlib.util.module_from_spec(spec)
sys.modules["greedy_reference"] = greedy
spec.loader.exec_module(greedy)


@pytest.mark.parametrize("name", ["localmixer", "baydin_cnn"])
def test_the_blocks_run_in_order_are_the_models_forward(name):
    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10).eval()
    x = torch.randn(3, 1, 28, 28)
    h = x
    for block in greedy.blocks_of(model, name, "layers"):
        h = block(h)
    torch.testing.assert_close(h, model(x))


def test_token_sequences_get_the_linear_head_on_the_mean_token():
    head = greedy.head("linear", 8, spatial=False, classes=10, tokens=True)
    h = torch.randn(4, 3, 8)
    linear = head[1]
    torch.testing.assert_close(head(h), h.mean(1) @ linear.weight.T + linear.bias)
    with pytest.raises(ValueError, match="linear head only"):
        greedy.head("conv2", 8, spatial=False, tokens=True)


@pytest.mark.parametrize("arguments, named", [(["--model", "nomodel"], "'nomodel'"),
                                              (["--model", "localmixer", "--split", "sites"], "--split sites"),
                                              (["--head", "weird"], "--head weird")])
def test_bad_arguments_are_one_line_and_exit_2(arguments, named, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["greedy_backprop_reference.py", *arguments])
    with pytest.raises(SystemExit) as stop:
        greedy.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
