"""Bottlenecks inserted at a cut: an encoder on the head side, a decoder on the tail side.

For a conv output ``(C, H, W)``: the undercomplete convolutional autoencoder of METHOD.md —
two stride-2 3x3 convolutions with BatchNorm and ReLU shrinking the channels to
``max(1, C // ratio)``, mirrored by two transposed convolutions whose output padding restores
the exact ``(C, H, W)`` (odd sizes included). For a flat output ``(F,)``: a linear encoder to
``max(1, F // ratio)`` and a linear decoder back.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _out_padding(size: int) -> int:
    # A 3x3 stride-2 pad-1 conv maps s -> ceil(s / 2); the transposed conv maps h -> 2h - 1 + p.
    return size - 2 * ((size + 1) // 2) + 1


# BatchNorm with momentum=None keeps a cumulative average: after a short training (tens of
# steps) an exponential average has not settled and eval-mode accuracy collapses.


class ConvBottleneck(nn.Module):
    """Encoder ``(N, C, H, W) -> (N, C', ceil(ceil(H/2)/2), ...)``; decoder back to ``(N, C, H, W)``."""

    def __init__(self, channels: int, height: int, width: int, ratio: int) -> None:
        super().__init__()
        code = max(1, channels // ratio)
        mid = max(code, (channels + code) // 2)
        h1, w1 = (height + 1) // 2, (width + 1) // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, mid, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid, momentum=None),
            nn.ReLU(),
            nn.Conv2d(mid, code, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(code, momentum=None),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(
                code, mid, 3, stride=2, padding=1, output_padding=(_out_padding(h1), _out_padding(w1)), bias=False
            ),
            nn.BatchNorm2d(mid, momentum=None),
            nn.ReLU(),
            # Last layer linear: the activation at the cut may be negative (e.g. a conv output).
            nn.ConvTranspose2d(
                mid, channels, 3, stride=2, padding=1, output_padding=(_out_padding(height), _out_padding(width))
            ),
        )


class LinearBottleneck(nn.Module):
    """Encoder ``(N, F) -> (N, max(1, F // ratio))``; decoder back to ``(N, F)``."""

    def __init__(self, features: int, ratio: int) -> None:
        super().__init__()
        code = max(1, features // ratio)
        self.encoder = nn.Sequential(nn.Linear(features, code), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(code, features))


def make_bottleneck(output_shape: Sequence[int], ratio: int) -> ConvBottleneck | LinearBottleneck:
    """The bottleneck for a cut whose per-image output shape is ``(C, H, W)`` or ``(F,)``."""
    if ratio < 1:
        raise ValueError(f"compression ratio must be >= 1, got {ratio}")
    if len(output_shape) == 3:
        return ConvBottleneck(*output_shape, ratio=ratio)
    if len(output_shape) == 1:
        return LinearBottleneck(output_shape[0], ratio)
    raise ValueError(f"cannot build a bottleneck for output shape {tuple(output_shape)}")
