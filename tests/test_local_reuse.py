"""A block's later passes reuse the first pass's values (fwdgrad.local.reuse).

The reference is the same estimator with every pass computing everything (the blocks listed in
``replayed_blocks``, the fallback the estimator itself takes): the same seed must give the same
``.grad`` of every parameter and head, float64, for the eager and the fast mode, K = 1 and K = 3.
The exact-gradient tests of tests/test_local_sites.py (autograd of the local losses) run with the
reuse on.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import fwdgrad
from fwdgrad.train.models import build_model


def resnet18():
    return build_model("resnet18", 3, 8, 10).double().train()


def vit():
    model = build_model("vit", 1, 8, 10, patch_size=4).double().train()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)
    return model


CASES = {
    "resnet18-eager": (resnet18, "resnet18", (3, 8, 8), dict(group_size=4)),
    "resnet18-constant-bn": (resnet18, "resnet18", (3, 8, 8), dict(group_size=1, patches=8, batch_norm="constant")),
    "resnet18-fast": (resnet18, "resnet18", (3, 8, 8), dict(group_size=4, mode="fast")),
    "resnet18-fast-k3": (resnet18, "resnet18", (3, 8, 8), dict(group_size=4, mode="fast", num_tangents=3,
                                                               aggregation="frog", sampler="normal")),
    "resnet18-eager-k3": (resnet18, "resnet18", (3, 8, 8), dict(group_size=4, num_tangents=3)),
    "vit-eager": (vit, "vit", (1, 8, 8), dict(group_size=4)),
    "vit-fast": (vit, "vit", (1, 8, 8), dict(group_size=4, mode="fast")),
}


def step_gradients(make, blocks, shape, options, reuse: bool, steps: int = 2, classes: int = 10):
    """.grad of every parameter and head after ``steps`` steps of SGD (lr 0.1), and the estimator."""
    torch.manual_seed(0)
    model = make()
    estimator = fwdgrad.LocalForwardGradient(model, blocks, shape, seed=0, **options)
    if not reuse:
        estimator.replayed_blocks.update(range(len(estimator.blocks)))
    parameters = [*model.parameters(), *estimator.auxiliary_parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(4, *shape, dtype=torch.float64, generator=generator)
        y = torch.randint(0, classes, (4,), generator=generator)
        estimator.backward(x, y)
        optimizer.step()
    return [p.grad.clone() for p in parameters], estimator, model


@pytest.mark.parametrize("case", list(CASES))
def test_reusing_the_first_pass_gives_the_updates_of_passes_that_compute_everything(case):
    make, blocks, shape, options = CASES[case]
    reused, estimator, model = step_gradients(make, blocks, shape, options, reuse=True)
    computed, _, reference_model = step_gradients(make, blocks, shape, options, reuse=False)
    assert not estimator.replayed_blocks  # nothing in these models draws random numbers
    for a, b in zip(reused, computed):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(model.buffers(), reference_model.buffers()):  # BatchNorm's running statistics
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


class CountConvolutions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reuse", [True, False])
def test_each_convolution_of_resnet18_runs_its_forward_once_per_step(reuse):
    """With the reuse a step convolves as often as backprop's forward (the weight gradients are
    convolution_backward, not conv2d): every block-loss site's pass used to compute the block again."""
    torch.manual_seed(0)
    model = resnet18()
    estimator = fwdgrad.LocalForwardGradient(model, "resnet18", (3, 8, 8), seed=0, group_size=4)
    if not reuse:
        estimator.replayed_blocks.update(range(len(estimator.blocks)))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    with CountConvolutions() as counter:
        estimator.backward(x, y)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convolutions == 20
    # without: every block-loss pass runs the whole block (the stem 2 passes of 1, a BasicBlock 2 of 2, one
    # with a downsampling shortcut 4 of 3: 2 + 5 * 4 + 3 * 12 = 58); the own-loss sites' outputs (conv1 of
    # each BasicBlock) are the first pass's either way
    assert counter.count == (convolutions if reuse else 58)


class NoisyLinear(nn.Module):
    """A linear layer that draws random numbers in its forward (dropout inside the site module)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.dropout(F.linear(x, self.weight, self.bias), 0.5, self.training)


def noisy_model():
    return nn.Sequential(NoisyLinear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().train()


def test_a_skipped_module_that_draws_random_numbers_makes_its_block_compute_every_pass():
    """The reused pass would skip the site's dropout and shift every later draw: the estimator sees
    the random state differ from the first pass's, runs the pass again in full and keeps the block so."""
    options = dict(group_size=None)
    blocks = [["0", "1", "2", "3"], "4"]
    reused, estimator, _ = step_gradients(noisy_model, blocks, (6,), options, reuse=True, classes=3)
    computed, _, _ = step_gradients(noisy_model, blocks, (6,), options, reuse=False, classes=3)
    assert estimator.replayed_blocks == {0}
    for a, b in zip(reused, computed):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_only_blocks_with_later_passes_keep_the_first_passs_outputs(monkeypatch):
    """A block with one site has no later pass: its first pass keeps no outputs (they would stay alive for
    the whole block step: on baydin_cnn a 64-channel map per block)."""
    import fwdgrad.local.step as step

    kept = []
    original = step.block_jvp

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        if args[5]:  # first
            kept.append((len(args[1]), result.outputs is not None))
        return result

    monkeypatch.setattr(step, "block_jvp", recording)
    step_gradients(resnet18, "resnet18", (3, 8, 8), dict(group_size=4), reuse=True, steps=1)
    # the stem (conv1, bn1) and the BasicBlocks keep them; the last block (fc) is one site
    assert kept[-1] == (1, False) and all(keep for sites, keep in kept if sites > 1)
    assert any(sites > 1 for sites, _ in kept)
