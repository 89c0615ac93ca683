"""fwdgrad.distributed.parallel on 2 gloo processes (CPU), against single-process references.

References: the single-process estimator with the same arguments and seed on the global
batch (for a BatchNorm network: a closure that normalizes each shard with its own
statistics, the data-parallel definition) and, independently, autograd: d = V ∇f with V
the tangents an identically seeded twin draws.

One 2-process group (``distributed_workers.run_processes``), started once for the module,
computes every case of every test (fixture ``two_processes``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from distributed_workers import (
    bytes_per_step,
    data_parallel_training,
    data_parallel_updates,
    failing_process,
    flat_grad,
    local_losses_training,
    problem,
    run_all,
    run_processes,
    sgd_steps,
    shards,
    tangent_parallel_updates,
)
from fwdgrad import Backprop, ForwardGradient
from fwdgrad.distributed.parallel import DataParallel, TangentParallel, tangent_ranges

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STRATEGIES = {  # execution strategies of the weight space
    "stored": dict(sampler="normal"),
    "regenerated": dict(sampler="normal", chunk_size=2),
    "factored": dict(sampler="rank1"),
}
DATA_PARALLEL = {
    f"{name}-{aggregation}-{strategy}": (name, dict(num_tangents=5, aggregation=aggregation, **options), [4, 4])
    for name in ("mlp", "bn_cnn") for aggregation in ("mean", "frog") for strategy, options in STRATEGIES.items()
}
DATA_PARALLEL["mlp-frog-unequal"] = ("mlp", dict(num_tangents=5, aggregation="frog"), [5, 3])


def shard_closure(model, x, y, sizes):
    """The global mean loss as data parallelism defines it: Σ_r (n_r / N) f_r, every shard
    through the model on its own (BatchNorm normalizes each shard with its own statistics)."""
    parts = shards(x, y, sizes)
    return lambda: sum(len(y_r) * F.cross_entropy(model(x_r), y_r) for x_r, y_r in parts) / len(y)


def reference_update(name, options, sizes):
    """One process, the same estimator arguments and seed, the data-parallel loss."""
    model, x, y = problem(name)
    fg = ForwardGradient(model, seed=7, **options)
    loss = fg.backward(shard_closure(model, x, y, sizes))
    return flat_grad(model), fg.last_directional_derivatives, loss


def autograd_directional_derivatives(name, options, sizes):
    """V ∇f: the twin's tangents (the same seed) times autograd's gradient of the same loss."""
    model, x, y = problem(name)
    twin = ForwardGradient(copy.deepcopy(model), seed=7, **options)
    tangents = torch.cat([t.reshape(t.shape[0], -1) for t in twin.sample_tangents()], dim=1)
    loss = shard_closure(model, x, y, sizes)()
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    return tangents @ gradient


TRAINING = {"mlp-frog-rank1": ("mlp", dict(num_tangents=4, aggregation="frog", sampler="rank1")),
            "bn_cnn-mean-normal": ("bn_cnn", dict(num_tangents=2, sampler="normal")),
            "bn_cnn-frog-regenerated": ("bn_cnn", dict(num_tangents=4, aggregation="frog", chunk_size=2))}

TANGENT_PARALLEL = {
    f"{aggregation}-{strategy}": ("mlp", dict(num_tangents=6, aggregation=aggregation, **options), torch.float64, 1)
    for aggregation in ("mean", "frog") for strategy, options in STRATEGIES.items()
}
TANGENT_PARALLEL["bn_cnn-frog-factored"] = ("bn_cnn", dict(num_tangents=6, aggregation="frog", sampler="rank1"),
                                            torch.float64, 1)
TANGENT_PARALLEL["float32-frog-factored-5-steps"] = ("mlp", dict(num_tangents=8, aggregation="frog", sampler="rank1"),
                                                     torch.float32, 5)
BYTES = {f"{kind}-{name}-K{k}": (kind, name, k)
         for kind in ("data", "tangent") for name in ("mlp", "wide_mlp") for k in (2, 16)}
BYTES.update({f"{kind}-{name}": (kind, name, 4) for kind in ("bp", "activity") for name in ("mlp", "wide_mlp")})


@pytest.fixture(scope="module")
def two_processes():
    """Every case below, computed by one group of 2 processes: ``[rank 0's, rank 1's]`` results."""
    tasks = {"data_parallel": (data_parallel_updates, (DATA_PARALLEL,)),
             "training": (data_parallel_training, (TRAINING, 20)),
             "tangent_parallel": (tangent_parallel_updates, (TANGENT_PARALLEL,)),
             "bytes": (bytes_per_step, (BYTES,)),
             "failing": (failing_process, ()),
             "local": (local_losses_training, (3,))}
    return run_processes(run_all, 2, tasks)


@pytest.fixture(scope="module")
def data_parallel(two_processes):
    return [result["data_parallel"] for result in two_processes]


@pytest.mark.parametrize("key", DATA_PARALLEL)
def test_data_parallel_two_processes_give_the_one_process_update(data_parallel, key):
    name, options, sizes = DATA_PARALLEL[key]
    grad, d, loss = reference_update(name, options, sizes)
    for rank in range(2):
        result = data_parallel[rank][key]
        torch.testing.assert_close(result["grad"], grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result["d"], d, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result["loss"], loss, rtol=1e-12, atol=0)
    # independently of the estimator: d_k = ∇f·v_k by autograd
    torch.testing.assert_close(data_parallel[0][key]["d"], autograd_directional_derivatives(name, options, sizes),
                               rtol=1e-9, atol=1e-12)
    assert torch.equal(data_parallel[0][key]["grad"], data_parallel[1][key]["grad"])


def test_data_parallel_averages_batch_norm_running_statistics(data_parallel):
    """buffers="average": both processes hold the mean of the statistics each shard alone gives."""
    name, options, sizes = DATA_PARALLEL["bn_cnn-mean-stored"]
    model, x, y = problem(name)
    alone = []
    for x_r, _ in shards(x, y, sizes):
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            copy_(x_r)  # one training-mode forward pass: the shard's running statistics
        alone.append([b for b in copy_.buffers() if b.is_floating_point()])
    expected = [(a + b) / 2 for a, b in zip(*alone)]
    for rank in range(2):
        got = [b for b in data_parallel[rank]["bn_cnn-mean-stored"]["buffers"] if b.is_floating_point()]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
    assert not torch.equal(alone[0][0], alone[1][0])  # the shards' own statistics differ


@pytest.fixture(scope="module")
def training(two_processes):
    first, second = (result["training"] for result in two_processes)
    return {key: (first[key], second[key]) for key in TRAINING}


@pytest.mark.parametrize("key", TRAINING)
def test_data_parallel_processes_stay_bitwise_identical_for_20_steps(training, key):
    first, second = training[key]
    for name, tensor in first["final"].items():
        assert torch.equal(tensor, second["final"][name]), name
        if tensor.is_floating_point():
            assert not torch.equal(tensor, first["initial"][name]), f"{name} never changed"


def test_local_losses_heads_start_from_rank_0_and_learn_from_the_global_batch(two_processes):
    """LocalForwardGradient under DataParallel: the heads (auxiliary parameters, outside the model)
    are broadcast and their .grad all-reduced like the model's, so processes stay identical."""
    from fwdgrad import LocalForwardGradient

    first, second = (result["local"] for result in two_processes)
    for part in ("model", "heads"):
        for name, tensor in first["final"][part].items():
            assert torch.equal(tensor, second["final"][part][name]), f"{part}.{name} differs between the processes"
            assert not torch.equal(tensor, first["initial"][part][name]), f"{part}.{name} never changed"
    # the first step's head gradient: the mean over the shards of each shard's exact head gradient,
    # computed here in one process from rank 0's initial state
    expected = []
    for result in (first, second):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3)).double()
        model.load_state_dict(first["initial"]["model"])
        local = LocalForwardGradient(model, [[0, 1, 2], [3]], input_shape=(12,), num_classes=3, seed=5, group_size=2)
        local.heads.double()
        local.heads.load_state_dict(first["initial"]["heads"])
        x, y = result["batches"][0]
        local.backward(x, y)
        expected.append([p.grad for p in local.heads.parameters()])
    for got_0, got_1, e_0, e_1 in zip(first["head_grads"], second["head_grads"], *expected):
        torch.testing.assert_close(got_0, (e_0 + e_1) / 2, rtol=1e-12, atol=1e-15)
        assert torch.equal(got_0, got_1)
    heads_size = sum(t.numel() for t in first["initial"]["heads"].values())
    model_size = sum(t.numel() for t in first["initial"]["model"].values())
    assert first["bytes"]["gradients"] == 8 * (model_size + heads_size)  # float64 .grad of both


@pytest.fixture(scope="module")
def tangent_parallel(two_processes):
    return [result["tangent_parallel"] for result in two_processes]


@pytest.mark.parametrize("key", TANGENT_PARALLEL)
def test_tangent_parallel_gives_the_one_process_update(tangent_parallel, key):
    name, options, dtype, steps = TANGENT_PARALLEL[key]
    model, x, y = problem(name, dtype=dtype)
    fg = ForwardGradient(model, seed=11, **options)
    grad = sgd_steps(fg, model, x, y, steps)
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)
    ranges = [tangent_parallel[rank][key]["range"] for rank in range(2)]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == options["num_tangents"]
    for rank in range(2):
        torch.testing.assert_close(tangent_parallel[rank][key]["grad"], grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(tangent_parallel[rank][key]["d"], fg.last_directional_derivatives, rtol=rtol,
                                   atol=atol)
    for tensor_name, tensor in tangent_parallel[0][key]["final"].items():
        assert torch.equal(tensor, tangent_parallel[1][key]["final"][tensor_name]), tensor_name
    if dtype == torch.float64:
        torch.testing.assert_close(tangent_parallel[0][key]["d"], autograd_tangent_parallel_reference(name, options),
                                   rtol=1e-9, atol=1e-12)


def autograd_tangent_parallel_reference(name, options):
    model, x, y = problem(name)
    twin = ForwardGradient(copy.deepcopy(model), seed=11, **options)
    tangents = torch.cat([t.reshape(t.shape[0], -1) for t in twin.sample_tangents()], dim=1)
    loss = F.cross_entropy(model(x), y)
    return tangents @ torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.fixture(scope="module")
def communication(two_processes):
    return [result["bytes"] for result in two_processes]


@pytest.mark.parametrize("kind", ["data", "tangent"])
def test_weight_space_bytes_are_O_of_K_whatever_the_number_of_parameters(communication, kind):
    """Data parallel: 8 (K + 1) for d and N, 8 for the loss; tangent parallel: 8 K / W.
    The same for a model with 399 and one with 29,051 parameters."""
    small, wide = communication[0][f"{kind}-mlp-K2"], communication[0][f"{kind}-wide_mlp-K2"]
    assert wide["parameters"] > 30 * small["parameters"]
    for k in (2, 16):
        expected = 8 * k + 16 if kind == "data" else 8 * k // 2
        for name in ("mlp", "wide_mlp"):
            for rank in range(2):
                assert communication[rank][f"{kind}-{name}-K{k}"]["total"] == expected


@pytest.mark.parametrize("kind", ["bp", "activity"])
def test_gradient_all_reduce_bytes_are_4P(communication, kind):
    """Backprop under DistributedDataParallel and activity perturbation send every gradient entry
    (float32: 4 P bytes) and 2 float64 (N, the loss); the gradients end equal on both processes."""
    for name in ("mlp", "wide_mlp"):
        result = communication[0][f"{kind}-{name}"]
        assert result["per_step"]["gradients"] == 4 * result["parameters"]
        assert result["per_step"]["loss"] == 16
        assert torch.equal(result["grad"], communication[1][f"{kind}-{name}"]["grad"])


def test_activity_processes_draw_their_own_per_sample_tangents(communication):
    """Per-sample tangents: every process its own (from the shared step seed and its rank), not
    the same tangents for the samples of every shard."""
    first, second = (communication[rank]["activity-mlp"]["tangents"] for rank in range(2))
    assert first.shape == second.shape and not torch.equal(first, second)


def test_backprop_under_ddp_is_the_gradient_of_the_global_batch(communication):
    model, x, y = problem("mlp", dtype=torch.float32)
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(communication[0]["bp-mlp"]["grad"], flat_grad(model), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["data", "activity", "tangent"])
def test_a_process_that_fails_before_the_collective_stops_every_process(two_processes, mode):
    """Rank 1's loss is NaN: it raises its own error, rank 0 learns it from the collective (NaN)
    and raises too, instead of waiting for rank 1 until the timeout."""
    first, second = (result["failing"][mode] for result in two_processes)
    assert "loss is not finite (nan)" in second
    assert "not finite" in first and "on at least one process" in first


def test_tangent_ranges_split_the_tangents_and_refuse_too_few():
    model, _, _ = problem("mlp")
    assert tangent_ranges(ForwardGradient(model, num_tangents=10, seed=0), 3) == [(0, 3), (3, 6), (6, 10)]
    chunked = ForwardGradient(model, num_tangents=8, chunk_size=2, seed=0)  # 4 regenerated chunks
    assert chunked.regenerate_tangents
    assert tangent_ranges(chunked, 3) == [(0, 2), (2, 6), (6, 8)]  # whole chunks
    with pytest.raises(ValueError, match="num_tangents=2 < world size 4"):
        tangent_ranges(ForwardGradient(model, num_tangents=2, seed=0), 4)
    with pytest.raises(ValueError, match="3 chunks .* for 4 processes"):
        tangent_ranges(ForwardGradient(model, num_tangents=6, chunk_size=2, seed=0), 4)


@pytest.fixture
def one_process_group(tmp_path):
    """A process group of this process alone (gloo), for what the wrappers refuse."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_wrappers_refuse_what_cannot_work(one_process_group):
    model, _, _ = problem("mlp")
    with pytest.raises(ValueError, match="needs an estimator built with seed=<int>"):
        DataParallel(ForwardGradient(model, num_tangents=2))
    with pytest.raises(ValueError, match="tangent parallelism splits weight-space tangents"):
        TangentParallel(ForwardGradient(model, num_tangents=2, seed=0, perturbation="activity"))
    with pytest.raises(ValueError, match="DataParallel\\(Backprop\\(...\\)\\) needs module="):
        DataParallel(Backprop(model))
    with pytest.raises(ValueError, match="unknown buffers mode 'sync'; valid choices: average, broadcast, local"):
        DataParallel(ForwardGradient(model, seed=0), buffers="sync")


def test_wrappers_need_a_process_group():
    model, _, _ = problem("mlp")
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        DataParallel(ForwardGradient(model, seed=0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices (NCCL, one process per GPU)")
def test_nccl_two_gpus_give_the_one_gpu_update():
    from distributed_workers import cuda_updates

    results = run_processes(cuda_updates, 2, backend="cpu:gloo,cuda:nccl")
    for key in ("data", "tangent"):
        model, x, y = problem("mlp")
        model, x, y = model.to("cuda:0"), x.to("cuda:0"), y.to("cuda:0")
        options = dict(num_tangents=6, aggregation="frog", sampler="rank1" if key == "tangent" else "normal")
        fg = ForwardGradient(model, seed=5, **options)
        closure = shard_closure(model, x, y, [4, 4]) if key == "data" else (lambda: F.cross_entropy(model(x), y))
        fg.backward(closure)
        for rank in range(2):
            torch.testing.assert_close(results[rank][key], flat_grad(model).cpu(), rtol=1e-9, atol=1e-12)
