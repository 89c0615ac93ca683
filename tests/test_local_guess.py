"""Global target, local guess (fwdgrad.local.guess) against autograd of the whole network.

The references are computed here by reverse-mode autograd: the true gradient of the global
(task) loss with respect to each block's output, the head loss's gradient (the guess), their
projection, and the block's VJP of it. The estimator computes them in forward mode.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad
from fwdgrad.local.guess import LocalGuessForwardGradient
from test_local import cnn, mlp  # the same small models as the local-loss tests

QUICK = ["progress=false", "tensorboard=false"]

CASES = {"mlp": (mlp, ["0:3", "3:5", "5:"], (8,)), "cnn": (cnn, ["0:2", "2:5", "5:"], (1, 4, 4))}


def build(case, seed=0, batch=5, **options):
    make, blocks, shape = CASES[case]
    torch.manual_seed(seed)
    model = make()
    estimator = LocalGuessForwardGradient(model, blocks, shape, seed=seed, **options)
    estimator.keep_records = True
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((batch, *shape), generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=generator)
    return model, estimator, x, y


def reference(model, estimator, x, y):
    """Per block, by autograd on copies: the block's input and output, the per-sample true gradient
    of the task loss w.r.t. the output (through every later block), and the per-sample guess (the
    gradient of the head's loss, or of the task loss for the last block)."""
    model, heads = copy.deepcopy(model), copy.deepcopy(estimator.heads)
    blocks = list(_blocks_of(model, estimator))
    result, h = [], x
    for index, block in enumerate(blocks):
        output = block(h).detach()
        a = output.clone().requires_grad_()
        rest = a
        for later in blocks[index + 1:]:
            rest = later(rest)
        true = torch.autograd.grad(F.cross_entropy(rest, y, reduction="sum"), a)[0]  # per sample: ∇ℓ_s
        a = output.clone().requires_grad_()
        if index < len(heads):
            pooled = a if a.dim() == 2 else a.flatten(2).mean(-1)
            local = F.cross_entropy(heads[index](pooled), y, reduction="sum")
        else:
            local = F.cross_entropy(a, y, reduction="sum")
        guess = torch.autograd.grad(local, a)[0]
        result.append({"input": h, "output": output, "true": true, "guess": guess})
        h = output
    return result, model


def _blocks_of(model, estimator):
    """The block functions of the copied model (the same slices as the estimator's blocks)."""
    for block in estimator.blocks:
        start, stop = (int(part) if part else None for part in block.name.split(":"))
        yield model[start:stop]


def projection(true, guess):
    """Per sample (⟨t, g⟩ / ||g||²) g."""
    t, g = true.flatten(1), guess.flatten(1)
    return ((t * g).sum(1, keepdim=True) / (g * g).sum(1, keepdim=True) * g).reshape(true.shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_tangent_gives_the_true_gradient_projected_onto_the_local_guess(case):
    model, estimator, x, y = build(case)
    expected, copied = reference(model, estimator, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    estimator.backward(x, y)
    for index, (record, ref) in enumerate(zip(estimator.last_records, expected)):
        torch.testing.assert_close(record["output"], ref["output"])
        torch.testing.assert_close(record["guess"], ref["guess"], rtol=1e-10, atol=1e-12)
        projected = projection(ref["true"], ref["guess"])
        torch.testing.assert_close(record["estimate"], projected, rtol=1e-9, atol=1e-12)
        # d along the unit guess: ⟨∇ℓ, g⟩ / ||g||
        unit = ref["guess"].flatten(1) / ref["guess"].flatten(1).norm(dim=1, keepdim=True)
        torch.testing.assert_close(record["directional_derivatives"][0], (ref["true"].flatten(1) * unit).sum(1),
                                   rtol=1e-9, atol=1e-12)
        if index == len(expected) - 1:  # the last block's guess is the exact gradient: so is its estimate
            torch.testing.assert_close(record["estimate"], ref["true"], rtol=1e-9, atol=1e-12)
    # the weights: autograd's VJP of the projected gradient / B through each block alone
    for block, ref in zip(_blocks_of(copied, estimator), expected):
        output = block(ref["input"])
        parameters = list(block.parameters())
        wanted = torch.autograd.grad(output, parameters, projection(ref["true"], ref["guess"]) / x.shape[0])
        names = {id(p): name for name, p in copied.named_parameters()}
        originals = dict(model.named_parameters())
        for parameter, gradient in zip(parameters, wanted):
            torch.testing.assert_close(originals[names[id(parameter)]].grad, gradient, rtol=1e-9, atol=1e-12)
    # the heads: the exact gradient of their own mean loss
    for index, head in enumerate(estimator.heads):
        reference_head = copy.deepcopy(head)
        output = expected[index]["output"]
        pooled = output if output.dim() == 2 else output.flatten(2).mean(-1)
        wanted = torch.autograd.grad(F.cross_entropy(reference_head(pooled), y), list(reference_head.parameters()))
        for parameter, gradient in zip(head.parameters(), wanted):
            torch.testing.assert_close(parameter.grad, gradient, rtol=1e-10, atol=1e-12)
    for parameter, saved in zip(model.parameters(), before):
        assert torch.equal(parameter, saved)


@pytest.mark.parametrize("case", sorted(CASES))
def test_more_tangents_with_frog_give_the_projection_onto_the_span_of_guess_and_random_tangents(case):
    model, estimator, x, y = build(case, num_tangents=4, aggregation="frog", seed=3)
    expected, _ = reference(model, estimator, x, y)
    estimator.backward(x, y)
    for record, ref in zip(estimator.last_records, expected):
        tangents = record["tangents"].flatten(2)  # (K, B, e)
        guess = ref["guess"].flatten(1)
        torch.testing.assert_close(tangents[0], guess / guess.norm(dim=1, keepdim=True), rtol=1e-10, atol=1e-12)
        true = ref["true"].flatten(1)
        for sample in range(x.shape[0]):
            basis = tangents[:, sample].T  # (e, K)
            coefficients = torch.linalg.lstsq(basis, true[sample, :, None]).solution
            torch.testing.assert_close(record["estimate"].flatten(1)[sample], (basis @ coefficients)[:, 0],
                                       rtol=1e-8, atol=1e-10)


def test_with_one_tangent_the_estimate_never_points_against_the_true_gradient():
    for seed in range(4):
        model, estimator, x, y = build("mlp", seed=seed, batch=16, aggregation="mean")
        expected, _ = reference(model, estimator, x, y)
        estimator.backward(x, y)
        for record, ref in zip(estimator.last_records, expected):
            inner = (record["estimate"].flatten(1) * ref["true"].flatten(1)).sum(1)
            # ⟨P_g t, t⟩ = ||P_g t||² >= 0: a projection is a descent direction
            assert bool((inner >= -1e-14).all())
            torch.testing.assert_close(inner, record["estimate"].flatten(1).square().sum(1), rtol=1e-9, atol=1e-14)


def test_chunks_of_tangents_give_the_same_estimate():
    model, estimator, x, y = build("mlp", num_tangents=5, aggregation="frog", seed=1)
    estimator.backward(x, y)
    whole = [p.grad.clone() for p in model.parameters()]
    model, estimator, x, y = build("mlp", num_tangents=5, aggregation="frog", seed=1, chunk_size=2)
    estimator.backward(x, y)
    for parameter, gradient in zip(model.parameters(), whole):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("num_tangents", [1, 3])
def test_the_forward_mode_passes_record_no_autograd_graph(num_tangents):
    model, estimator, x, y = build("mlp", num_tangents=num_tangents)
    loss = estimator.backward(x, y)
    assert loss.grad_fn is None and not loss.requires_grad
    for record in estimator.last_records:
        for key in ("directional_derivatives", "estimate", "guess", "output"):
            assert record[key].grad_fn is None and not record[key].requires_grad, key


def test_batch_norm_statistics_are_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    estimator = LocalGuessForwardGradient(model, ["0:3", "3:"], (8,), num_tangents=2, seed=0)
    x = torch.randn(7, 8, dtype=torch.float64)
    estimator.backward(x, torch.arange(7) % 3)
    plain(x)
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("options, message", [
    (dict(num_tangents=0), "num_tangents"),
    (dict(aggregation="nope"), "unknown aggregation 'nope'; valid choices"),
    (dict(sampler="nope"), "nope"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(head="nope"), "unknown head 'nope'; valid choices"),
])
def test_bad_options_raise_one_line_errors(options, message):
    with pytest.raises((ValueError, TypeError)) as error:
        LocalGuessForwardGradient(mlp(), ["0:3", "3:5", "5:"], (8,), **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_exported_from_the_package():
    assert fwdgrad.LocalGuessForwardGradient is LocalGuessForwardGradient


def test_train_with_the_local_guess_from_the_command_line(tmp_path, capsys):
    from fwdgrad.experiments import train

    run_dir = tmp_path / "guess"
    assert train.main(["model=fc", "model.width=16", "gradient=local", "gradient.guess=local", "lr=0.1", "epochs=1",
                       "max_steps_per_epoch=2", f"run_dir={run_dir}", *QUICK]) == 0
    assert json.load(open(run_dir / "summary.json"))["method"] == "local guess K=1"
    assert train.main(["model=fc", "model.width=16", "gradient=local", "gradient.guess=local",
                       "gradient.num_tangents=3", "gradient.aggregation=frog", "lr=0.1", "epochs=1",
                       "max_steps_per_epoch=2", f"run_dir={tmp_path / 'mixed'}", *QUICK]) == 0
    assert json.load(open(tmp_path / "mixed" / "summary.json"))["method"] == "local guess + 2 random, frog K=3"
    capsys.readouterr()
    for overrides, message in [
        (["gradient.guess=nope"], "unknown gradient.guess 'nope' for gradient=local; valid choices: local"),
        (["gradient.scaling_correction=true"], "gradient.guess=local takes no gradient.scaling_correction"),
    ]:
        guess = [] if overrides[0].startswith("gradient.guess") else ["gradient.guess=local"]
        code = train.main(["model=fc", "model.width=16", "gradient=local", *guess, *overrides, "lr=0.1",
                           f"run_dir={tmp_path / 'bad'}", *QUICK])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
