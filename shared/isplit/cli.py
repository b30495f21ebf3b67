"""The one command-line tool, ``isplit``.

Subcommands: ``zoo list|train``, ``cuts``, ``analyze`` (``--shards N``; ``analyze merge``), ``plan``,
``edge predict|profile``, ``stack up|down|status``, ``experiment sweep``, ``token create``. Errors a user can
cause print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from isplit import IsplitError

if TYPE_CHECKING:
    from isplit.analysis import AnalysisResult

# Modules that add their own subcommands: each has ``register_cli(subparsers)``.
_PLUGINS = ("isplit.plan", "isplit.edge", "isplit.dev.stack", "isplit.experiment", "isplit.dev.demo", "isplit.auth")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one readable line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from isplit.zoo import ARCHS

    print("\n".join(ARCHS))
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from isplit.checkpoint import save_checkpoint
    from isplit.data import load_dataset
    from isplit.training import pick_device, train_reference_model

    train = load_dataset(args.dataset, "train", in_channels=args.in_channels)
    test = load_dataset(args.dataset, "test", in_channels=args.in_channels)
    if args.max_train_images:
        train = train.subset(None, args.max_train_images)
    device = pick_device(args.device)
    print(f"training {args.arch} (width {args.width}) on {args.dataset}: {len(train)} images, {device}")
    model, info, stats = train_reference_model(
        args.arch,
        args.dataset,
        train,
        test,
        input_size=args.input_size,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
    )
    save_checkpoint(Path(args.out), model.cpu(), info)
    print(f"test accuracy {info.test_accuracy:.4f} on {len(test)} images; {stats['samples_per_second']:.0f} samples/s")
    print(f"wrote {args.out}")
    return 0


def cmd_cuts(args: argparse.Namespace) -> int:
    from isplit.checkpoint import load_model
    from isplit.cuts import find_cut_points
    from isplit.zoo import build_model

    if args.weights:
        model, info = load_model(Path(args.weights), arch=args.arch)
        shape = (info.in_channels, info.input_size, info.input_size)
    else:
        if not args.arch:
            raise IsplitError("give --arch or --weights")
        model = build_model(
            args.arch,
            num_classes=args.num_classes,
            in_channels=args.in_channels,
            input_size=args.input_size,
            width=args.width,
        )
        shape = (args.in_channels, args.input_size, args.input_size)
    points = find_cut_points(model, shape)
    print(f"{'module':<28} {'kind':<22} {'output shape':<16} {'bytes/img':>10}  skipped")
    for p in points:
        shape_text = "x".join(map(str, p.output_shape))
        print(f"{p.module:<28} {p.kind:<22} {shape_text:<16} {p.output_bytes:>10}  {'yes' if p.skipped else ''}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise IsplitError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _program_meta(args: argparse.Namespace) -> object:
    """``--class-names``/``--mean``/``--std`` as an ``isplit.exported.ProgramMeta`` (None when
    none is given); they apply to torch.export programs (``.pt2``) only."""
    given = {
        k: v
        for k, v in {
            "class_names": _csv(args.class_names) if args.class_names else None,
            "mean": _floats(args.mean, "--mean") if args.mean else None,
            "std": _floats(args.std, "--std") if args.std else None,
        }.items()
        if v is not None
    }
    if not given:
        return None
    from isplit.exported import ProgramMeta, is_exported_program

    if not is_exported_program(Path(args.weights)):
        raise IsplitError("--class-names, --mean and --std apply to torch.export programs (.pt2) only")
    return ProgramMeta(**given)


def cmd_analyze(args: argparse.Namespace) -> int:
    from isplit.analysis import result_from_stats, run_analysis
    from isplit.shards import INDEX_ENV, load_stats, merge, run_shard, run_shards, save_stats
    from isplit.training import pick_device

    missing = [flag for flag, value in (("--weights", args.weights), ("--dataset", args.dataset)) if not value]
    if args.shard_index is None and args.stats_out:
        args.shard_index = _int_env(INDEX_ENV)  # a pod of a Kubernetes Indexed Job
    if args.shard_index is None and not args.out:
        missing.append("--out")
    if args.shard_index is not None and not args.stats_out:
        missing.append("--stats-out")
    if args.stats_out and args.shard_index is None:
        args.parser.error(f"--stats-out writes one shard: give --shard-index (or set ${INDEX_ENV})")
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    options = {
        "arch": args.arch,
        "classes": _csv(args.classes) if args.classes else None,
        "max_images": args.max_images,
        "batch_size": args.batch_size,
        "target": args.target,
        "model_meta": _program_meta(args),
    }
    if args.shard_index is not None:  # one shard, for an external scheduler
        shard = run_shard(Path(args.weights), args.dataset, index=args.shard_index, count=args.shards,
                          device=pick_device(args.device), progress=True, **options)  # fmt: skip
        save_stats(shard, Path(args.stats_out))
        print(f"shard {args.shard_index} of {args.shards}: {int(shard.stats.counts.sum())} images in "
              f"{shard.meta.seconds:.2f} s; wrote {args.stats_out}")  # fmt: skip
        return 0
    if args.shards == 1:
        result = run_analysis(Path(args.weights), args.dataset, device=args.device, progress=True, **options)
    else:
        folder = Path(args.out) / "shards"
        paths = run_shards(Path(args.weights), args.dataset, count=args.shards, folder=folder,
                           device=str(pick_device(args.device)), **options)  # fmt: skip
        result = result_from_stats(merge([load_stats(p) for p in paths]))
    return _report(result, Path(args.out), args.json)


def cmd_analyze_merge(args: argparse.Namespace) -> int:
    from isplit.analysis import result_from_stats
    from isplit.shards import load_stats, merge

    result = result_from_stats(merge([load_stats(Path(p)) for p in args.stats]))
    return _report(result, Path(args.out), args.json)


def _int_env(name: str) -> int | None:
    import os

    value = os.environ.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise IsplitError(f"{name} must be a shard index (0, 1, ...), got {value!r}")
    return int(value)


def _report(result: AnalysisResult, out: Path, as_json: bool) -> int:
    from isplit.analysis import write_report

    paths = write_report(result, out)
    curve = result.curve
    print(f"analysed {curve.num_images} images in {result.seconds:.2f} s ({result.images_per_second:.0f} img/s)")
    print(f"best cut: {curve.best}; candidates: {', '.join(curve.candidates) or '(none)'}")
    print(f"size baseline (smallest output first): {', '.join(curve.size_ranking[:5])}")
    for p in curve.points:
        if not p.skipped:
            flag = " *best" if p.module == curve.best else (" ^cand" if p.module in curve.candidates else "")
            print(f"  {p.module:<28} log10 CUI {p.log10_cui:8.3f}  {p.output_bytes:>9} B{flag}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if as_json:
        print(json.dumps(result.model_dump(mode="json")))
    return 0


def cmd_export_head(args: argparse.Namespace) -> int:
    from isplit.export import export_head

    out = export_head(Path(args.candidate_dir), args.format)
    print(f"wrote {out} ({out.stat().st_size} bytes); recorded in {out.parent / 'head.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isplit", description="I-SPLIT split computing: analyse, train, serve, call.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    zoo = sub.add_parser("zoo", help="reference models").add_subparsers(dest="zoo_command", required=True)
    zoo.add_parser("list", help="architectures isplit can build").set_defaults(func=cmd_zoo_list)
    tr = zoo.add_parser("train", help="train a reference model and write a checkpoint")
    tr.add_argument("--arch", required=True)
    tr.add_argument("--dataset", required=True, help="fashion-mnist | digits | imagefolder:<path>")
    tr.add_argument("--input-size", type=int, default=32)
    tr.add_argument("--in-channels", type=int, default=None, help="image folders only (default 3)")
    tr.add_argument("--width", type=float, default=1.0, help="VGG channel multiplier (narrow variants)")
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--max-train-images", type=int, default=None)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True)
    tr.set_defaults(func=cmd_zoo_train)

    cuts = sub.add_parser("cuts", help="list the single-tensor cut points of a model")
    cuts.add_argument("--arch")
    cuts.add_argument("--weights", help="an isplit checkpoint or a torch.export program (.pt2)")
    cuts.add_argument("--num-classes", type=int, default=10)
    cuts.add_argument("--in-channels", type=int, default=3)
    cuts.add_argument("--input-size", type=int, default=224)
    cuts.add_argument("--width", type=float, default=1.0)
    cuts.set_defaults(func=cmd_cuts)

    an = sub.add_parser("analyze", help="I-SPLIT importance curve, candidates and plots")
    an.add_argument("--arch", help="checked against the checkpoint")
    an.add_argument("--weights", help="(required) an isplit checkpoint or a torch.export program (.pt2)")
    an.add_argument("--dataset", help="(required)")
    an.add_argument("--classes", help="comma-separated class indices or names (default: all)")
    an.add_argument("--max-images", type=int, default=1000)
    an.add_argument("--batch-size", type=int, default=64)
    an.add_argument("--target", choices=["label", "predicted"], default="label")
    an.add_argument("--device", default="auto")
    an.add_argument("--out", help="(required) folder for result.json and the plots")
    an.add_argument("--json", action="store_true", help="also print result.json to stdout")
    an.add_argument("--shards", type=_positive, default=1, help="split the images into N shards (N processes)")
    an.add_argument(
        "--shard-index", type=_non_negative, help="compute only this shard (default: $JOB_COMPLETION_INDEX)"
    )
    an.add_argument("--stats-out", help="with --shard-index: write the shard's stats (.npz) here")
    an.add_argument("--class-names", help=".pt2 programs: comma-separated names (default: the dataset's)")
    an.add_argument("--mean", help=".pt2 programs: per-channel mean of [0, 1] pixels (default: none)")
    an.add_argument("--std", help=".pt2 programs: per-channel std of [0, 1] pixels (default: none)")
    an.set_defaults(func=cmd_analyze, parser=an)
    # `isplit analyze merge ...` beside `isplit analyze --weights ...`: an optional sub-command.
    an_sub = an.add_subparsers(dest="analyze_command", parser_class=_Parser, metavar="{merge}")
    merge = an_sub.add_parser("merge", help="merge shard stats into result.json and plots")
    merge.add_argument("--stats", nargs="+", required=True, help="the stats files of every shard")
    merge.add_argument("--out", required=True)
    merge.add_argument("--json", action="store_true", help="also print result.json to stdout")
    merge.set_defaults(func=cmd_analyze_merge)

    eh = sub.add_parser("export-head", help="write a trained candidate's head as ONNX, TorchScript or ExecuTorch")
    eh.add_argument("candidate_dir", help="the candidate's folder (head.json and head.pt2, as the trainer writes)")
    eh.add_argument("--format", required=True, choices=["onnx", "torchscript", "executorch"])
    eh.set_defaults(func=cmd_export_head)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except IsplitError as exc:
        print(f"isplit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isplit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
