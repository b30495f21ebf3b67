"""Models brought as ``torch.export`` programs (``.pt2`` files from ``torch.export.save``).

A program is screened before ``torch.export.load`` sees it, so that loading cannot run code
from the file (see "Safety" below), then loaded, checked to be an image classifier
(``(N, C, S, S)`` in, ``(N, classes)`` out), and turned into plain ``torch.fx`` modules with
the module hierarchy and qualified names of the user's model (``torch.export.unflatten``), so
cut points, the importance engine, retraining and TorchScript/ONNX export work on it as on a
zoo model. The input shape comes from the program's input spec, the classes from its output;
class names and normalisation are optional (:class:`ProgramMeta`, stored in the archive as
the extra file ``isplit.json`` or given by the caller).

Safety. A PT2 archive is a zip holding a JSON graph (``models/model.json``), raw weight bytes
with JSON configs, and a ``torch.save``'d sample input. ``torch.export.load`` would still run
code from a crafted file in four ways, each refused here before it is called:

* pickled weights or constants (``use_pickle`` in the configs, custom/opaque objects), which
  it loads with ``torch.load(weights_only=False)`` or ``pickle.loads``;
* the sample inputs, which it loads with ``weights_only=True`` but retries with
  ``weights_only=False`` on failure: we load them first with ``weights_only=True`` and refuse
  the file when that fails (the same bytes then never reach the fallback);
* symbolic-shape expressions (``expr_str``), which it parses with ``sympy.sympify`` (an
  ``eval``): each must be made of shape symbols, integers, arithmetic and sympy's known names;
* guard code (``guards_code``), compiled with ``exec`` when the program is called: must be
  empty; AOTInductor binaries (native code) and legacy pickled formats are refused too.

Every graph node's target must be an ATen operator, ``getitem`` or a symbolic-size operator
(no Python callables reachable from ``torch.*``, no higher-order or custom operators).
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from torch import fx, nn

from isplit import IsplitError

ARCH = "exported"  # ModelInfo.arch of a model brought as a torch.export program
META_FILE = "isplit.json"  # the archive's extra file with class names and normalisation
NAMES_GIVEN = "class_names_given"  # ModelInfo.extra key: False when the classes are only numbered
BATCH_CHECK = 3  # images run as one batch and one by one to prove the batch size is free

_FIXED_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_ALLOWED_FILE = re.compile(
    r"(models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]{1,100})"
)
_SYM_TARGETS = {
    *(
        f"_operator.{n}"
        for n in [
            "getitem",
            "eq",
            "ne",
            "le",
            "ge",
            "lt",
            "gt",
            "neg",
            "pos",
            "mul",
            "add",
            "sub",
            "floordiv",
            "mod",
            "pow",
            "truediv",
        ]
    ),
    *(f"torch.sym_{n}" for n in ["not", "int", "float", "ite", "max", "min", "sqrt"]),
    "math.trunc",
}
_REFUSED_ATEN = ("from_file",)  # would read a server file into a tensor
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "FloorDiv", "ModularIndexing",
    "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToInt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "True", "False", "integer", "positive", "nonnegative", "real", "finite", "oo", "zoo",
}  # fmt: skip
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<sym>'[a-z]+\d+')|(?P<name>[A-Za-z]+\d*)|(?P<num>\d+(?:\.\d+)?)|(?P<op>[-+*/%(),=<>!]))"
)
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\u2028\u2029]")  # anything but \n that can end a line
_CODE_CHARS = re.compile(r"[\"'\\(){}\n`]")
_VIEW_OPS = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


class ProgramMeta(BaseModel):
    """Optional facts a program does not carry: ``class_names`` (one per output), per-channel
    ``mean``/``std`` of the ``[0, 1]`` pixels (default: no normalisation)."""

    class_names: list[str] = Field(default_factory=list, max_length=10_000)
    mean: list[float] | None = Field(default=None, max_length=16)
    std: list[float] | None = Field(default=None, max_length=16)


def is_exported_program(path: Path) -> bool:
    """True when ``path`` is a zip with a PT2 archive's ``archive_format`` record (cheap check)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") and n.count("/") == 1 for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def screen_archive(path: Path) -> dict[str, Any]:
    """Refuse (``IsplitError``) a PT2 archive that could run code when loaded; return its
    ``models/model.json`` as a dict. See the module docstring for what is checked and why."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise IsplitError(f"weights file {path} is not a torch.export program (not a zip archive)") from exc
    with z:
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise IsplitError(f"weights file {path} is not a torch.export program (no single archive folder)")
        if any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist()):  # torch stores; bombs compress
            raise IsplitError(f"weights file {path} has compressed members; torch.export.save writes none")
        root = roots.pop() + "/"
        rel = [n[len(root) :] for n in names]
        unknown = [n for n in rel if n not in _FIXED_FILES and not _ALLOWED_FILE.fullmatch(n)]
        if unknown:
            raise IsplitError(
                f"weights file {path} holds {unknown[0]!r}, which isplit does not load "
                "(only the graph, plain tensor weights and constants are accepted; no AOTInductor "
                "binaries, pickled objects or extra models)"
            )
        if "models/model.json" not in rel or "data/sample_inputs/model.pt" not in rel:
            raise IsplitError(f"weights file {path} is not a torch.export program saved by torch.export.save")
        read = lambda name: z.read(root + name)  # noqa: E731
        if read("archive_format").decode(errors="replace").strip() != "pt2":
            raise IsplitError(f"weights file {path} is not a PT2 archive")
        for config in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
            _check_payload_config(path, _json(path, read(config), config), config)
        try:
            sample = torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), weights_only=True)
        except Exception as exc:  # refusals of unsafe pickles come in many types
            raise IsplitError(f"weights file {path} has sample inputs that are not plain tensors") from exc
        if not isinstance(sample, tuple | dict):
            raise IsplitError(f"weights file {path} has sample inputs of type {type(sample).__name__}")
        program = _json(path, read("models/model.json"), "models/model.json")
    if not isinstance(program, dict) or program.get("guards_code"):
        raise IsplitError(f"weights file {path} carries guard code; isplit does not run code from a program file")
    _check_graph_json(path, program)
    return program


def _json(path: Path, data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsplitError(f"weights file {path}: {name} is not JSON ({exc})") from None


def _check_payload_config(path: Path, config: Any, name: str) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise IsplitError(f"weights file {path}: {name} is not a payload config")
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise IsplitError(f"weights file {path}: {fqn!r} is stored pickled; isplit loads only plain tensors")
        if "constants" in name and not str(entry.get("path_name", "")).startswith("tensor_"):
            raise IsplitError(f"weights file {path}: constant {fqn!r} is not a tensor")


def _check_graph_json(path: Path, program: dict[str, Any]) -> None:
    """Node targets from the allow-list; every symbolic expression made of harmless tokens;
    every other string (names, module paths, metadata) free of the quotes, brackets and line
    breaks that would let it escape into the Python source torch.fx generates and runs."""
    stack: list[tuple[str, Any]] = [("", program)]
    while stack:
        key, obj = stack.pop()
        if isinstance(obj, dict):
            target = obj.get("target")
            if isinstance(target, str) and "inputs" in obj and "outputs" in obj:
                _check_target(path, target)
            stack.extend(obj.items())
        elif isinstance(obj, list):
            stack.extend((key, v) for v in obj)
        elif isinstance(obj, str):
            if key == "expr_str":
                _check_expr(path, obj)
            elif key in ("in_spec", "out_spec"):  # pytree specs: JSON text of type names
                stack.append((key + "_json", _json(path, obj.encode(), key)))
            elif _CONTROL.search(obj) or (key != "stack_trace" and _CODE_CHARS.search(obj)):
                raise IsplitError(
                    f"weights file {path} has a {key or 'graph'} string isplit does not accept: {obj[:60]!r}"
                )
    for key in program.get("range_constraints", {}) or {}:
        if not re.fullmatch(r"[a-z]+\d+", str(key)):
            raise IsplitError(f"weights file {path} has a shape symbol {str(key)[:40]!r} isplit does not accept")


def _check_target(path: Path, target: str) -> None:
    if target in _SYM_TARGETS:
        return
    if target.startswith("torch.ops.aten.") and not any(bad in target for bad in _REFUSED_ATEN):
        return
    raise IsplitError(f"weights file {path} calls {target[:80]!r}; isplit accepts programs of ATen operators only")


def _check_expr(path: Path, expr: str) -> None:
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise IsplitError(f"weights file {path} has a shape expression isplit does not accept: {expr[:60]!r}")
        name = m.group("name")
        if name is not None and name not in _SYMPY_NAMES and not re.fullmatch(r"[a-z]+\d+", name):
            raise IsplitError(f"weights file {path} has a shape expression naming {name[:40]!r}")
        pos = m.end()


def read_meta(path: Path) -> ProgramMeta:
    """The archive's ``extra/isplit.json`` (empty meta when absent); ``IsplitError`` if invalid."""
    with zipfile.ZipFile(path) as z:
        found = [n for n in z.namelist() if n.split("/", 1)[-1] == f"extra/{META_FILE}"]
        if not found:
            return ProgramMeta()
        raw = z.read(found[0])
    try:
        return ProgramMeta.model_validate_json(raw)
    except ValidationError as exc:
        raise IsplitError(f"weights file {path}: extra/{META_FILE} is invalid: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"


def load_program(path: Path) -> torch.export.ExportedProgram:
    """Screen, then ``torch.export.load`` the file (``IsplitError`` naming the problem)."""
    screen_archive(path)
    try:
        with open(path, "rb") as fh:
            return torch.export.load(fh)
    except IsplitError:
        raise
    except Exception as exc:  # deserialisation errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IsplitError(f"weights file {path} is not a loadable torch.export program: {first[:200]}") from None


def save_program(program: torch.export.ExportedProgram, path: Path, meta: ProgramMeta | None = None) -> None:
    """``torch.export.save`` ``program`` with ``meta`` as its ``extra/isplit.json``."""
    extra = {META_FILE: meta.model_dump_json()} if meta is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files=extra)


def program_signature(program: torch.export.ExportedProgram) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), number of classes)`` from the program's one image input and one logits
    output; ``IsplitError`` naming what is not an image classifier."""
    users = [
        s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(users) != 1 or users[0].arg.name not in placeholders:
        raise IsplitError(f"the program takes {len(users)} inputs; isplit needs one image batch (N, C, H, W)")
    val = placeholders[users[0].arg.name].meta.get("val")
    shape = tuple(getattr(val, "shape", ()))
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise IsplitError(f"the program's input has shape {_text(shape)}; isplit needs an image batch (N, C, H, W)")
    c, h, w = (int(d) for d in shape[1:])
    if c not in (1, 3) or h != w:
        raise IsplitError(f"the program's input is {c}x{h}x{w}; isplit needs 1 or 3 channels and square images")
    if val.dtype != torch.float32:
        raise IsplitError(f"the program's input is {val.dtype}; isplit needs float32 images")
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    if not isinstance(outputs, tuple | list) or len(outputs) != 1:
        raise IsplitError("the program returns several values; isplit needs one (N, classes) logits tensor")
    out = outputs[0].meta.get("val") if isinstance(outputs[0], fx.Node) else None
    out_shape = tuple(getattr(out, "shape", ()))
    if len(out_shape) != 2 or not isinstance(out_shape[1], int) or out_shape[1] < 2:
        raise IsplitError(
            f"the program's output has shape {_text(out_shape)}; isplit needs classification logits (N, classes)"
        )
    return (c, h, w), int(out_shape[1])


def _text(shape: tuple) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in shape) + ")"


class ExportedLayer(fx.GraphModule):
    """One module of a program, as a plain ``fx.GraphModule`` under its original qualified
    name; ``original_type`` is the user's class path (e.g. ``torch.nn.modules.conv.Conv2d``)."""

    original_type: str = ""


def to_module(program: torch.export.ExportedProgram) -> nn.Module:
    """The program as nested :class:`ExportedLayer` modules named like the user's model:
    ``named_modules()``/``named_parameters()`` give the original qualified names, and the
    result takes ``(N, C, H, W)`` for any ``N`` and returns ``(N, classes)``."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, type_path in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(fqn, str(type_path))
    try:
        flat = torch.export.unflatten(program)
    except Exception as exc:  # unflatten fails on unusual programs in many ways
        raise IsplitError(f"cannot recover the module hierarchy of the program: {str(exc)[:200]}") from None
    model = _convert(flat, "", types)
    # The top graph returns a one-element tuple; the model returns the logits tensor itself.
    out = next(n for n in model.graph.nodes if n.op == "output")
    if isinstance(out.args[0], tuple | list):
        out.args = (out.args[0][0],)
    _free_batch_size(model)
    model.recompile()
    return model.eval()


def _convert(module: nn.Module, fqn: str, types: dict[str, str]) -> ExportedLayer:
    """``module`` (an unflattened module with a ``graph``) as an :class:`ExportedLayer`, each
    module its graph calls converted first (containers nobody calls stay plain modules)."""
    for target in {str(n.target) for n in module.graph.nodes if n.op == "call_module"}:
        parent_name, _, leaf = target.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        child_fqn = f"{fqn}.{target}" if fqn else target
        parent._modules[leaf] = _convert(parent.get_submodule(leaf), child_fqn, types)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    layer = ExportedLayer(module, graph, class_name=types.get(fqn, "Program").rsplit(".", 1)[-1])
    layer.original_type = types.get(fqn, "")
    return layer


def _free_batch_size(model: nn.Module) -> None:
    """Reshapes that spell out the export-time batch size get ``-1`` instead, so the model runs
    at any batch size (the same numbers at the export batch size)."""
    for layer in model.modules():
        if not isinstance(layer, fx.GraphModule):
            continue
        for node in layer.graph.nodes:
            if node.op != "call_function" or not any(str(node.target).endswith(v) for v in _VIEW_OPS):
                continue
            out = getattr(node.meta.get("val"), "shape", None)
            if out is not None and len(out) >= 1 and all(isinstance(d, int) for d in out[1:]):
                node.args = (node.args[0], [-1, *(int(d) for d in out[1:])], *node.args[2:])
        layer.graph.eliminate_dead_code()
        layer.recompile()


def check_batch_free(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """``IsplitError`` unless ``BATCH_CHECK`` random images give the same logits as a batch
    as one by one (the program was exported for a fixed batch, or in training mode)."""
    x = torch.rand(BATCH_CHECK, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            batch = model(x)
            single = torch.cat([model(x[i : i + 1]) for i in range(BATCH_CHECK)])
    except Exception as exc:  # a program bound to its export shapes fails in many ways
        raise IsplitError(
            f"the program does not run on a batch of {BATCH_CHECK} images ({str(exc).splitlines()[0][:150]}); "
            "export it with a dynamic batch dimension (dynamic_shapes={'x': {0: torch.export.Dim.DYNAMIC}})"
        ) from None
    if not torch.allclose(batch, single, atol=1e-4, rtol=1e-3):
        raise IsplitError(
            "the program's outputs depend on the batch (exported in training mode?); export the model after .eval()"
        )


def is_skipped_type(type_path: str, skipped: tuple[type, ...]) -> bool:
    """Whether the class named ``type_path`` (already imported; nothing is imported here) is a
    subclass of one of ``skipped``."""
    module_name, _, cls_name = type_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), cls_name, None)
    return isinstance(cls, type) and issubclass(cls, skipped)


def load_exported(path: Path, meta: ProgramMeta | None = None) -> tuple[nn.Module, Any]:
    """Load a ``.pt2`` program as ``(model in eval mode, ModelInfo)``.

    ``meta`` (e.g. from CLI flags) overrides the archive's ``extra/isplit.json`` field by field.
    ``ModelInfo.class_names`` stays empty when neither gives them (callers fill in the dataset's).
    """
    program = load_program(path)  # its errors name the file already
    try:
        return _as_model(path, program, meta)
    except IsplitError as exc:
        raise IsplitError(f"weights file {path}: {exc}") from None


def _as_model(path: Path, program: torch.export.ExportedProgram, meta: ProgramMeta | None) -> tuple[nn.Module, Any]:
    from isplit.checkpoint import MAX_INPUT_SIZE, ModelInfo

    (c, size, _), num_classes = program_signature(program)
    stored = read_meta(path)
    given = meta.model_dump(exclude_unset=True) if meta is not None else {}
    merged = ProgramMeta.model_validate({**stored.model_dump(exclude_unset=True), **given})
    if merged.class_names and len(merged.class_names) != num_classes:
        raise IsplitError(f"{len(merged.class_names)} class names given; the program has {num_classes} outputs")
    for name, values in (("mean", merged.mean), ("std", merged.std)):
        if values is not None and len(values) != c:
            raise IsplitError(f"{name} has {len(values)} values; the program takes {c} channels")
    if merged.std is not None and any(v <= 0 for v in merged.std):
        raise IsplitError(f"std values must be > 0, got {merged.std}")
    model = to_module(program)
    check_batch_free(model, (c, size, size))
    if not 8 <= size <= MAX_INPUT_SIZE:
        raise IsplitError(f"the program's input is {size}x{size} pixels; isplit accepts 8 to {MAX_INPUT_SIZE}")
    info = ModelInfo(
        arch=ARCH,
        num_classes=num_classes,
        in_channels=c,
        input_size=size,
        # Until a dataset gives its names (with_dataset_names), the classes are numbered.
        class_names=merged.class_names or [str(i) for i in range(num_classes)],
        mean=merged.mean if merged.mean is not None else [0.0] * c,
        std=merged.std if merged.std is not None else [1.0] * c,
        extra={"format": "torch.export", "program_class": type(model).__name__, NAMES_GIVEN: bool(merged.class_names)},
    )
    return model, info


def embed_meta(path: Path, meta: ProgramMeta) -> None:
    """Rewrite the program at ``path`` with ``meta`` laid over its stored ``isplit.json``."""
    merged = ProgramMeta.model_validate(
        {**read_meta(path).model_dump(exclude_unset=True), **meta.model_dump(exclude_unset=True)}
    )
    program = load_program(path)
    tmp = path.with_name(path.name + ".meta")
    try:
        save_program(program, tmp, merged)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def with_dataset_names(info: Any, names: list[str]) -> Any:
    """``info`` (a ``ModelInfo``) with the dataset's class ``names`` when it is a program
    uploaded without names and the counts agree; otherwise ``info`` unchanged."""
    if info.extra.get(NAMES_GIVEN, True) or len(names) != info.num_classes:
        return info
    return info.model_copy(update={"class_names": list(names), "extra": {**info.extra, NAMES_GIVEN: True}})
