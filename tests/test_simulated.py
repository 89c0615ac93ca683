"""SimulatedForwardGradient: with the same tangents, the same update as the true forward-mode path.

The simulation takes ∇f from a backward pass and forms d = V ∇f; the forward-mode estimators
compute d with jvp. Same seed, same tangents: the updates must agree to float64 rounding.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import ForwardGradient
from fwdgrad.core.activity import ActivityForwardGradient
from fwdgrad.core.simulated import SimulatedActivityForwardGradient, SimulatedForwardGradient


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
                         ).double()


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
                         ).double()


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("make, shape", [(mlp, (6, 1, 4, 4)), (bn_cnn, (5, 1, 8, 8))])
@pytest.mark.parametrize("options", [
    dict(num_tangents=1),
    dict(num_tangents=4, aggregation="frog"),
    dict(num_tangents=5, aggregation="mean", chunk_size=2),             # regenerated chunks
    dict(num_tangents=4, aggregation="max_normalized", sampler="rank1"),  # factored in forward mode
    dict(num_tangents=3, aggregation="sum", sampler="rademacher", chunk_size=1, regenerate_tangents=False),
])
def test_weight_space_simulation_equals_forward_mode(make, shape, options):
    model = make()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(shape[0]) % 3
    twin = copy.deepcopy(model)
    forward = ForwardGradient(model, seed=7, **options)
    simulated = SimulatedForwardGradient(twin, seed=7, **options)
    loss = forward.backward(lambda: F.cross_entropy(model(x), y))
    simulated_loss = simulated.backward(lambda: F.cross_entropy(twin(x), y))
    torch.testing.assert_close(simulated_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(simulated.last_directional_derivatives, forward.last_directional_derivatives,
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads(twin), grads(model), rtol=1e-6, atol=1e-12)
    if any(isinstance(m, nn.BatchNorm2d) for m in model):  # one running-statistics update per step, both ways
        torch.testing.assert_close(twin[1].running_mean, model[1].running_mean)


@pytest.mark.parametrize("tangent_sharing", ["per_sample", "shared"])
@pytest.mark.parametrize("aggregation", ["mean", "frog"])
def test_activity_space_simulation_equals_forward_mode(tangent_sharing, aggregation):
    model = mlp()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6) % 3
    twin = copy.deepcopy(model)
    options = dict(num_tangents=4, aggregation=aggregation, tangent_sharing=tangent_sharing, seed=3)
    forward = ActivityForwardGradient(model, **options)
    simulated = SimulatedActivityForwardGradient(twin, **options)
    forward.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    simulated.backward(lambda: F.cross_entropy(twin(x), y, reduction="none"))
    torch.testing.assert_close(simulated.last_directional_derivatives, forward.last_directional_derivatives,
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads(twin), grads(model), rtol=1e-6, atol=1e-12)


def test_the_simulation_runs_one_backward_pass_and_says_so():
    model = mlp()
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.arange(4) % 3
    simulated = SimulatedForwardGradient(model, num_tangents=256, seed=0)  # K = 256 at backprop's cost
    calls = []
    handle = model[1].weight.register_hook(lambda grad: calls.append(1))
    simulated.backward(lambda: F.cross_entropy(model(x), y))
    handle.remove()
    assert calls == [1]  # reverse mode reached the first layer's weight once
    assert repr(simulated).startswith("Simulated")
    with pytest.raises(ValueError, match="detached"):
        simulated.backward(lambda: F.cross_entropy(model(x), y).detach())


def test_train_with_gradient_simulated_uses_the_simulation_and_labels_it(tmp_path):
    import json

    from fwdgrad.experiments import train

    run_dir = str(tmp_path / "sim")
    assert train.main(["model=fc", "model.width=16", "gradient=frog", "gradient.num_tangents=64",
                       "gradient.simulated=true", "lr=0.5", "epochs=1", "max_steps_per_epoch=3", "progress=false",
                       "tensorboard=false", f"run_dir={run_dir}"]) == 0
    summary = json.load(open(f"{run_dir}/summary.json"))
    assert summary["method"] == "frog K=64 (simulated: backprop)"
    cfg = train.compose("train", ["gradient=fg", "gradient.simulated=true", "gradient.perturbation=activity"])
    trainer, _ = train.build_trainer(cfg, str(tmp_path / "activity"))
    assert isinstance(trainer.estimator, SimulatedActivityForwardGradient)


def test_activity_simulation_after_the_activation_equals_forward_mode():
    model = mlp()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.arange(5) % 3
    twin = copy.deepcopy(model)
    options = dict(num_tangents=3, aggregation="frog", seed=5, after_activation=True)
    forward = ActivityForwardGradient(model, **options)
    simulated = SimulatedActivityForwardGradient(twin, **options)
    forward.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    simulated.backward(lambda: F.cross_entropy(twin(x), y, reduction="none"))
    torch.testing.assert_close(grads(twin), grads(model), rtol=1e-6, atol=1e-12)
