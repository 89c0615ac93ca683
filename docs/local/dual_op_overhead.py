"""The fixed cost of one elementwise op on a forward-mode dual tensor (torch.autograd.forward_ad).

    python docs/local/dual_op_overhead.py

For n = 4 .. 2^20 entries: one multiplication of a dual tensor (primal and tangent) against two
plain multiplications (the same arithmetic), 1 thread, mean of 100. Why
fwdgrad.local.execution makes a site's output dual with make_dual instead of adding a
differentiated zero (one more such op per site).
"""

import time

import torch
import torch.autograd.forward_ad as forward_ad

torch.set_num_threads(1)
for n in (4, 4096, 65536, 1 << 20):
    x, primal, tangent = torch.randn(n), torch.zeros(n), torch.randn(n)
    with torch.no_grad(), forward_ad.dual_level():
        dual = forward_ad.make_dual(primal, tangent)
        dual * x
        start = time.perf_counter()
        for _ in range(100):
            dual * x
        dual_us = (time.perf_counter() - start) / 100 * 1e6
        start = time.perf_counter()
        for _ in range(100):
            primal * x
            tangent * x
        plain_us = (time.perf_counter() - start) / 100 * 1e6
    print(f"n = {n:8d}: dual {dual_us:8.1f} us, two plain ops {plain_us:8.1f} us")
