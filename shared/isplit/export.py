"""Export a trained head/tail pair: TorchScript files plus metadata JSON (no pickle needed to load).

Layout (see docs/CONTRACTS.md): ``head.pt`` + ``head.json`` for the edge, ``tail.pt`` +
``tail.json`` for the server (packaged into a TorchServe ``.mar``). Beside the TorchScript head
the edge gets ``head.pt2`` (the head as a ``torch.export`` program with a free batch size, the
source of every other format) and ``head.onnx`` (ONNX, opset ``ONNX_OPSET``);
:func:`export_head` writes any format of ``HEAD_FORMATS`` from ``head.pt2`` (ExecuTorch's
``head.pte`` where the ``executorch`` package is installed). ``head.json`` lists each written
format under ``artifacts``: file name, bytes, SHA-256 (and the ONNX opset).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isplit import IsplitError
from isplit.checkpoint import ModelInfo, sha256_file
from isplit.retrain import HeadTailPair

ONNX_OPSET = 18
HEAD_FORMATS: dict[str, str] = {"torchscript": "head.pt", "onnx": "head.onnx", "executorch": "head.pte"}
PROGRAM_FILE = "head.pt2"
ONNX_INPUT, ONNX_OUTPUT = "image", "code"


def _script(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.cpu().eval(), example.cpu(), check_trace=False)
    with torch.no_grad():
        if not torch.allclose(traced(example), module(example), atol=1e-4, rtol=1e-4):
            raise RuntimeError("the exported TorchScript module does not reproduce the original outputs")
    return traced


def export_pair(pair: HeadTailPair, info: ModelInfo, out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``head.pt``, ``head.json``, ``tail.pt``, ``tail.json`` into ``out_dir``.

    ``meta`` adds ids (analysis_id, candidate_id, model_name, dataset) to both JSON files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, info.in_channels, info.input_size, info.input_size)
    head = _script(pair.head, x)
    with torch.no_grad():
        code = pair.head.cpu()(x)
    tail = _script(pair.tail, code)
    common = {
        "schema_version": 1,
        "cut": pair.cut,
        "code_shape": pair.code_shape,
        "class_names": info.class_names,
        **meta,
    }
    head_meta = {
        **common,
        "arch": info.arch,
        "input_size": info.input_size,
        "in_channels": info.in_channels,
        "mean": info.mean,
        "std": info.std,
        "output_dtype": "float32",
    }
    paths = {k: out_dir / k for k in ("head.pt", "head.json", "tail.pt", "tail.json", PROGRAM_FILE, "head.onnx")}
    torch.jit.save(head, str(paths["head.pt"]))
    torch.jit.save(tail, str(paths["tail.pt"]))
    paths["tail.json"].write_text(json.dumps(common, indent=1))
    program = head_program(pair.head, x)
    torch.export.save(program, str(paths[PROGRAM_FILE]))
    _onnx_from_program(program, x, paths["head.onnx"])
    head_meta["artifacts"] = {
        "torchscript": artifact_entry(paths["head.pt"]),
        "program": artifact_entry(paths[PROGRAM_FILE]),
        "onnx": {**artifact_entry(paths["head.onnx"]), "opset": ONNX_OPSET},
    }
    paths["head.json"].write_text(json.dumps(head_meta, indent=1))
    return paths


def artifact_entry(path: Path) -> dict[str, Any]:
    """``{"file", "bytes", "sha256"}`` of an exported file (the name only: it lies beside head.json)."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def head_program(head: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the edge head (layers up to the cut + encoder) with a free batch
    dimension; ``example`` is ``(1, C, S, S)`` float32."""
    x = example.cpu().expand(2, *example.shape[1:]).contiguous()  # export specialises a batch of 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(head.cpu().eval(), (x,), dynamic_shapes=({0: batch},))


def _onnx_from_program(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
    """ONNX (opset ``ONNX_OPSET``, input ``image``, output ``code``, dynamic batch) from the head
    program, with torch's dynamo exporter (it needs ``onnxscript``, a dependency of isplit)."""
    import contextlib
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            (example.cpu(),),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            optimize=True,
            verbose=False,
        )
    if onnx_program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    onnx_program.save(str(path))


def _executorch_from_program(program: torch.export.ExportedProgram, path: Path) -> None:
    try:
        from executorch.exir import to_edge
    except ImportError:
        raise IsplitError(
            "format executorch needs the `executorch` package (pip install executorch); it is not installed here"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(to_edge(program).to_executorch().buffer)


def export_head(candidate_dir: Path, fmt: str) -> Path:
    """Write the head of a trained candidate (a folder with ``head.json`` and ``head.pt2``) in
    format ``fmt`` (one of ``HEAD_FORMATS``) beside it and record it in ``head.json``; returns
    the written file."""
    if fmt not in HEAD_FORMATS:
        raise IsplitError(f"unknown head format {fmt!r}; choose one of {', '.join(HEAD_FORMATS)}")
    folder = Path(candidate_dir)
    meta_path, program_path = folder / "head.json", folder / PROGRAM_FILE
    if not meta_path.is_file() or not program_path.is_file():
        raise IsplitError(f"{folder} holds no head.json and {PROGRAM_FILE} (give a trained candidate's folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsplitError(f"{meta_path} is not readable JSON: {exc}") from None
    from isplit.exported import load_program, to_module

    program = load_program(program_path)  # screened: a head file is no more trusted than an upload
    x = torch.zeros(1, int(meta["in_channels"]), int(meta["input_size"]), int(meta["input_size"]))
    out = folder / HEAD_FORMATS[fmt]
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "onnx":
        _onnx_from_program(program, x, tmp)
        entry: dict[str, Any] = {"opset": ONNX_OPSET}
    elif fmt == "executorch":
        _executorch_from_program(program, tmp)
        entry = {}
    else:
        _script_to(to_module(program), x, tmp)
        entry = {}
    shutil.move(tmp, out)
    meta.setdefault("artifacts", {})[fmt] = {**artifact_entry(out), **entry}
    meta_path.write_text(json.dumps(meta, indent=1))
    return out


def _script_to(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.jit.save(_script(module, example), str(path))
