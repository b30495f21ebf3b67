"""The whole pipeline on one machine, as local processes: ``isplit stack up|down|status``.

Kafka (127.0.0.1:9092), the analyzer (:8000), the trainer (metrics :9101), TorchServe (:8080,
:8081, :8082) and, when installed, Prometheus (:9090) scraping them all. Pid and log files live
in ``<home>/run``; artifacts, the SQLite job store and Kafka data under ``<home>`` (default
``var/`` in the repository, ``ISPLIT_HOME`` to move it). The first ``up`` makes an analyzer
token with every scope (principal ``local``) in ``<home>/run/analyzer-token`` (mode 0600), its
hash in ``<home>/run/analyzer-tokens.jsonl``; the CLI and the demo read it from there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from isplit import IsplitError
from isplit.auth import add_token, client_token, write_secret_file
from isplit.dev import REPO, torchserve


def home() -> Path:
    return Path(os.environ.get("ISPLIT_HOME", REPO / "var")).resolve()


def token_file() -> Path:
    """The local stack's analyzer token (mode 0600), made by the first ``up``."""
    return home() / "run" / "analyzer-token"


def tokens_file() -> Path:
    """The local analyzer's token file (hashes only)."""
    return home() / "run" / "analyzer-tokens.jsonl"


def analyzer_token() -> str | None:
    """The token clients of the local stack send: ``ISPLIT_ANALYZER_TOKEN`` or the stack's file."""
    return client_token(token_file())


def ensure_token() -> None:
    """Make the stack's token once: an ``admin`` token for the principal ``local``."""
    if token_file().exists():
        return
    write_secret_file(token_file(), add_token(tokens_file(), "local", ["read", "submit", "admin"]) + "\n")
    print(f"  analyzer token written to {token_file()} (mode 0600)")


def stack_env() -> dict[str, str]:
    """The environment every local service gets (one artifact root, one broker)."""
    h = home()
    return {
        **os.environ,
        "ISPLIT_ARTIFACT_ROOT": str(h / "artifacts"),
        "ISPLIT_KAFKA_DIR": str(h / "kafka"),
        "ISPLIT_TORCHSERVE_DIR": str(h / "torchserve"),
        "ISPLIT_TORCHSERVE_KEY_FILE": str(h / "torchserve" / "key_file.json"),
        "ISPLIT_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
        "ISPLIT_DATA_ROOT": str(h / "data"),
        "ISPLIT_ANALYZER_TOKENS_FILE": str(tokens_file()),
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:
        return False


@dataclass
class Service:
    name: str
    url: str  # what "healthy" means
    command: list[str]

    @property
    def pid_file(self) -> Path:
        return home() / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return home() / "run" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def up(self, env: dict[str, str], timeout_s: float = 120) -> None:
        if self.pid() is not None or _answers(self.url):
            print(f"  {self.name:<12} already running  {self.url}")
            return
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            self.command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, start_new_session=True,
        )  # fmt: skip
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while not _answers(self.url):
            if proc.poll() is not None:
                raise IsplitError(f"{self.name} exited with {proc.returncode}; see {self.log_file}")
            if time.monotonic() > deadline:
                raise IsplitError(f"{self.name} did not answer {self.url} in {timeout_s:.0f} s; see {self.log_file}")
            time.sleep(0.5)
        print(f"  {self.name:<12} started (pid {proc.pid})  {self.url}  log {self.log_file}")

    def down(self) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.killpg(pid, signal.SIGTERM)
        for _ in range(120):
            if self.pid() is None:
                break
            time.sleep(0.25)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        print(f"  {self.name:<12} stopped")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def services() -> list[Service]:
    h = home()
    out = [
        Service("analyzer", "http://127.0.0.1:8000/healthz", [_bin("isplit-analyzer")]),
        Service("trainer", "http://127.0.0.1:9101/metrics", [_bin("isplit-trainer")]),
    ]
    prometheus = shutil.which("prometheus")
    if prometheus:
        out.append(
            Service(
                "prometheus",
                "http://127.0.0.1:9090/-/ready",
                [
                    prometheus,
                    f"--config.file={REPO / 'deploy' / 'prometheus.yml'}",
                    f"--storage.tsdb.path={h / 'prometheus'}",
                    "--web.listen-address=127.0.0.1:9090",
                    "--storage.tsdb.retention.time=2d",
                ],
            )  # fmt: skip
        )
    return out


def _script(name: str, action: str, env: dict[str, str]) -> int:
    return subprocess.run(
        [str(REPO / "scripts" / name), action], env=env, cwd=REPO, stdin=subprocess.DEVNULL
    ).returncode


def up() -> None:
    """Start whatever is not running, wait until each answers, print where everything is."""
    env = stack_env()
    (home() / "artifacts").mkdir(parents=True, exist_ok=True)
    print(f"isplit stack: home {home()}")
    ensure_token()
    if _script("kafka", "start", env) != 0:
        raise IsplitError("Kafka did not start; see scripts/kafka logs")
    subprocess.run(
        [sys.executable, "-c", "from isplit.bus import ensure_topics; ensure_topics('127.0.0.1:9092')"],
        env=env, check=True,
    )  # fmt: skip
    if torchserve.run_script("start", env, capture=False).returncode != 0:
        raise IsplitError("TorchServe did not start; see scripts/torchserve logs")
    for svc in services():
        svc.up(env)
    print("isplit stack is up:")
    print(f"  analyzer API   http://127.0.0.1:8000/docs (token: {token_file()})")
    print("  TorchServe     http://127.0.0.1:8080 (management :8081, metrics :8082)")
    print("  trainer        metrics http://127.0.0.1:9101/metrics")
    if shutil.which("prometheus"):
        print("  Prometheus     http://127.0.0.1:9090")


def down() -> None:
    env = stack_env()
    for svc in reversed(services()):
        svc.down()
    torchserve.run_script("stop", env, capture=False)
    _script("kafka", "stop", env)


def status() -> int:
    """Print each component's state; exit code 0 when all answer, 3 otherwise."""
    env = stack_env()
    ok = True
    rows = [
        ("kafka", _script("kafka", "status", {**env}) == 0, "127.0.0.1:9092"),
        ("torchserve", _answers("http://127.0.0.1:8080/ping"), "http://127.0.0.1:8080"),
    ] + [(s.name, _answers(s.url), s.url) for s in services()]
    for name, up_, where in rows:
        ok &= up_
        print(f"  {name:<12} {'up' if up_ else 'DOWN':<5} {where}")
    return 0 if ok else 3


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack", help="run the whole pipeline locally (Kafka, analyzer, trainer, TorchServe, Prometheus)"
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.action == "up":
        up()
        return 0
    if args.action == "down":
        down()
        return 0
    return status()
