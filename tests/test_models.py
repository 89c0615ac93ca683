"""fwdgrad.train.models: shapes per dataset, parameter counts, one training step with bp and frog."""

import pytest
import torch
import torch.nn.functional as F

from fwdgrad import Backprop, ForwardGradient
from fwdgrad.train.models import MODELS, build_model, count_parameters


def linear_parameters(sizes):
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 10), (3, 32, 7)])
def test_output_shape_per_dataset(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, channels, size, classes)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, channels, size, size)).shape == (2, classes)


def test_parameter_counts_match_the_papers_architectures():
    assert count_parameters(build_model("baydin_mlp")) == linear_parameters([784, 1024, 1024, 10]) == 1_863_690
    convs = (1 * 9 * 64 + 64) + 3 * (64 * 9 * 64 + 64)
    assert count_parameters(build_model("baydin_cnn")) == convs + linear_parameters([3136, 1024, 10])
    for width in (256, 1024, 4096):
        assert count_parameters(build_model("fc", width=width)) == linear_parameters([784, width, width, 10])
    resnet = build_model("resnet18", 1, 28)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    vit = build_model("vit", 3, 32)
    assert len(vit.encoder.layers) == 6 and vit.hidden_dim == 256 and vit.patch_size == 4
    assert vit.encoder.layers[0].self_attention.num_heads == 4
    assert vit.encoder.layers[0].mlp[0].out_features == 512
    assert vit.conv_proj.in_channels == 3 and vit.seq_length == 8 * 8 + 1


def test_unknown_model_and_bad_options_list_choices():
    with pytest.raises(ValueError, match="baydin_mlp, baydin_cnn, fc, resnet18, vit"):
        build_model("lenet")
    with pytest.raises(ValueError, match="width"):
        build_model("baydin_mlp", width=3)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_with_bp_and_frog(name):
    """bp fills the autograd gradient; frog K=2 fills P∇f, so ⟨g, ∇f⟩ = ||g||² >= 0 (projection)."""
    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10, **({"width": 32} if name == "fc" else {}))
    model.train()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    parameters = [p for p in model.parameters()]
    closure = lambda: F.cross_entropy(model(x), y)
    # the reference gradient, from autograd (state_dict restored: BatchNorm buffers move in train mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = flat(torch.autograd.grad(closure(), parameters))
    model.load_state_dict(state)

    bp_loss = Backprop(model).backward(closure)
    assert torch.isfinite(bp_loss)
    torch.testing.assert_close(flat([p.grad for p in parameters]), reference, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)

    frog = ForwardGradient(model, num_tangents=2, aggregation="frog", seed=0)
    loss = frog.backward(closure)
    torch.testing.assert_close(loss, bp_loss, rtol=1e-5, atol=1e-6)  # same primal
    estimate = flat([p.grad for p in parameters])
    assert torch.isfinite(estimate).all() and estimate.norm() > 0
    torch.testing.assert_close(estimate @ reference, estimate @ estimate, rtol=2e-3, atol=1e-7)
    before = flat([p.detach().clone() for p in parameters])
    torch.optim.SGD(parameters, lr=0.1).step()
    torch.testing.assert_close(flat(parameters) - before, -0.1 * estimate)
