"""The fast and the memory-lean paths compute the same update as the reference path.

Reference: the materialized eager step (all K tangents stored, one aggregation call), and,
independently, the closed-form update from autograd's exact gradient: d = V ∇f, then
g = V^T c with c from the aggregation's formula (for FROG: c = (V V^T)^-1 V ∇f, solved in
float64 here).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import ActivityForwardGradient, ForwardGradient
from fwdgrad.core.weight import WeightForwardGradient


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def bn_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    )


MODELS = {"mlp": (mlp, (6, 1, 4, 4)), "bn_cnn": (bn_cnn, (5, 1, 8, 8))}


def setup(name, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double().train()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    return model, x, y


def update(model, x, y, **options):
    """The flat update one step of ForwardGradient writes into .grad, and the estimator."""
    model.zero_grad(set_to_none=True)
    fg = ForwardGradient(model, seed=7, **options)
    fg.backward(lambda: F.cross_entropy(model(x), y))
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), fg


def exact_gradient(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def flat_tangents(fg):
    return torch.cat([t.reshape(t.shape[0], -1) for t in fg.sample_tangents()], dim=1)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("aggregation", ["frog", "mean", "max_normalized"])
def test_regenerated_chunks_equal_the_materialized_update(name, aggregation):
    model, x, y = setup(name)
    options = dict(num_tangents=8, chunk_size=3, aggregation=aggregation, sampler="normal")
    regenerated, fg = update(copy.deepcopy(model), x, y, **options)
    assert fg.regenerate_tangents
    stored, fg_stored = update(copy.deepcopy(model), x, y, regenerate_tangents=False, **options)
    assert not fg_stored.regenerate_tangents
    torch.testing.assert_close(regenerated, stored, rtol=1e-9, atol=1e-12)
    # independent reference: the same tangents (same seed), autograd's gradient, closed form
    tangents = flat_tangents(ForwardGradient(model, seed=7, **options))
    d = tangents @ exact_gradient(copy.deepcopy(model), x, y)
    if aggregation == "frog":
        c = torch.linalg.solve(tangents @ tangents.T, d)
    elif aggregation == "mean":
        c = d / 8
    else:
        best = (d.abs() / tangents.norm(dim=1)).argmax()
        c = torch.zeros_like(d)
        c[best] = d[best]
    torch.testing.assert_close(regenerated, tangents.T @ c, rtol=1e-7, atol=1e-10)


def test_regenerated_tangents_never_hold_more_than_a_chunk():
    model, x, y = setup("mlp")
    fg = ForwardGradient(model, num_tangents=10, chunk_size=4, aggregation="frog", seed=0)
    sizes = []
    draw = fg._draw_flat

    def recording_draw(num_tangents, generator):
        sizes.append(num_tangents)
        return draw(num_tangents, generator)

    fg._draw_flat = recording_draw
    fg.backward(lambda: F.cross_entropy(model(x), y))
    assert max(sizes) == 4 and sum(sizes) > 10  # chunks of <= 4, drawn again for the update
    # rank1 and rademacher regenerate too; angle (joint over K) is stored, as documented
    assert ForwardGradient(model, num_tangents=10, chunk_size=4, sampler="rank1").regenerate_tangents
    assert not ForwardGradient(model, num_tangents=10, chunk_size=4, sampler="angle", angle=30).regenerate_tangents
    with pytest.raises(ValueError, match="regenerate_tangents=True needs chunk_size < num_tangents"):
        ForwardGradient(model, num_tangents=4, sampler="angle", angle=30, chunk_size=2, regenerate_tangents=True)


def test_scaling_correction_and_rank1_regenerated_equal_materialized():
    model, x, y = setup("mlp")
    for options in (dict(aggregation="sum", scaling_correction=True), dict(sampler="rank1", aggregation="frog")):
        options = dict(num_tangents=5, chunk_size=2, **options)
        regenerated, _ = update(copy.deepcopy(model), x, y, **options)
        stored, _ = update(copy.deepcopy(model), x, y, regenerate_tangents=False, **options)
        torch.testing.assert_close(regenerated, stored, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "name, backend",
    [pytest.param("mlp", None, marks=pytest.mark.slow), ("mlp", "aot_eager"), ("bn_cnn", None)],  # inductor: ~30 s
)
def test_compiled_mode_equals_eager(name, backend, monkeypatch):
    """torch.compile around vmap(jvp): same update and same BatchNorm running statistics.

    ``aot_eager`` captures the same graph as inductor (Dynamo + AOTAutograd) without code
    generation: the fast check that the forward-mode step compiles into one graph.
    """
    if backend is not None:
        monkeypatch.setattr(ForwardGradient, "compile_options", {"backend": backend})
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    model, x, y = setup(name)
    results = {}
    for mode in ("eager", "compiled"):
        copy_ = copy.deepcopy(model)
        fg = ForwardGradient(copy_, num_tangents=3, aggregation="frog", seed=1, mode=mode)
        loss_fn = lambda a, b: F.cross_entropy(copy_(a), b)  # noqa: E731 - the batch passed as inputs
        for step in range(2 if name == "mlp" else 1):  # BatchNorm: the compiler falls back to eager
            copy_.zero_grad(set_to_none=True)
            fg.backward(loss_fn, x + step, y)
        results[mode] = [p.grad for p in copy_.parameters()] + list(copy_.buffers())
    for eager, compiled in zip(results["eager"], results["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-9)
    if backend is not None:  # really compiled: one graph, no recompilation for the second batch
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_k1_fast_update_equals_closed_form_for_every_aggregation():
    """K = 1 takes a shortcut (c = d, or d / ||v||^2 for FROG): check it against the formula."""
    model, x, y = setup("mlp")
    gradient = exact_gradient(copy.deepcopy(model), x, y)
    for aggregation in ("mean", "sum", "max", "max_normalized", "mean_of_top_k", "frog", "mean_times_dim"):
        got, fg = update(copy.deepcopy(model), x, y, num_tangents=1, aggregation=aggregation)
        v = flat_tangents(ForwardGradient(model, seed=7))[0]
        c = v @ gradient
        if aggregation == "frog":
            c = c / (v @ v)
        elif aggregation == "mean_times_dim":
            c = c * v.numel()
        torch.testing.assert_close(got, c * v, rtol=1e-7, atol=1e-10, msg=aggregation)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="unknown mode 'quick'; valid choices: auto, eager, compiled, fast"):
        ForwardGradient(nn.Linear(2, 1), mode="quick")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_tangents, aggregation", [(1, "mean"), (4, "frog"), (3, "max_normalized")])
def test_factored_rank1_equals_materialized_rank1(name, num_tangents, aggregation):
    """Linear layers' rank-1 tangents kept as factors u, w: the same d and update as with v = u w^T dense."""
    model, x, y = setup(name)
    options = dict(num_tangents=num_tangents, aggregation=aggregation, sampler="rank1")
    factored, fg = update(copy.deepcopy(model), x, y, **options)
    assert fg.factored
    dense, fg_dense = update(copy.deepcopy(model), x, y, factored=False, **options)
    assert not fg_dense.factored
    torch.testing.assert_close(fg.last_directional_derivatives, fg_dense.last_directional_derivatives)
    torch.testing.assert_close(factored, dense, rtol=1e-9, atol=1e-12)
    # and against autograd: d_k = ∇f·v_k for the same tangents
    tangents = flat_tangents(ForwardGradient(model, seed=7, **options))
    torch.testing.assert_close(fg.last_directional_derivatives, tangents @ exact_gradient(copy.deepcopy(model), x, y))
    with pytest.raises(ValueError, match="factored=True needs sampler='rank1'"):
        ForwardGradient(model, sampler="normal", factored=True)


@pytest.mark.parametrize(
    "options",
    [dict(sampler="normal"), dict(sampler="normal", chunk_size=2), dict(sampler="rank1"),
     dict(perturbation="activity")],
    ids=["stored", "regenerated", "factored", "activity"],
)
def test_every_execution_aggregates_the_combined_directional_derivatives(options):
    """combine_directional_derivatives (the hook for torch.distributed) sits between the
    forward-mode pass and the aggregation of every execution: doubling d doubles g (mean)."""

    space = ActivityForwardGradient if options.get("perturbation") == "activity" else WeightForwardGradient

    class Doubled(space):
        def combine_directional_derivatives(self, directional_derivatives):
            return 2 * directional_derivatives

    model, x, y = setup("mlp")
    reduction = "none" if options.get("perturbation") == "activity" else "mean"
    updates = []
    for estimator in (ForwardGradient, Doubled):
        copy_ = copy.deepcopy(model)
        fg = estimator(copy_, num_tangents=4, seed=3, **options)
        fg.backward(lambda: F.cross_entropy(copy_(x), y, reduction=reduction))
        updates.append(torch.cat([p.grad.reshape(-1) for p in copy_.parameters()]))
    assert isinstance(fg, Doubled)
    if "chunk_size" in options or options.get("sampler") == "rank1":
        assert fg.regenerate_tangents or fg.factored
    torch.testing.assert_close(updates[1], 2 * updates[0], rtol=1e-12, atol=0)


def closed_form_coefficients(aggregation, tangents, d):
    """c of g = V^T c written from each aggregation's definition (flat V (K, n), d = V ∇f)."""
    num_tangents, dim = tangents.shape
    cosines = d.abs() / tangents.norm(dim=1)
    if aggregation == "sum":
        return d
    if aggregation == "mean":
        return d / num_tangents
    if aggregation == "mean_times_dim":
        return d * dim / num_tangents
    if aggregation in ("max", "max_normalized"):
        best = (d.abs() if aggregation == "max" else cosines).argmax()
        return torch.zeros_like(d).index_fill_(0, best, d[best])
    if aggregation == "mean_of_top_k":
        keep = (cosines >= cosines.max() - 0.1).to(d.dtype)
        return d * keep / keep.sum()
    return torch.linalg.solve(tangents @ tangents.T, d)  # frog


@pytest.mark.parametrize("aggregation", ["sum", "mean", "mean_times_dim", "max", "max_normalized",
                                         "mean_of_top_k", "frog"])
@pytest.mark.parametrize(
    "options",
    [dict(sampler="normal"), dict(sampler="normal", chunk_size=2, regenerate_tangents=False),
     dict(sampler="normal", chunk_size=2), dict(sampler="rank1"), dict(sampler="rank1", factored=False)],
    ids=["stored", "stored-chunks", "regenerated", "factored", "rank1-dense"],
)
def test_every_execution_equals_the_closed_form_update(options, aggregation):
    """Whatever holds the tangents, .grad is V^T c with c from autograd's gradient and the formula."""
    model, x, y = setup("bn_cnn")
    got, fg = update(copy.deepcopy(model), x, y, num_tangents=5, aggregation=aggregation, **options)
    assert fg.factored == (options == dict(sampler="rank1"))
    assert fg.regenerate_tangents == ("chunk_size" in options and "regenerate_tangents" not in options)
    tangents = flat_tangents(ForwardGradient(model, seed=7, num_tangents=5, **options))
    d = tangents @ exact_gradient(copy.deepcopy(model), x, y)
    torch.testing.assert_close(fg.last_directional_derivatives, d, rtol=1e-9, atol=1e-12)
    expected = tangents.T @ closed_form_coefficients(aggregation, tangents, d)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
