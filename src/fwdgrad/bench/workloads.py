"""The benchmark's workloads (a zoo model on a batch of random images) and one step of each method.

A *step* is what a training loop pays per batch: ``.grad`` reset
(``zero_grad(set_to_none=True)``), tangents drawn, loss and directional derivatives (or the
backward pass), the update written into ``.grad``, and ``optimizer.step()`` of plain SGD
(with lr 0, so the weights stay put while the arithmetic runs): the same unit as
``ms_per_step`` of ``fwdgrad train`` (:class:`fwdgrad.train.trainer.Trainer`). Methods:

- ``bp``: eager backprop, :class:`fwdgrad.Backprop` (``loss.backward()``).
- ``bp_compiled``: backprop through ``torch.compile(model)``.
- ``fg``: :class:`fwdgrad.ForwardGradient`, aggregation ``mean`` (K = 1: Baydin et al.'s
  g = (∇f·v) v), for each K, execution mode (``eager``, ``compiled``, ``fast``, ``auto``)
  and sampler asked for.
- ``frog``: the same with the orthogonal projection (K >= 2).
- ``fg_activity`` / ``frog_activity``: the same two with tangents on the layer outputs
  (:class:`fwdgrad.ActivityForwardGradient`, per-sample tangents; a model with BatchNorm in
  training mode gives an error row: activity perturbation refuses it).
- ``seed_jvp``: baseline, orobix/fwdgrad's technique re-implemented: one
  ``torch.func.jvp`` over ``torch.func.functional_call`` per step, N(0, I) tangents from
  ``torch.randn_like`` per parameter, K = 1.
- ``dual_loop``: baseline, the FROG repo's true forward-mode path re-implemented:
  ``torch.autograd.forward_ad`` dual numbers, one forward pass per tangent, g = mean_k d_k v_k.
- ``local_fg``: local losses, :class:`fwdgrad.LocalForwardGradient` with the workload's
  model-zoo blocks and the ``local_fg`` configuration ``fwdgrad compare`` uses on that model
  (:func:`local_fg_options`: :data:`LOCAL_FG`, groups of 4, changed per model by
  :data:`LOCAL_FG_BY_MODEL`), for each K and sampler; its heads are in the optimizer step.
- ``local_fg_plain``: the same with :data:`LOCAL_FG` on every model (groups of 4, linear heads on
  globally pooled features, no patches): the cheapest local losses, whatever compare uses.

Only torch is imported here; :func:`fwdgrad.train.models.build_model` is looked up when a
workload is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fwdgrad.core.estimators import Backprop, ForwardGradient
from fwdgrad.local.estimator import LocalForwardGradient


@dataclass(frozen=True)
class Workload:
    """A model of :mod:`fwdgrad.train.models` on random images ``(batch, channels, size, size)``."""

    model: str
    batch: int
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    options: dict = field(default_factory=dict)

    def build(self, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        from fwdgrad.train.models import build_model  # lazily: the model zoo is not needed to import this

        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model(self.model, self.channels, self.image_size, self.num_classes, **self.options)
        x = torch.randn(self.batch, self.channels, self.image_size, self.image_size, generator=generator)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=generator)
        return model.to(device).train(), x.to(device), y.to(device)


WORKLOADS: dict[str, Workload] = {
    "baydin_mlp_64": Workload("baydin_mlp", 64),
    "baydin_mlp_256": Workload("baydin_mlp", 256),
    "baydin_mlp_1024": Workload("baydin_mlp", 1024),
    "baydin_cnn_64": Workload("baydin_cnn", 64),
    "fc4096_256": Workload("fc", 256, options={"width": 4096}),
    "resnet18_256": Workload("resnet18", 256, channels=3, image_size=32),
    "resnet18_32": Workload("resnet18", 32, channels=3, image_size=32),  # CPU-sized
    "vit_128": Workload("vit", 128),
    # for tests and smoke runs
    "tiny_fc": Workload("fc", 8, image_size=8, options={"width": 16}),
}
METHODS = ("bp", "bp_compiled", "fg", "frog", "fg_activity", "frog_activity", "seed_jvp", "dual_loop", "local_fg",
           "local_fg_plain")
LOCAL_METHODS = ("local_fg", "local_fg_plain")
# the local_fg configuration of conf/compare.yaml (besides K and the sampler), and the gradient keys its
# per-model entries (method_configs.local_fg.models.<model>) change: tests/test_bench.py checks that they agree
LOCAL_FG = {"group_size": 4, "last_group_size": 1}
LOCAL_FG_BY_MODEL = {
    "baydin_cnn": {"group_size": 1, "patches": 28, "head": "conv", "head_pool": 2},
    "resnet18": {"group_size": 1, "patches": 28, "head": "conv", "head_pool": 2},
    "vit": {"group_size": 1, "patches": 50},
    "localmixer": {"group_size": 32},
}


def local_fg_options(model_name: str) -> dict:
    """The ``local_fg`` row's LocalForwardGradient options for a zoo model: compare's configuration for it."""
    return {**LOCAL_FG, **LOCAL_FG_BY_MODEL.get(model_name, {})}


def _assemble(parameters: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], derivatives: torch.Tensor):
    """p.grad = mean_k d_k v_k, as the reference codes write it (baselines only)."""
    for parameter, tangent in zip(parameters, tangents):
        parameter.grad = torch.einsum("k,k...->...", derivatives, tangent) / derivatives.numel()


def make_step(
    method: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_tangents: int = 1,
    mode: str = "eager",
    sampler: str = "normal",
    model_name: str | None = None,
) -> Callable[[], object]:
    """One training step of ``method`` (see the module docstring) as a no-argument callable:
    the method's gradient, then ``optimizer.step()`` of SGD with lr 0. ``model_name``: the
    model-zoo name (``local_fg``'s blocks)."""
    if method in LOCAL_METHODS:
        options = local_fg_options(model_name) if method == "local_fg" else LOCAL_FG
        return _local_step(model, x, y, num_tangents, sampler, model_name, mode, options)
    gradient = _gradient_step(method, model, x, y, num_tangents, mode, sampler)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        loss = gradient()
        optimizer.step()
        return loss

    return step


def _local_step(model, x, y, num_tangents, sampler, model_name, mode, options) -> Callable[[], object]:
    estimator = LocalForwardGradient(model, model_name, tuple(x.shape[1:]), num_tangents=num_tangents,
                                     sampler=sampler, seed=0, mode=mode, **options)
    parameters = [p for p in model.parameters() if p.requires_grad] + estimator.auxiliary_parameters()
    optimizer = torch.optim.SGD(parameters, lr=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = estimator.backward(x, y)
        optimizer.step()
        return loss

    return step


def _gradient_step(method, model, x, y, num_tangents, mode, sampler) -> Callable[[], object]:
    """zero_grad and ``method``'s gradient in ``.grad``, as a no-argument callable."""
    parameters = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(inputs, targets):
        return F.cross_entropy(model(inputs), targets)

    if method == "bp":
        estimator = Backprop(model)

        def step():
            model.zero_grad(set_to_none=True)
            return estimator.backward(loss_fn, x, y)

        return step
    if method == "bp_compiled":
        compiled = torch.compile(model)

        def step():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        return step
    if method in ("fg", "frog", "fg_activity", "frog_activity"):
        aggregation = "orthogonal_projection" if method.startswith("frog") else "mean"
        perturbation = "activity" if method.endswith("_activity") else "weight"
        estimator = ForwardGradient(model, num_tangents=num_tangents, aggregation=aggregation, sampler=sampler, seed=0,
                                    mode=mode, perturbation=perturbation)

        def step():
            model.zero_grad(set_to_none=True)
            if perturbation == "activity":  # per-sample losses, the batch captured
                return estimator.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
            return estimator.backward(loss_fn, x, y)

        return step
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())

    def functional_loss(params):
        return F.cross_entropy(torch.func.functional_call(model, ({**buffers, **params},), (x,)), y)

    if method == "seed_jvp":

        def step():
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                primals = {name: p.detach() for name, p in zip(names, parameters)}
                tangents = {name: torch.randn_like(p) for name, p in primals.items()}
                loss, derivative = torch.func.jvp(functional_loss, (primals,), (tangents,))
                _assemble(parameters, [t.unsqueeze(0) for t in tangents.values()], derivative.reshape(1))
            return loss

        return step
    if method == "dual_loop":
        import torch.autograd.forward_ad as forward_ad

        def step():
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                tangents = [torch.randn((num_tangents, *p.shape), device=p.device, dtype=p.dtype) for p in parameters]
                derivatives = []
                for k in range(num_tangents):
                    with forward_ad.dual_level():
                        duals = {
                            name: forward_ad.make_dual(p.detach(), t[k])
                            for name, p, t in zip(names, parameters, tangents)
                        }
                        derivatives.append(forward_ad.unpack_dual(functional_loss(duals)).tangent)
                _assemble(parameters, tangents, torch.stack(derivatives))

        return step
    raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
