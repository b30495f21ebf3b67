"""Model zoo: torchvision classifiers built by name and adapted to a dataset.

One builder per family; the adaptation (input channels, number of classes, small inputs,
width multiplier for narrow test variants) is explicit and recorded in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.vgg import cfgs as _VGG_CFGS

from isplit import IsplitError

_VGG_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
_RESNETS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
}
_MOBILENETS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": models.mobilenet_v2,
    "mobilenet_v3_small": models.mobilenet_v3_small,
}

ARCHS: tuple[str, ...] = (
    *_VGG_CFG,
    *(f"{name}_bn" for name in _VGG_CFG),
    *_RESNETS,
    *_MOBILENETS,
)

SMALL_INPUT = 96  # below this many pixels the ImageNet stems downsample too early


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 224,
    width: float = 1.0,
    pretrained: bool = False,
) -> nn.Module:
    """Build a torchvision classifier by name, adapted to a dataset.

    Args:
        arch: one of ``ARCHS``.
        num_classes: size of the output layer.
        in_channels: 1 (grayscale) or 3 (RGB).
        input_size: side of the square input in pixels; below ``SMALL_INPUT`` the ResNet stem
            keeps full resolution and VGG uses a global pool with a narrower classifier.
        width: channel multiplier for VGG (narrow variants for tests and CPUs); 1.0 = torchvision.
        pretrained: load torchvision ImageNet weights (needs the internet; clear error if not).

    Returns:
        ``nn.Module`` taking ``(N, in_channels, input_size, input_size)`` float32, returning
        logits ``(N, num_classes)``.
    """
    if arch not in ARCHS:
        raise IsplitError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if in_channels not in (1, 3):
        raise IsplitError(f"in_channels must be 1 or 3, got {in_channels}")
    if not 0 < width <= 4:
        raise IsplitError(f"width must be in (0, 4], got {width}")
    if width != 1.0 and not arch.startswith("vgg"):
        raise IsplitError(f"width multipliers are supported for VGG only, not {arch!r}")
    if pretrained and (width != 1.0 or input_size < SMALL_INPUT):
        raise IsplitError("pretrained weights need width 1.0 and input_size >= 96")
    if arch.startswith("vgg"):
        model = _vgg(arch, width, input_size, pretrained)
    elif arch in _RESNETS:
        model = _resnet(arch, input_size, pretrained)
    else:
        model = _mobilenet(arch, pretrained)
    _adapt_input(model, in_channels)
    _adapt_output(model, num_classes)
    return model


def _pretrained(builder: Callable[..., nn.Module], **kwargs: object) -> nn.Module:
    try:
        return builder(weights="DEFAULT", **kwargs)
    except Exception as exc:  # network errors come in many types; the message is what matters
        raise IsplitError(
            f"could not fetch torchvision pretrained weights ({type(exc).__name__}); this machine "
            "may have no internet access: train a reference model with `isplit zoo train` instead"
        ) from exc


def _vgg(arch: str, width: float, input_size: int, pretrained: bool) -> nn.Module:
    batch_norm = arch.endswith("_bn")
    base = arch.removesuffix("_bn")
    if pretrained:
        return _pretrained(getattr(models, arch))
    cfg = [v if v == "M" else max(4, int(round(v * width))) for v in _VGG_CFGS[_VGG_CFG[base]]]
    # The VGG shell is built on the meta device: its 1000-class classifier is replaced below,
    # and allocating and initialising ~120 M throw-away parameters took a second per build.
    with torch.device("meta"):
        model = models.VGG(nn.Sequential(), num_classes=1000, init_weights=False)
    model.features = models.vgg.make_layers(cfg, batch_norm=batch_norm)
    last = cfg[-2]
    if input_size < SMALL_INPUT:
        # At 32-64 px the feature map is 1-2 px: pool it globally and keep the classifier's
        # three-layer shape at a width that fits the features.
        hidden = max(16, int(round(512 * width)))
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        flat = last
    else:
        hidden = max(16, int(round(4096 * width)))
        flat = last * 7 * 7
    model.classifier = nn.Sequential(
        nn.Linear(flat, hidden),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(hidden, 1000),
    )
    _init_vgg(model)
    return model


def _init_vgg(model: nn.Module) -> None:
    """torchvision's VGG initialisation for the features; the narrower classifier keeps
    PyTorch's default Linear init (VGG's N(0, 0.01) starves a 3-layer head this small)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _resnet(arch: str, input_size: int, pretrained: bool) -> nn.Module:
    model = _pretrained(_RESNETS[arch]) if pretrained else _RESNETS[arch]()
    if input_size < SMALL_INPUT:
        # CIFAR-style stem: a 3x3 stride-1 conv and no max-pool keep small images informative.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _mobilenet(arch: str, pretrained: bool) -> nn.Module:
    return _pretrained(_MOBILENETS[arch]) if pretrained else _MOBILENETS[arch]()


def _first_conv(model: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module, name
    raise IsplitError("model has no Conv2d layer")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapt_input(model: nn.Module, in_channels: int) -> None:
    conv, name = _first_conv(model)
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        # Grayscale from RGB weights: sum over the colour channels keeps the response scale.
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).expand_as(new.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)


def _adapt_output(model: nn.Module, num_classes: int) -> None:
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None or last_name is None:
        raise IsplitError("model has no Linear output layer")
    if last.out_features != num_classes:
        _set_submodule(model, last_name, nn.Linear(last.in_features, num_classes))
