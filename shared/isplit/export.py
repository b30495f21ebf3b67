"""Export a trained head/tail pair: TorchScript files plus metadata JSON (no pickle needed to load).

Layout (see docs/CONTRACTS.md): ``head.pt`` + ``head.json`` for the edge, ``tail.pt`` +
``tail.json`` for the server (packaged into a TorchServe ``.mar``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isplit.checkpoint import ModelInfo
from isplit.retrain import HeadTailPair


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
    paths = {k: out_dir / k for k in ("head.pt", "head.json", "tail.pt", "tail.json")}
    torch.jit.save(head, str(paths["head.pt"]))
    torch.jit.save(tail, str(paths["tail.pt"]))
    paths["head.json"].write_text(json.dumps(head_meta, indent=1))
    paths["tail.json"].write_text(json.dumps(common, indent=1))
    return paths
