"""The benchmark: ms per training step and peak memory of every method against backprop.

The workloads and the step of each method (:mod:`~fwdgrad.bench.benchmark`), and the same
on several processes (:mod:`~fwdgrad.bench.distributed`).

May import: torch, fwdgrad.core, fwdgrad.local, fwdgrad.train, fwdgrad.distributed.
"""
