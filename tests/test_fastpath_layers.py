"""mode="fast" (fwdgrad.core.fast_forward) against the forward-AD path (mode="eager") and autograd.

Every layer with a fast rule, and every zoo model, in float64: the directional derivatives and
the .grad update of one step equal the eager path's (rtol 1e-9), for weight and activity
perturbation, K = 1 and K = 3, rank-1 and dense tangents. Operations without a rule take the
fallback and still give autograd's directional derivative (backprop's gradient dotted with the
tangent: the independent reference).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad.core.fast_forward as fast_forward
from fwdgrad import ForwardGradient
from fwdgrad.core.fast_forward import FastForward
from fwdgrad.train.models import build_model

RTOL, ATOL = 1e-9, 1e-12


class Residual(nn.Module):
    """conv - BN - in-place ReLU, plus the input (torchvision's BasicBlock: relu_(), out += identity)."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.norm(self.conv(x))
        out = F.relu(out, inplace=True)
        out += x
        return torch.relu_(out)


class Tokens(nn.Module):
    """(B, C, L) -> attention over L tokens: MultiheadAttention, sdpa, LayerNorm, GELU, softmax, indexing."""

    def __init__(self, dim=4):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm, self.project = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.token = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x):
        x = x.transpose(1, 2)  # (B, L, C)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = self.norm(x)
        heads = self.project(x).unflatten(-1, (2, 2)).permute(0, 2, 1, 3)  # (B, 2, L, 2)
        x = x + F.scaled_dot_product_attention(heads, heads, heads).permute(0, 2, 1, 3).flatten(2)
        x = F.gelu(x) * torch.sigmoid(x) - x.softmax(-1) / 2
        return x[:, 0] + x[:, 1:].mean(1)


class Aliasing(nn.Module):
    """Values read after an elementwise map, views kept while their base dies: the fast mode's in-place
    reuse of a dead value's tangents must never change a live value's."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 5), nn.Linear(5, 5)

    def forward(self, x):
        z = self.first(x)
        kept = z.view(-1, 5)  # shares z's tangents
        y = torch.relu(z)
        del z
        w = torch.sigmoid(self.second(y))
        u = self.second(w)
        v = self.second(u)
        a, b = torch.relu(v), torch.tanh(v)  # two maps of one value, pending while it dies
        del v
        c = self.second(a)
        d = torch.sigmoid(c)
        c.relu_()  # an in-place op on a value whose map is pending
        return torch.tanh(u) + u + torch.relu(kept) * y + a * b + c + d


# name: (layers between the input and a Linear(features, 3), input shape (without the batch), features)
LAYERS = {
    "linear_tanh": (lambda: [nn.Linear(6, 5), nn.Tanh()], (6,), 5),
    "relu_inplace": (lambda: [nn.Linear(6, 5), nn.ReLU(inplace=True)], (6,), 5),
    "activations": (lambda: [nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 5), nn.ELU(), nn.LeakyReLU(0.1),
                             nn.Softplus(), nn.Sigmoid()], (6,), 5),
    "dropout": (lambda: [nn.Linear(6, 5), nn.Dropout(0.3)], (6,), 5),
    "conv1d_maxpool": (lambda: [nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten()],
                       (2, 8), 12),
    "conv2d_maxpool": (lambda: [nn.Conv2d(2, 3, 3, stride=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()],
                       (2, 6, 6), 12),
    "conv2d_groups_avgpool": (lambda: [nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GELU(), nn.AvgPool2d(2),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten()], (2, 6, 6), 4),
    "conv2d_reflect_adaptive_max": (lambda: [nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                             nn.AdaptiveMaxPool2d(2), nn.Flatten()], (2, 6, 6), 12),
    "batchnorm_residual": (lambda: [Residual(), nn.AdaptiveAvgPool2d(1), nn.Flatten()], (3, 5, 5), 3),
    "batchnorm1d": (lambda: [nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()], (6,), 5),
    "batchnorm_on_the_input": (lambda: [nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, affine=False),
                                        nn.Flatten()], (2, 2, 2), 8),
    "layernorm": (lambda: [nn.Linear(6, 5), nn.LayerNorm(5), nn.GELU()], (6,), 5),
    "attention": (lambda: [Tokens()], (4, 3), 4),
    "aliasing": (lambda: [Aliasing()], (6,), 5),
}


def build(name, seed=0, eval_norms=False):
    layers, shape, features = LAYERS[name]
    torch.manual_seed(seed)
    model = nn.Sequential(*layers(), nn.Linear(features, 3)).double().train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if eval_norms:
                module.eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (4,))


SITES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def sites(model):
    """The modules whose outputs carry activity tangents: the layers (not the attention blocks that own
    a packed projection and contain the output projection, nor a model owning its class token)."""
    return [name for name, module in model.named_modules()
            if type(module) in SITES and any(True for _ in module.parameters(recurse=False))]


def one_step(model, x, y, mode, perturbation="weight", **options):
    """(d, .grad flat, buffers) of one step in ``mode`` on a copy of ``model``."""
    model = copy.deepcopy(model)
    if perturbation == "activity":
        options["perturbed_modules"] = sites(model)
    fg = ForwardGradient(model, seed=5, mode=mode, perturbation=perturbation, **options)
    assert fg.mode == mode
    torch.manual_seed(11)  # dropout: the same mask for both modes
    reduction = "none" if perturbation == "activity" else "mean"
    loss = fg.backward(lambda: F.cross_entropy(model(x), y, reduction=reduction))
    assert loss.grad_fn is None  # no autograd graph was recorded
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return fg.last_directional_derivatives, grads, [b.clone() for b in model.buffers()]


def assert_same_step(model, x, y, **options):
    eager = one_step(model, x, y, "eager", **options)
    fast = one_step(model, x, y, "fast", **options)
    torch.testing.assert_close(fast[0], eager[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fast[1], eager[1], rtol=RTOL, atol=ATOL)
    for a, b in zip(fast[2], eager[2]):  # BatchNorm's running statistics: updated once, the same way
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    return fast


TANGENTS = [dict(num_tangents=1, sampler="rank1"), dict(num_tangents=3, sampler="rank1", aggregation="frog"),
            dict(num_tangents=1, sampler="normal"), dict(num_tangents=3, sampler="normal", aggregation="frog")]
TANGENT_IDS = ["K1-rank1", "K3-rank1", "K1-normal", "K3-normal"]


@pytest.mark.parametrize("options", TANGENTS, ids=TANGENT_IDS)
@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_equals_forward_ad_in_weight_space(name, options):
    model, x, y = build(name)
    assert_same_step(model, x, y, **options)


@pytest.mark.parametrize("options", TANGENTS[::2] + [dict(num_tangents=3, aggregation="frog")],
                         ids=["K1-rank1", "K1-normal", "K3-normal"])
@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_equals_forward_ad_in_activity_space(name, options):
    model, x, y = build(name, eval_norms=True)  # activity perturbation needs per-sample losses: BN in eval mode
    assert_same_step(model, x, y, perturbation="activity", **options)


ZOO = {
    "baydin_mlp": dict(image_size=4), "fc": dict(image_size=6, width=16), "baydin_cnn": dict(image_size=4),
    "resnet18": dict(in_channels=3, image_size=4), "vit": dict(image_size=4, patch_size=2),
}


def zoo(name, eval_norms=False):
    options = dict(ZOO[name])
    torch.manual_seed(0)
    model = build_model(name, **options).double().train()
    if eval_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    x = torch.randn(3, options.get("in_channels", 1), options["image_size"], options["image_size"],
                    dtype=torch.float64)
    return model, x, torch.randint(0, 10, (3,))


@pytest.mark.parametrize("options", TANGENTS, ids=TANGENT_IDS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_equal_forward_ad_in_weight_space(name, options):
    model, x, y = zoo(name)
    if name in ("resnet18", "vit") and options["sampler"] == "normal" and options["num_tangents"] == 3:
        options = dict(options, chunk_size=2)  # and the chunked pass: RNG replayed, buffers restored
    assert_same_step(model, x, y, **options)


@pytest.mark.parametrize("options", [dict(num_tangents=1), dict(num_tangents=3, aggregation="frog")], ids=["K1", "K3"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_equal_forward_ad_in_activity_space(name, options):
    model, x, y = zoo(name, eval_norms=True)
    assert_same_step(model, x, y, perturbation="activity", **options)


def test_batch_norm_updates_its_running_statistics_once_per_step():
    model, x, y = build("batchnorm1d")
    norm = model[1]
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    hidden = model[0](x).detach()  # the independent reference: the statistics of one plain forward pass
    _, _, buffers = one_step(model, x, y, "fast", num_tangents=3, sampler="rank1")
    running_mean, running_var, tracked = buffers[:3]
    torch.testing.assert_close(running_mean, 0.9 * mean + 0.1 * hidden.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(running_var, 0.9 * var + 0.1 * hidden.var(0), rtol=1e-12, atol=1e-14)
    assert int(tracked) == 1


class Unusual(nn.Module):
    """Operations without a fast rule: the fallback (forward AD of that one operation)."""

    def forward(self, x):
        return torch.special.erf(x) + torch.cumsum(x, dim=-1) * torch.logsumexp(x, dim=-1, keepdim=True) \
            + torch.special.i0(x).flip(-1)


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_unknown_operations_take_the_fallback_and_match_autograd(num_tangents, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), Unusual(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    taken = []
    original = fast_forward.fallback

    def spy(mode, func, args, kwargs):
        taken.append(getattr(func, "__name__", str(func)))
        return original(mode, func, args, kwargs)

    monkeypatch.setattr(fast_forward, "fallback", spy)
    fg = ForwardGradient(model, num_tangents=num_tangents, seed=2, mode="fast")
    tangents = fg.sample_tangents()
    _, derivatives, _ = fg.directional_derivatives(lambda: F.cross_entropy(model(x), y), tangents)
    assert {"special_erf", "cumsum", "logsumexp", "special_i0", "flip"} <= set(taken)
    gradient = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))  # backprop: the reference
    expected = sum((t.reshape(num_tangents, -1) @ g.reshape(-1)) for t, g in zip(tangents, gradient))
    torch.testing.assert_close(derivatives, expected, rtol=1e-9, atol=1e-12)


def test_make_dual_and_unpack_match_forward_ad_for_a_block():
    """The API a block's jvp uses (local losses): tangents on one module's output, the block's output's wanted."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.Flatten()).double()
    h = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    tangents = torch.randn(3, 4, 3, 5, 5, dtype=torch.float64)  # K = 3 tangents on the first conv's output
    import torch.autograd.forward_ad as forward_ad

    with torch.no_grad(), FastForward(3) as mode:
        handle = block[0].register_forward_hook(lambda module, args, output: mode.make_dual(output + 0, tangents))
        output, output_tangents = mode.unpack(block(h))
        handle.remove()
    for k in range(3):
        with torch.no_grad(), forward_ad.dual_level():
            handle = block[0].register_forward_hook(lambda m, a, out: forward_ad.make_dual(out, tangents[k]))
            expected = forward_ad.unpack_dual(block(h))
            handle.remove()
        torch.testing.assert_close(output, expected.primal, rtol=0, atol=0)
        torch.testing.assert_close(output_tangents[k], expected.tangent, rtol=1e-12, atol=1e-14)


def test_same_seed_same_training_with_and_without_the_fast_path():
    """Five SGD steps: the fast path trains exactly as the eager one (float64)."""
    results = []
    for mode in ("eager", "fast"):
        model, x, y = build("batchnorm_residual")
        fg = ForwardGradient(model, num_tangents=2, sampler="rank1", aggregation="frog", seed=3, mode=mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(5):
            optimizer.zero_grad(set_to_none=True)
            fg.backward(lambda: F.cross_entropy(model(x + step), y))
            optimizer.step()
        results.append(torch.cat([t.reshape(-1) for t in model.state_dict().values()]).double())
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


def test_the_execution_is_recorded_so_resume_is_exact():
    model, x, y = build("linear_tanh")
    fg = ForwardGradient(model, seed=0)  # mode="auto": fast on the CPU
    assert fg.mode == "fast" and fg.state_dict()["execution"] == "fast"
    activity = ForwardGradient(model, perturbation="activity")
    assert activity.mode == "fast" and activity.state_dict()["execution"] == "fast"
    eager = ForwardGradient(model, seed=0, mode="eager")
    resumed = ForwardGradient(model, seed=0)
    resumed.load_state_dict(eager.state_dict())  # a run that started eager stays eager
    assert resumed.mode == "eager" and resumed.factored == eager.factored
    with pytest.raises(ValueError, match="executing mode='eager'; this one was built with mode='fast'"):
        ForwardGradient(model, seed=0, mode="fast").load_state_dict(eager.state_dict())
    state = eager.state_dict()
    del state["execution"]  # a checkpoint from before the execution was recorded
    resumed = ForwardGradient(model, seed=0)
    resumed.load_state_dict(state)
    assert resumed.mode == "fast"


def test_a_loss_without_tangent_is_refused_in_the_fast_mode():
    model, x, y = build("linear_tanh")
    fg = ForwardGradient(model, mode="fast")
    with pytest.raises(ValueError, match="the closure's loss has no forward-mode tangent"):
        fg.backward(lambda: F.cross_entropy(model(x).detach(), y))
    with pytest.raises(ValueError, match="the closure never used the parameters"):
        fg.backward(lambda: F.cross_entropy(x[:, :3], y))


@pytest.mark.parametrize("options", [dict(after_activation=True), dict(tangent_sharing="shared", num_tangents=3),
                                     dict(num_tangents=5, chunk_size=2, aggregation="frog")],
                         ids=["after-activation", "shared", "chunks"])
def test_activity_options_equal_forward_ad(options):
    model, x, y = build("activations")
    assert_same_step(model, x, y, perturbation="activity", **options)


def test_a_resumed_training_run_is_exact_and_records_the_execution(tmp_path):
    """fwdgrad train with gradient=fg (mode=auto: fast on the CPU), 2 epochs against 1 + resume 1."""
    import csv
    import os

    from fwdgrad.experiments import train
    from fwdgrad.train.trainer import TIMING_COLUMNS

    quick = ["model=fc", "model.width=16", "gradient=fg", "gradient.sampler=rank1", "lr=0.05",
             "max_steps_per_epoch=3", "progress=false", "tensorboard=false"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*quick, "epochs=2", f"run_dir={whole}"]) == 0
    assert train.main([*quick, "epochs=1", f"run_dir={parts}"]) == 0
    checkpoint = torch.load(os.path.join(parts, "checkpoint.pt"), weights_only=True)
    assert checkpoint["estimator"]["execution"] == "fast"
    assert train.main([f"resume={parts}", "epochs=2"]) == 0

    def metrics(run_dir):
        with open(os.path.join(run_dir, "metrics.csv"), newline="") as file:
            return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(file)]

    assert metrics(parts) == metrics(whole)


@pytest.mark.parametrize("sampler", ["normal", "rank1"])
def test_one_tangent_trains_an_mlp_bit_for_bit_as_the_eager_path(sampler):
    """K = 1 on a Linear/ReLU MLP with cross-entropy (make demo's fg K=1): the fast rules sum their
    terms in the order of torch's forward formulas, so float32 training is the same to the last bit
    (a rounding difference would flip ReLUs and, over epochs, test predictions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 1, 4, 5, generator=generator), torch.randint(0, 4, (8,), generator=generator))
               for _ in range(5)]
    trained = []
    for mode in ("eager", "fast"):
        copy_ = copy.deepcopy(model)
        fg = ForwardGradient(copy_, seed=0, mode=mode, sampler=sampler)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.5)
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            fg.backward(lambda a, b: F.cross_entropy(copy_(a), b), x, y)
            optimizer.step()
        trained.append([p.detach().clone() for p in copy_.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained))


def _setitem(a):
    b = a.clone()
    b[:, 0] = a[:, 1] * 3
    return b


# operations a model may use between its layers: rules (indexing, cat, reductions, arithmetic, in place) and
# the fallback (sort, topk, norms, einsum, interpolation, group/instance norm, transposed convolution, unfold)
OPERATIONS = {
    "max_topk_sort": lambda a: a.max(dim=1).values.sum() + torch.topk(a.flatten(1), 5).values.sum()
    + torch.sort(a, dim=-1)[0],
    "norms": lambda a: torch.linalg.vector_norm(a, dim=(2, 3)).sum() + a.var(dim=1).sum() + a.std(dim=(2, 3)).sum()
    + F.group_norm(a, 1) + F.instance_norm(a),
    "einsum_matmul": lambda a: torch.einsum("bchw,bchw->bc", a, a).sum() + a.flatten(2) @ a.flatten(2).transpose(1, 2),
    "where_clamp_mask": lambda a: torch.where(a > 0, a, a.clamp(min=-0.5) * 2) + a.masked_fill(a < 0, 0.0),
    "resampling": lambda a: F.interpolate(a, scale_factor=2, mode="bilinear").sum() + F.unfold(a, 2).sum()
    + F.conv_transpose2d(a, torch.ones(3, 3, 3, 3, dtype=a.dtype)).sum(),
    "indexing": lambda a: a[torch.tensor([0, 2])].sum() + a[a > 0.5].sum() + a.flatten(1).gather(
        1, torch.arange(5).repeat(4, 1)).sum() + _setitem(a),
    "shapes": lambda a: torch.stack([a, a.repeat(1, 1, 1, 1) * 2], dim=-1).sum(-1) + torch.roll(a, 2, dims=-1)
    + torch.cat([a, -a], 1)[:, 1:4] + a.cumsum(1).flip(0),
    "arithmetic": lambda a: a.pow(2) / (1 + a.abs()) + (a * a + 1) ** 0.5 - 1 / (2 + a.exp())
    + a.sum((1, 3), keepdim=True) * a.mean(),
    "in_place": lambda a: (a * 1).mul_(2).add_(1).relu_(),
    "losses": lambda a: F.nll_loss(F.log_softmax(a.flatten(2).mean(-1), 1), torch.tensor([0, 1, 2, 0]))
    + F.mse_loss(a, torch.zeros_like(a)),
}


@pytest.mark.parametrize("num_tangents", [1, 3])
@pytest.mark.parametrize("name", OPERATIONS)
def test_operations_between_layers_match_torch_func_jvp(name, num_tangents):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    tangents = torch.randn(num_tangents, *x.shape, dtype=torch.float64)
    function = OPERATIONS[name]
    expected = torch.stack([torch.func.jvp(function, (x,), (t,))[1] for t in tangents])
    with torch.no_grad(), FastForward(num_tangents) as mode:
        primal, got = mode.unpack(function(mode.make_dual(x.view_as(x), tangents)))
    torch.testing.assert_close(primal, function(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
