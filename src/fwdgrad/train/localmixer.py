"""LocalMixer: Ren et al. 2023's MLP-Mixer built for local losses.

Ren, Kornblith, Liao, Hinton, *Scaling Forward Gradient With Local Losses* (ICLR 2023,
arXiv 2210.03310); the authors' JAX code is google-research/google-research,
``local_forward_gradient/train_mixer_supervised.py`` (``block0``, ``mlp_block``,
``predict``) and ``mixer_lib.py`` (``preprocess``, ``get_layer_sizes``, ``get_param_scale``).

**Names.** The paper writes a LocalMixer as size/grid/groups: ``M/8/16`` is the M size
(4 blocks of 512 channels), an 8 × 8 grid of patches, 16 channel groups (CIFAR-10);
``M/1/16`` is the same network on a 1 × 1 grid, the whole 28 × 28 image one token of
784 pixels (MNIST, Fashion-MNIST): token mixing then has nothing to mix and the network
is a residual MLP with grouped layers. :func:`localmixer` defaults to these two.

**Architecture.** An image ``(B, C, S, S)`` is cut into an n × n grid of patches, P = n²
tokens of d = C (S/n)² pixels each (pixel order row, column, channel), then D channels per
token. LN is a LayerNorm without affine parameters over the last axis, ``LN_G`` the same
over each of the G groups of D/G consecutive channels, ``Lin_G`` a grouped linear map
(group g's D/G outputs from group g's inputs only), ρ = ReLU; every linear map sits
between two LayerNorms ("LN around every linear layer"):

    block 1:    a = ρ(LN(W₁ LN(x) + c₁));           y = ρ(LN_G(Lin_G(LN_G(a))))
    block b>1:  t = ρ(LN(T LN(y)))                  token mixing: T (P × P) acts on each channel's P values
                a = ρ(LN(W LN(t) + c))              channel mixing
                y = ρ(LN_G(Lin_G(LN_G(a))) + y_in)  grouped channel mixing, residual around the block
    readout:    logits = V LN(mean_tokens(y)) + v

Block b maps tokens ``(B, P, D)`` to ``(B, P, D)``; the readout's V (classes × D) starts at
zero, the other weights ~ N(0, min(2/√fan_in, 0.1)²) (fan_in per group for Lin_G), biases 0
(the authors' ``kaiming`` scheme). Parameters, K classes:

    d·D + 2D + D²/G                       (block 1)
    + (blocks − 1)(P² + D² + 2D + D²/G)   (blocks 2..)
    + D·K + K                             (readout).

**For local losses** (:data:`fwdgrad.local.blocks.ZOO_SPLITS` ``localmixer``): each block is
one local block, the readout the last. A parameter-owning module's output is LN(·) before the
ReLU, where the authors add their activity perturbation; group g of every channel-mixing
output reaches only group g of the block's output, every token only its own token, so
group- and patch-wise losses (``group_size=D/G``, ``patches=P``) split them as the paper does
(token mixing: per token, summed over the groups).

**Departures from the authors' code.** The token-mixing map has no bias: theirs adds a
per-token bias shared by the channels, which the LayerNorm over the channels that follows
removes exactly (and their ``linear`` adds it twice, as it does the channel-mixing bias on
tokens; here every bias is added once). The per-group LayerNorm before each auxiliary head
(``inter_ln``) belongs to the loss, not to the network, and is not here (see
``docs/local-losses.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocalMixer", "default_grid", "localmixer"]

PAPER_GRIDS = {28: 1, 32: 8}  # M/1/16 on MNIST-sized images, M/8/16 on CIFAR-10-sized ones


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis, no affine parameters (ε = 1e-5, as the authors')."""
    return F.layer_norm(x, x.shape[-1:])


def _init_weight(weight: torch.Tensor, fan_in: int) -> None:
    """N(0, σ²), σ = min(2/√fan_in, 0.1): ``get_param_scale("kaiming")`` of the authors' code."""
    with torch.no_grad():
        weight.normal_(0.0, min(2.0 / math.sqrt(fan_in), 0.1))


class NormLinear(nn.Module):
    """z = LN_G(Lin_G(LN_G(h))) on the last axis: a (grouped) linear map between two LayerNorms.

    h ``(..., in_features)`` -> z ``(..., out_features)``; with G = ``groups`` the features are
    G groups of consecutive ones, group g's outputs depend on group g's inputs only
    (weight ``(G, out/G, in/G)``, bias ``(G, out/G)``); G = 1 is a dense linear map.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(groups, out_features // groups))
        _init_weight(self.weight, in_features // groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        grouped = _normalize(h.unflatten(-1, (self.groups, -1)))                 # (..., G, in/G)
        z = torch.einsum("...gi,goi->...go", grouped, self.weight) + self.bias   # (..., G, out/G)
        return _normalize(z).flatten(-2)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, groups={self.groups}"


class TokenMixing(nn.Module):
    """z = LN(T LN(h)) over tokens: tokens h ``(B, P, D)`` -> ``(B, P, D)``, z_{p,c} = LN_c(Σ_q T_{pq} LN(h)_{q,c}).

    Each channel's P values are mixed by the same T ``(P, P)``; both LayerNorms are over the
    channels of one token. No bias: a per-token bias is removed by the LayerNorm after it.
    """

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.weight = nn.Parameter(torch.empty(tokens, tokens))
        _init_weight(self.weight, tokens)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _normalize(torch.einsum("pq,...qc->...pc", self.weight, _normalize(h)))

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}"


class Patches(nn.Module):
    """Images ``(B, C, S, S)`` -> tokens ``(B, n², C·(S/n)²)``: an n × n grid of patches, each
    flattened in (row, column, channel) order, patches in row-major order."""

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        n = self.grid
        patches = images.reshape(batch, channels, n, height // n, n, width // n)
        return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, n * n, -1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


class FirstBlock(nn.Module):
    """Block 1: patch pixels ``(B, P, d)`` -> ``(B, P, D)``, y = ρ(LN_G(Lin_G(LN_G(ρ(LN(W₁ LN(x) + c₁))))))."""

    def __init__(self, patch_features: int, channels: int, groups: int):
        super().__init__()
        self.embed = NormLinear(patch_features, channels)
        self.group_mixing = NormLinear(channels, channels, groups)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.relu(self.group_mixing(F.relu(self.embed(tokens))))


class MixerBlock(nn.Module):
    """Block b > 1: ``(B, P, D)`` -> ``(B, P, D)``: token mixing, channel mixing, grouped
    channel mixing, each followed by a ReLU; the block's input is added before the last one."""

    def __init__(self, tokens: int, channels: int, groups: int):
        super().__init__()
        self.token_mixing = TokenMixing(tokens)
        self.channel_mixing = NormLinear(channels, channels)
        self.group_mixing = NormLinear(channels, channels, groups)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed = F.relu(self.channel_mixing(F.relu(self.token_mixing(tokens))))
        return F.relu(self.group_mixing(mixed) + tokens)


class Readout(nn.Module):
    """Tokens ``(B, P, D)`` -> logits ``(B, K)`` = V LN(mean over tokens) + v, V and v zero at init."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(_normalize(tokens.mean(1)))


class LocalMixer(nn.Module):
    """Images ``(B, C, S, S)`` -> logits ``(B, K)``: :class:`Patches`, ``blocks`` LocalMixer
    blocks (:class:`FirstBlock`, then :class:`MixerBlock`), :class:`Readout` (module docstring)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, blocks: int, channels: int,
                 grid: int, groups: int):
        super().__init__()
        self.grid, self.groups, self.channels = grid, groups, channels
        tokens, patch_features = grid * grid, in_channels * (image_size // grid) ** 2
        self.patches = Patches(grid)
        self.blocks = nn.ModuleList(
            [FirstBlock(patch_features, channels, groups)]
            + [MixerBlock(tokens, channels, groups) for _ in range(blocks - 1)])
        self.readout = Readout(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images)
        for block in self.blocks:
            tokens = block(tokens)
        return self.readout(tokens)


def default_grid(image_size: int) -> int:
    """The paper's grid for an image size: 8 for 32 pixels (M/8/16, CIFAR-10), else 1 (M/1/16, MNIST)."""
    return PAPER_GRIDS.get(image_size, 1)


def _positive_int(name: str, value, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"localmixer {name} must be a positive integer ({hint}), got {value!r}")


def localmixer(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, blocks: int = 4,
               channels: int = 512, grid: int | None = None, groups: int = 16) -> LocalMixer:
    """A LocalMixer size/``grid``/``groups`` (module docstring); defaults: M/1/16 on 28-pixel
    images, M/8/16 on 32-pixel ones.

    Args:
        in_channels, image_size, num_classes: the dataset's.
        blocks: LocalMixer blocks (M: 4).
        channels: D, channels per token (M: 512).
        grid: patches per side n (P = n² tokens); ``None``: :func:`default_grid`.
        groups: G, channel groups of the grouped layers; must divide ``channels``.

    Raises:
        ValueError: a non-positive option, a grid that does not divide the image size or a
            group count that does not divide the channels (the message lists valid values).
    """
    grid = default_grid(image_size) if grid is None else grid
    _positive_int("blocks", blocks, "the paper's M size has 4")
    _positive_int("channels", channels, "the paper's M size has 512")
    _positive_int("grid", grid, "patches per side: 8 for CIFAR-10, 1 for MNIST")
    _positive_int("groups", groups, "the paper uses 16")
    if image_size % grid:
        valid = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise ValueError(f"localmixer grid={grid} does not divide the image size {image_size}; "
                         f"valid: {', '.join(map(str, valid))}")
    if channels % groups:
        valid = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(f"localmixer groups={groups} does not divide channels={channels}; "
                         f"valid: {', '.join(map(str, valid))}")
    return LocalMixer(in_channels, image_size, num_classes, blocks, channels, grid, groups)

