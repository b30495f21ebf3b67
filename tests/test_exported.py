"""Models brought as torch.export programs (.pt2): loading runs no code from the file, the
module hierarchy keeps the user's names, and isplit's tools work on them."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from isplit import IsplitError
from isplit.checkpoint import load_model
from isplit.cuts import find_cut_points, split_at
from isplit.exported import ProgramMeta, embed_meta, read_meta


class TinyNet(nn.Module):
    """A classifier class defined only here: the loader cannot import it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x.view(x.size(0), -1) exports with the batch size spelled out: the loader frees it.
        return self.fc(self.body(self.stem(x)).view(x.size(0), -1))


class Tokens(nn.Module):
    """A transformer-like output: (N, T, D) tokens, not class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


def export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 32, 32), **save: object) -> Path:
    program = torch.export.export(model.eval(), (torch.randn(*shape),))
    torch.export.save(program, str(path), **save)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    return model, export(model, tmp_path_factory.mktemp("pt2") / "tiny.pt2")


def test_a_program_loads_with_its_shapes_names_and_outputs(tiny) -> None:
    original, path = tiny
    model, info = load_model(path)
    assert (info.arch, info.in_channels, info.input_size, info.num_classes) == ("exported", 1, 32, 10)
    assert info.class_names == [str(i) for i in range(10)] and info.mean == [0.0] and info.std == [1.0]
    assert info.extra["class_names_given"] is False  # numbered until a dataset names them
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in original.named_parameters()}
    x = torch.randn(5, 1, 32, 32)  # a batch size the program was not exported with
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)


def test_cut_points_carry_the_users_module_names_and_split_exactly(tiny) -> None:
    model, _ = load_model(tiny[1])
    points = find_cut_points(model, (1, 32, 32))
    assert [p.module for p in points] == ["stem.0", "stem.1", "stem.2", "stem.3", "body.0", "body.1", "body.2"]
    assert [p.kind for p in points][:2] == ["Conv2d", "BatchNorm2d"]
    assert [p.skipped for p in points] == [False, True, True, False, False, True, False]
    x = torch.randn(3, 1, 32, 32)
    for p in points:
        head, tail = split_at(model, p.module)
        with torch.no_grad():
            torch.testing.assert_close(tail(head(x)), model(x))


def test_class_names_and_normalisation_from_meta_or_the_archive(tiny, tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(10)]
    _, info = load_model(tiny[1], meta=ProgramMeta(class_names=names, mean=[0.5], std=[0.25]))
    assert (info.class_names, info.mean, info.std) == (names, [0.5], [0.25])
    copy = tmp_path / "named.pt2"
    copy.write_bytes(tiny[1].read_bytes())
    embed_meta(copy, ProgramMeta(class_names=names))
    assert read_meta(copy).class_names == names
    assert load_model(copy)[1].class_names == names
    with pytest.raises(IsplitError, match="3 class names given; the program has 10 outputs"):
        load_model(tiny[1], meta=ProgramMeta(class_names=["a", "b", "c"]))


def _rewrite(src: Path, dst: Path, change: dict[str, bytes]) -> Path:
    """Copy the archive ``src`` to ``dst`` with some members (relative to its root) replaced/added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for name in zin.namelist():
            rel = name[len(root) :]
            zout.writestr(name, change.pop(rel) if rel in change else zin.read(name))
        for rel, data in change.items():
            zout.writestr(root + rel, data)
    return dst


class _Boom:
    def __reduce__(self):  # unpickling this runs a shell command that leaves a marker file
        return (subprocess.call, (["touch", str(MARKER)],))


MARKER = Path("/tmp/isplit-test-exported-pwned")


def _crafted_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save(((_Boom(),), {}), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "attack",
    ["sample_inputs", "pickled_weight", "sympy_expr", "guards_code", "python_target", "name", "stack_trace"],
)
def test_a_crafted_program_is_refused_before_any_of_it_runs(tiny, tmp_path: Path, attack: str) -> None:
    """Each way torch.export.load would run code from a file is refused, and nothing ran."""
    MARKER.unlink(missing_ok=True)
    with zipfile.ZipFile(tiny[1]) as z:
        root = z.namelist()[0].split("/", 1)[0] + "/"
        program = json.loads(z.read(root + "models/model.json"))
        weights = json.loads(z.read(root + "data/weights/model_weights_config.json"))
    change: dict[str, bytes] = {}
    evil = f"__import__('os').system('touch {MARKER}')"
    if attack == "sample_inputs":  # torch.load(weights_only=True) fails, then torch retries with pickle
        change["data/sample_inputs/model.pt"] = _crafted_pickle()
    elif attack == "pickled_weight":
        first = next(iter(weights["config"].values()))
        first["use_pickle"] = True
        change["data/weights/model_weights_config.json"] = json.dumps(weights).encode()
        change["data/weights/" + first["path_name"]] = pickle.dumps(_Boom())
    elif attack == "sympy_expr":  # parsed by sympy.sympify, an eval
        x = program["graph_module"]["graph"]["tensor_values"]["x"]
        x["sizes"][0] = {"as_expr": {"expr_str": evil, "hint": {"as_int": 1}}}
        change["models/model.json"] = json.dumps(program).encode()
    elif attack == "guards_code":  # exec'd when the program is called
        program["guards_code"] = [evil]
        change["models/model.json"] = json.dumps(program).encode()
    elif attack == "python_target":  # a node calling a Python function reachable from torch
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        change["models/model.json"] = json.dumps(program).encode()
    elif attack == "name":  # torch.fx writes input names into the Python source it runs
        text = json.dumps(program).replace('"x"', json.dumps(f"x=({evil})"))
        change["models/model.json"] = text.encode()
    else:  # a carriage return ends the comment torch.fx makes of a stack trace
        node = program["graph_module"]["graph"]["nodes"][0]
        node["metadata"]["stack_trace"] = f'File "a.py", line 1, in f\n    y = 1\r{evil}\n'
        change["models/model.json"] = json.dumps(program).encode()
    bad = _rewrite(tiny[1], tmp_path / "evil.pt2", change)
    with pytest.raises(IsplitError, match="evil.pt2"):
        load_model(bad)
    assert not MARKER.exists()


def test_a_compressed_archive_is_refused(tiny, tmp_path: Path) -> None:
    bad = tmp_path / "zipped.pt2"
    with zipfile.ZipFile(tiny[1]) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    with pytest.raises(IsplitError, match="compressed members"):
        load_model(bad)


def test_torch_export_load_itself_would_run_the_crafted_sample_inputs(tiny, tmp_path: Path) -> None:
    """The screen matters: without it this very file runs code while loading."""
    MARKER.unlink(missing_ok=True)
    bad = _rewrite(tiny[1], tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": _crafted_pickle()})
    with contextlib.suppress(Exception):  # it may fail after having run the pickle: the marker tells
        torch.export.load(str(bad))
    ran = MARKER.exists()
    MARKER.unlink(missing_ok=True)
    assert ran


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isplit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_a_program", "cannot be loaded safely"),
        ("wrong_input", "input has shape (1, 32); isplit needs an image batch"),
        ("no_classes", "output has shape (1); isplit needs classification logits"),
        ("tokens", "output has shape (1, 64, 4); isplit needs classification logits"),
    ],
)
def test_bad_files_exit_2_with_one_line_naming_the_problem(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "bad.pt2"
    if case == "not_a_program":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "wrong_input":
        export(nn.Linear(32, 10), path, (1, 32))
    elif case == "no_classes":
        export(_Sum(), path)
    else:
        export(Tokens(), path)
    done = _cli("cuts", "--weights", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


class _Sum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2, 3))


def test_isplit_analyze_just_works_on_a_digits_program(tiny, tmp_path: Path) -> None:
    done = _cli(
        "analyze", "--weights", str(tiny[1]), "--dataset", "digits", "--out", "out", "--max-images", "64", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["model"]["arch"] == "exported"
    assert result["model"]["class_names"] == [str(i) for i in range(10)]  # the dataset's names
    assert result["curve"]["best"] in {"stem.0", "stem.3", "body.0", "body.2"}


def test_flops_and_parameters_of_each_cut_equal_the_original_models(tiny) -> None:
    from isplit.plan import cut_costs

    original, path = tiny
    model, _ = load_model(path)
    points = find_cut_points(model, (1, 32, 32))
    ours = cut_costs(model, (1, 32, 32), points)
    theirs = cut_costs(original, (1, 32, 32), points)  # the same qualified names in the original
    assert ours.total_flops == theirs.total_flops > 0
    assert [(c.module, c.head_flops, c.head_params) for c in ours.cuts] == [
        (c.module, c.head_flops, c.head_params) for c in theirs.cuts
    ]


def test_an_rgb_program_is_analysed_on_a_grayscale_dataset_resized_to_its_input(tmp_path: Path) -> None:
    from isplit.analysis import run_analysis

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    path = export(net, tmp_path / "rgb.pt2", (1, 3, 24, 24))
    result = run_analysis(path, "digits", max_images=16, batch_size=16)
    assert (result.model.in_channels, result.model.input_size) == (3, 24)
    assert [p.module for p in result.curve.points] == ["0", "1", "2", "3"]
