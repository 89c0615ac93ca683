"""Data parallel, weight space, Baydin MLP on mnist5k: are the processes' parameters bitwise
identical after 100 steps, and is a step's update the one-process update of the global batch?

    torchrun --standalone --nproc_per_node=2 docs/distributed/identical_ranks.py [steps]

For each estimator below, every process trains its shard of the same global batches (64
images: DistributedSampler(seed=0) strides, 32 per process) for ``steps`` SGD steps (lr 2e-4,
Baydin et al.'s), then all processes compare SHA-256 digests of their parameters. Before the
first step, rank 0 also computes the one-process update of the first global batch (the
same estimator arguments and seed, the whole batch) and reports the largest relative
difference of the two ``.grad`` (float32: the global loss is a reordered sum of the shard
losses). Printed by rank 0; ``bytes/step`` is what each process handed to the collectives.
"""

import copy
import hashlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from fwdgrad import ForwardGradient
from fwdgrad.distributed.parallel import DataParallel
from fwdgrad.distributed.run import shutdown
from fwdgrad.experiments.cli import exit_process
from fwdgrad.train.data import load_dataset
from fwdgrad.train.models import build_model

ESTIMATORS = {
    "fg K=1 (normal)": dict(num_tangents=1),
    "fg-mean K=16 (normal)": dict(num_tangents=16),
    "frog K=16 (rank1, factored)": dict(num_tangents=16, aggregation="frog", sampler="rank1"),
    "frog K=16 (normal, chunks of 4 regenerated)": dict(num_tangents=16, aggregation="frog", chunk_size=4),
}


def digest(model) -> str:
    hasher = hashlib.sha256()
    for tensor in model.state_dict().values():
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main(steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    splits = load_dataset("mnist5k")
    sampler = DistributedSampler(splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(splits.train, batch_size=64 // world_size, sampler=sampler, drop_last=True)
    # the first global batch, for the one-process reference: the union of the shards, in sampler order
    first_indices = list(iter(DistributedSampler(splits.train, num_replicas=1, rank=0, shuffle=True, seed=0)))[:64]
    x_all = torch.stack([splits.train[i][0] for i in first_indices])
    y_all = torch.tensor([splits.train[i][1] for i in first_indices])
    for name, options in ESTIMATORS.items():
        torch.manual_seed(0)
        model = build_model("baydin_mlp", 1, 28, 10)
        reference = copy.deepcopy(model)
        fg = DataParallel(ForwardGradient(model, seed=0, **options))
        optimizer = torch.optim.SGD(model.parameters(), lr=2e-4)
        difference = None
        done = 0
        epoch = 0
        while done < steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                fg.backward(lambda: F.cross_entropy(model(x), y))
                if done == 0 and rank == 0:
                    single = ForwardGradient(reference, seed=0, **options)
                    single.backward(lambda: F.cross_entropy(reference(x_all), y_all))
                    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
                    difference = float((got - want).abs().max() / want.abs().max())
                optimizer.step()
                done += 1
                if done == steps:
                    break
            epoch += 1
        digests = [None] * world_size
        dist.all_gather_object(digests, digest(model))
        if rank == 0:
            verdict = "identical" if len(set(digests)) == 1 else "DIFFERENT"
            print(f"{name}: {steps} steps on {world_size} processes, parameters {verdict} ({', '.join(digests)}); "
                  f"first step vs one process: max |Δgrad| / max |grad| = {difference:.2e}; "
                  f"bytes/step/process = {fg.bytes_per_step:.0f} ({fg.counter.per_step()})", flush=True)
    # as fwdgrad's own torchrun workers end: a barrier before the group goes, then no interpreter teardown
    # (after a gloo run it aborts now and then, SIGABRT, and torchrun reports the launch failed)
    shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
    exit_process(0)
