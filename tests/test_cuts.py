"""Single-tensor cut points (METHOD.md, "Which layers are cut points")."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from isplit import IsplitError
from isplit.cuts import find_cut_points
from isplit.zoo import build_model

SKIPPED_KINDS = {"ReLU", "BatchNorm2d", "Dropout", "Identity", "Flatten"}


def _names(points) -> list[str]:
    return [p.module for p in points]


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    return build_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.25)


@pytest.fixture(scope="module")
def vgg11_bn() -> nn.Module:
    return build_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.125)


# -- VGG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_vgg_cuts_after_every_layer_of_features_and_classifier_but_the_output(arch, request):
    model = request.getfixturevalue(arch)
    points = find_cut_points(model, (1, 32, 32))
    expected = (
        [f"features.{i}" for i in range(len(model.features))]
        + ["avgpool"]
        + [f"classifier.{i}" for i in range(len(model.classifier) - 1)]
    )
    assert _names(points) == expected


def test_vgg_flags_relu_batchnorm_and_dropout_as_skipped_and_nothing_else(vgg11_bn):
    model = vgg11_bn
    points = find_cut_points(model, (1, 32, 32))
    for p in points:
        assert p.kind == type(model.get_submodule(p.module)).__name__
        assert p.skipped == (p.kind in SKIPPED_KINDS), p
    assert {p.kind for p in points if p.skipped} == {"ReLU", "BatchNorm2d", "Dropout"}
    assert {p.kind for p in points if not p.skipped} == {"Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear"}


def test_vgg_output_shapes_and_fp32_bytes(vgg11):
    points = {p.module: p for p in find_cut_points(vgg11, (1, 32, 32))}
    assert points["features.0"].output_shape == [16, 32, 32]  # 64 * 0.25 channels, full size
    assert points["features.2"].output_shape == [16, 16, 16]  # after the first max-pool
    assert points["avgpool"].output_shape == [128, 1, 1]
    assert points["classifier.0"].output_shape == [128]
    assert points["features.0"].output_bytes == 4 * 16 * 32 * 32
    for p in points.values():
        assert p.output_bytes == 4 * math.prod(p.output_shape)


def test_cut_shapes_are_the_real_forward_shapes(vgg11):
    model = vgg11
    points = find_cut_points(model, (1, 32, 32))
    seen: dict[str, list[int]] = {}
    handles = [
        model.get_submodule(p.module).register_forward_hook(
            lambda _m, _i, out, name=p.module: seen.__setitem__(name, list(out.shape[1:]))
        )
        for p in points
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(3, 1, 32, 32))
    model.train()
    for h in handles:
        h.remove()
    assert {p.module: p.output_shape for p in points} == seen


# -- ResNet ---------------------------------------------------------------------------------

BLOCK_LEVEL = re.compile(r"^(conv1|bn1|relu|maxpool|avgpool|layer[1-4]\.\d+)$")


@pytest.mark.parametrize(("arch", "blocks"), [("resnet18", [2, 2, 2, 2]), ("resnet50", [3, 4, 6, 3])])
def test_resnet_cuts_are_stem_layers_blocks_and_avgpool(arch, blocks):
    model = build_model(arch, num_classes=10, in_channels=1, input_size=32)
    names = _names(find_cut_points(model, (1, 32, 32)))
    expected = ["conv1", "bn1", "relu", "maxpool"]
    expected += [f"layer{i + 1}.{j}" for i, n in enumerate(blocks) for j in range(n)]
    expected += ["avgpool"]
    assert names == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_with_imagenet_stem_never_cuts_inside_a_residual_block(arch):
    model = build_model(arch, num_classes=10, in_channels=3, input_size=96)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    for name in _names(find_cut_points(model, (3, 96, 96))):
        assert BLOCK_LEVEL.match(name), f"{name} is inside a residual block"


def test_resnet18_block_output_shapes():
    model = build_model("resnet18", num_classes=10, in_channels=1, input_size=32)
    shapes = {p.module: p.output_shape for p in find_cut_points(model, (1, 32, 32))}
    assert shapes["layer1.0"] == [64, 32, 32]
    assert shapes["layer2.0"] == [128, 16, 16]
    assert shapes["layer4.1"] == [512, 4, 4]
    assert shapes["avgpool"] == [512, 1, 1]


# -- MobileNetV2 ----------------------------------------------------------------------------


def test_mobilenet_v2_never_cuts_inside_a_block_with_a_residual_connection():
    model = build_model("mobilenet_v2", num_classes=10, in_channels=3, input_size=32)
    names = _names(find_cut_points(model, (3, 32, 32)))
    residual = [n for n, m in model.named_modules() if isinstance(m, InvertedResidual) and m.use_res_connect]
    assert residual, "mobilenet_v2 should have residual blocks"
    for block in residual:
        assert block in names, f"residual block {block} should be a cut point as a whole"
        inside = [n for n in names if n.startswith(block + ".")]
        assert inside == [], f"cuts inside residual block {block}: {inside}"


def test_mobilenet_v2_may_cut_inside_blocks_without_a_residual_connection():
    model = build_model("mobilenet_v2", num_classes=10, in_channels=3, input_size=32)
    names = _names(find_cut_points(model, (3, 32, 32)))
    plain = [n for n, m in model.named_modules() if isinstance(m, InvertedResidual) and not m.use_res_connect]
    assert any(n.startswith(plain[0] + ".") for n in names)


# -- general rules, on hand-written models --------------------------------------------------


class _SkipAroundConv(nn.Module):
    """stem -> conv -> (+ stem output) -> pool -> fc: the conv's output is not a cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.conv(a) + a
        return self.fc(torch.flatten(self.pool(b), 1))


def test_a_layer_bypassed_by_a_skip_connection_is_not_a_cut():
    names = _names(find_cut_points(_SkipAroundConv(), (1, 8, 8)))
    assert names == ["stem", "pool"]


def test_the_final_output_layer_is_never_a_cut():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    assert _names(find_cut_points(model, (1, 8, 8))) == ["0", "1"]


def test_find_cut_points_leaves_train_mode_as_it_was(vgg11_bn):
    vgg11_bn.train()
    find_cut_points(vgg11_bn, (1, 32, 32))
    assert vgg11_bn.training and all(m.training for m in vgg11_bn.modules())


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor's value: torch.fx cannot trace it
            x = -x
        return self.conv(x).flatten(1)


def test_untraceable_model_gives_isplit_error_naming_it():
    with pytest.raises(IsplitError, match="_DataDependent"):
        find_cut_points(_DataDependent(), (1, 8, 8))
