"""Sites that do not mix, and the heads for feature maps (local losses, fwdgrad.local).

Every test compares with autograd of the local losses themselves (the block's loss for the
sites that keep its units apart, the site's own loss for those that mix them), computed
here independently of the estimator's forward-mode machinery, in float64.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.local.blocks import constant_batch_statistics
from fwdgrad.local.heads import HEADS
from fwdgrad.train.models import build_model

EXACT = dict(group_size=1, patches=64, num_tangents=1, sampler="rademacher", aggregation="mean")


def head_loss(head, a, y, pooled_input):
    """The mean cross-entropy of a head on a: the linear head on globally pooled features, others on a
    (a BatchNorm in the head as nn.BatchNorm computes it in training mode)."""
    if pooled_input:
        a = a if a.dim() == 2 else (a.mean(1) if a.dim() == 3 else a.flatten(2).mean(-1))
    return F.cross_entropy(head(a), y)


def local_loss_gradients(estimator, x, y):
    """{id(parameter): autograd's gradient of the local loss that parameter's site is trained on}."""
    result, h = {}, x
    for index, block in enumerate(estimator.blocks):
        structure = estimator._structures[(index, tuple(h.shape[1:]))]
        calls = []
        handles = [site.module.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((module, args, kwargs)), with_kwargs=True)
            for site in structure.sites]
        try:
            # BatchNorm as the estimator runs it: through its batch statistics (nn.BatchNorm's own training-mode
            # forward) or with them held constant
            statistics = constant_batch_statistics(block.modules) if estimator.batch_norm == "constant" \
                else contextlib.nullcontext()
            with torch.enable_grad(), statistics:
                output = block.forward(h.detach())
                last = index == len(estimator.blocks) - 1
                if last:
                    block_loss = F.cross_entropy(output, y)
                else:
                    head = estimator.heads[index]
                    block_loss = head_loss(head, output, y, isinstance(head, nn.Linear))
                    for p, g in zip(head.parameters(), torch.autograd.grad(block_loss, list(head.parameters()),
                                                                           retain_graph=True)):
                        result[id(p)] = g
                for position, site in enumerate(structure.sites):
                    module, args, kwargs = calls[position]
                    assert module is site.module
                    parameters = [site.module.get_parameter(name) for name in site.owned]
                    if site.own_loss:
                        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                        z = module(*detached, **kwargs)
                        z = z[0] if isinstance(z, tuple) else z
                        site_head = estimator.site_heads[estimator._site_key(index, position)]
                        loss = head_loss(site_head, z, y, isinstance(site_head, nn.Linear))
                        head_parameters = list(site_head.parameters())
                        gradients = torch.autograd.grad(loss, parameters + head_parameters)
                        for p, g in zip(head_parameters, gradients[len(parameters):]):
                            result[id(p)] = g
                        gradients = gradients[:len(parameters)]
                    else:
                        gradients = torch.autograd.grad(block_loss, parameters, retain_graph=True)
                    result.update({id(p): g for p, g in zip(parameters, gradients)})
        finally:
            for handle in handles:
                handle.remove()
        h = output.detach()
    return result


def assert_every_site_is_exact(model, estimator, x, y):
    expected = local_loss_gradients(estimator, x, y)
    estimator.backward(x, y)
    parameters = [*model.parameters(), *estimator.auxiliary_parameters()]
    assert {id(p) for p in parameters} == set(expected)  # every parameter, every head, once
    for name, p in [*model.named_parameters(), *estimator.site_heads.named_parameters(prefix="site_heads"),
                    *estimator.heads.named_parameters(prefix="heads")]:
        reference = expected[id(p)]
        if reference.norm() == 0:
            assert p.grad.norm() == 0, name
            continue
        cosine = fwdgrad.cosine_similarity([p.grad], [reference])
        assert cosine >= 0.99999, (name, cosine)
        assert abs(float(p.grad.norm() / reference.norm()) - 1) < 1e-8, name


@pytest.mark.parametrize("batch_norm", ["differentiated", "constant"])
def test_every_site_of_resnet18_gets_the_exact_gradient_of_its_local_loss(batch_norm):
    """differentiated: the reference is autograd through nn.BatchNorm's batch statistics; constant: with
    them held fixed (each BatchNorm directly follows the one site whose estimate it corrects)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 8, 10).double().train()
    estimator = fwdgrad.LocalForwardGradient(model, "resnet18", (3, 8, 8), seed=0, batch_norm=batch_norm, **EXACT)
    # conv1 and bn1 of every BasicBlock mix channels and positions through conv2: losses of their own
    mixing = [site.name for (index, _), structure in sorted(estimator._structures.items(), key=lambda kv: kv[0][0])
              for site in structure.sites if site.own_loss]
    assert mixing == [f"{layer}.{i}.{part}" for layer in ("layer1", "layer2", "layer3", "layer4") for i in (0, 1)
                      for part in ("conv1", "bn1")]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    assert_every_site_is_exact(model, estimator, x, y)


def test_every_site_of_the_vit_gets_the_exact_gradient_of_its_local_loss():
    torch.manual_seed(0)
    model = build_model("vit", 1, 8, 10, patch_size=4).double().train()
    with torch.no_grad():  # torchvision zero-initializes the classifier: give the last blocks a gradient
        model.heads.head.weight.normal_(0, 0.1)
    estimator = fwdgrad.LocalForwardGradient(model, "vit", (1, 8, 8), seed=0, **EXACT)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    assert_every_site_is_exact(model, estimator, x, y)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("group_size, patches", [(1, 8), (2, 2), (2, 1)])
def test_each_head_gives_autograds_group_and_patch_directional_derivatives(head, group_size, patches):
    """d[k, b, g, p] = B ∇_a L restricted to unit (g, p) · ȧ[k, b], from the records, against autograd
    of the head's mean loss (through the head's batch statistics), for every head kind."""
    torch.manual_seed(0)
    model = small_cnn()
    estimator = fwdgrad.LocalForwardGradient(model, ["0:3", "3:5", "5:"], (1, 8, 8), seed=0, head=head,
                                             group_size=group_size, patches=patches, num_tangents=2,
                                             mixing_sites="block_loss")
    estimator.keep_records = True
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    estimator.backward(x, y)
    for index in (0, 1):
        record, layout, block_head = estimator.last_records[index], estimator.layouts[index], estimator.heads[index]
        output = record["output"].detach().requires_grad_(True)
        with torch.enable_grad():  # B ∇_a L: each sample's ∇_a ℓ_b when the samples are independent
            pooled = output.flatten(2).mean(-1) if isinstance(block_head, nn.Linear) else output
            gradients = len(y) * torch.autograd.grad(F.cross_entropy(block_head(pooled), y), output)[0]
        site = record["sites"][-1]  # the block's last site keeps the units apart
        assert site["by_group"] or layout.groups == 1
        # the block output's tangents from this site: through the block's rest, recomputed by forward AD here
        tangents = site["tangents"]  # (K, B, *z) on the site's output
        block = estimator.blocks[index]
        sites = estimator._structures[(index, tuple(record["input"].shape[1:]))]
        module = sites.sites[-1].module

        def rest(delta):
            handle = module.register_forward_hook(lambda m, a, out: out + delta)
            try:
                with constant_batch_statistics(block.modules):
                    return block.forward(record["input"])
            finally:
                handle.remove()

        zero = torch.zeros_like(tangents[0])
        output_tangents = torch.stack([torch.func.jvp(rest, (zero,), (t,))[1] for t in tangents])
        expected = layout.to_units(output_tangents * gradients).sum(-1)
        torch.testing.assert_close(site["directional_derivatives"], expected, rtol=1e-9, atol=1e-12)


def test_a_conv_head_on_vectors_is_the_mlp_head_and_unknown_heads_name_the_choices():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    (head,) = fwdgrad.LocalForwardGradient(model, ["0:3", "3:"], (4,), head="conv").heads
    assert [type(m).__name__ for m in head] == ["BatchNorm1d", "Pool", "Linear", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="unknown head 'deep'; valid choices: linear, normalized, conv, mlp"):
        fwdgrad.LocalForwardGradient(model, ["0:3", "3:"], (4,), head="deep")
    with pytest.raises(ValueError, match="unknown mixing_sites 'sum'; valid choices: own_loss, guess, block_loss"):
        fwdgrad.LocalForwardGradient(model, ["0:3", "3:"], (4,), mixing_sites="sum")


def test_the_guess_rule_projects_the_block_losss_gradient_onto_the_sites_own_loss_gradient():
    """mixing_sites='guess': ĝ_b = (∇_z ℓ_block,b · û_b) û_b with û_b the unit gradient of the site's own loss,
    against autograd of both losses (ResNet-18's BasicBlock conv1 and bn1, float64)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 8, 10).double().train()
    estimator = fwdgrad.LocalForwardGradient(model, "resnet18", (3, 8, 8), seed=0, mixing_sites="guess", **EXACT)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    index = 1  # layer1.0
    h = model.relu(model.bn1(model.conv1(x))).detach()
    structure = next(s for (i, _), s in estimator._structures.items() if i == index)
    block = estimator.blocks[index]
    estimator.keep_records = True
    estimator.backward(x, y)
    record = estimator.last_records[index]
    for position, site in enumerate(structure.sites):
        if not site.own_loss:
            continue
        calls = []
        # a clone: torchvision's ReLU(inplace=True) overwrites bn1's output afterwards
        handle = site.module.register_forward_hook(lambda m, a, out: calls.append(out.clone()))
        try:
            with torch.enable_grad(), constant_batch_statistics(block.modules):
                delta = torch.zeros((4, *site.shape), dtype=torch.float64, requires_grad=True)
                swap = site.module.register_forward_hook(lambda m, a, out: out + delta)
                try:
                    output = block.forward(h)
                finally:
                    swap.remove()
                head = estimator.heads[index]
                block_losses = F.cross_entropy(head(output.flatten(2).mean(-1)), y, reduction="none")
                block_gradient = torch.stack([torch.autograd.grad(block_losses[b], delta, retain_graph=True)[0][b]
                                              for b in range(4)])
                z = calls[0].detach().requires_grad_(True)
                site_head = estimator.site_heads[estimator._site_key(index, position)]
                own = F.cross_entropy(site_head(z.flatten(2).mean(-1)), y, reduction="sum")
                guess = torch.autograd.grad(own, z)[0]
        finally:
            handle.remove()
        unit = guess.flatten(1) / guess.flatten(1).norm(dim=1, keepdim=True)
        expected = ((block_gradient.flatten(1) * unit).sum(1, keepdim=True) * unit).reshape(guess.shape)
        torch.testing.assert_close(record["sites"][position]["estimate"], expected, rtol=1e-9, atol=1e-12)


FAST_CASES = {
    "cnn-exact": (small_cnn, ["0:3", "3:5", "5:"], (1, 8, 8), dict(group_size=1, patches=8)),
    "cnn-groups-k3": (small_cnn, ["0:3", "3:5", "5:"], (1, 8, 8), dict(group_size=2, patches=2, num_tangents=3,
                                                                       aggregation="frog", sampler="normal")),
    "resnet18": (lambda: build_model("resnet18", 3, 8, 10).double(), "resnet18", (3, 8, 8), dict(group_size=4)),
    "resnet18-guess": (lambda: build_model("resnet18", 3, 8, 10).double(), "resnet18", (3, 8, 8),
                       dict(group_size=4, mixing_sites="guess", head="normalized")),
    "vit-k2": (lambda: build_model("vit", 1, 8, 10, patch_size=4).double(), "vit", (1, 8, 8),
               dict(group_size=4, num_tangents=2)),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_the_fast_mode_gives_the_eager_modes_updates(case):
    """mode='fast' (fwdgrad.core.fast_forward) against PyTorch's forward AD: the same .grad of every
    parameter and head, float64, same seed; the tangents drawn are left as drawn."""
    make, blocks, shape, options = FAST_CASES[case]
    grads, drawn = {}, {}
    for mode in ("eager", "fast"):
        torch.manual_seed(0)
        model = make().train()
        estimator = fwdgrad.LocalForwardGradient(model, blocks, shape, seed=0, mode=mode, **options)
        assert estimator.mode == mode
        x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 10 if case.startswith(("resnet", "vit")) else 3, (4,),
                          generator=torch.Generator().manual_seed(2))
        estimator.keep_records = True
        estimator.backward(x, y)
        grads[mode] = [p.grad.clone() for p in [*model.parameters(), *estimator.auxiliary_parameters()]]
        drawn[mode] = [s["tangents"] for r in estimator.last_records for s in r["sites"]]
    for eager, fast in zip(drawn["eager"], drawn["fast"]):  # the same draws, unchanged by either pass
        torch.testing.assert_close(fast, eager, rtol=0, atol=0)
    for eager, fast in zip(grads["eager"], grads["fast"]):
        torch.testing.assert_close(fast, eager, rtol=1e-9, atol=1e-12)
