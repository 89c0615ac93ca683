"""fwdgrad.train.localmixer: Ren et al. 2023's LocalMixer, its block split and forward-mode friendliness."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad import LocalForwardGradient
from fwdgrad.experiments import train
from fwdgrad.local.blocks import resolve_blocks
from fwdgrad.train.models import build_model, count_parameters


def small(in_channels=1, image_size=8, grid=2, channels=8, groups=2, blocks=3, dtype=torch.float64, seed=0):
    """A LocalMixer with a nonzero readout (the paper's starts at zero), in float64."""
    torch.manual_seed(seed)
    model = build_model("localmixer", in_channels, image_size, 10, blocks=blocks, channels=channels, grid=grid,
                        groups=groups).to(dtype)
    with torch.no_grad():
        model.readout.classifier.weight.normal_()
        model.readout.classifier.bias.normal_()
    return model


def test_the_paper_variants_by_default_and_their_parameter_counts():
    """M/1/16 on 28x28x1 and M/8/16 on 32x32x3, counted by hand: 4 blocks of D = 512 channels, G = 16 groups."""
    D, G, K = 512, 16, 10
    grouped = G * (D // G) * (D // G) + D             # Lin_G: G blocks of (D/G)^2 weights, D biases
    dense = D * D + D                                 # channel mixing
    for channels, size, tokens, patch_pixels in [(1, 28, 1, 28 * 28), (3, 32, 64, 3 * 4 * 4)]:
        model = build_model("localmixer", channels, size, K)
        first = patch_pixels * D + D + grouped        # patch embedding + grouped mixing
        later = tokens * tokens + dense + grouped     # token mixing (no bias) + channel + grouped mixing
        assert count_parameters(model) == first + 3 * later + D * K + K
        assert model.grid ** 2 == tokens and model.groups == G and len(model.blocks) == 4
        assert model.blocks[1].group_mixing.weight.shape == (G, D // G, D // G)
        with torch.no_grad():
            x = torch.randn(2, channels, size, size)
            assert model.patches(x).shape == (2, tokens, patch_pixels)
            assert model(x).shape == (2, K)
    assert count_parameters(build_model("localmixer", 3, 32, 10)) == 898_058
    assert count_parameters(build_model("localmixer", 1, 28, 10)) == 1_262_605


def test_patches_are_the_grid_cells_in_row_column_channel_order():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tokens = build_model("localmixer", 3, 8, 10, grid=2, channels=8, groups=2).patches(x)
    for i in range(2):
        for j in range(2):
            cell = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(0, 2, 3, 1).reshape(2, -1)
            assert torch.equal(tokens[:, 2 * i + j], cell)


def layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


def test_grouped_layer_is_group_g_from_group_g_with_layernorm_around_it():
    """z_g = LN(W_g LN(h_g) + c_g) for every group g: a loop over the groups as the reference."""
    layer = small().blocks[1].group_mixing
    h = torch.randn(3, 4, 8, dtype=torch.float64)
    expected = torch.cat([layer_norm(layer_norm(h[..., 4 * g:4 * g + 4]) @ layer.weight[g].T + layer.bias[g])
                          for g in range(2)], -1)
    torch.testing.assert_close(layer(h), expected, rtol=1e-12, atol=1e-12)
    token = small().blocks[1].token_mixing  # mixes the tokens of each channel, LayerNorm over the channels
    torch.testing.assert_close(token(h), layer_norm(token.weight @ layer_norm(h)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_channels, image_size, grid", [(1, 28, None), (3, 32, None), (1, 8, 2)])
def test_forward_is_the_zoo_blocks_in_order(in_channels, image_size, grid):
    options = {} if grid is None else {"grid": grid, "channels": 8, "groups": 2}
    torch.manual_seed(0)
    model = build_model("localmixer", in_channels, image_size, 10, **options).double()
    blocks = resolve_blocks(model, "localmixer")
    assert [b.name for b in blocks] == ["patches+blocks.0", "blocks.1", "blocks.2", "blocks.3", "readout"]
    x = torch.randn(3, in_channels, image_size, image_size, dtype=torch.float64)
    h = x
    with torch.no_grad():
        for block in blocks:
            h = block.forward(h)
        torch.testing.assert_close(h, model(x), rtol=1e-12, atol=0)


def test_jvp_equals_autograd_and_finite_differences_in_float64():
    """Forward mode through every op (LayerNorm, grouped einsum, token mixing, ReLU, mean): the jvp in the
    input and all parameters at once against reverse-mode autograd's jvp (double-backward) and
    central differences. Groups of 8 channels: with groups of 4 a group after a ReLU is all zeros now and
    then, LN maps it to exactly 0 and the next ReLU sits on its kink, where differences see a mean slope."""
    model = small(channels=16, groups=2)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=generator)
    # small directions: LayerNorm after every linear map makes the output scale-invariant in the weights,
    # so its curvature along a direction as large as the weights (std <= 0.1) defeats central differences
    directions = {name: 0.01 * torch.randn(p.shape, dtype=p.dtype, generator=generator)
                  for name, p in parameters.items()}
    dx = 0.01 * torch.randn(x.shape, dtype=x.dtype, generator=generator)

    def f(params, inputs):
        return torch.func.functional_call(model, params, (inputs,))

    _, forward = torch.func.jvp(f, (parameters, x), (directions, dx))
    _, reverse = torch.autograd.functional.jvp(
        lambda *flat: f(dict(zip(parameters, flat[:-1])), flat[-1]),
        (*parameters.values(), x), (*directions.values(), dx))
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=1e-12)
    step = 1e-6
    plus = f({n: p + step * directions[n] for n, p in parameters.items()}, x + step * dx)
    minus = f({n: p - step * directions[n] for n, p in parameters.items()}, x - step * dx)
    torch.testing.assert_close(forward, (plus - minus) / (2 * step), rtol=1e-5, atol=1e-7)
    assert forward.abs().max() > 0.1


def test_runs_under_vmap_over_samples_and_over_tangents():
    model = small()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    per_sample = torch.func.vmap(lambda sample: model(sample.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(per_sample, model(x), rtol=1e-12, atol=1e-12)
    tangents = torch.randn(3, *x.shape, dtype=torch.float64)
    batched = torch.func.vmap(lambda t: torch.func.jvp(model, (x,), (t,))[1])(tangents)
    one_by_one = torch.stack([torch.autograd.functional.jvp(model, (x,), (t,))[1] for t in tangents])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-10, atol=1e-12)


def block_loss_gradients(estimator, model, x, y):
    """Autograd's gradient of each block's local loss w.r.t. the block's parameters, its input detached:
    CE(head(mean over tokens)) for the mixer blocks, the task loss for the readout."""
    h, result = x, []
    for index, block in enumerate(estimator.blocks):
        with torch.enable_grad():
            output = block.forward(h.detach())
            logits = estimator.heads[index](output.mean(1)) if index < len(estimator.heads) else output
            result.append(torch.autograd.grad(F.cross_entropy(logits, y), block.parameters()))
        h = output.detach()
    return result


def test_local_losses_see_the_papers_groups_and_patches_and_are_exact_with_enough_tangents():
    """With group_size = D/G and one patch per token every channel-mixing site splits into (group, token)
    units of D/G = 4 coordinates and every token-mixing site into per-token units of D = 8 (summed over the
    groups), as Ren et al. credit them; K = 8 tangents and the projection make every block's estimate
    its exact local gradient (mixing_sites="block_loss": token mixing credited with its block's loss, as the
    paper does)."""
    model = small()
    estimator = LocalForwardGradient(model, "localmixer", (1, 8, 8), num_tangents=8, aggregation="frog",
                                     sampler="normal", group_size=4, patches=4, seed=0, mixing_sites="block_loss")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 10, (6,), generator=generator)
    expected = block_loss_gradients(estimator, model, x, y)
    estimator.keep_records = True
    estimator.backward(x, y)
    splits = [[(site["name"], site["by_group"], site["by_patch"]) for site in record["sites"]]
              for record in estimator.last_records]
    assert splits[0] == [("blocks.0.embed", True, True), ("blocks.0.group_mixing", True, True)]
    assert splits[1] == [("blocks.1.token_mixing", False, True), ("blocks.1.channel_mixing", True, True),
                         ("blocks.1.group_mixing", True, True)]
    for block, gradients in zip(estimator.blocks, expected):
        assert fwdgrad.cosine_similarity([p.grad for p in block.parameters()], gradients) > 1 - 1e-9, block.name
        for parameter, gradient in zip(block.parameters(), gradients):
            torch.testing.assert_close(parameter.grad, gradient, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("num_tangents", [1, 2])
def test_one_local_step_fills_every_gradient(num_tangents):
    """The paper's M/1/16 shape on a 28x28 batch (K = 1: forward_ad; K = 2: vmap over jvp)."""
    torch.manual_seed(0)
    model = build_model("localmixer", 1, 28, 10, channels=64)
    estimator = LocalForwardGradient(model, "localmixer", (1, 28, 28), num_tangents=num_tangents,
                                     group_size=4, seed=0)
    loss = estimator.backward(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss) and len(estimator.last_local_losses) == 5
    for name, parameter in [*model.named_parameters(), *estimator.heads.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_fwdgrad_train_local_step_changes_the_parameters(tmp_path, monkeypatch):
    initial = {}

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        initial.update({name: p.detach().clone() for name, p in model.named_parameters()})
        return model

    monkeypatch.setattr(train, "build_model", recording_build_model)
    run_dir = str(tmp_path / "run")
    assert train.main(["model=localmixer", "model.channels=32", "model.groups=4", "model.grid=4", "model.blocks=2",
                       "gradient=local", "gradient.group_size=8", "gradient.patches=16", "optimizer=adam", "lr=1e-3",
                       "epochs=1", "max_steps_per_epoch=2", "max_eval_batches=1", f"run_dir={run_dir}",
                       "progress=false", "tensorboard=false"]) == 0
    trained = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["model"]
    assert set(initial) == {name for name in trained if name in initial} and initial
    for name, before in initial.items():
        assert not torch.equal(trained[name], before), name
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert 0.0 <= summary["test_accuracy_last"] <= 1.0


@pytest.mark.parametrize("options, message", [
    ({"grid": 3}, "grid=3 does not divide the image size 28; valid: 1, 2, 4, 7, 14, 28"),
    ({"groups": 5}, "groups=5 does not divide channels=512; valid: 1, 2, 4, 8, 16"),
    ({"blocks": 0}, "blocks must be a positive integer"),
])
def test_bad_options_name_the_value_and_the_valid_choices(options, message):
    with pytest.raises(ValueError, match=message):
        build_model("localmixer", 1, 28, 10, **options)
