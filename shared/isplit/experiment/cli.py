"""``isplit experiment sweep|report``: the options are generated from :class:`SweepConfig`'s
fields (one option per field, its help the field's description)."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from isplit import IsplitError
from isplit.experiment.report import (
    budget_outcome,
    number,
    percent,
    read_result,
    signed,
    write_outputs,
    write_report,
)
from isplit.experiment.schema import SweepConfig
from isplit.experiment.sweep import run_sweep


def _subsets_arg(text: str) -> list[list[int | str]]:
    groups = [[t.strip() for t in g.split(",") if t.strip()] for g in text.split(";")]
    groups = [g for g in groups if g]
    if not groups:
        raise argparse.ArgumentTypeError(f"no class subset in {text!r}; write e.g. '0,1;5,7,9'")
    return [[int(c) if c.isdigit() else c for c in g] for g in groups]


def _csv_arg(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def _budgets_arg(text: str) -> list[float]:
    try:
        values = [float(t) for t in _csv_arg(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be fractions like '0.1,0.25,0.5', got {text!r}") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"each budget is a fraction in (0, 1], got {text!r}")
    return values


OPTION_NAMES = {"time_budget_s": "--time-budget"}  # otherwise --field-name
PARSERS: dict[str, Callable[[str], Any]] = {"cuts": _csv_arg, "subsets": _subsets_arg, "budgets": _budgets_arg}
EXCLUSIVE = ("cuts", "max_cuts")  # give one of them


def _option(name: str, field: FieldInfo) -> tuple[str, dict[str, Any]]:
    """The option of one ``SweepConfig`` field: flag, type or choices, help with the default."""
    flag = OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    options: dict[str, Any] = {"dest": name, "default": None, "help": field.description or ""}
    if field.is_required():
        options["required"] = True
    elif field.default is not None:
        options["help"] += f" (default: {field.default})"
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if name in PARSERS:
        options["type"] = PARSERS[name]
    elif typing.get_origin(kind) is Literal:
        options["choices"] = list(typing.get_args(kind))
    else:
        options["type"] = kind
    return flag, options


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """One option per ``SweepConfig`` field, then where the outputs go."""
    exclusive = p.add_mutually_exclusive_group()
    for name, field in SweepConfig.model_fields.items():
        flag, options = _option(name, field)
        (exclusive if name in EXCLUSIVE else p).add_argument(flag, **options)
    p.add_argument("--save-weights", help="where to save the trained reference model (default: OUT/PREFIXmodel.pt)")
    p.add_argument("--no-save-weights", action="store_true", help="do not save the trained reference model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. 'vgg16-fmnist-'")
    p.add_argument("--name", help="a name for the run (default: the output directory's name)")
    p.add_argument("--note", action="append", default=[], help="a remark recorded in the result (repeatable)")
    p.add_argument("--resume", type=Path, help="an earlier result.json of the same sweep: keep its measured cuts, "
                   "train only the others (same --weights and settings; budget, device, cuts may differ)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The config of the options given; the model's defaults for the rest."""
    given = {name: getattr(args, name) for name in SweepConfig.model_fields}
    return SweepConfig(**{name: value for name, value in given.items() if value is not None})


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    save = None if args.no_save_weights or args.weights else Path(args.save_weights or out / f"{args.prefix}model.pt")
    resume = read_result(args.resume) if args.resume else None
    result = run_sweep(cfg, name=args.name or out.name, save_weights=save, notes=args.note, resume=resume)
    paths = write_outputs(result, out, args.prefix)
    cui, size = result.correlations["cui"], result.correlations["size"]
    print(f"measured {len(result.cuts)} cuts in {result.wall_seconds:.0f} s on {result.machine.device_name}")
    print(
        f"CUI:  Spearman {signed(cui.spearman)} (p {number(cui.spearman_p)}), Kendall {signed(cui.kendall)}, n {cui.n}"
    )
    print(f"size: Spearman {signed(size.spearman)} (p {number(size.spearman_p)}), Kendall {signed(size.kendall)}")
    for pick in (result.picks.cui, result.picks.size, result.picks.oracle):
        print(f"{pick.method:>6} pick: {pick.module:<20} accuracy {percent(pick.accuracy)}")
    for row in result.budget_picks:
        if row.target == result.curve.target:
            print(f"budget {row.budget:.0%}: {budget_outcome(row, result.test_images)}")
    if save is not None:
        print(f"wrote {save}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    paths = write_report(Path(args.result), Path(args.out) if args.out else None, args.prefix)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment sweep`` and ``experiment report`` to the ``isplit`` CLI."""
    exp = subparsers.add_parser("experiment", help="re-measure I-SPLIT's claim: does CUI predict split accuracy?")
    _add_commands(exp.add_subparsers(dest="experiment_command", required=True))


def _add_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="train bottlenecks at many cuts; correlate accuracy with CUI and size")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("report", help="regenerate the Markdown report and plot from a result JSON")
    rep.add_argument("result", help="a sweep's result.json")
    rep.add_argument("--out", help="output directory (default: beside the JSON)")
    rep.add_argument("--prefix", help="file name prefix (default: taken from the JSON's name)")
    rep.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isplit.experiment sweep|report ...``: the same commands without the rest of the CLI
    (for machines that have only this module's dependencies)."""
    parser = argparse.ArgumentParser(prog="python -m isplit.experiment")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except IsplitError as exc:
        print(f"isplit: error: {exc}", file=sys.stderr)
        return 2
