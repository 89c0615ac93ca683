"""Model zoo of the two papers, built for a dataset's channels, image size and classes.

Every model maps images ``(B, C, H, W)`` (H = W = ``image_size``) to logits
``(B, num_classes)``. Names (:data:`MODELS`):

- ``baydin_mlp``: Baydin et al. 2022's MLP, flatten -> C·H·W-1024-1024-classes, ReLU
  (784-1024-1024-10 on MNIST: 1,863,690 parameters).
- ``baydin_cnn``: Baydin et al. 2022's CNN (as in orobix/fwdgrad): two blocks of
  [conv 3x3 64 ch, ReLU, conv 3x3 64 ch, ReLU, max-pool 2], padding 1, then
  flatten -> 64·(H/4)·(W/4)-1024-classes (3136-1024-10 on MNIST).
- ``fc``: the multi-tangent paper's fully-connected net, two hidden layers of ``width``
  (256, 1024 or 4096), ReLU.
- ``resnet18``: ``torchvision.models.resnet18`` with a small-image stem. The ImageNet stem
  (7x7 conv stride 2 + 3x3 max-pool stride 2) shrinks a 28- or 32-pixel image 4x before
  the first residual block, leaving 1x1 feature maps at the last stage; we use a 3x3 conv
  with stride 1 and no max-pool instead (the usual CIFAR ResNet stem), accepting
  ``in_channels`` (1 for MNIST). BatchNorm as in torchvision.
- ``vit``: ``torchvision.models.VisionTransformer`` with 6 layers, 4 heads, width 256,
  MLP 512, patch 4 (7x7 = 49 patches on MNIST, 64 on CIFAR-10); its patch projection
  takes ``in_channels``.
- ``localmixer``: Ren et al. 2023's LocalMixer (:mod:`fwdgrad.train.localmixer`), an
  MLP-Mixer with grouped channel mixing and LayerNorm around every linear layer, built for
  local losses; options ``blocks`` (4), ``channels`` (512), ``grid`` (patches per side;
  default 1 on 28-pixel images: M/1/16, 8 on 32-pixel ones: M/8/16), ``groups`` (16).

Only torch is imported at module level; torchvision is imported by the two builders that
need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from fwdgrad.train.localmixer import localmixer

MODELS = ("baydin_mlp", "baydin_cnn", "fc", "resnet18", "vit", "localmixer")
FC_WIDTHS = (256, 1024, 4096)


def baydin_mlp(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """Flatten, Linear(C·H·W, 1024), ReLU, Linear(1024, 1024), ReLU, Linear(1024, classes)."""
    inputs = in_channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, num_classes)
    )


def baydin_cnn(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """Conv(C→64)-ReLU-Conv(64→64)-ReLU-MaxPool2, twice (3x3, padding 1); then 64·(H/4)²-1024-classes."""
    if image_size % 4:
        raise ValueError(f"baydin_cnn needs an image size divisible by 4 (two 2x2 max-pools), got {image_size}")
    features = 64 * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(features, 1024), nn.ReLU(), nn.Linear(1024, num_classes),
    )


def fc(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 256) -> nn.Module:
    """Flatten, Linear(C·H·W, width), ReLU, Linear(width, width), ReLU, Linear(width, classes)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"fc width must be a positive integer (the paper uses {FC_WIDTHS}), got {width!r}")
    inputs = in_channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes),
    )


def resnet18(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet18 with the small-image stem: conv 3x3 stride 1 (C→64), no max-pool."""
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    return model


def vit(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, patch_size: int = 4) -> nn.Module:
    """torchvision VisionTransformer: 6 layers, 4 heads, hidden 256, MLP 512, patch 4, C input channels."""
    from torchvision.models import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"vit needs an image size divisible by the patch size {patch_size}, got {image_size}")
    hidden = 256
    model = VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=6, num_heads=4, hidden_dim=hidden, mlp_dim=512,
        num_classes=num_classes,
    )
    model.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
    # torchvision's initialization of the patch projection: truncated normal, std sqrt(1 / fan_in)
    fan_in = in_channels * patch_size * patch_size
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(model.conv_proj.bias)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "baydin_mlp": baydin_mlp, "baydin_cnn": baydin_cnn, "fc": fc, "resnet18": resnet18, "vit": vit,
    "localmixer": localmixer,
}


def build_model(
    name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **options
) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for images ``(B, in_channels, image_size, image_size)``.

    Args:
        name: ``baydin_mlp``, ``baydin_cnn``, ``fc``, ``resnet18``, ``vit`` or ``localmixer``.
        in_channels, image_size, num_classes: the dataset's (see :func:`fwdgrad.train.data.load`).
        options: model options, e.g. ``width=1024`` for ``fc``, ``patch_size`` for ``vit``,
            ``blocks``, ``channels``, ``grid``, ``groups`` for ``localmixer``.

    Returns:
        An ``nn.Module`` mapping ``(B, in_channels, image_size, image_size)`` to logits
        ``(B, num_classes)``, initialized by torch's default (seeded by the global RNG).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    try:
        return _BUILDERS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes, **options)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise ValueError(f"model {name!r} does not take the options {sorted(options)}: {error}") from error
        raise


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad=True``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["FC_WIDTHS", "MODELS", "build_model", "count_parameters"]
