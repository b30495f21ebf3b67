"""A local TorchServe started by ``scripts/torchserve``: the developer's on the default ports,
or a private one on free ports (tests, benchmarks) that is stopped and removed afterwards.

    with private_torchserve(tmp_dir) as server:
        ts.register(server.management_url, ..., key=server.keys().management)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from isplit.dev import REPO
from isplit.torchserve import TorchServeKeys, read_keys

SCRIPT = REPO / "scripts" / "torchserve"
BASE_CONFIG = REPO / "services" / "tail-serving" / "config.properties"
PORT_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port")  # fmt: skip


class TorchServeError(RuntimeError):
    """``scripts/torchserve`` could not start a server."""


@dataclass(frozen=True)
class TorchServeEndpoints:
    """Where a running TorchServe listens, the model store it loads ``.mar`` files from, and the
    key file its token authorization wrote."""

    inference_url: str
    management_url: str
    metrics_url: str
    model_store: Path
    key_file: Path

    def keys(self) -> TorchServeKeys:
        """The current keys (read again each time: a restart makes new ones)."""
        return read_keys(self.key_file)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_state(run_dir: Path) -> TorchServeEndpoints | None:
    """The endpoints ``scripts/torchserve start`` recorded in ``run_dir``, if any."""
    state_file = run_dir / "torchserve.env"
    if not state_file.is_file():
        return None
    lines = state_file.read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return TorchServeEndpoints(
        inference_url=values["ISPLIT_TORCHSERVE_INFERENCE_URL"],
        management_url=values["ISPLIT_TORCHSERVE_MANAGEMENT_URL"],
        metrics_url=values["ISPLIT_TORCHSERVE_METRICS_URL"],
        model_store=Path(values["ISPLIT_TORCHSERVE_MODEL_STORE"]),
        key_file=Path(values.get("ISPLIT_TORCHSERVE_KEY_FILE", run_dir / "key_file.json")),
    )


def private_config(overrides: Mapping[str, str | None] | None = None) -> str:
    """The project's ``config.properties`` with every listening port (HTTP and gRPC) moved to a
    free one, then ``overrides`` applied (``None`` removes a key)."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(len(PORT_KEYS))
    settings: dict[str, str | None] = {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc_inference),
        "grpc_management_port": str(grpc_management),
        **(overrides or {}),
    }
    text = BASE_CONFIG.read_text()
    for key, value in settings.items():
        line = "" if value is None else f"{key}={value}"
        text, found = re.subn(rf"^{re.escape(key)}=.*$", line, text, flags=re.MULTILINE)
        if not found and value is not None:
            text += f"\n{line}\n"
    return text


def run_script(
    command: str, env: Mapping[str, str], timeout_s: float = 240, *, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """``scripts/torchserve <command>`` (start, stop, status) with ``env``; its output captured,
    or shown on this terminal with ``capture=False``."""
    return subprocess.run(
        [str(SCRIPT), command],
        env=dict(env),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=capture,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def private_env(root: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment ``scripts/torchserve`` gets for the private server under ``root`` (to
    stop or start it again by hand: ``run_script("stop", private_env(root))``)."""
    return {**os.environ, **(env or {}), "ISPLIT_ARTIFACT_ROOT": str(root / "artifacts"),
            "ISPLIT_TORCHSERVE_DIR": str(root / "run"), "ISPLIT_TORCHSERVE_CONFIG": str(root / "config.properties")}  # fmt: skip


def let_torchserve_user_in(root: Path) -> None:
    """Started by root, ``scripts/torchserve`` runs TorchServe as an unprivileged user, which must
    reach ``root`` (its run dir and model store). Temporary directories are 0700 (pytest's
    included): give others search (x, not read) permission on ``root`` and on those of its
    ancestors inside the system temp directory that we own. No-op unless we are root."""
    if os.geteuid() != 0:
        return
    tmp = Path(tempfile.gettempdir()).resolve()
    path = Path(root).resolve()
    for directory in (path, *path.parents):
        if directory == tmp or tmp not in directory.parents:
            break
        info = directory.stat()
        if info.st_uid == 0 and not info.st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


@contextmanager
def private_torchserve(
    root: Path, overrides: Mapping[str, str | None] | None = None, env: Mapping[str, str] | None = None
) -> Iterator[TorchServeEndpoints]:
    """A TorchServe of our own under ``root`` (artifacts, run dir, config) on free ports, with
    config ``overrides``; stopped at exit. Raises ``TorchServeError`` if it does not start."""
    config = root / "config.properties"
    run_env = private_env(root, env)
    root.mkdir(parents=True, exist_ok=True)
    let_torchserve_user_in(root)
    endpoints = None
    for _attempt in range(3):  # a free port can be taken before TorchServe binds it: pick again
        config.write_text(private_config(overrides))
        started = run_script("start", run_env)
        endpoints = read_state(root / "run")
        if started.returncode == 0 and endpoints is not None:
            break
    else:
        raise TorchServeError(
            f"scripts/torchserve start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}"
        )
    try:
        yield endpoints
    finally:
        run_script("stop", run_env)


@contextmanager
def temporary_torchserve(prefix: str, overrides: Mapping[str, str | None] | None = None,
                         env: Mapping[str, str] | None = None) -> Iterator[TorchServeEndpoints]:  # fmt: skip
    """:func:`private_torchserve` in a new temporary directory, removed afterwards."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with private_torchserve(root, overrides, env) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
