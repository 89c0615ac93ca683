"""Greedy local learning computed with BACKPROP inside each block: the ceiling of local losses.

A study tool, not an estimator: every block is trained on its own auxiliary head's loss,
its input detached, with the exact gradient of that loss from ``loss.backward()`` (reverse
mode inside the block and the head). Forward-gradient local losses with groups of one unit
at every position compute the same update for sites that keep units apart, so the accuracy
reached here is what `fwdgrad.LocalForwardGradient` can reach with a block split and a
head; it tells which splits and heads are worth building before building them.

    python docs/local/greedy_backprop_reference.py --model baydin_cnn --split layers --head pool2 --epochs 3

``--batch-norm constant`` holds every BatchNorm's batch statistics constant (detached, as
fwdgrad's forward-mode passes compute them) instead of differentiating through them.

Splits: ``layers`` (fwdgrad's zoo split), ``resnet16`` (ResNet-18: each BasicBlock cut after
its first conv, the second half also gets the block's input for the shortcut), ``sites``
(ResNet-18: conv1 and bn1 of each BasicBlock on losses of their own outputs, the rest on the
block's), ``pairs`` / ``head2`` (baydin_cnn: two convs per block / the classifier as one
block), ``bp`` (one block, plain backprop); other zoo models (``localmixer``, ``vit``) have
``layers``, fwdgrad's own split (``fwdgrad.local.blocks.zoo_blocks``), with the linear head on
the mean token. Heads: ``linear`` (global average pool, linear), ``poolQ`` (adaptive
average pool to Q x Q, linear), ``bnpoolQ`` (BatchNorm, pool, linear; Fournier et al.),
``convQ`` (conv 3x3 + ReLU, pool Q x Q, linear; DGL-style), ``mlpQ`` (pool, Linear-ReLU-Linear).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.local.blocks import zoo_blocks
from fwdgrad.train.data import load
from fwdgrad.train.models import build_model


class Pair(nn.Module):
    """A block whose input and output are (main, shortcut input)."""

    def __init__(self, forward, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self._forward = forward

    def forward(self, h):
        return self._forward(h)


class TokenMean(nn.Module):
    """(B, T, C) token sequences -> (B, C): the mean over the tokens."""

    def forward(self, h):
        return h.mean(1)


def head(kind: str, channels: int, spatial: bool, classes: int = 10, tokens: bool = False) -> nn.Module:
    if tokens:  # LocalMixer, ViT blocks: the linear head on the mean token (fwdgrad's `linear` head)
        if kind != "linear":
            raise ValueError(f"--head {kind}: token sequences have the linear head only")
        return nn.Sequential(TokenMean(), nn.Linear(channels, classes))
    if kind != "linear" and not re.fullmatch(r"(bn)?(pool|conv|mlp)\d", kind):
        raise ValueError(f"--head {kind}: valid choices: linear, poolQ, bnpoolQ, bnconvQ, convQ, bnmlpQ, mlpQ "
                         "(Q the pooled grid, e.g. conv2)")
    if not spatial or kind == "linear":
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if spatial else []
        return nn.Sequential(*pool, nn.Linear(channels, classes))
    q = int(kind[-1])
    if kind.startswith("pool"):
        return nn.Sequential(nn.AdaptiveAvgPool2d(q), nn.Flatten(), nn.Linear(channels * q * q, classes))
    if kind.startswith("bnpool"):
        return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(q), nn.Flatten(),
                             nn.Linear(channels * q * q, classes))
    if kind.startswith("bnconv"):
        return nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(q), nn.Flatten(), nn.Linear(channels * q * q, classes))
    if kind.startswith("conv"):
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(q),
                             nn.Flatten(), nn.Linear(channels * q * q, classes))
    if kind.startswith("bnmlp"):
        return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(q), nn.Flatten(),
                             nn.Linear(channels * q * q, 256), nn.ReLU(), nn.Linear(256, classes))
    if kind.startswith("mlp"):
        return nn.Sequential(nn.AdaptiveAvgPool2d(q), nn.Flatten(), nn.Linear(channels * q * q, 256), nn.ReLU(),
                             nn.Linear(256, classes))
    raise AssertionError(kind)  # the pattern above admits only the kinds handled here


def constant_statistics(module: nn.BatchNorm2d):
    """A training-mode forward with the batch statistics detached (the running ones updated as usual)."""
    def forward(x):
        if not module.training:
            return nn.BatchNorm2d.forward(module, x)
        mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), correction=0)
        with torch.no_grad():
            count = x.numel() / x.shape[1]
            module.running_mean.lerp_(mean, module.momentum)
            module.running_var.lerp_(var * count / (count - 1), module.momentum)
        return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)

    return forward


def blocks_of(model: nn.Module, name: str, split: str) -> list[nn.Module]:
    if split == "bp":
        return [model]
    if name == "baydin_cnn":
        m = model
        if split == "pairs":  # two convs per block
            return [m[0:5], m[5:10], m[10:13], m[13:]]
        if split == "head2":  # the classifier MLP as one block
            return [m[0:2], m[2:4], m[4:7], m[7:9], m[9:]]
        return [m[0:2], m[2:4], m[4:7], m[7:9], m[9:13], m[13:]]
    if name == "resnet18":
        stem = nn.Sequential(model.conv1, model.bn1, model.relu)
        basic = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        tail = nn.Sequential(model.avgpool, nn.Flatten(), model.fc)
        if split == "layers":
            return [stem, *basic, tail]
        blocks = [stem]
        for b in basic:
            if split == "sites":  # conv1 and bn1 each on their own loss (at their outputs), the rest on the block's
                blocks.append(Pair(lambda x, b=b: (b.conv1(x), x), [b.conv1]))
                blocks.append(Pair(lambda cx, b=b: (b.relu(b.bn1(cx[0])), cx[1]), [b.bn1]))
            else:
                blocks.append(Pair(lambda x, b=b: (b.relu(b.bn1(b.conv1(x))), x), [b.conv1, b.bn1]))
            blocks.append(Pair(lambda hx, b=b: b.relu(b.bn2(b.conv2(hx[0])) +
                                                      (b.downsample(hx[1]) if b.downsample is not None else hx[1])),
                               [b.conv2, b.bn2] + ([b.downsample] if b.downsample is not None else [])))
        return blocks + [tail]
    if split != "layers":
        raise ValueError(f"--split {split}: {name} has the zoo split only (layers) or bp")
    return [Pair(block.forward, list(block.modules)) for block in zoo_blocks(model, name)]  # fwdgrad's own split


def setup(args: argparse.Namespace, data) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """The model, its blocks and a head for every block but the last (sized on two training images)."""
    model = build_model(args.model, data.channels, data.image_size, data.num_classes)
    if args.batch_norm == "constant":
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.forward = constant_statistics(module)
    blocks = blocks_of(model, args.model, args.split)
    with torch.no_grad():  # the heads' input widths
        h, heads = next(iter(data.train_loader))[0][:2], []
        for block in blocks[:-1]:
            h = block(h)
            main = h[0] if isinstance(h, tuple) else h
            tokens = main.dim() == 3
            heads.append(head(args.head, main.shape[-1] if tokens else main.shape[1], main.dim() == 4,
                              data.num_classes, tokens))
    return model, blocks, heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="baydin_cnn")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--split", default="layers")
    parser.add_argument("--head", default="linear")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-norm", choices=["differentiated", "constant"], default="differentiated")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load(args.data, batch_size=args.batch, seed=args.seed)
    try:  # an unknown model, split or head: one line, exit status 2
        model, blocks, heads = setup(args, data)
    except ValueError as error:
        print(f"greedy_backprop_reference.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    parameters = [*model.parameters(), *(p for hd in heads for p in hd.parameters())]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    start = time.perf_counter()
    steps = 0
    for epoch in range(args.epochs):
        model.train()
        for hd in heads:
            hd.train()
        for index, (x, y) in enumerate(data.train_loader):
            if args.max_steps is not None and index >= args.max_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            h = x
            for number, block in enumerate(blocks):
                h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
                out = block(h)
                main = out[0] if isinstance(out, tuple) else out
                logits = heads[number](main) if number < len(heads) else main
                F.cross_entropy(logits, y).backward()
                h = out
            optimizer.step()
            steps += 1
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in data.test_loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        print(json.dumps({"model": args.model, "split": args.split, "head": args.head, "epoch": epoch + 1,
                          "batch_norm": args.batch_norm, "batch": args.batch,
                          "test_accuracy": correct / total, "seconds": round(time.perf_counter() - start, 1),
                          "lr": args.lr}), flush=True)


if __name__ == "__main__":
    main()
