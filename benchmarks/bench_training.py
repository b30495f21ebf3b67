"""Training throughput: reference-model training and bottleneck retraining, samples/s.

Runs on the devices given (e.g. ``--devices cpu cuda``) in one process, same model, same data,
and prints a table plus JSON. Weights are random (throughput does not depend on them).

    python benchmarks/bench_training.py --arch vgg16 --width 1.0 --input-size 32 --images 8192 --devices cpu cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from isplit.checkpoint import ModelInfo
from isplit.cuts import find_cut_points
from isplit.data import load_dataset
from isplit.messages import BottleneckSpec
from isplit.retrain import retrain_split
from isplit.training import train_classifier
from isplit.zoo import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=4096, help="training images per measurement")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cut", default=None, help="default: the middle non-skipped cut point")
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    train = load_dataset("fashion-mnist", "train").subset(None, args.images)
    test = load_dataset("fashion-mnist", "test").subset(None, 512)
    mean, std = train.channel_stats()
    rows = []
    for device in args.devices:
        dev = torch.device(device)
        model = build_model(args.arch, num_classes=10, in_channels=1, input_size=args.input_size, width=args.width)
        info = ModelInfo(arch=args.arch, num_classes=10, in_channels=1, input_size=args.input_size, width=args.width,
                         class_names=train.class_names, mean=mean, std=std)  # fmt: skip
        stats = train_classifier(model, train, input_size=args.input_size, mean=mean, std=std, epochs=1,
                                 batch_size=args.batch_size, lr=1e-3, device=dev, progress=False)  # fmt: skip
        points = [p for p in find_cut_points(model.cpu(), (1, args.input_size, args.input_size)) if not p.skipped]
        cut = args.cut or points[len(points) // 2].module
        start = time.perf_counter()
        out = retrain_split(model, info, cut, train, test,
                            BottleneckSpec(compression_ratio=4, epochs=1, lr=5e-3, batch_size=args.batch_size),
                            device=dev)  # fmt: skip
        rows.append({
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "model_train_samples_per_s": round(stats["samples_per_second"], 1),
            "bottleneck_train_samples_per_s": round(out.samples_per_second, 1),
            "cut": cut,
            "retrain_wall_s": round(time.perf_counter() - start, 2),
        })  # fmt: skip
    print(f"{args.arch} width {args.width} at {args.input_size} px, batch {args.batch_size}, {args.images} images")
    print(f"{'device':<34} {'model train img/s':>18} {'bottleneck img/s':>17}  cut")
    for r in rows:
        print(
            f"{r['device']:<34} {r['model_train_samples_per_s']:>18} {r['bottleneck_train_samples_per_s']:>17}  {r['cut']}"
        )
    result = {"args": vars(args), "machine": platform.platform(), "torch": torch.__version__, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
