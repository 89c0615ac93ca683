"""Gradient guesses: tangents in the span of each layer's inputs (Singhal et al. 2023).

Checked against closed-form properties: every guess lies in the span its layer's inputs
allow, and with the projection the update is P_span(V) ∇f for the guesses V, ∇f by autograd.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.core.guesses import InputSpanForwardGradient


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def batch(size=4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 10, generator=generator, dtype=torch.float64), torch.arange(size) % 3


def autograd_gradient(model, x, y):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y),
                                                                   list(model.parameters()))])


def row_space_residual(matrix, inputs):
    """‖matrix (I - P)‖ with P the orthogonal projection onto the row space of ``inputs`` (B × d_in)."""
    projection = torch.linalg.pinv(inputs) @ inputs
    return float(torch.linalg.matrix_norm(matrix - matrix @ projection))


def test_every_guess_lies_in_the_span_of_its_layers_inputs():
    model = mlp()
    x, y = batch(4)  # B = 4 < d_in = 10: the span is a proper subspace
    fg = InputSpanForwardGradient(model, num_tangents=3, seed=0)
    fg.backward(lambda: F.cross_entropy(model(x), y))
    hidden = torch.relu(model[0](x)).detach()
    for v in fg.last_tangents:
        w1 = v[:70].reshape(7, 10)
        w2 = v[77:98].reshape(3, 7)
        assert row_space_residual(w1, x) < 1e-10 * float(torch.linalg.matrix_norm(w1))
        assert row_space_residual(w2, hidden) < 1e-10 * float(torch.linalg.matrix_norm(w2))
        # a random matrix is far from that span
        assert row_space_residual(torch.randn(7, 10, dtype=torch.float64), x) > 0.3


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_with_the_projection_the_update_is_the_gradient_projected_onto_the_guesses(num_tangents):
    model = mlp()
    x, y = batch(5)
    exact = autograd_gradient(copy.deepcopy(model), x, y)
    fg = InputSpanForwardGradient(model, num_tangents=num_tangents, aggregation="frog", seed=2)
    fg.backward(lambda: F.cross_entropy(model(x), y))
    guesses = fg.last_tangents  # (K, n)
    coefficients = torch.linalg.lstsq(guesses.T, exact[:, None]).solution[:, 0]
    projected = guesses.T @ coefficients  # P_span(V) ∇f, independently
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(update, projected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(fg.last_directional_derivatives, guesses @ exact, rtol=1e-8, atol=1e-12)


def test_the_probe_pass_leaves_batch_norm_statistics_to_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    x, y = batch(8)
    fg = InputSpanForwardGradient(model, num_tangents=2, seed=0)
    fg.backward(lambda: F.cross_entropy(model(x), y))
    plain(x)  # one plain forward pass: the update a training step makes
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_train_with_input_span_guesses_from_the_command_line(tmp_path):
    import json

    from fwdgrad.experiments import train

    run_dir = str(tmp_path / "guess")
    assert train.main(["model=fc", "model.width=16", "gradient=frog", "gradient.num_tangents=4",
                       "gradient.guess=input_span", "lr=0.5", "epochs=1", "max_steps_per_epoch=3", "progress=false",
                       "tensorboard=false", f"run_dir={run_dir}"]) == 0
    assert json.load(open(f"{run_dir}/summary.json"))["method"] == "frog K=4 (input-span guesses)"
