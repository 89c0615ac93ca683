"""The estimator's execution paths, BatchNorm, attention, `fwdgrad bench` and `fwdgrad train` on every device.

Every test runs on ``"cpu"`` (in the default suite: it proves the test logic) and on ``"cuda"``
(marker ``cuda``, ``make test-cuda``; skipped where ``torch.cuda.is_available()`` is false).

Reference: autograd's gradient of a float64 copy of the model at the same point, so that
d_k = ∇f·v_k is (nearly) exact; the tangents v_k come from an identically seeded twin
estimator (``sample_tangents``). A float32 result may differ from it by float32 rounding:
|d_k - ∇f·v_k| <= rtol · Σ_i |v_ki| |∇f_i| with rtol = :func:`precision.dot_product_rtol`
(float32, n), the bound of an n-term dot product. TF32 (on by default for cuDNN
convolutions) rounds to 10 mantissa bits and is switched off here: these tests check float32.
"""

import copy
import csv
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import ForwardGradient
from fwdgrad.experiments import bench, train
from precision import dot_product_rtol
from test_activity import mlp as activity_mlp
from test_activity import per_sample_output_gradients
from test_fastpath import bn_cnn, exact_gradient, flat_tangents, mlp

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(),
                           reason="no CUDA device (torch.cuda.is_available() is False): the cuda variants need a GPU"),
    ]),
]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def full_float32_and_a_fresh_compiler():
    """No TF32 (float32 means float32 here) and no compiled graphs left over from another test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def attention_model():
    """One post-norm transformer encoder layer (multi-head self-attention via SDPA) and a linear head."""
    return nn.Sequential(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True),
        nn.Flatten(), nn.Linear(4 * 8, 3),
    )


MODELS = {"mlp": (mlp, (6, 1, 4, 4)), "bn_cnn": (bn_cnn, (5, 1, 8, 8)), "attention": (attention_model, (3, 4, 8))}


def setup(name, device, dtype, seed=0):
    """The model (train mode) and a batch on ``device`` in ``dtype``, and a float64 CPU copy of both."""
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model64 = make().double().train()
    x64 = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    model = copy.deepcopy(model64).to(device=device, dtype=dtype)
    return model, x64.to(device=device, dtype=dtype), y.to(device), model64, x64, y


def assert_float_close(got, exact, scale, dtype, length):
    """|got - exact| <= rtol(dtype, length) · scale elementwise: a bound from ``dtype``'s rounding."""
    rtol = dot_product_rtol(dtype, length)
    error = (got.detach().cpu().double() - exact).abs()
    bound = rtol * scale + torch.finfo(dtype).tiny
    assert bool((error <= bound).all()), f"max error / bound {float((error / bound).max()):.3g} (rtol {rtol:.3g})"


def check_directional_derivatives(fg, twin, model64, x64, y):
    """fg.last_directional_derivatives against the twin's tangents · autograd's float64 gradient."""
    tangents = flat_tangents(twin).cpu().double()  # (K, n)
    gradient = exact_gradient(copy.deepcopy(model64), x64, y)  # (n,)
    assert fg.last_directional_derivatives.shape == (tangents.shape[0],)
    assert_float_close(fg.last_directional_derivatives, tangents @ gradient, tangents.abs() @ gradient.abs(),
                       fg.dtype, tangents.shape[1])


def compile_on_cpu_quickly(fg, device):
    """On the CPU compile with aot_eager (Dynamo + AOTAutograd, no code generation): seconds, not tens."""
    if device == "cpu":
        fg.compile_options = {"backend": "aot_eager"}  # the instance's own setting; the class default stays
    return fg


# (ForwardGradient options, what the options must have selected)
EXECUTIONS = {
    "eager": (dict(mode="eager"), {"mode": "eager"}),
    "compiled": (dict(mode="compiled"), {"mode": "compiled"}),
    "auto": (dict(mode="auto"), {}),  # compiled on CUDA, fast on the CPU: checked in the test
    "fast": (dict(mode="fast"), {"mode": "fast"}),
    "rank1_factored": (dict(sampler="rank1", aggregation="frog"), {"factored": True}),
    "rank1_factored_fast": (dict(sampler="rank1", aggregation="frog", mode="fast"), {"factored": True, "mode": "fast"}),
    "chunked_regenerated": (dict(chunk_size=2, aggregation="frog"), {"regenerate_tangents": True}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_every_execution_mode_matches_autograd(device, dtype, execution):
    model, x, y, model64, x64, y64 = setup("mlp", device, dtype)
    options, selected = EXECUTIONS[execution]
    options = dict(num_tangents=5, seed=7, **options)
    fg = compile_on_cpu_quickly(ForwardGradient(model, **options), device)
    for attribute, value in selected.items():
        assert getattr(fg, attribute) == value, attribute
    loss_fn = lambda a, b: F.cross_entropy(model(a), b)  # the batch passed as inputs: what auto compiles
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # auto's silent fallback fails the test
        loss = fg.backward(loss_fn, x, y)
    if execution in ("compiled", "auto"):
        expected_mode = "compiled" if execution == "compiled" or device == "cuda" else "fast"
        assert fg.mode == expected_mode
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs >= 1) == (expected_mode == "compiled")  # really compiled (or really not)
    with torch.no_grad():
        expected_loss = F.cross_entropy(model64(x64), y64)
    assert_float_close(loss, expected_loss, expected_loss.abs(), dtype, 16)
    check_directional_derivatives(fg, ForwardGradient(model, **options), model64, x64, y64)
    # the update lands in .grad, on the device, in the parameters' dtype
    assert all(p.grad is not None and p.grad.device.type == device and p.grad.dtype == dtype
               for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "fast"])
def test_activity_perturbation_matches_autograd(device, dtype, mode):
    torch.manual_seed(0)
    model64 = activity_mlp()  # float64: LayerNorm (closed-form local derivative), PReLU (the vjp fallback)
    model = copy.deepcopy(model64).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=generator)
    x, y_device = x64.to(device=device, dtype=dtype), y.to(device)
    fg = ForwardGradient(model, num_tangents=5, perturbation="activity", seed=1, mode=mode)
    fg.backward(lambda: F.cross_entropy(model(x), y_device, reduction="none"))
    # d[k, b] = Σ_m ∇_{z_{m,b}} L_b · u_m[k, b], the per-sample output gradients by float64 autograd
    gradients = per_sample_output_gradients(model64, x64, y)
    tangents = [u.cpu().double() for u in fg.last_tangents]
    exact = sum((g.unsqueeze(0) * u).flatten(2).sum(-1) for g, u in zip(gradients, tangents))
    scale = sum((g.unsqueeze(0) * u).abs().flatten(2).sum(-1) for g, u in zip(gradients, tangents))
    assert fg.last_directional_derivatives.shape == (5, 4)
    assert_float_close(fg.last_directional_derivatives, exact, scale, dtype, sum(g[0].numel() for g in gradients))
    assert all(p.grad.device.type == device for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "compiled", "fast"])
def test_batch_norm_cnn_statistics_updated_once_per_step(device, dtype, mode):
    model, x, y, model64, x64, y64 = setup("bn_cnn", device, dtype)
    plain = copy.deepcopy(model)
    initial = copy.deepcopy(model[1].state_dict())
    fg = compile_on_cpu_quickly(ForwardGradient(model, num_tangents=3, seed=7, mode=mode), device)
    fg.backward(lambda a, b: F.cross_entropy(model(a), b), x, y)
    check_directional_derivatives(fg, ForwardGradient(model, num_tangents=3, seed=7), model64, x64, y64)
    with torch.no_grad():
        plain(x)  # one plain forward pass in train mode: the reference update of the running statistics
    for name in ("running_mean", "running_var"):
        got, expected = getattr(model[1], name), getattr(plain[1], name)
        count = x.shape[0] * 6 * 6  # values per channel behind each statistic
        assert_float_close(got, expected.cpu().double(), expected.abs().cpu().double() + 1, dtype, count)
        assert not torch.equal(expected, initial[name])  # the step did move them
    assert int(model[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
# compiling the attention layer takes ~10 s per dtype on a CPU: in `make test-all` and `make test-cuda`
@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow), "fast"])
def test_attention_model(device, dtype, mode):
    model, x, y, model64, x64, y64 = setup("attention", device, dtype)
    fg = compile_on_cpu_quickly(ForwardGradient(model, num_tangents=3, seed=7, mode=mode), device)
    fg.backward(lambda a, b: F.cross_entropy(model(a), b), x, y)
    assert fg.mode == mode
    check_directional_derivatives(fg, ForwardGradient(model, num_tangents=3, seed=7), model64, x64, y64)


# ---------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("device", DEVICES)
def test_bench_on_the_device(device, tmp_path):
    code = bench.main([
        f"device={device}", "workloads=[tiny_fc]", "methods=[fg,frog]", "ks=[1,4]", "repetitions=2", "warmup=1",
        "memory_steps=1", "plot=false", f"hydra.run.dir={tmp_path}",
    ])
    assert code == 0
    with open(tmp_path / "bench.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # bp first, fg for K = 1 and 4, frog for K = 4 (frog needs K >= 2), each eager and fast (the default modes)
    assert [(r["method"], r["K"], r["mode"]) for r in rows] == [("bp", "1", ""), *[
        (method, k, mode) for method, k in (("fg", "1"), ("fg", "4"), ("frog", "4")) for mode in ("eager", "fast")]]
    bp_ms = float(rows[0]["ms"])
    expected_device = torch.cuda.get_device_name(0) if device == "cuda" else f"({torch.get_num_threads()} threads)"
    for row in rows:
        assert row["error"] == "" and expected_device in row["device"]
        ms, peak = float(row["ms"]), float(row["peak_MB"])
        assert math.isfinite(ms) and ms > 0
        assert math.isfinite(peak) and (peak > 0 if device == "cuda" else peak >= 0)  # CUDA: allocations counted
        assert float(row["ms_ratio_bp"]) == pytest.approx(ms / bp_ms, rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_one_training_epoch_on_the_device(device, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main([
        f"device={device}", "model=fc", "model.width=16", "epochs=1", "max_steps_per_epoch=3", "progress=false",
        "tensorboard=false", "lr=0.1", f"run_dir={run_dir}",
    ]) == 0
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["device"] == device and summary["epochs_completed"] == 1
    if device == "cuda":
        assert summary["device_name"] == torch.cuda.get_device_name(0)
    else:
        assert summary["device_name"].endswith(f"({torch.get_num_threads()} threads)")
    assert math.isfinite(summary["final_train_loss"]) and 0 <= summary["test_accuracy_last"] <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eager", "fast"])
def test_local_losses_reuse_the_first_pass_on_the_device(device, mode):
    """ResNet-18's local step with the later passes reusing the first one's values (fwdgrad.local.reuse)
    gives the .grad of passes that compute everything (float64, the random-state check on the device's
    generator included: nothing here draws, so no block falls back)."""
    from fwdgrad import LocalForwardGradient
    from fwdgrad.train.models import build_model

    grads = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        model = build_model("resnet18", 3, 8, 10).double().to(device).train()
        estimator = LocalForwardGradient(model, "resnet18", (3, 8, 8), seed=0, group_size=4, mode=mode)
        if not reuse:
            estimator.replayed_blocks.update(range(len(estimator.blocks)))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator).to(device)
        y = torch.randint(0, 10, (4,), generator=generator).to(device)
        estimator.backward(x, y)
        assert not estimator.replayed_blocks or not reuse
        grads[reuse] = [p.grad.cpu() for p in [*model.parameters(), *estimator.auxiliary_parameters()]]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
