"""Save or compare the engine's CUI curve on a fixed seed: VGG16 at 64 px (random init, seed 0),
64 seeded noise images (or digits), batch 32. ``save PATH`` writes it; ``compare PATH`` prints the max relative
CUI difference against the saved curve and exits 1 above ``--tolerance`` (default 1e-6).
Used to check that speed work on the engine leaves its curves unchanged."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from isplit.cuts import find_cut_points
from isplit.data import load_dataset, to_model_input
from isplit.importance import accumulate_importance
from isplit.zoo import build_model


def curve(arch: str, size: int, images: int, batch_size: int, data: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=3, input_size=size, width=1.0)
    if data == "synthetic":  # seeded noise: no exact max-pool ties (see bench_importance.py)
        g = torch.Generator().manual_seed(0)
        raw = torch.randint(0, 256, (images, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (images,), generator=g)
    else:
        digits = load_dataset("digits", "train")
        raw, y = digits.images[:images].expand(-1, 3, -1, -1), digits.labels[:images]
    x = to_model_input(raw, size, [0.5] * 3, [0.25] * 3)
    points = find_cut_points(model, (3, size, size))
    stats = accumulate_importance(model, (x, y), batch_size=batch_size, device="cpu", cut_points=points)
    return dict(zip((p.module for p in points), stats.cui(), strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["save", "compare"])
    p.add_argument("path")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", choices=["digits", "synthetic"], default="synthetic")
    p.add_argument("--tolerance", type=float, default=1e-6)
    a = p.parse_args()
    now = curve(a.arch, a.input_size, a.images, a.batch_size, a.data)
    if a.action == "save":
        with open(a.path, "w") as fh:
            json.dump(now, fh, indent=1)
        return 0
    with open(a.path) as fh:
        before = json.load(fh)
    worst = max(abs(now[k] - before[k]) / max(abs(before[k]), 1e-300) for k in before)
    print(f"max relative CUI difference against {a.path}: {worst:.3e} (tolerance {a.tolerance:.0e})")
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
