"""TorchServe helpers: package a tail as a ``.mar``, (un)register it, and call it.

A tail is served by TorchServe with the isplit handler
(``services/tail-serving/isplit_tail_handler.py``). The handler file is found, in order, at
``$ISPLIT_TAIL_HANDLER`` or at ``services/tail-serving/isplit_tail_handler.py`` in the source
tree this package was installed from (an editable install, as ``make setup`` does); an
installation without the source tree (e.g. a container image) must set ``ISPLIT_TAIL_HANDLER``.

The TorchServe worker that runs the handler must be able to ``import isplit`` (TorchServe runs
in the project venv locally, and the tail-serving image installs ``isplit``): the archive holds
the handler, ``tail.pt`` and ``tail.json``, not the library.

URLs: ``management_url`` is the management API base (``http://127.0.0.1:8081``),
``inference_base`` the inference API base (``http://127.0.0.1:8080``).

Token authorization is on: every management call takes ``key`` (the management key) and every
prediction ``key`` (the inference key), sent as ``Authorization: Bearer <key>``. TorchServe 0.12
makes new random keys at each start and writes them to ``key_file.json`` in its working
directory (:func:`read_keys`); ``scripts/torchserve`` runs it in its run dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import requests

from isplit import IsplitError

if TYPE_CHECKING:  # torch only where a function needs it: the gateway imports this module torch-free
    import torch

HANDLER_ENV = "ISPLIT_TAIL_HANDLER"
_REPO_HANDLER = Path(__file__).resolve().parents[2] / "services" / "tail-serving" / "isplit_tail_handler.py"
# TorchServe's own rule for model names (ModelArchive.validateModelName).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class TorchServeError(RuntimeError):
    """TorchServe refused a call or could not be reached.

    ``status`` is the HTTP status (``None`` when no answer came) and ``message`` the server's
    own message (the handler's reason for a 400).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TorchServeKeys:
    """The keys of a TorchServe with token authorization: management and inference APIs."""

    management: str = field(repr=False)
    inference: str = field(repr=False)


def read_keys(key_file: Path) -> TorchServeKeys:
    """The keys TorchServe wrote to ``key_file`` (its ``key_file.json``) at its last start.

    Raises:
        IsplitError: the file is missing or is not TorchServe's key file.
    """
    try:
        keys = json.loads(Path(key_file).read_text())
        return TorchServeKeys(management=keys["management"]["key"], inference=keys["inference"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IsplitError(f"cannot read TorchServe's keys from {key_file}: {exc}") from None


def default_handler_path() -> Path:
    """The tail handler file: ``$ISPLIT_TAIL_HANDLER``, else the one in the source tree."""
    configured = os.environ.get(HANDLER_ENV)
    path = Path(configured) if configured else _REPO_HANDLER
    if not path.is_file():
        source = f"{HANDLER_ENV}={configured}" if configured else "the isplit source tree"
        raise IsplitError(f"tail handler not found at {path} (from {source}); set {HANDLER_ENV} to its path")
    return path


def build_mar(
    tail_pt: Path,
    tail_json: Path,
    model_name: str,
    version: str,
    export_dir: Path,
    handler: Path | None = None,
) -> Path:
    """Package a tail as ``export_dir/<model_name>.mar`` and return its path.

    The archive holds ``tail.pt`` (serialized file), ``tail.json`` (extra file) and the handler
    (default :func:`default_handler_path`), whatever the input files are called. An existing
    archive is replaced atomically, so a server reading the store never sees half a file.
    """
    _check_model_name(model_name)
    handler = Path(handler) if handler is not None else default_handler_path()
    for path in (Path(tail_pt), Path(tail_json), handler):
        if not path.is_file():
            raise IsplitError(f"cannot build {model_name}.mar: {path} does not exist")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=export_dir, prefix=f".{model_name}.") as scratch:
        staged = Path(scratch)
        shutil.copyfile(tail_pt, staged / "tail.pt")
        shutil.copyfile(tail_json, staged / "tail.json")
        (staged / "tmp").mkdir()
        # A child process with its own TMPDIR: the archiver assembles files in
        # $TMPDIR/<model_name>, deleting whatever is there, so concurrent builds (or a directory
        # of that name in /tmp) would otherwise collide.
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", model_name, "--version", str(version), "--handler", str(handler),
            "--serialized-file", str(staged / "tail.pt"), "--extra-files", str(staged / "tail.json"),
            "--export-path", str(staged), "--archive-format", "default", "--force",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            env={**os.environ, "TMPDIR": str(staged / "tmp")},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise IsplitError(f"torch-model-archiver could not build {model_name}.mar: " + " | ".join(detail))
        target = export_dir / f"{model_name}.mar"
        os.replace(staged / f"{model_name}.mar", target)
    return target


@dataclass(frozen=True)
class TailBatching:
    """How TorchServe serves a tail: up to ``batch_size`` codes per forward pass, waiting up to
    ``max_batch_delay_ms`` for a batch to fill, on ``workers`` worker processes."""

    batch_size: int
    max_batch_delay_ms: int
    workers: int


# From the serving benchmark's side by side (benchmarks/results/serving-cpu.json, 2-core VM):
# a 0.35 ms tail (VGG11 after features.20) met the 2x-of-bare latency goal only at delay 0
# (1 ms: 2.1x), and no setting doubled the bare endpoint's throughput; a 17 ms tail (ResNet-18
# at 64 px after layer3) met both goals at delays 1, 2 and 5 ms (p50 1.5-1.8x, throughput at
# concurrency 16 2.4-2.7x; delay 0: 2.0x, no batching: 1.5x), each ms of delay adding about a
# ms at concurrency 1 while the throughput gained beyond 1-2 ms stayed within the noise.
BATCH_SIZE, WORKERS = 16, 2
CHEAP_TAIL_MS = 1.0  # below: the per-request Python and HTTP work dominates; batch what is queued
DELAY_FRACTION = 1 / 8  # of a costly tail's per-image time: 2 ms for the 17 ms tail
MAX_DELAY_MS = 5


def tail_batching(tail_ms_per_image: float) -> TailBatching:
    """The registration for a tail whose forward pass costs ``tail_ms_per_image`` (ms, one image,
    one torch thread, as :func:`tail_cost_ms` measures): batch 16 on 2 workers; no batch delay
    for a tail under 1 ms, else an eighth of its cost, rounded, 1 to 5 ms."""
    if tail_ms_per_image < CHEAP_TAIL_MS:
        delay = 0
    else:
        delay = min(MAX_DELAY_MS, max(1, int(DELAY_FRACTION * tail_ms_per_image + 0.5)))
    return TailBatching(batch_size=BATCH_SIZE, max_batch_delay_ms=delay, workers=WORKERS)


def tail_cost_ms(tail: Callable[[torch.Tensor], torch.Tensor], code: torch.Tensor, repeats: int = 7) -> float:
    """Median time of ``tail(code)`` on one torch thread (as the handler runs it) per image in
    ``code`` ``(N, ...)``, in ms, after one untimed pass; the process's thread count is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            tail(code)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                tail(code)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2] * 1e3 / len(code)


def register(
    management_url: str,
    mar_name: str,
    model_name: str,
    *,
    version: str | None = None,
    batch_size: int = 8,
    max_batch_delay_ms: int = 5,
    initial_workers: int = 1,
    timeout_s: float = 120,
    key: str | None = None,
) -> None:
    """Register ``mar_name`` (a file in the model store) as ``model_name`` and wait for its workers.

    Idempotent: if ``model_name`` is already served from ``mar_name`` (and, when ``version`` is
    given, with that version) nothing happens. A newly registered version becomes the default.
    ``max_batch_delay_ms`` is how long TorchServe waits to fill a batch of ``batch_size``.
    Raises :class:`TorchServeError` with the server's message when TorchServe refuses.
    """
    _check_model_name(model_name)
    before = _describe(management_url, model_name, timeout_s, key)
    if _registered(before, mar_name, version):
        return
    params = {
        "url": mar_name,
        "model_name": model_name,
        "batch_size": batch_size,
        "max_batch_delay": max_batch_delay_ms,
        "initial_workers": initial_workers,
        "synchronous": "true",
        "response_timeout": int(timeout_s),
    }
    response = _call("POST", f"{_base(management_url)}/models", params=params, timeout_s=timeout_s + 10, key=key)
    after = _describe(management_url, model_name, timeout_s, key)
    if response.status_code == 409 and _registered(after, mar_name, version):
        return  # registered concurrently by someone else: the state we want
    _raise_for_status(response, f"registering {mar_name} as {model_name}")
    new_versions = {str(v["modelVersion"]) for v in after} - {str(v["modelVersion"]) for v in before}
    if before and len(new_versions) == 1:
        path = f"/models/{quote(model_name)}/{quote(new_versions.pop())}/set-default"
        _raise_for_status(
            _call("PUT", _base(management_url) + path, timeout_s=timeout_s, key=key), "setting the default version"
        )


def unregister(
    management_url: str,
    model_name: str,
    version: str | None = None,
    *,
    timeout_s: float = 60,
    key: str | None = None,
) -> None:
    """Unregister one ``version`` of ``model_name``, or every version; absent models are fine."""
    versions = [str(v["modelVersion"]) for v in _describe(management_url, model_name, timeout_s, key)]
    if not versions:
        return
    default = _default_version(management_url, model_name, timeout_s, key)
    targets = [v for v in versions if version is None or v == str(version)]
    # TorchServe refuses to drop the default version while others remain: drop it last.
    for target in sorted(targets, key=lambda v: v == default):
        url = f"{_base(management_url)}/models/{quote(model_name)}/{quote(target)}"
        response = _call("DELETE", url, timeout_s=timeout_s, key=key)
        if response.status_code != 404:
            _raise_for_status(response, f"unregistering {model_name} version {target}")


def inference_url(base: str, model_name: str) -> str:
    """The predictions URL of a model: ``<base>/predictions/<model_name>``."""
    return f"{_base(base)}/predictions/{quote(model_name)}"


def predict(
    inference_base: str,
    model_name: str,
    payload: bytes,
    timeout_s: float = 30,
    *,
    top_k: int | None = None,
    key: str | None = None,
) -> dict:
    """POST a wire message (:func:`isplit.wire.encode`) to a tail; return its JSON answer.

    The answer is ``{"model": name, "predictions": ...}`` (see the handler); ``top_k`` asks for
    that many classes per image (sent as the ``X-Isplit-Top-K`` header). Raises
    :class:`TorchServeError` with the server's message on 4xx/5xx or when unreachable.
    """
    from isplit import wire  # here, like torch above: the module stays torch-free for the gateway

    headers = {"Content-Type": "application/octet-stream"}
    if top_k is not None:
        headers[wire.TOP_K_HEADER] = str(top_k)
    response = _call(
        "POST", inference_url(inference_base, model_name), data=payload, headers=headers, timeout_s=timeout_s, key=key
    )
    _raise_for_status(response, f"prediction by {model_name}")
    return response.json()


def is_healthy(inference_base: str, timeout_s: float = 2, *, key: str | None = None) -> bool:
    """Whether ``GET <inference_base>/ping`` answers ``{"status": "Healthy"}`` (with token
    authorization, /ping too needs the inference ``key``)."""
    try:
        response = requests.get(f"{_base(inference_base)}/ping", headers=auth_headers(key), timeout=timeout_s)
        return response.ok and response.json().get("status") == "Healthy"
    except (requests.RequestException, ValueError):
        return False


def _check_model_name(model_name: str) -> None:
    if not _MODEL_NAME.match(model_name):
        raise IsplitError(
            f"invalid TorchServe model name {model_name!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )


def _base(url: str) -> str:
    return url.rstrip("/")


def auth_headers(key: str | None) -> dict[str, str]:
    """The header that authorizes a call with ``key`` (none without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def _call(method: str, url: str, *, timeout_s: float, key: str | None = None, **kwargs) -> requests.Response:
    kwargs["headers"] = {**kwargs.get("headers", {}), **auth_headers(key)}
    try:
        return requests.request(method, url, timeout=timeout_s, **kwargs)
    except requests.RequestException as exc:
        raise TorchServeError(f"cannot reach TorchServe at {url}: {exc}") from exc


def _describe(management_url: str, model_name: str, timeout_s: float, key: str | None) -> list[dict]:
    """Every registered version of ``model_name`` (TorchServe's describe entries); [] if none."""
    response = _call("GET", f"{_base(management_url)}/models/{quote(model_name)}/all", timeout_s=timeout_s, key=key)
    if response.status_code == 404:
        return []
    _raise_for_status(response, f"describing {model_name}")
    return response.json()


def _default_version(management_url: str, model_name: str, timeout_s: float, key: str | None) -> str | None:
    response = _call("GET", f"{_base(management_url)}/models/{quote(model_name)}", timeout_s=timeout_s, key=key)
    if response.status_code == 404:
        return None
    _raise_for_status(response, f"describing {model_name}")
    return str(response.json()[0]["modelVersion"])


def _registered(versions: list[dict], mar_name: str, version: str | None) -> bool:
    return any(
        v.get("modelUrl") == mar_name and (version is None or str(v.get("modelVersion")) == str(version))
        for v in versions
    )


def _raise_for_status(response: requests.Response, action: str) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    message = message or response.text.strip() or response.reason
    raise TorchServeError(f"TorchServe refused {action}: {message}", status=response.status_code)
