"""Peak memory of one FROG K=16 step on the Baydin MLP (batch 64): tangents stored vs regenerated.

Run: python docs/bench/stored_free_memory.py [cpu|cuda]. Prints MiB above the start of the
step (fwdgrad.train.profiling.PeakMemory; on the CPU with the bench's fixed mmap threshold).
"""

import sys

import torch
import torch.nn.functional as F

from fwdgrad import ForwardGradient
from fwdgrad.bench.benchmark import WORKLOADS, release_freed_memory_to_the_system
from fwdgrad.train.profiling import PeakMemory

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
if device.type == "cpu":
    release_freed_memory_to_the_system()
model, x, y = WORKLOADS["baydin_mlp_64"].build(device)
configurations = {
    "K=16, all tangents at once": dict(),
    "K=16, chunk_size=4, stored": dict(chunk_size=4, regenerate_tangents=False),
    "K=16, chunk_size=4, regenerated": dict(chunk_size=4),
    "K=16, chunk_size=1, regenerated": dict(chunk_size=1),
}
print(f"parameters: {sum(p.numel() for p in model.parameters()):,}; one tangent = "
      f"{sum(p.numel() for p in model.parameters()) * 4 / 2**20:.1f} MiB (float32)")
for name, options in configurations.items():
    fg = ForwardGradient(model, num_tangents=16, aggregation="frog", seed=0, **options)
    peaks = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with PeakMemory(device) as peak:
            fg.backward(lambda a, b: F.cross_entropy(model(a), b), x, y)
        peaks.append(peak.megabytes)
    print(f"{name:36s} peak {min(peaks):7.1f} MiB")
