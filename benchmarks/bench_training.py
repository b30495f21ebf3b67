"""Training throughput: reference-model training and bottleneck retraining, samples/s.

Runs on the devices given (e.g. ``--devices cpu cuda``) in one process, same model, same data.
Bottleneck retraining runs twice per device, with the same seed: running the frozen head (and
the frozen model's reference logits) every step, as before the activation cache, and from the
cache (``retrain_split``'s default: computed once, then only bottleneck and tail run); the
table shows both throughputs (cache filling included), the speed-up and both split accuracies.
The model is trained for ``--model-epochs`` first so that the accuracies mean something.
Prints a table; ``--json-out`` also writes the figures with the machine and its load average.

    python benchmarks/bench_training.py --arch vgg16 --width 1.0 --input-size 32 --images 8192 --devices cpu cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.machine

from benchmarks.machine import describe, load_line  # noqa: E402
from isplit.checkpoint import ModelInfo  # noqa: E402
from isplit.cuts import find_cut_points  # noqa: E402
from isplit.data import load_dataset  # noqa: E402
from isplit.messages import BottleneckSpec  # noqa: E402
from isplit.retrain import retrain_split  # noqa: E402
from isplit.training import train_classifier  # noqa: E402
from isplit.zoo import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=4096, help="training images per measurement")
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="bottleneck epochs")
    ap.add_argument("--cut", default=None, help="default: the middle non-skipped cut point")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe()

    train = load_dataset("fashion-mnist", "train").subset(None, args.images)
    test = load_dataset("fashion-mnist", "test").subset(None, args.test_images)
    mean, std = train.channel_stats()
    rows = []
    for device in args.devices:
        dev = torch.device(device)
        torch.manual_seed(0)
        model = build_model(args.arch, num_classes=10, in_channels=1, input_size=args.input_size, width=args.width)
        info = ModelInfo(arch=args.arch, num_classes=10, in_channels=1, input_size=args.input_size, width=args.width,
                         class_names=train.class_names, mean=mean, std=std)  # fmt: skip
        stats = train_classifier(model, train, input_size=args.input_size, mean=mean, std=std, epochs=args.model_epochs,
                                 batch_size=args.batch_size, lr=1e-3, device=dev, progress=False)  # fmt: skip
        points = [p for p in find_cut_points(model.cpu(), (1, args.input_size, args.input_size)) if not p.skipped]
        cut = args.cut or points[len(points) // 2].module
        spec = BottleneckSpec(compression_ratio=4, epochs=args.epochs, lr=5e-3, batch_size=args.batch_size, seed=0)
        runs = {
            cached: retrain_split(model, info, cut, train, test, spec, device=dev, cache_activations=cached)
            for cached in (False, True)
        }
        before, after = runs[False], runs[True]
        rows.append({
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "model_train_samples_per_s": round(stats["samples_per_second"], 1),
            "cut": cut,
            "bottleneck_epochs": args.epochs,
            "bottleneck_samples_per_s_uncached": round(before.samples_per_second, 1),
            "bottleneck_samples_per_s_cached": round(after.samples_per_second, 1),
            "speedup": round(after.samples_per_second / before.samples_per_second, 2),
            "bottleneck_seconds_uncached": round(before.training_seconds, 2),
            "bottleneck_seconds_cached": round(after.training_seconds, 2),
            "accuracy_original": round(after.accuracy_original, 4),
            "accuracy_split_uncached": round(before.accuracy_split, 4),
            "accuracy_split_cached": round(after.accuracy_split, 4),
            "final_loss_uncached": round(before.losses[-1], 5),
            "final_loss_cached": round(after.losses[-1], 5),
        })  # fmt: skip
    print(
        f"{args.arch} width {args.width} at {args.input_size} px, batch {args.batch_size}, {args.images} training "
        f"images, bottleneck {args.epochs} epochs; test accuracy on {len(test)} images"
    )
    print(f"{'device':<22} {'model img/s':>11} {'cut':<12} {'bneck img/s before':>18} {'after':>7} {'x':>5}"
          f"  {'acc split before/after':>22}  {'final loss before/after':>23}")  # fmt: skip
    for r in rows:
        print(
            f"{r['device']:<22} {r['model_train_samples_per_s']:>11} {r['cut']:<12}"
            f" {r['bottleneck_samples_per_s_uncached']:>18} {r['bottleneck_samples_per_s_cached']:>7}"
            f" {r['speedup']:>5}  {r['accuracy_split_uncached']:>11.4f} / {r['accuracy_split_cached']:.4f}"
            f"  {r['final_loss_uncached']:>11.5f} / {r['final_loss_cached']:.5f}"
        )
    print(load_line(machine))
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"args": vars(args), "machine": machine, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
