"""Local losses (fwdgrad.local.estimator) against autograd of each block's own loss, and their CLI."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad
from fwdgrad.local.blocks import ZOO_SPLITS, constant_batch_statistics, resolve_blocks
from fwdgrad.local.estimator import LocalForwardGradient
from fwdgrad.local.normalization import statistics_projection
from fwdgrad.train.models import build_model

QUICK = ["progress=false", "tensorboard=false"]


class MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn():
    # block 1 has two sites (conv, GroupNorm): see test_group_and_patch_directional_derivatives_equal_autograd
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double()


def tokens():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), MeanTokens(), nn.Linear(4, 3)).double()


def two_layer_head(features, classes):
    return nn.Sequential(nn.Linear(features, 5), nn.Tanh(), nn.Linear(5, classes))


CASES = {
    # model, blocks, input shape, options
    "mlp": (mlp, ["0:3", "3:5", "5:"], (8,), dict(group_size=2)),
    "mlp-two-layer-heads": (mlp, ["0:3", "3:5", "5:"], (8,), dict(group_size=2, head=two_layer_head)),
    # block 1's conv mixes the patches: these tests check the block-loss credit of such a site
    "cnn": (cnn, ["0:2", "2:5", "5:"], (1, 4, 4), dict(group_size=2, patches=2, mixing_sites="block_loss")),
    "tokens": (tokens, ["0:2", "2:"], (6, 4), dict(group_size=2, patches=3)),
}


def build(case, seed=0, **options):
    make, blocks, shape, defaults = CASES[case]
    torch.manual_seed(seed)
    model = make()
    estimator = LocalForwardGradient(model, blocks, shape, seed=seed, **{**defaults, **options})
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((5, *shape), generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=generator)
    return model, estimator, x, y


def block_loss(estimator, index, output, y):
    """The block's local loss per sample, computed here: head(global average pool) or the task loss."""
    if index == len(estimator.blocks) - 1:
        return F.cross_entropy(output, y, reduction="none")
    pooled = output if output.dim() == 2 else (output.mean(1) if output.dim() == 3 else output.flatten(2).mean(-1))
    return F.cross_entropy(estimator.heads[index](pooled), y, reduction="none")


def site_gradients(estimator, index, h, y):
    """Per sample, ∇_{z_m} ℓ_b by autograd for every parameter-owning module's output z_m of the block."""
    block = estimator.blocks[index]
    modules = [m for root in block.modules for m in root.modules() if any(True for _ in m.parameters(recurse=False))]
    deltas, handles = [], []

    def hook(module, args, output):
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append(delta)
        return output + delta

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        losses = block_loss(estimator, index, block.forward(h.detach()), y)
        per_sample = [torch.autograd.grad(losses[b], deltas, retain_graph=True) for b in range(len(y))]
    finally:
        for handle in handles:
            handle.remove()
    return [torch.stack([per_sample[b][i][b] for b in range(len(y))]) for i in range(len(deltas))]


def unit_masks(shape, kind, group_size, patches):
    """Boolean masks (G, P, *shape) of the coordinates of each group g and patch p, built independently."""
    if kind == "features":
        features = shape[0]
        groups = features // group_size
        masks = torch.zeros(groups, 1, *shape, dtype=torch.bool)
        for g in range(groups):
            masks[g, 0, g * group_size:(g + 1) * group_size] = True
        return masks
    if kind == "tokens":
        length, features = shape
        groups, run = features // group_size, length // patches
        masks = torch.zeros(groups, patches, *shape, dtype=torch.bool)
        for g in range(groups):
            for p in range(patches):
                masks[g, p, p * run:(p + 1) * run, g * group_size:(g + 1) * group_size] = True
        return masks
    channels, height, width = shape
    groups, rows, columns = channels // group_size, height // patches, width // patches
    masks = torch.zeros(groups, patches * patches, *shape, dtype=torch.bool)
    for g in range(groups):
        for i in range(patches):
            for j in range(patches):
                masks[g, i * patches + j, g * group_size:(g + 1) * group_size,
                      i * rows:(i + 1) * rows, j * columns:(j + 1) * columns] = True
    return masks


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_tangents", [1, 3])
def test_group_and_patch_directional_derivatives_equal_autograd(case, num_tangents):
    """d[k, b, g, p] = ∇_{z} ℓ_b restricted to group g, patch p · u[k, b], per site, in float64.

    A site whose units separate gets exactly that; a site that mixes groups (patches) is
    credited with the sum over them, which must equal the full ∇_z ℓ_b · u."""
    model, estimator, x, y = build(case, num_tangents=num_tangents)
    estimator.keep_records = True
    estimator.backward(x, y)
    separable = 0
    for index, record in enumerate(estimator.last_records):
        gradients = site_gradients(estimator, index, record["input"], y)
        layout = estimator.layouts[index]
        assert len(gradients) == len(record["sites"])
        for gradient, site in zip(gradients, record["sites"]):
            u, d = site["tangents"], site["directional_derivatives"]  # (K, B, *z), (K, B, G, P)
            assert d.shape == (num_tangents, len(y), layout.groups, layout.num_patches)
            products = gradient.unsqueeze(0) * u
            if site["by_group"] or site["by_patch"]:
                separable += 1
                masks = unit_masks(layout.shape, layout.kind, layout.group_size, layout.patches)
                expected = torch.einsum("kb...,gp...->kbgp", products, masks.to(products.dtype))
                got = d
                if not site["by_patch"]:
                    expected, got = expected.sum(-1), got.sum(-1)
                if not site["by_group"]:
                    expected, got = expected.sum(-2), got.sum(-2)
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(d.sum((-1, -2)), products.flatten(2).sum(-1), rtol=1e-10, atol=1e-12)
    assert separable >= 2  # the group-wise path is exercised, not only the block-wise one
    if case == "cnn":
        # block 1: conv -> GroupNorm(2, 4) -> ReLU with groups of 2 channels: the conv's output keeps the groups
        # apart (GroupNorm normalizes within them) but mixes the patches (over all positions); the norm's
        # output keeps both apart
        assert [(s["by_group"], s["by_patch"]) for s in estimator.last_records[1]["sites"]] == \
            [(True, False), (True, True)]


def exact_block_gradients(estimator, x, y):
    """Autograd's gradient of every block's local loss (mean over the batch) w.r.t. its own parameters
    and its head's, the block's input detached: what local losses estimate."""
    h, result = x, []
    for index, block in enumerate(estimator.blocks):
        with torch.enable_grad():
            output = block.forward(h.detach())
            loss = block_loss(estimator, index, output, y).mean()
            parameters = block.parameters() + (list(estimator.heads[index].parameters())
                                               if index < len(estimator.heads) else [])
            result.append((parameters, torch.autograd.grad(loss, parameters)))
        h = output.detach()
    return result


@pytest.mark.parametrize("case", ["mlp", "mlp-two-layer-heads", "cnn"])
def test_projection_with_k_equal_to_the_unit_dimension_is_the_exact_local_gradient(case):
    # units: mlp groups of 2 features (e = 2); cnn groups of 2 channels x 2x2 patches of a 4x4 map (e = 8),
    # and the GroupNorm block's conv site, whose groups mix the 4 patches (e = 2 * 16 = 32)
    dims = {"mlp": 2, "mlp-two-layer-heads": 2, "cnn": 32}
    model, estimator, x, y = build(case, num_tangents=dims[case], aggregation="frog", sampler="normal")
    expected = exact_block_gradients(estimator, x, y)
    estimator.backward(x, y)
    for index, (parameters, gradients) in enumerate(expected):
        cosine = fwdgrad.cosine_similarity([p.grad for p in parameters], gradients)
        assert cosine >= 0.99999, (index, cosine)
        norms = [float(p.grad.norm() / g.norm()) for p, g in zip(parameters, gradients) if g.norm() > 0]
        assert all(abs(ratio - 1) < 1e-6 for ratio in norms), (index, norms)


def test_the_mean_over_tangents_is_unbiased():
    """E[ĝ] = ∇ for K = 1 and the mean: the batch repeated 400 times gets 400 independent tangents per
    sample in one step, and its estimate approaches the exact local gradient of the batch."""
    model, estimator, x, y = build("mlp", group_size=3)
    expected = exact_block_gradients(estimator, x, y)
    estimator.backward(x.repeat(400, 1), y.repeat(400))
    parameters = [p for block_parameters, _ in expected for p in block_parameters]
    exact = [g for _, gradients in expected for g in gradients]
    cosine = fwdgrad.cosine_similarity([p.grad for p in parameters], exact)
    assert cosine > 0.99, cosine


def test_chunks_of_tangents_give_the_same_update():
    updates = []
    for chunk_size in (None, 2):
        model, estimator, x, y = build("cnn", num_tangents=4, aggregation="frog", chunk_size=chunk_size)
        estimator.backward(x, y)
        updates.append([p.grad for p in [*model.parameters(), *estimator.auxiliary_parameters()]])
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_no_derivative_crosses_a_block_and_no_autograd_graph_is_built():
    """Changing block 2's parameters changes no update of blocks 0 and 1 (same seed), and no module
    runs with grad mode on or produces a tensor that requires grad."""
    updates = []
    for shift in (0.0, 0.5):
        model, estimator, x, y = build("mlp")
        with torch.no_grad():
            model[5].weight.add_(shift)
        seen = []
        handles = [m.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
                   for m in model.modules()]
        loss = estimator.backward(x, y)
        for handle in handles:
            handle.remove()
        assert seen and not any(enabled or requires for enabled, requires in seen)
        assert loss.grad_fn is None and not loss.requires_grad
        updates.append([p.grad.clone() for p in [*model[1].parameters(), *model[3].parameters(),
                                                 *estimator.auxiliary_parameters()]]
                       + [model[5].weight.grad.clone()])
    for before, after in zip(updates[0][:-1], updates[1][:-1]):
        assert torch.equal(before, after)
    assert not torch.equal(updates[0][-1], updates[1][-1])  # the changed block's own update did change


@pytest.mark.parametrize("batch_norm", ["differentiated", "constant"])
def test_batch_norm_enters_through_or_without_its_statistics_and_updates_running_statistics_once(batch_norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    reference = nn.BatchNorm2d(4).double()
    # the conv's and the norm's units: 2 channels x 16 positions; K = 32 tangents make the projection exact
    estimator = LocalForwardGradient(model, ["0:3", "3:"], (1, 4, 4), group_size=2, num_tangents=32,
                                     aggregation="frog", sampler="normal", seed=0, batch_norm=batch_norm)
    assert estimator._structures[(0, (1, 4, 4))].sites[0].batch_norm is model[1]  # the conv feeds the norm
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with torch.enable_grad():  # reference: the local loss through the batch statistics, or with them detached
        z = model[0](x)
        source = z if batch_norm == "differentiated" else z.detach()
        mean, var = source.mean((0, 2, 3)), source.var((0, 2, 3), correction=0)
        normalized = (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
        output = F.relu(normalized * model[1].weight[None, :, None, None] + model[1].bias[None, :, None, None])
        loss = F.cross_entropy(estimator.heads[0](output.flatten(2).mean(-1)), y)
        parameters = [model[0].weight, *model[1].parameters()]
        expected = torch.autograd.grad(loss, parameters)
    reference(model[0](x).detach())  # what one training-mode forward does to the running statistics
    estimator.backward(x, y)
    for parameter, gradient in zip(parameters, expected):
        assert fwdgrad.cosine_similarity([parameter.grad], [gradient]) > 0.99999
        torch.testing.assert_close(parameter.grad, gradient)
    if batch_norm == "differentiated":  # the bias before a BatchNorm has no gradient through the statistics
        assert float(model[0].bias.grad.abs().max()) < 1e-12
    torch.testing.assert_close(model[1].running_mean, reference.running_mean)
    torch.testing.assert_close(model[1].running_var, reference.running_var)
    assert int(model[1].num_batches_tracked) == 1
    with constant_batch_statistics([model]) as patched:  # the context restores the class's forward
        assert patched == [model[1]]
    assert "forward" not in vars(model[1])


def test_statistics_projection_is_nn_batch_norms_backward():
    """P(v) of fwdgrad.local.normalization against autograd through F.batch_norm's training-mode statistics."""
    torch.manual_seed(0)
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    upstream = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y = F.batch_norm(z, None, None, weight, bias, training=True, eps=1e-5)
    (expected,) = torch.autograd.grad(y, z, upstream)
    mean, var = z.detach().mean((0, 2, 3)), z.detach().var((0, 2, 3), correction=0)
    constant = upstream * (weight / torch.sqrt(var + 1e-5))[None, :, None, None]  # the statistics held fixed
    torch.testing.assert_close(statistics_projection(constant, z.detach(), mean, var, 1e-5), expected)


def test_an_unknown_batch_norm_mode_names_the_choices():
    with pytest.raises(ValueError, match="batch_norm 'frozen'; valid choices: differentiated, constant"):
        LocalForwardGradient(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), ["0:2"], (1, 2, 2), batch_norm="frozen")


@pytest.mark.parametrize("name", ZOO_SPLITS)
def test_zoo_blocks_compose_to_the_model(name):
    torch.manual_seed(0)
    options = {"width": 16} if name == "fc" else {}
    model = build_model(name, 1, 28, 10, **options).eval()
    blocks = resolve_blocks(model, name)
    x = torch.randn(2, 1, 28, 28)
    h = x
    with torch.no_grad():
        for block in blocks:
            h = block.forward(h)
        torch.testing.assert_close(h, model(x))
    counts = {"baydin_mlp": 3, "fc": 3, "baydin_cnn": 6, "resnet18": 10, "vit": 8, "localmixer": 5}
    assert len(blocks) == counts[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_one_local_step_on_the_large_zoo_models_updates_every_parameter(name):
    """BatchNorm (constant batch statistics), residual blocks with several sites, attention (its
    out_proj updated through the MultiheadAttention site), class token and position embedding."""
    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10).train()
    estimator = LocalForwardGradient(model, name, (1, 28, 28), group_size=4, seed=0)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = estimator.backward(x, y)
    assert math.isfinite(float(loss)) and len(estimator.last_local_losses) == len(estimator.blocks)
    for parameter_name, parameter in [*model.named_parameters(), *estimator.heads.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        # torchvision zero-initializes the ViT's classifier, so the final LayerNorm's exact gradient is 0 too
        if not parameter_name.startswith("encoder.ln."):
            assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("blocks, message", [
    (["0:3", "3:5", "nope"], "unknown module name 'nope'; valid names: 0, 1, 2"),
    (["0:3", "3:5"], "blocks do not cover the model: 2 trainable parameters belong to no block (5.weight, 5.bias)"),
    (["0:3", "1:5", "5:"], "parameter '1.weight' belongs to blocks '0:3' and '1:5'"),
    (["0:1", "1:5", "5:"], "block '0:1' has no trainable parameter"),
    (["3:5", "0:3", "5:"], "in order fails at block '3:5'"),
    ([["0", "1"], "3:5", "5:"], "in order does not compute model(x)"),
    (["0:3", "3:5", "5:", "5:"], "belongs to blocks '5:' and '5:'"),
    ("lenet", "unknown model-zoo split 'lenet'; valid choices: baydin_mlp, fc"),
])
def test_bad_block_specifications_name_the_value(blocks, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LocalForwardGradient(mlp(), blocks, (8,))


def test_groups_that_do_not_divide_name_the_block_and_the_valid_choices():
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the 6 features of block '0:3' "
                                         r"\(output shape \(6,\)\); valid: 1, 2, 3, 6"):
        LocalForwardGradient(mlp(), ["0:3", "3:5", "5:"], (8,), group_size=4)
    with pytest.raises(ValueError, match=r"last_group_size=2 does not divide the 3 features of block '5:'"):
        LocalForwardGradient(mlp(), ["0:3", "3:5", "5:"], (8,), last_group_size=2)
    # patches is an upper bound: each block takes the largest divisor of its sizes not above it
    assert LocalForwardGradient(cnn(), ["0:2", "2:5", "5:"], (1, 4, 4), patches=3).layouts[0].patches == 2
    assert LocalForwardGradient(cnn(), ["0:2", "2:5", "5:"], (1, 4, 4), patches=9).layouts[0].num_patches == 16


def test_cli_bad_blocks_exit_2_with_one_line(tmp_path, capsys):
    from fwdgrad.experiments import train

    code = train.main(["model=fc", "model.width=16", "gradient=local", "gradient.blocks=[0:3,nope,5:]", "lr=0.1",
                       f"run_dir={tmp_path}", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "unknown module name 'nope'" in err and "Traceback" not in err
    # integers from YAML are nn.Sequential's module names
    assert train.main(["model=fc", "model.width=16", "gradient=local", "gradient.blocks=[[0,1,2],[3,4],5]", "lr=0.1",
                       "epochs=1", "max_steps_per_epoch=1", f"run_dir={tmp_path}/ints", *QUICK]) == 0
    code = train.main(["model=fc", "model.width=16", "gradient=local", "gradient.group_size=3", "lr=0.1",
                       f"run_dir={tmp_path}/b", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "group_size=3 does not divide the 16 features of block '0:3'" in err


def test_short_local_training_on_mnist5k_learns(tmp_path):
    # `fwdgrad train gradient=local`: fc width 64, 2 epochs, K = 1, groups of 4, lr 0.3. Measured test
    # accuracy 0.881 / 0.872 / 0.768 for seeds 0 / 1 / 2 (fc64 bp at lr 0.1: 0.878 / 0.880 / 0.874); chance 0.10
    from fwdgrad.experiments import train

    run_dir = str(tmp_path / "local")
    assert train.main(["model=fc", "model.width=64", "gradient=local", "epochs=2", "lr=0.3", f"run_dir={run_dir}",
                       *QUICK]) == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["method"] == "local fg K=1 (groups of 4)"
    assert summary["test_accuracy_last"] > 0.7


def test_resume_with_local_losses_is_exact_and_the_heads_are_in_the_checkpoint(tmp_path):
    from fwdgrad.experiments import train
    from fwdgrad.train.trainer import TIMING_COLUMNS
    from test_train import Interrupt, interrupt_after_epoch_1, read_metrics

    overrides = ["model=fc", "model.width=16", "gradient=local", "gradient.num_tangents=2", "lr=0.2",
                 "optimizer=sgd_momentum", "epochs=3", "max_steps_per_epoch=4", *QUICK]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main([*overrides, f"run_dir={whole}"]) == 0
    cfg = train.compose("train", overrides)
    with pytest.raises(Interrupt):
        train.run_training(cfg, parts, callbacks=[interrupt_after_epoch_1], verbose=False)
    assert train.main([f"resume={parts}", "progress=false"]) == 0
    strip = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_metrics(whole)]
    assert [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_metrics(parts)] == strip
    checkpoints = [torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (whole, parts)]
    heads = [c["estimator"]["heads"] for c in checkpoints]
    assert sorted(heads[0]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    # the optimizer holds the heads: 6 model tensors + 4 head tensors, each with a momentum buffer
    assert len(checkpoints[0]["optimizer"]["state"]) == 10


def test_compare_and_bench_run_local_fg(tmp_path, capsys):
    from fwdgrad.bench.benchmark import WORKLOADS, make_step
    from fwdgrad.experiments import compare

    run_dir = str(tmp_path / "cmp")
    assert compare.main(["model=fc", "model.width=16", "epochs=1", "max_steps_per_epoch=3", "methods=[bp,local_fg]",
                         "lr=0.1", f"run_dir={run_dir}", *QUICK]) == 0
    assert "| local fg K=1 (groups of 4) |" in capsys.readouterr().out
    model, x, y = WORKLOADS["tiny_fc"].build(torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step = make_step("local_fg", model, x, y, 1, sampler="rademacher", model_name="fc")
    assert math.isfinite(float(step()))
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0
