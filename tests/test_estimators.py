import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fwdgrad
from fwdgrad import Backprop, ForwardGradient, forward_gradient
from fwdgrad.core.weight import WeightForwardGradient
from precision import dot_product_rtol


def autograd_gradient(model, loss_fn):
    loss = loss_fn()
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def bn_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    )


def small_vit():
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )


def small_resnet18():
    return torchvision.models.resnet18(num_classes=3)


MODELS = {
    "mlp": (mlp, (4, 1, 4, 4)),
    "cnn": (bn_cnn, (5, 1, 8, 8)),
    "resnet18": (small_resnet18, (2, 3, 32, 32)),
    "vit": (small_vit, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", MODELS)
def test_directional_derivatives_equal_autograd(name):
    """d_k = ∇f·v_k from one batched forward-mode pass equals autograd's, in float64, train mode."""
    make, input_shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double().train()
    if name == "vit":  # torchvision zero-initializes the head: give the gradient something to flow through
        nn.init.normal_(model.heads.head.weight)
    reference = copy.deepcopy(model)
    x = torch.randn(*input_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (input_shape[0],))
    fg = ForwardGradient(model, num_tangents=3, seed=0)
    tangents = fg.sample_tangents()
    loss, derivatives, _ = fg.directional_derivatives(lambda: F.cross_entropy(model(x), y), tangents)
    gradient = autograd_gradient(reference, lambda: F.cross_entropy(reference(x), y))
    expected = torch.stack([sum((g * t[k]).sum() for g, t in zip(gradient, tangents)) for k in range(3)])
    torch.testing.assert_close(derivatives, expected, rtol=1e-6, atol=1e-12)
    assert loss.item() == pytest.approx(F.cross_entropy(reference(x), y).item(), rel=1e-12) or name == "vit"


def test_batchnorm_running_statistics_updated_once_like_a_forward_pass():
    torch.manual_seed(0)
    model = bn_cnn()
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for chunk_size in (None, 2):  # with chunks the closure runs several times, the update still once
        fg = ForwardGradient(model, num_tangents=5, seed=0, chunk_size=chunk_size)
        fg.backward(lambda: F.cross_entropy(model(x), y))
        plain(x)
        for (name, ours), (_, theirs) in zip(model.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
    assert int(model[1].num_batches_tracked) == 2


def test_batchnorm_cumulative_average_momentum_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 1))
    plain = copy.deepcopy(model)
    fg = ForwardGradient(model, num_tangents=2, seed=0)
    for step in range(3):
        x = torch.randn(6, 3) + step
        fg.backward(lambda: model(x).square().mean())
        plain(x)
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var)


def test_chunked_equals_unchunked_and_dropout_mask_is_shared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))
    x = torch.randn(16, 10)

    def derivatives(chunk_size, tangents):
        fg = ForwardGradient(model, num_tangents=6, chunk_size=chunk_size)
        torch.manual_seed(123)  # the same dropout mask draw for both runs
        return fg.directional_derivatives(lambda: model(x).square().mean(), tangents)[1]

    fg = ForwardGradient(model, num_tangents=6, seed=1)
    tangents = fg.sample_tangents()
    torch.testing.assert_close(derivatives(None, tangents), derivatives(4, tangents))
    # identical tangents give identical derivatives only if every tangent saw the same mask
    repeated = [t[:1].expand(6, *t.shape[1:]).contiguous() for t in tangents]
    d = derivatives(2, repeated)
    torch.testing.assert_close(d, d[:1].expand(6))


def test_multihead_attention_uses_a_backend_with_a_forward_rule():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def loss():
        return attention(x, x, x, need_weights=False)[0].square().mean()

    for mode in ("train", "eval"):
        getattr(attention, mode)()
        fg = ForwardGradient(attention, num_tangents=2, seed=0)
        tangents = fg.sample_tangents()
        derivatives = fg.directional_derivatives(loss, tangents)[1]
        gradient = autograd_gradient(attention, loss)
        expected = torch.stack([sum((g * t[k]).sum() for g, t in zip(gradient, tangents)) for k in range(2)])
        torch.testing.assert_close(derivatives, expected)


def test_frog_with_k_equal_n_recovers_the_gradient_float32():
    """K = n = 1024 normal tangents span R^n: the projection is ∇f (FROG's code: cosine 0.944)."""
    torch.manual_seed(0)
    model = nn.Linear(1023, 1)  # 1023 weights + 1 bias = 1024 parameters
    x = torch.randn(4, 1023)
    fg = ForwardGradient(model, num_tangents=1024, aggregation="frog", seed=0)
    fg.backward(lambda: model(x).square().mean())
    estimate = [p.grad.clone() for p in model.parameters()]
    exact = autograd_gradient(model, lambda: model(x).square().mean())
    assert fwdgrad.cosine_similarity(estimate, exact) >= 0.99999


def test_global_projection_property_on_multi_tensor_mlp():
    """<g, ∇f> = ||g||^2 for the projection over all six parameter tensors together."""
    torch.manual_seed(1)
    model = mlp()
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    fg = ForwardGradient(model, num_tangents=4, aggregation="orthogonal_projection", seed=3)
    fg.backward(lambda: F.cross_entropy(model(x), y))
    g = flat([p.grad for p in model.parameters()]).double()
    exact = flat(autograd_gradient(model, lambda: F.cross_entropy(model(x), y))).double()
    # float32 directional derivatives: the identity holds to float32 rounding of sums over n terms
    assert (g @ exact).item() == pytest.approx((g @ g).item(), rel=dot_product_rtol(torch.float32, g.numel()))


def test_single_tangent_forward_gradient_is_unbiased():
    """The mean of N single-tangent normal forward gradients g_i = (∇f·v_i) v_i converges to ∇f.

    E[g g^T] = ||∇f||^2 I + 2 ∇f ∇f^T, so E||mean - ∇f||^2 = (n + 1) ||∇f||^2 / N. The
    squared error is a sum of n ≈ independent terms, so it concentrates near that value;
    we assert the ratio lies in [0.5, 2] and that the error is 20 times below ||∇f||.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()  # n = 29
    x = torch.randn(10, 5, dtype=torch.float64)
    num_samples = 20_000
    fg = ForwardGradient(model, num_tangents=num_samples, aggregation="mean", seed=0)
    fg.backward(lambda: model(x).square().mean())
    estimate = flat([p.grad for p in model.parameters()])
    exact = flat(autograd_gradient(model, lambda: model(x).square().mean()))
    n = exact.numel()
    expected_squared_error = (n + 1) * exact.square().sum() / num_samples
    ratio = (estimate - exact).square().sum() / expected_squared_error
    assert 0.5 < ratio < 2.0
    assert (estimate - exact).norm() < exact.norm() / 20


def test_same_seed_bitwise_identical_and_grad_accumulates_like_autograd():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731

    def grads_after(seed, calls):
        model.zero_grad(set_to_none=True)
        fg = ForwardGradient(model, num_tangents=4, aggregation="frog", seed=seed)
        for _ in range(calls):
            fg.backward(closure)
        return [p.grad.clone() for p in model.parameters()]

    first, second = grads_after(5, 1), grads_after(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # two calls accumulate: the second step's estimate (seed stream continues) is added
    fg = ForwardGradient(model, num_tangents=4, aggregation="frog", seed=5)
    fg.sample_tangents()  # skip the first step's tangents
    model.zero_grad(set_to_none=True)
    fg.backward(closure)
    second_step = [p.grad.clone() for p in model.parameters()]
    both = grads_after(5, 2)
    for a, b, c in zip(both, first, second_step):
        torch.testing.assert_close(a, b + c)
    # Backprop accumulates the same way autograd does
    model.zero_grad(set_to_none=True)
    Backprop(model).backward(closure)
    Backprop(model).backward(closure)
    for p, g in zip(model.parameters(), autograd_gradient(model, closure)):
        torch.testing.assert_close(p.grad, 2 * g)


def test_only_trainable_and_used_parameters_are_touched():
    torch.manual_seed(0)
    used, frozen, unused = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
    frozen.requires_grad_(False)
    x = torch.randn(4, 3)
    params = [*used.parameters(), *frozen.parameters(), *unused.parameters()]
    fg = ForwardGradient(params, num_tangents=2, seed=0)
    assert fg.dim == 8  # frozen parameters are not differentiated
    fg.backward(lambda: (used(x) + frozen(x)).square().mean())
    assert used.weight.grad is not None and used.bias.grad is not None
    assert frozen.weight.grad is None and unused.weight.grad is None  # as autograd leaves them


def test_functional_forward_gradient_on_a_plain_function():
    # f(x) = sum(x^2) / 2 has ∇f = x; with K = n basis tangents and sum, g = ∇f exactly
    x = torch.arange(1.0, 7.0).reshape(2, 3)
    value, g = forward_gradient(lambda z: z.square().sum() / 2, x, num_tangents=6, aggregation="sum",
                                sampler="standard_basis")
    assert value.item() == pytest.approx(45.5)
    torch.testing.assert_close(g, x)
    generator = torch.Generator().manual_seed(0)
    _, g1 = forward_gradient(lambda z: z.square().sum() / 2, x, generator=generator)
    assert g1.shape == x.shape


def test_forward_gradient_uses_no_backward_pass():
    """A closure whose ops have no autograd backward still works: forward mode only."""

    class ForwardOnly(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, tangent):
            return tangent * 3

        @staticmethod
        def backward(ctx, grad):
            raise AssertionError("a backward pass was run")

    model = nn.Linear(4, 1)
    x = torch.randn(3, 4)
    fg = ForwardGradient(model, num_tangents=4, aggregation="frog", seed=0)
    fg.backward(lambda: ForwardOnly.apply(model(x)).square().mean())
    exact = autograd_gradient(model, lambda: (3 * model(x)).square().mean())
    projection_property = flat([p.grad for p in model.parameters()])
    assert (projection_property @ flat(exact)).item() == pytest.approx(
        projection_property.square().sum().item(), rel=1e-4
    )


# ---- errors --------------------------------------------------------------------------


def test_bad_constructor_arguments():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="num_tangents must be an integer >= 1, got 0"):
        ForwardGradient(model, num_tangents=0)
    with pytest.raises(ValueError, match="unknown aggregation 'avg'; valid choices: sum, mean"):
        ForwardGradient(model, aggregation="avg")
    with pytest.raises(ValueError, match="unknown tangent sampler 'uniform'; valid choices: normal"):
        ForwardGradient(model, sampler="uniform")
    with pytest.raises(ValueError, match="scaling_correction=True is defined for"):
        ForwardGradient(model, aggregation="max", scaling_correction=True)
    with pytest.raises(ValueError, match="chunk_size must be None or an integer >= 1, got 0"):
        ForwardGradient(model, chunk_size=0)
    for tolerance in (-0.1, math.nan):  # mean_of_top_k would select no tangent: a NaN .grad
        for perturbation in ("weight", "activity"):
            with pytest.raises(ValueError, match=rf"top_k_tolerance must be a finite number >= 0.*got {tolerance}"):
                ForwardGradient(model, aggregation="mean_of_top_k", top_k_tolerance=tolerance,
                                perturbation=perturbation)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    for estimator in (ForwardGradient, Backprop):
        with pytest.raises(ValueError, match="no trainable parameters"):
            estimator(frozen)
    with pytest.raises(TypeError, match="iterable of tensors"):
        ForwardGradient([1.0, 2.0])


def test_bad_closures():
    model = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    fg = ForwardGradient(model, num_tangents=2, seed=0)
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(3, 2\)"):
        fg.backward(lambda: model(x))
    with pytest.raises(TypeError, match="torch.Tensor, got float"):
        fg.backward(lambda: 1.0)
    with pytest.raises(ValueError, match="never used the parameters"):
        fg.backward(lambda: x.sum())
    with pytest.raises(RuntimeError, match="not finite"):
        fg.backward(lambda: (model(x) * math.inf).sum())
    with pytest.raises(ValueError, match="scalar loss"):
        Backprop(model).backward(lambda: model(x))


def test_non_finite_directional_derivatives_are_named_in_one_short_line():
    from fwdgrad.core.forward_mode import check_finite

    per_sample = torch.zeros(4, 5)
    per_sample[1, 2], per_sample[3, 0] = math.nan, math.inf
    with pytest.raises(RuntimeError) as error:
        check_finite(torch.tensor(0.5), per_sample)
    message = str(error.value)
    assert message.startswith("2 of 20 directional derivatives are not finite ((tangent, sample) (1, 2): nan, "
                              "(3, 0): inf)"), message  # the (k, b) index of each and its value
    with pytest.raises(RuntimeError, match=r"1 of 3 directional derivatives are not finite \(tangent 2: -inf\)"):
        check_finite(torch.tensor(0.5), torch.tensor([1.0, 2.0, -math.inf]))
    # a diverged run of 128 tangents x 64 samples: still one short line
    with pytest.raises(RuntimeError) as error:
        check_finite(torch.tensor(1e27), torch.full((128, 64), math.nan))
    assert "8192 of 8192" in str(error.value) and "and 8189 more" in str(error.value)
    assert len(str(error.value)) < 250 and "\n" not in str(error.value)


def test_operator_without_forward_rule_is_named():
    model = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    fg = ForwardGradient(model, num_tangents=2)
    with pytest.raises(RuntimeError, match=r"operator '_cdist_forward' has no forward-mode AD rule.*fwdgrad.Backprop"):
        fg.backward(lambda: torch.cdist(model(x), x).sum())


class ZeroFirstTangent(WeightForwardGradient):
    """Tangents supplied by overriding step_tangents (the hook for gradient guesses): v_1 = 0."""

    def step_tangents(self):
        tangents = super().step_tangents()
        tangents[0] = 0
        return tangents


@pytest.mark.parametrize("num_tangents, aggregation", [(1, "frog"), (2, "mean_of_top_k")])
def test_non_finite_update_is_refused_before_it_reaches_grad(num_tangents, aggregation):
    """A zero tangent: d_1 = 0 is finite, but c_1 = 0 / ||v_1||^2 (frog, K = 1) or the top-k
    cosine 0 / ||v_1|| is NaN. The update must not reach .grad."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    fg = ZeroFirstTangent(model, num_tangents=num_tangents, aggregation=aggregation, seed=0)
    resolved = "orthogonal_projection" if aggregation == "frog" else aggregation
    with pytest.raises(RuntimeError, match=rf"aggregation '{resolved}' produced non-finite coefficients"):
        fg.backward(lambda: model(x).square().mean())
    assert model.weight.grad is None and model.bias.grad is None


@pytest.mark.parametrize("strategy", ["regenerated", "factored"])
def test_non_finite_coefficients_of_every_execution_are_refused(strategy, monkeypatch):
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(4, 16), torch.randint(0, 3, (4,))
    module = importlib.import_module(f"fwdgrad.{strategy}")
    coefficients = module.aggregation_coefficients
    monkeypatch.setattr(module, "aggregation_coefficients", lambda *a, **k: coefficients(*a, **k) * math.inf)
    options = dict(chunk_size=2, sampler="normal") if strategy == "regenerated" else dict(sampler="rank1")
    fg = ForwardGradient(model, num_tangents=4, aggregation="mean", seed=0, **options)
    assert fg.regenerate_tangents if strategy == "regenerated" else fg.factored
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="aggregation 'mean' produced non-finite coefficients"):
        fg.backward(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def closures_without_tangent(model, x):
    return {
        r"loss has no forward-mode tangent: it is not connected to the trainable parameters": lambda *_: (
            model(x).detach().square().mean()
        ),
        r"loss has dtype torch.int64; a forward gradient needs a floating-point loss": lambda *_: (
            (model(x) > 0).sum()
        ),
    }


@pytest.mark.parametrize(
    "options",
    [dict(num_tangents=1), dict(num_tangents=3), dict(num_tangents=4, chunk_size=2),
     dict(num_tangents=4, chunk_size=2, regenerate_tangents=False), dict(num_tangents=3, sampler="rank1"),
     dict(num_tangents=1, sampler="rank1"), dict(num_tangents=3, mode="compiled")],
    ids=["K1", "K3", "regenerated", "chunked", "factored", "factored-K1", "compiled"],
)
def test_loss_without_tangent_is_refused_and_a_zero_gradient_is_not(options, monkeypatch):
    """A detached or integer loss used to give a silent zero .grad (Backprop raises for it)."""
    if options.get("mode") == "compiled":
        monkeypatch.setattr(ForwardGradient, "compile_options", {"backend": "aot_eager"})
        torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    fg = ForwardGradient(model, seed=0, **options)
    assert fg.factored == (options.get("sampler") == "rank1")
    for message, closure in closures_without_tangent(model, x).items():
        with pytest.raises(ValueError, match=message):
            fg.backward(closure, x)
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
            Backprop(model).backward(closure)
    # connected to the parameters with a zero gradient (the ReLUs all off): no error, .grad = 0
    fg.backward(lambda *_: torch.relu(model(x) - 1e3).sum(), x)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_closure_errors_raised_while_compiling_do_not_switch_compilation_off():
    """mode="auto" falls back to eager when the compiler fails, not for the closure's own ValueError."""
    from fwdgrad.core.execution import BatchedJvp

    run = BatchedJvp("compiled", "auto", torch.device("cpu"), {"backend": "aot_eager"})
    torch._dynamo.reset()

    def function(params, inputs):
        (param,) = params
        loss = (param * inputs[0]).sum().detach()
        fwdgrad.core.forward_mode.require_tangent(loss, "the parameter")
        return loss, ()

    with pytest.raises(ValueError, match="not connected to the parameter"):
        run(function, (torch.ones(3),), (torch.eye(3),), (torch.randn(3),))
    assert run.mode == "compiled"


def test_a_new_perturbation_space_is_a_registered_subclass():
    """ForwardGradient(..., perturbation=name) constructs the subclass declared with that name."""
    from fwdgrad.core.base import ForwardGradient as Base

    assert ForwardGradient is Base
    assert type(ForwardGradient(nn.Linear(2, 1))) is WeightForwardGradient
    assert type(ForwardGradient(nn.Linear(2, 1), perturbation="activity")).__name__ == "ActivityForwardGradient"
    try:
        class BlockSpace(ForwardGradient, perturbation="test-block"):
            def backward(self, closure, *inputs):
                return closure(*inputs)

        fg = ForwardGradient(nn.Linear(2, 1), num_tangents=3, perturbation="test-block")
        assert type(fg) is BlockSpace and fg.num_tangents == 3 and isinstance(fg, ForwardGradient)
    finally:
        Base._spaces.pop("test-block", None)
    with pytest.raises(ValueError, match="unknown perturbation .test-block.; valid choices: activity, local, weight"):
        ForwardGradient(nn.Linear(2, 1), perturbation="test-block")


@pytest.mark.parametrize(
    "options",
    [dict(num_tangents=5, chunk_size=2), dict(num_tangents=5, chunk_size=2, regenerate_tangents=False),
     dict(num_tangents=3), dict(num_tangents=2, sampler="rank1"), dict(num_tangents=3, perturbation="activity")],
    ids=["regenerated", "seeded-chunks-stored", "unchunked", "factored", "activity"],
)
def test_state_dict_resumes_the_tangent_stream(options, tmp_path):
    """Save after 2 steps, run 2 more, restore, run 2 more: the same .grad as the first continuation."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    reduction = "none" if options.get("perturbation") == "activity" else "mean"
    closure = lambda: F.cross_entropy(model(x), y, reduction=reduction)  # noqa: E731
    fg = ForwardGradient(model, seed=4, **options)
    if "chunk_size" in options:
        assert fg.regenerate_tangents == options.get("regenerate_tangents", True)

    def two_steps(estimator):
        grads = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            estimator.backward(closure)
            grads.append([p.grad.clone() for p in model.parameters()])
        return grads

    two_steps(fg)
    torch.save({"estimator": fg.state_dict()}, tmp_path / "checkpoint.pt")
    first = two_steps(fg)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["estimator"]
    fg.load_state_dict(state)
    resumed = two_steps(fg)
    fresh = ForwardGradient(model, seed=4, **options)  # e.g. a new process loading the checkpoint
    fresh.load_state_dict(state)
    for grads in (resumed, two_steps(fresh)):
        assert all(torch.equal(a, b) for step_a, step_b in zip(first, grads) for a, b in zip(step_a, step_b))
    if "chunk_size" in options:
        # the per-step seeds of the chunks are state too: the tangent generator alone does not resume
        partial = ForwardGradient(model, seed=4, **options)
        partial.generator.set_state(state["tangent_generator"])
        assert not torch.equal(two_steps(partial)[0][0], first[0][0])


def test_state_dict_errors_and_backprop():
    model = nn.Linear(2, 1)
    assert Backprop(model).state_dict() == {}
    Backprop(model).load_state_dict({})
    seeded, unseeded = ForwardGradient(model, seed=0), ForwardGradient(model)
    # the generators, and how the batched jvp runs (mode="auto" resolves by device: recorded for an exact resume)
    assert unseeded.state_dict() == {"tangent_generator": None, "step_seed_generator": None, "execution": "fast"}
    with pytest.raises(ValueError, match="tangent_generator: the state was saved by an estimator with a seed"):
        unseeded.load_state_dict(seeded.state_dict())
    with pytest.raises(ValueError, match=r"the state has entries \['tangent_generator'\]"):
        seeded.load_state_dict({"tangent_generator": seeded.generator.get_state()})
    with pytest.raises(ValueError, match="Backprop owns no random state"):
        Backprop(model).load_state_dict(seeded.state_dict())
