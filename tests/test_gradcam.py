"""Grad-CAM maths of the importance engine (METHOD.md, "The computation").

Hand-computed maps on tiny tensors, then the engine's CUI against a direct per-image
computation with our own hooks and ``torch.autograd`` on a tiny model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from isplit import IsplitError
from isplit.cuts import find_cut_points
from isplit.importance import (
    LOG10_FLOOR,
    accumulate_importance,
    curve_from_stats,
    gradcam_maps,
    local_maxima,
    log10_cui,
)
from isplit.zoo import build_model

NUM_CLASSES = 3


def tiny_model() -> nn.Module:
    """Conv/pool/linear net, 1x8x8 -> 3 logits, with in-place ReLUs like torchvision's."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, NUM_CLASSES),
    )


def tiny_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % NUM_CLASSES


def reference_cui(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, modules: list[str]) -> list[float]:
    """CUI per module computed the slow, obvious way: one image at a time, own hooks,
    ``torch.autograd.grad`` of the correct class's score, Grad-CAM written out longhand."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False  # an in-place ReLU would overwrite the conv output we hook
    sums = {name: None for name in modules}
    for x, y in zip(images, labels, strict=True):
        acts: dict[str, torch.Tensor] = {}
        handles = [
            model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name, acts=acts: acts.__setitem__(name, out)
            )
            for name in modules
        ]
        score = model(x[None])[0, int(y)]
        grads = torch.autograd.grad(score, [acts[n] for n in modules])
        for h in handles:
            h.remove()
        for name, grad in zip(modules, grads, strict=True):
            a, g = acts[name][0].detach(), grad[0]
            if a.dim() == 1:  # a flat (F,) output is (F, 1, 1)
                a, g = a[:, None, None], g[:, None, None]
            channel_weights = g.mean(dim=(1, 2))
            weighted = sum(channel_weights[c] * a[c] for c in range(a.shape[0])) / a.shape[0]
            cam = torch.clamp(weighted, min=0).double()
            sums[name] = cam if sums[name] is None else sums[name] + cam
    out = []
    for name in modules:
        mean_map = sums[name] / len(labels)
        out.append(abs(float(mean_map.sum()) / mean_map.numel()))
    return out


def assert_close_relative(actual: list[float], expected: list[float], rel: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, rel=rel, abs=1e-30)


# -- gradcam_maps -----------------------------------------------------------------------------


def test_gradcam_map_is_relu_of_channel_mean_of_gradient_weighted_activations():
    activation = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)
    gradient = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[-1.0, -1.0], [-2.0, 0.0]]]])
    # a = (0.5, -1); (0.5*A0 - A1) / 2 = [[0.25, -0.5], [0.75, 1.5]]; ReLU zeroes -0.5.
    expected = torch.tensor([[[0.25, 0.0], [0.75, 1.5]]])
    torch.testing.assert_close(gradcam_maps(activation, gradient), expected)


def test_gradcam_uses_channel_mean_so_duplicated_channels_change_nothing():
    g = torch.Generator().manual_seed(0)
    activation = torch.randn(2, 3, 4, 5, generator=g)
    gradient = torch.randn(2, 3, 4, 5, generator=g)
    doubled = gradcam_maps(activation.repeat(1, 2, 1, 1), gradient.repeat(1, 2, 1, 1))
    torch.testing.assert_close(doubled, gradcam_maps(activation, gradient))


def test_gradcam_of_a_channels_last_activation_is_the_same_map():
    g = torch.Generator().manual_seed(1)
    activation = torch.randn(4, 16, 7, 9, generator=g)
    gradient = torch.randn(4, 16, 7, 9, generator=g)
    last = activation.contiguous(memory_format=torch.channels_last)
    assert not last.is_contiguous()  # the CPU engine's layout
    torch.testing.assert_close(gradcam_maps(last, gradient), gradcam_maps(activation, gradient))
    torch.testing.assert_close(gradcam_maps(activation, gradient)[0, 2, 3], _by_hand(activation, gradient, 0, 2, 3))


def _by_hand(activation: torch.Tensor, gradient: torch.Tensor, i: int, y: int, x: int) -> torch.Tensor:
    """One map pixel from the definition: ReLU(mean_c(mean_hw(G[c]) * A[c, y, x]))."""
    weights = gradient[i].mean(dim=(1, 2))
    return torch.relu((weights * activation[i, :, y, x]).mean())


def test_gradcam_of_flat_output_treats_features_as_channels_of_1x1_maps():
    activation = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    gradient = torch.tensor([[2.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])
    maps = gradcam_maps(activation, gradient)
    # (2 - 2 + 3) / 3 = 1; (-1 - 1 - 1) / 3 = -1 -> ReLU -> 0.
    torch.testing.assert_close(maps, torch.tensor([[[1.0]], [[0.0]]]))
    torch.testing.assert_close(maps, gradcam_maps(activation[:, :, None, None], gradient[:, :, None, None]))


def test_gradcam_rejects_tensors_that_are_neither_flat_nor_images():
    with pytest.raises(ValueError, match="expected"):
        gradcam_maps(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


# -- local maxima and the log10 floor ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 1.0, 0.0, 2.0, 1.0], [1, 3]),
        ([3.0, 1.0, 2.0], []),  # the ends are never local maxima
        ([0.0, 1.0, 1.0, 0.0], []),  # a plateau is not strictly higher than its neighbours
        ([-5.0, -1.0, -3.0, -2.0, -4.0], [1, 3]),
        ([], []),
        ([1.0], []),
        ([1.0, 2.0], []),
    ],
)
def test_local_maxima_are_points_strictly_higher_than_both_neighbours(values, expected):
    assert local_maxima(values) == expected


def test_log10_cui_of_zero_is_the_finite_floor():
    assert log10_cui(0.0) == LOG10_FLOOR
    assert math.isfinite(LOG10_FLOOR)


def test_log10_cui_of_positive_values_is_log10():
    assert log10_cui(100.0) == pytest.approx(2.0)
    assert log10_cui(1e-3) == pytest.approx(-3.0)


# -- the engine against a direct computation --------------------------------------------------


def test_cui_matches_direct_per_image_computation_with_own_hooks():
    model = tiny_model()
    images, labels = tiny_data()
    stats = accumulate_importance(model, (images, labels), batch_size=5, device="cpu")
    modules = [p.module for p in stats.points]
    assert_close_relative(stats.cui(), reference_cui(model, images, labels, modules), rel=1e-5)


def test_cui_is_spatial_mean_of_the_image_averaged_map():
    model = tiny_model()
    images, labels = tiny_data()
    stats = accumulate_importance(model, (images, labels), batch_size=4, device="cpu")
    for point, cui in zip(stats.points, stats.cui(), strict=True):
        mean_map = stats.sums[point.module].sum(0) / len(labels)
        assert cui == pytest.approx(abs(float(mean_map.sum()) / mean_map.numel()), rel=1e-12)


def test_curve_is_log10_of_the_directly_computed_cui():
    model = tiny_model()
    images, labels = tiny_data()
    curve = curve_from_stats(accumulate_importance(model, (images, labels), device="cpu"))
    expected = reference_cui(model, images, labels, [p.module for p in curve.points])
    for point, cui in zip(curve.points, expected, strict=True):
        assert point.log10_cui == pytest.approx(log10_cui(cui), abs=1e-5)


def test_batched_result_equals_per_image_result():
    model = build_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.125)
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(16, 1, 32, 32, generator=g), torch.arange(16) % 10
    batched = accumulate_importance(model, (images, labels), batch_size=16, device="cpu")
    single = accumulate_importance(model, (images, labels), batch_size=1, device="cpu")
    assert_close_relative(batched.cui(), single.cui(), rel=1e-5)
    torch.testing.assert_close(batched.counts, single.counts)


def test_predicted_target_differs_from_label_target_when_the_model_mispredicts():
    model = tiny_model()
    images, _ = tiny_data()
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    wrong = (predicted + 1) % NUM_CLASSES
    by_label = accumulate_importance(model, (images, wrong), target="label", device="cpu").cui()
    by_prediction = accumulate_importance(model, (images, wrong), target="predicted", device="cpu").cui()
    assert by_label != pytest.approx(by_prediction, rel=1e-3)


def test_predicted_target_equals_label_target_when_every_label_is_predicted():
    model = tiny_model()
    images, _ = tiny_data()
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    by_label = accumulate_importance(model, (images, predicted), target="label", device="cpu")
    by_prediction = accumulate_importance(model, (images, predicted), target="predicted", device="cpu")
    assert_close_relative(by_label.cui(), by_prediction.cui(), rel=1e-6)
    assert by_prediction.target == "predicted"


def test_unknown_target_is_refused():
    with pytest.raises(IsplitError, match="'logits'"):
        accumulate_importance(tiny_model(), tiny_data(), target="logits", device="cpu")


# -- the model is left as it was found --------------------------------------------------------


def _model_state(model: nn.Module) -> tuple:
    return (
        model.training,
        [p.requires_grad for p in model.parameters()],
        [getattr(m, "inplace", None) for m in model.modules()],
    )


def test_analysis_restores_train_mode_requires_grad_and_inplace_activations():
    model = tiny_model().train()
    model[0].weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    before = _model_state(model)
    assert before[0] is True and True in before[2]
    accumulate_importance(model, tiny_data(), device="cpu")
    assert _model_state(model) == before


def test_analysis_restores_the_model_when_it_fails_midway():
    model = tiny_model().train()
    before = _model_state(model)
    images, labels = tiny_data()
    labels[-1] = NUM_CLASSES + 4  # no such logit: the second batch fails
    with pytest.raises((RuntimeError, IndexError, IsplitError)):
        accumulate_importance(model, (images, labels), batch_size=6, device="cpu")
    assert _model_state(model) == before


def test_analysis_gives_no_parameter_a_gradient():
    model = tiny_model().train()
    accumulate_importance(model, tiny_data(), device="cpu")
    assert all(p.grad is None for p in model.parameters())


def test_analysis_runs_with_explicit_cut_points_only_on_those():
    model = tiny_model()
    points = [p for p in find_cut_points(model, (1, 8, 8)) if not p.skipped]
    stats = accumulate_importance(model, tiny_data(), device="cpu", cut_points=points)
    assert [p.module for p in stats.points] == [p.module for p in points]
    assert set(stats.sums) == {p.module for p in points}
