"""Activity perturbation (fwdgrad.core.activity) against autograd and closed-form properties."""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad
from fwdgrad.core.activity import ActivityForwardGradient, local_parameter_gradients


def mlp():
    # LayerNorm: closed-form norm derivative; PReLU: the isolated-module fallback
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5), nn.PReLU(), nn.Linear(5, 3)
    ).double()


def cnn():
    # Conv2d, GroupNorm, BatchNorm in eval mode, Conv1d-free but with a strided conv, Linear
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    ).double()
    batch_norm = model[4]
    batch_norm.running_mean.uniform_(-0.5, 0.5)
    batch_norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    return model


def data(model_name, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 8) if model_name == "mlp" else (batch, 1, 6, 6)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=generator)
    return x, y


MODELS = {"mlp": mlp, "cnn": cnn}


def true_gradient(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, list(model.parameters()))


def per_sample_output_gradients(model, x, y):
    """∇_{z_{m,b}} L_b by autograd: δ_m added to each parameter-owning module's output, one grad per sample."""
    modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    deltas, handles = [], []

    def hook(module, args, output):
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append(delta)
        return output + delta

    for module in modules:
        handles.append(module.register_forward_hook(hook))
    try:
        losses = F.cross_entropy(model(x), y, reduction="none")
        per_sample = [torch.autograd.grad(losses[b], deltas, retain_graph=True) for b in range(len(y))]
    finally:
        for handle in handles:
            handle.remove()
    # per perturbed output: (B, *z_shape), row b = ∇_{z_{m,b}} L_b
    return [torch.stack([per_sample[b][i][b] for b in range(len(y))]) for i in range(len(deltas))]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("tangent_sharing", ["per_sample", "shared"])
def test_directional_derivatives_equal_autograd_per_sample(model_name, tangent_sharing):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    x, y = data(model_name)
    fg = fwdgrad.ForwardGradient(
        model, num_tangents=5, perturbation="activity", seed=1, tangent_sharing=tangent_sharing
    )
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    output_gradients = per_sample_output_gradients(model, x, y)
    assert len(fg.last_tangents) == len(output_gradients)
    # d[k, b] = Σ_m ∇_{z_{m,b}} L_b · u_m[k, b]
    expected = sum(
        (g.unsqueeze(0) * u).flatten(2).sum(-1) for g, u in zip(output_gradients, fg.last_tangents)
    )
    assert fg.last_directional_derivatives.shape == (5, len(y))
    torch.testing.assert_close(fg.last_directional_derivatives, expected, rtol=1e-10, atol=1e-12)
    # frog: ĝ_{z_b} = P_{U_b} ∇_{z_b} L_b, the projection onto the span of sample b's tangents
    fg_frog = ActivityForwardGradient(
        model, num_tangents=5, aggregation="frog", seed=2, tangent_sharing=tangent_sharing
    )
    fg_frog.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    flat_u = torch.cat([u.flatten(2) for u in fg_frog.last_tangents], dim=-1).transpose(0, 1)  # (B, K, a)
    flat_g = torch.cat([g.flatten(1) for g in output_gradients], dim=-1)  # (B, a)
    projected = (torch.linalg.pinv(flat_u) @ (flat_u @ flat_g.unsqueeze(-1))).squeeze(-1)
    estimate = torch.cat([g.flatten(1) for g in fg_frog.last_output_gradients], dim=-1)
    torch.testing.assert_close(estimate, projected, rtol=1e-8, atol=1e-10)
    if tangent_sharing == "shared":
        for u in fg.last_tangents:
            assert torch.equal(u, u[:, :1].expand_as(u))
    else:
        assert not torch.equal(fg.last_tangents[0][:, 0], fg.last_tangents[0][:, 1])


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("sampler", ["standard_basis", "normal"])
def test_projection_with_full_rank_tangents_gives_the_true_gradient(model_name, sampler):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    x, y = data(model_name, batch=3)
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    probe = ActivityForwardGradient(model, num_tangents=1)
    probe.backward(closure)
    dim = probe.dim  # a = Σ_m a_m
    model.zero_grad()
    fg = fwdgrad.ForwardGradient(model, num_tangents=dim, aggregation="frog", sampler=sampler, seed=0,
                                 perturbation="activity")
    loss = fg.backward(closure)
    true = true_gradient(model, x, y)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    model_grads = [p.grad for p in model.parameters()]
    for estimate, exact in zip(model_grads, true):
        cosine = F.cosine_similarity(estimate.flatten(), exact.flatten(), dim=0)
        assert cosine >= 0.99999
        torch.testing.assert_close(estimate, exact, rtol=1e-6, atol=1e-9)


def test_perturbing_a_subset_by_type_updates_exactly_those_parameters():
    torch.manual_seed(0)
    model = mlp()
    x, y = data("mlp", batch=2)
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    dim = 6 + 5 + 3  # outputs of the three Linear layers
    fg = ActivityForwardGradient(model, num_tangents=dim, aggregation="frog", sampler="standard_basis",
                                 perturbed_modules=nn.Linear)
    fg.backward(closure)
    assert fg.dim == dim
    true = true_gradient(model, x, y)
    for (name, parameter), exact in zip(model.named_parameters(), true):
        if name.split(".")[0] in ("1", "4", "6"):
            torch.testing.assert_close(parameter.grad, exact, rtol=1e-6, atol=1e-9)
        else:
            assert parameter.grad is None  # LayerNorm and PReLU are not perturbed


def test_perturbed_modules_by_name_and_chunks_and_a_new_batch_size():
    torch.manual_seed(0)
    model = mlp()
    fg = ActivityForwardGradient(model, num_tangents=11, aggregation="frog", sampler="standard_basis",
                                 perturbed_modules=["1", "4"], chunk_size=4)
    for batch in (3, 2):  # the second call re-probes the output shapes
        x, y = data("mlp", batch=batch, seed=batch)
        model.zero_grad()
        fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
        assert fg.last_directional_derivatives.shape == (11, batch)
        true = true_gradient(model, x, y)
        torch.testing.assert_close(model[1].weight.grad, true[0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(model[4].bias.grad, true[5], rtol=1e-6, atol=1e-9)


def test_dropout_mask_is_the_one_of_a_plain_forward_pass_in_every_chunk():
    # one mask per step shared by all tangents and chunks: with K = a the update is the
    # gradient autograd computes under the same RNG state
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    fg = ActivityForwardGradient(model, num_tangents=8, aggregation="frog", sampler="standard_basis", chunk_size=3)
    torch.manual_seed(5)
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    torch.manual_seed(5)
    true = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for parameter, exact in zip(model.parameters(), true):
        torch.testing.assert_close(parameter.grad, exact, rtol=1e-9, atol=1e-12)


def test_mean_aggregation_is_unbiased_for_the_gradient_of_the_mean_loss():
    # E[u u^T] = I, so E[ĝ_z] = ∇_z L_b and the average over many draws approaches the gradient
    torch.manual_seed(0)
    model = mlp()
    x, y = data("mlp", batch=2)
    fg = ActivityForwardGradient(model, num_tangents=4000, aggregation="mean", seed=0)
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    true = true_gradient(model, x, y)
    estimate = torch.cat([p.grad.flatten() for p in model.parameters()])
    exact = torch.cat([g.flatten() for g in true])
    assert F.cosine_similarity(estimate, exact, dim=0) > 0.97


def test_local_derivatives_match_autograd_of_the_single_module():
    # every closed form and the fallback against torch.autograd on the module alone
    torch.manual_seed(0)
    cases = [
        (nn.Linear(5, 4), torch.randn(3, 2, 5)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1), torch.randn(3, 2, 7)),
        (nn.Conv2d(2, 4, 3, padding=1, groups=2, dilation=1), torch.randn(3, 2, 5, 5)),
        (nn.Conv3d(1, 2, 2), torch.randn(2, 1, 3, 3, 3)),
        (nn.LayerNorm([2, 3]), torch.randn(3, 4, 2, 3)),
        (nn.GroupNorm(2, 4), torch.randn(3, 4, 5)),
        (nn.BatchNorm1d(4).eval(), torch.randn(3, 4)),
        (nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect"), torch.randn(2, 2, 5, 5)),  # fallback
        (nn.Embedding(6, 3), torch.randint(0, 6, (3, 4))),  # fallback
    ]
    for module, h in cases:
        module = module.double()
        h = h.double() if h.is_floating_point() else h
        for p in module.parameters():
            p.data.normal_()
        output = module(h)
        upstream = torch.randn_like(output)
        exact = torch.autograd.grad(output, list(module.parameters()), upstream)
        local = local_parameter_gradients(module, (h,), {}, upstream)
        names = [n for n, _ in module.named_parameters()]
        assert sorted(local) == sorted(names), module
        for name, expected in zip(names, exact):
            torch.testing.assert_close(local[name], expected, rtol=1e-9, atol=1e-9, msg=f"{module}: {name}")


def test_clear_errors():
    model = mlp()
    x, y = data("mlp")
    fg = fwdgrad.ForwardGradient(model, perturbation="activity")
    assert fg.per_sample_loss is True
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(B,\).*reduction='none'"):
        fg.backward(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="'nope' is not a module.*valid names: 1, 2, 4, 5, 6"):
        ActivityForwardGradient(model, perturbed_modules=["nope"])
    # a config names types as strings: "Linear" / "nn.Linear" select what nn.Linear selects
    by_type = ActivityForwardGradient(model, perturbed_modules=[nn.Linear]).perturbed_modules
    assert ActivityForwardGradient(model, perturbed_modules=["nn.Linear"]).perturbed_modules == by_type
    assert len(by_type) >= 2
    with pytest.raises(ValueError, match="tangent_sharing 'batch'.*per_sample, shared"):
        ActivityForwardGradient(model, tangent_sharing="batch")
    with pytest.raises(TypeError, match="needs an nn.Module"):
        ActivityForwardGradient(list(model.parameters()))

    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    fg = ActivityForwardGradient(bn)
    closure = lambda: F.cross_entropy(bn(x), y, reduction="none")
    message = r"module '1' \(BatchNorm1d\).*eval.*GroupNorm/LayerNorm.*perturbation='weight'"
    with pytest.raises(ValueError, match=message):
        fg.backward(closure)
    bn.eval()
    fg.backward(closure)  # eval-mode statistics: per-sample, allowed
    assert bn[1].weight.grad is not None

    class Container(nn.Module):  # owns a parameter and contains a perturbed Linear
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.inner = nn.Linear(3, 3)

        def forward(self, h):
            return self.inner(h) * self.scale

    with pytest.raises(ValueError, match=r"contain other perturbed modules.*perturbed_modules=\['inner'\]"):
        ActivityForwardGradient(Container())


@functools.cache
def mnist5k():
    from fwdgrad.train.data import load_dataset

    return load_dataset("mnist5k")  # about 3 s: load it once


def mnist5k_batch(batch_size, seed=0):
    train = mnist5k().train
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return train.normalize(train.images[index]), train.labels[index]


def baydin_mlp():
    try:
        from fwdgrad.train.models import build_model
    except ImportError:  # identical architecture
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))
    return build_model("baydin_mlp")


def test_activity_cosine_at_initialization_is_far_higher_than_weight_cosine():
    # Baydin MLP at initialization, one real mnist5k batch of 64, K = 16, frog. Measured
    # (docs/activity/cosine_table.md, 10 draws): weight 0.0029 ± 0.0006, activity 0.039 ± 0.005.
    torch.manual_seed(0)
    model = baydin_mlp()
    x, y = mnist5k_batch(64)
    true = true_gradient(model, x, y)
    cosines = {}
    for perturbation in ("weight", "activity"):
        values = []
        for seed in range(2):
            model.zero_grad()
            fg = fwdgrad.ForwardGradient(model, num_tangents=16, aggregation="frog", seed=seed,
                                         perturbation=perturbation)
            reduction = "none" if perturbation == "activity" else "mean"
            fg.backward(lambda: F.cross_entropy(model(x), y, reduction=reduction))
            values.append(fwdgrad.cosine_similarity([p.grad for p in model.parameters()], true))
        cosines[perturbation] = sum(values) / len(values)
    assert cosines["weight"] < 0.01  # about sqrt(K / n) = sqrt(16 / 1.86 M) = 0.003
    assert cosines["activity"] > 0.02
    assert cosines["activity"] > 5 * cosines["weight"]


def test_short_training_with_activity_perturbation_learns_mnist5k():
    # 784-256-10 ReLU, frog K = 16 in activity space, SGD lr 0.3, batch 64, 2 epochs of the
    # 3,500 mnist5k training images. Measured here: test accuracy 0.838 (chance: 0.1).
    torch.manual_seed(0)
    splits = mnist5k()
    x_train, y_train = splits.train.normalize(splits.train.images), splits.train.labels
    x_test, y_test = splits.test.normalize(splits.test.images), splits.test.labels
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    fg = fwdgrad.ForwardGradient(model, num_tangents=16, aggregation="frog", seed=0, perturbation="activity")
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            loss = fg.backward(lambda: F.cross_entropy(model(x_train[index]), y_train[index], reduction="none"))
            assert math.isfinite(float(loss))
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.7, accuracy


def test_non_finite_output_gradient_estimate_is_refused():
    """A zero tangent u_1: mean_of_top_k's cosine 0 / ||u_1|| is NaN, so is ĝ; .grad must stay untouched."""

    class ZeroFirstTangent(ActivityForwardGradient):  # tangents supplied by overriding sample_tangents
        def sample_tangents(self):
            return [torch.cat([torch.zeros_like(t[:1]), t[1:]]) for t in super().sample_tangents()]

    model = mlp()
    x, y = data("mlp")
    fg = ZeroFirstTangent(model, num_tangents=2, aggregation="mean_of_top_k", seed=0)
    with pytest.raises(RuntimeError, match=r"aggregation 'mean_of_top_k' produced a non-finite output-gradient"):
        fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_loss_without_tangent_is_refused(chunk_size):
    """Detached or integer per-sample losses used to give a silent zero .grad."""
    model = mlp()
    x, y = data("mlp")
    fg = ActivityForwardGradient(model, num_tangents=3, seed=0, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="no forward-mode tangent: it is not connected to the perturbed modules'"):
        fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none").detach())
    with pytest.raises(ValueError, match="loss has dtype torch.int64"):
        fg.backward(lambda: (model(x).argmax(-1) == y).long())
    assert all(p.grad is None for p in model.parameters())
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none") * 0)  # connected, zero gradient: fine
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


# ------------------------------------------------------------------------ tangents after the activation

def mlp_with_activations():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def per_sample_activation_gradients(model, x, y, sites):
    """∂L_b/∂a_{m,b} by autograd, δ added to the output of each module in ``sites`` (in call order)."""
    deltas = []

    def hook(module, args, output):
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append(delta)
        return output + delta

    handles = [model[i].register_forward_hook(hook) for i in sites]
    losses = F.cross_entropy(model(x), y, reduction="none")
    for handle in handles:
        handle.remove()
    return torch.autograd.grad(losses.sum(), deltas)


def test_tangents_after_the_activation_sit_on_the_activations_outputs():
    model = mlp_with_activations()
    x, y = data("mlp", batch=4)
    fg = ActivityForwardGradient(model, num_tangents=3, seed=1, after_activation=True)
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert fg._activations == {model[1]: model[2], model[3]: model[4]}  # the last Linear keeps its own output
    # d[k, b] = <∂L_b/∂a_b, u[k, b]> over the Tanh output, the ReLU output and the logits
    gradients = per_sample_activation_gradients(model, x, y, sites=(2, 4, 5))
    expected = sum((t * g.unsqueeze(0)).flatten(2).sum(-1) for t, g in zip(fg.last_tangents, gradients))
    torch.testing.assert_close(fg.last_directional_derivatives, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler", ["standard_basis", "normal"])
def test_after_the_activation_full_rank_projection_gives_the_true_gradient(sampler):
    model = mlp_with_activations()
    x, y = data("mlp", batch=3)
    fg = ActivityForwardGradient(model, num_tangents=6 + 5 + 3, aggregation="frog", sampler=sampler, seed=0,
                                 after_activation=True)
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    for parameter, exact in zip(model.parameters(), true_gradient(model, x, y)):
        torch.testing.assert_close(parameter.grad, exact, rtol=1e-6, atol=1e-9)


class ResidualInPlace(nn.Module):
    """relu(lin(x) += x): the activation's input is lin's output tensor, but changed in place."""

    def __init__(self):
        super().__init__()
        self.lin, self.relu, self.head = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        out = self.lin(x)
        out += x
        return self.head(self.relu(out))


def test_an_output_changed_in_place_before_the_activation_is_not_paired_with_it():
    model = ResidualInPlace().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 0])
    fg = ActivityForwardGradient(model, num_tangents=4 + 2, aggregation="frog", sampler="standard_basis",
                                 after_activation=True)
    fg.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert fg._activations == {}
    for parameter, exact in zip(model.parameters(), true_gradient(model, x, y)):
        torch.testing.assert_close(parameter.grad, exact, rtol=1e-6, atol=1e-9)
