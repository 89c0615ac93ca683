"""Blocks for local losses: a model cut into pieces that run one after another.

Local losses (:mod:`fwdgrad.local.estimator`) train each block of a model on its own loss, with
the block's input detached, so no derivative crosses a block boundary. A block here is a
:class:`Block`: a name, a function from the previous block's output to this block's
output, and the modules whose parameters it owns. Running the blocks in order must
compute ``model(x)``; :func:`resolve_blocks` checks that every trainable parameter
belongs to exactly one block.

Ways to give the blocks (:func:`resolve_blocks`):

- a model-zoo name (:data:`ZOO_SPLITS`), for the models of :mod:`fwdgrad.train.models`:

  - ``baydin_mlp``, ``fc``: [Flatten, Linear, ReLU], [Linear, ReLU], [Linear];
  - ``baydin_cnn``: [Conv, ReLU], [Conv, ReLU], [MaxPool, Conv, ReLU], [Conv, ReLU],
    [MaxPool, Flatten, Linear, ReLU], [Linear] (a pool opens the next block, so that each
    block's one layer outputs the block's shape);
  - ``resnet18``: the stem [conv1, bn1, ReLU], each of the 8 BasicBlocks, [avgpool, fc];
  - ``vit``: the patch embedding [conv_proj, class token, position embedding], each
    encoder layer, [final LayerNorm, class token, head];
  - ``localmixer``: [patches, block 1], each later LocalMixer block, [readout] (Ren et
    al.'s split: one local loss per block; :mod:`fwdgrad.train.localmixer`);

- a list whose entries are each one block: a module name (``"layer1.0"``), a slice of an
  ``nn.Sequential`` model (``"0:3"``, ``"5:"``), a list of module names run in order
  (``["conv1", "bn1", "relu"]``), an ``nn.Module`` whose parameters are the model's, or a
  :class:`Block`.

Also here: :func:`constant_batch_statistics`, how BatchNorm in training mode runs inside
a forward-mode pass (the batch statistics are constants), and :func:`update_running_statistics`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ZOO_SPLITS = ("baydin_mlp", "fc", "baydin_cnn", "resnet18", "vit", "localmixer")
_SLICE = re.compile(r"(-?\d*):(-?\d*)")


@dataclass
class Block:
    """One block: ``forward(h)`` maps the previous block's output (the input for the first) to
    this block's output; ``modules`` are the modules whose parameters the block trains."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]

    def parameters(self) -> list[torch.Tensor]:
        seen, result = set(), []
        for module in self.modules:
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    result.append(parameter)
        return result


def _run_in_order(modules: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(h: torch.Tensor) -> torch.Tensor:
        for module in modules:
            h = module(h)
        return h

    return forward


class _TokenEmbedding(nn.Module):
    """The ViT's class token and position embedding as one module (a perturbation site):
    tokens (B, T-1, D) -> dropout(cat(class token, tokens) + position embedding) (B, T, D)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        class_token = self.class_token.expand(tokens.shape[0], -1, -1)
        return self.dropout(torch.cat([class_token, tokens], dim=1) + self.pos_embedding)


def zoo_blocks(model: nn.Module, name: str) -> list[Block]:
    """The block split of a model of :mod:`fwdgrad.train.models` built as ``name`` (see the module docstring)."""
    if name not in ZOO_SPLITS:
        raise ValueError(f"unknown model-zoo block split {name!r}; valid choices: {', '.join(ZOO_SPLITS)}")
    if name in ("baydin_mlp", "fc"):
        return [_slice_block(model, spec) for spec in ("0:3", "3:5", "5:")]
    if name == "baydin_cnn":
        return [_slice_block(model, spec) for spec in ("0:2", "2:4", "4:7", "7:9", "9:13", "13:")]
    if name == "resnet18":
        stem = (model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [Block("stem", _run_in_order(stem), stem)]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for index, basic_block in enumerate(getattr(model, layer)):
                blocks.append(Block(f"{layer}.{index}", basic_block, (basic_block,)))
        blocks.append(Block("avgpool+fc", lambda h: model.fc(torch.flatten(model.avgpool(h), 1)),
                            (model.avgpool, model.fc)))
        return blocks
    if name == "localmixer":
        first = model.blocks[0]
        blocks = [Block("patches+blocks.0", lambda x: first(model.patches(x)), (model.patches, first))]
        blocks += [Block(f"blocks.{index}", block, (block,)) for index, block in enumerate(model.blocks) if index]
        return [*blocks, Block("readout", model.readout, (model.readout,))]
    tokens = _TokenEmbedding(model)
    blocks = [Block("embedding", lambda x: tokens(model._process_input(x)), (model.conv_proj, tokens))]
    for layer_name, layer in model.encoder.layers.named_children():
        blocks.append(Block(f"encoder.layers.{layer_name}", layer, (layer,)))
    blocks.append(Block("ln+head", lambda h: model.heads(model.encoder.ln(h)[:, 0]),
                        (model.encoder.ln, model.heads)))
    return blocks


def _slice_block(model: nn.Module, spec: str) -> Block:
    match = _SLICE.fullmatch(spec)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"blocks: the slice {spec!r} needs an nn.Sequential model, got {type(model).__name__}; "
                         "give module names instead")
    start, stop = (int(part) if part else None for part in match.groups())
    modules = tuple(model[start:stop])
    if not modules:
        raise ValueError(f"blocks: the slice {spec!r} of a Sequential of {len(model)} modules is empty")
    return Block(spec, _run_in_order(modules), modules)


def _names_hint(named: dict[str, nn.Module]) -> str:
    names = [name for name in named if name]
    return ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")


def _named_block(model: nn.Module, named: dict[str, nn.Module], names: Sequence[str]) -> Block:
    # a YAML list like [0, 1, 2] gives integers: nn.Sequential's module names
    names = [str(name) if isinstance(name, int) and not isinstance(name, bool) else name for name in names]
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"blocks: a block's module names must be strings, got {name!r}")
        if name not in named or not name:
            raise ValueError(f"blocks: unknown module name {name!r}; valid names: {_names_hint(named)}")
    modules = tuple(named[name] for name in names)
    return Block("+".join(names), modules[0] if len(modules) == 1 else _run_in_order(modules), modules)


def resolve_blocks(model: nn.Module, blocks) -> list[Block]:
    """The :class:`Block` list of ``blocks`` (see the module docstring) for ``model``.

    Raises:
        ValueError: an unknown zoo name or module name, an empty slice, or a block list that
            does not give every trainable parameter of ``model`` to exactly one block (the
            message names the parameters).
    """
    named = dict(model.named_modules())
    if isinstance(blocks, str):
        if blocks not in ZOO_SPLITS:
            raise ValueError(f"blocks: unknown model-zoo split {blocks!r}; valid choices: {', '.join(ZOO_SPLITS)}, "
                             "or a list of blocks (module names, 'i:j' slices of an nn.Sequential, lists of names)")
        result = zoo_blocks(model, blocks)
    else:
        if blocks is None or not isinstance(blocks, Sequence) or len(blocks) == 0:
            raise ValueError(f"blocks must be a model-zoo name ({', '.join(ZOO_SPLITS)}) or a non-empty list of "
                             f"blocks, got {blocks!r}")
        result = []
        for entry in blocks:
            if isinstance(entry, Block):
                result.append(entry)
            elif isinstance(entry, nn.Module):
                name = next((n for n, m in named.items() if m is entry), f"block {len(result)}")
                result.append(Block(name, entry, (entry,)))
            elif isinstance(entry, str) and _SLICE.fullmatch(entry):
                result.append(_slice_block(model, entry))
            elif isinstance(entry, (str, int)) and not isinstance(entry, bool):
                result.append(_named_block(model, named, [entry]))
            elif isinstance(entry, Sequence) and entry:
                result.append(_named_block(model, named, list(entry)))
            else:
                raise TypeError(f"blocks: an entry must be a module name, an 'i:j' slice, a list of module names, an "
                                f"nn.Module or a Block, got {entry!r}")
    _check_cover(model, result)
    return result


def _check_cover(model: nn.Module, blocks: Sequence[Block]) -> None:
    parameter_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    owner: dict[int, str] = {}
    for block in blocks:
        parameters = block.parameters()
        if not parameters:
            raise ValueError(f"blocks: block {block.name!r} has no trainable parameter; merge it into the next block")
        for parameter in parameters:
            if id(parameter) not in parameter_names:
                raise ValueError(f"blocks: block {block.name!r} holds a parameter that is not one of the model's")
            if id(parameter) in owner:
                raise ValueError(f"blocks: parameter {parameter_names[id(parameter)]!r} belongs to blocks "
                                 f"{owner[id(parameter)]!r} and {block.name!r}; every parameter must be in one block")
            owner[id(parameter)] = block.name
    missing = [name for key, name in parameter_names.items() if key not in owner]
    if missing:
        shown = ", ".join(missing[:12]) + (", ..." if len(missing) > 12 else "")
        raise ValueError(f"blocks do not cover the model: {len(missing)} trainable parameters belong to no block "
                         f"({shown}); add their modules to a block")


@torch.no_grad()
def block_outputs(model: nn.Module, blocks: Sequence[Block], input_shape: tuple, device, dtype,
                  ) -> tuple[list[tuple[int, ...]], list[torch.Tensor]]:
    """Each block's per-sample output shape and its input on a probe batch (2 samples of
    ``input_shape``, N(0, 1) from a fixed seed, the model in eval mode); checks that the blocks,
    run in order, compute ``model(x)`` and that the last one outputs logits ``(batch, classes)``."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn((2, *input_shape), generator=generator, device=device, dtype=dtype)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # deterministic (dropout), and BatchNorm leaves its running statistics alone
    names = [b.name for b in blocks]
    try:
        h, shapes, inputs = x, [], []
        for block in blocks:
            inputs.append(h)
            try:
                h = block.forward(h)
            except RuntimeError as error:
                raise ValueError(f"blocks: running the blocks {names} in order fails at block {block.name!r} "
                                 f"({str(error).splitlines()[0][:160]}); a block list must follow the model's "
                                 "forward") from error
            if not isinstance(h, torch.Tensor) or h.dim() < 2:
                raise ValueError(f"blocks: block {block.name!r} must return a tensor (batch, ...), got "
                                 f"{type(h).__name__ if not isinstance(h, torch.Tensor) else tuple(h.shape)}")
            shapes.append(tuple(h.shape[1:]))
        expected = model(x)
    finally:
        for module, training in modes.items():
            module.train(training)
    if h.shape != expected.shape or not torch.allclose(h, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(f"blocks: running the blocks {names} in order does not compute model(x) (the outputs "
                         "differ); a block list must follow the model's forward")
    if len(shapes[-1]) != 1:
        raise ValueError(f"the last block must output logits (batch, classes), got per-sample shape {shapes[-1]}")
    return shapes, inputs


# ---- BatchNorm inside a forward-mode pass ------------------------------------------------


def is_training_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance per channel of ``x`` ``(B, C, *spatial)``: ``(C,), (C,)``.

    Two passes, the variance as the mean of the centred squares: the same numbers as
    ``x.var(dims, correction=0)`` to rounding, and on the CPU about 15x faster for an NCHW
    tensor (torch 2.14's ``var`` over dims (0, 2, 3) takes 4.6 ms on a (32, 64, 28, 28) map
    with 2 threads; this 0.3 ms).
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = (x - mean.reshape([1, -1] + [1] * (x.dim() - 2))).square().mean(dims)
    return mean, var


@contextmanager
def constant_batch_statistics(modules: Sequence[nn.Module], statistics: list | None = None,
                              given: Sequence[tuple] | None = None):
    """Run the BatchNorms in training mode among ``modules`` with constant batch statistics.

    Inside, such a module computes z = γ (x − μ) / sqrt(σ² + ε) + β with the batch mean μ
    and biased variance σ² of its input's *primal* (``x.detach()``: inside a forward-mode
    pass the statistics carry no tangent), so each sample's output depends on its own
    input only, and its running statistics are left alone (no in-place update inside a
    transform). ``statistics`` (a list) receives ``(module, μ, σ², n)`` per call, n the
    number of values per channel; :func:`update_running_statistics` applies them once.
    ``given``: such a list from an earlier pass on the same input; each module's calls then
    take its recorded μ, σ² in order instead of computing them again (a block's later passes:
    the primal, and so the statistics, are the first pass's).
    """
    with batch_statistics(modules, statistics, constant=True, given=given) as patched:
        yield patched


@contextmanager
def batch_statistics(modules: Sequence[nn.Module], statistics: list | None = None, constant: bool = False,
                     given: Sequence[tuple] | None = None):
    """Run the BatchNorms in training mode among ``modules`` with their batch statistics, leaving
    the running statistics alone (recorded into ``statistics`` as :func:`constant_batch_statistics`
    does); ``constant=False``: the statistics are functions of the input, differentiated through
    as ``nn.BatchNorm`` is (the auxiliary heads' BatchNorms inside a reverse-mode product)."""
    if given is not None and not constant:
        raise ValueError("recorded batch statistics are constants: given needs constant=True")
    patched = [module for root in modules for module in root.modules() if is_training_batch_norm(module)]
    recorded: dict[nn.Module, list] = {}
    for module, mean, var, _ in given or ():
        recorded.setdefault(module, []).append((mean, var))

    def make_forward(module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if recorded.get(module):
                mean, var = recorded[module].pop(0)
            elif constant or statistics is not None:
                mean, var = batch_mean_var(x.detach())
            if statistics is not None:
                statistics.append((module, mean.detach(), var.detach(), x.numel() // x.shape[1]))
            if constant:
                return F.batch_norm(x, mean, var, module.weight, module.bias, training=False, eps=module.eps)
            # through the statistics: torch's kernel (and its one backward kernel), the running buffers not given
            return F.batch_norm(x, None, None, module.weight, module.bias, training=True, eps=module.eps)

        return forward

    for module in patched:
        module.forward = make_forward(module)
    try:
        yield patched
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward is back


@torch.no_grad()
def update_running_statistics(statistics: Sequence[tuple]) -> None:
    """What ``nn.BatchNorm`` in training mode does to its buffers, once per recorded call.

    running_μ ← (1 − m) running_μ + m μ, running_σ² ← (1 − m) running_σ² + m σ² n / (n − 1)
    (m = momentum, or 1 / num_batches_tracked when momentum is None).
    """
    for module, mean, var, count in statistics:
        if not module.track_running_stats or module.running_mean is None:
            continue
        module.num_batches_tracked.add_(1)
        momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
        unbiased = var * (count / max(count - 1, 1))
        module.running_mean.mul_(1 - momentum).add_(mean.to(module.running_mean.dtype), alpha=momentum)
        module.running_var.mul_(1 - momentum).add_(unbiased.to(module.running_var.dtype), alpha=momentum)
