"""API tokens (``isplit.auth``): made by the CLI, stored hashed with mode 0600, read back by the
analyzer's token store, and made once by the local stack."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from isplit import IsplitError
from isplit.auth import TokenStore, add_token, client_token, hash_token, read_tokens


def isplit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "isplit.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_token_create_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path):
    path = tmp_path / "tokens.jsonl"
    done = isplit("token", "create", "--name", "alice", "--scopes", "read,submit", "--file", str(path))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("isplit_") and len(token) >= 40
    assert token not in path.read_text()
    assert json.loads(path.read_text()) == {"name": "alice", "sha256": hash_token(token), "scopes": ["read", "submit"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = isplit("token", "create", "--name", "bob", "--file", str(path)).stdout.strip()
    assert [e.name for e in read_tokens(path)] == ["alice", "bob"] and second != token


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--name", "x", "--scopes", "read,root"], "scopes 'read,root'"), (["--name", "a b"], "token name 'a b'")],
)
def test_token_create_refuses_bad_scopes_and_names_in_one_line(tmp_path: Path, args: list[str], needle: str):
    done = isplit("token", "create", *args, "--file", str(tmp_path / "t"))
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_store_authenticates_by_hash_and_rereads_a_changed_file(tmp_path: Path):
    path = tmp_path / "tokens.jsonl"
    store = TokenStore(path)
    assert store.authenticate("isplit_x") is None and store.problem == "missing"
    alice = add_token(path, "alice", ["read"])
    principal = store.authenticate(alice)
    assert principal is not None and principal.name == "alice" and principal.allows("read")
    assert not principal.allows("submit") and not principal.is_admin
    root = add_token(path, "root", ["admin"])
    assert store.authenticate(root).allows("submit")  # type: ignore[union-attr]
    assert store.authenticate(alice + "x") is None and store.authenticate("") is None


def test_a_malformed_token_file_authenticates_nobody_and_names_the_line(tmp_path: Path):
    path = tmp_path / "tokens.jsonl"
    token = add_token(path, "alice", ["read"])
    with open(path, "a") as fh:
        fh.write('{"name": "bob", "sha256": "zz", "scopes": ["read"]}\n')
    with pytest.raises(IsplitError, match="line 2"):
        read_tokens(path)
    store = TokenStore(path)
    assert store.authenticate(token) is None and "line 2" in (store.problem or "")


def test_the_local_stack_makes_its_token_once_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from isplit.dev import stack

    monkeypatch.setenv("ISPLIT_HOME", str(tmp_path))
    monkeypatch.delenv("ISPLIT_ANALYZER_TOKEN", raising=False)
    stack.ensure_token()
    token = stack.token_file().read_text().strip()
    assert stat.S_IMODE(stack.token_file().stat().st_mode) == 0o600
    assert TokenStore(stack.tokens_file()).authenticate(token).is_admin  # type: ignore[union-attr]
    stack.ensure_token()
    assert stack.token_file().read_text().strip() == token and len(read_tokens(stack.tokens_file())) == 1
    assert stack.stack_env()["ISPLIT_ANALYZER_TOKENS_FILE"] == str(stack.tokens_file())
    assert stack.analyzer_token() == token
    monkeypatch.setenv("ISPLIT_ANALYZER_TOKEN", "isplit_from-env")
    assert client_token(stack.token_file()) == "isplit_from-env"
