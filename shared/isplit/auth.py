"""API tokens: bearer tokens for the analyzer, stored hashed, each with a principal and scopes.

A token is ``isplit_`` followed by 43 URL-safe characters (256 random bits); only its SHA-256
is stored. The token file (``ISPLIT_ANALYZER_TOKENS_FILE``; in Kubernetes a mounted Secret)
holds one JSON object per line (blank lines and ``#`` comments are skipped)::

    {"name": "alice", "sha256": "<64 hex>", "scopes": ["read", "submit"]}

``name`` is the principal that owns the jobs and models made with the token; scopes are
``read`` (GET), ``submit`` (upload, submit, cancel, delete what it owns) and ``admin`` (every
scope, and every principal's jobs and models). ``isplit token create`` appends a line and
prints the token once. Clients send ``Authorization: Bearer <token>``; they find their token
in ``ISPLIT_ANALYZER_TOKEN`` or in a file (the local stack's ``var/run/analyzer-token``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from isplit import IsplitError

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[str, ...] = ("read", "submit", "admin")
TOKEN_PREFIX = "isplit_"
TOKEN_ENV = "ISPLIT_ANALYZER_TOKEN"
TOKENS_FILE_ENV = "ISPLIT_ANALYZER_TOKENS_FILE"


class TokenEntry(BaseModel):
    """One line of the token file: a principal, the hash of its token and its scopes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)


class Principal(BaseModel):
    """Who a request acts for: the token's name and scopes."""

    name: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        """``admin`` holds every scope."""
        return self.is_admin or scope in self.scopes


def new_token() -> str:
    """A fresh token: ``isplit_`` + 256 random bits, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token's UTF-8 bytes (what the token file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(text: str) -> list[Scope]:
    """``"read,submit"`` -> ``["read", "submit"]``; an unknown or empty list is an ``IsplitError``."""
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise IsplitError(f"scopes {text!r}: use a comma-separated list of {', '.join(SCOPES)}")
    return list(dict.fromkeys(scopes))  # type: ignore[arg-type]


def read_tokens(path: Path) -> list[TokenEntry]:
    """The entries of a token file; a bad line is an ``IsplitError`` naming the line."""
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(TokenEntry.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise IsplitError(f"token file {path} line {number} is not a token entry: {first[:200]}") from None
    return entries


def add_token(path: Path, name: str, scopes: list[Scope]) -> str:
    """Make a token for ``name``, append its entry to ``path`` (created with mode 0600) and
    return the token (it is stored nowhere else)."""
    token = new_token()
    try:
        line = TokenEntry(name=name, sha256=hash_token(token), scopes=scopes).model_dump_json()
    except ValidationError as exc:
        raise IsplitError(f"token name {name!r}: letters, digits and . _ @ - only, up to 64 characters") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return token


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600, parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


class TokenStore:
    """The token file, re-read when it changes (a new token or a rotated Secret needs no
    restart). A missing or unreadable file authenticates nobody."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._entries: list[TokenEntry] = []
        self._error: str | None = None
        self._lock = threading.Lock()

    def entries(self) -> list[TokenEntry]:
        """The current entries (re-read if the file's mtime or size changed)."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._stamp = stamp
                try:
                    self._entries, self._error = (read_tokens(self.path), None) if stamp else ([], "missing")
                except (OSError, IsplitError) as exc:
                    self._entries, self._error = [], str(exc)
            return self._entries

    @property
    def problem(self) -> str | None:
        """Why no token can authenticate (file missing or malformed), or None."""
        self.entries()
        return self._error

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None. Every entry is compared in constant time."""
        digest = hash_token(token)
        found = None
        for entry in self.entries():
            if hmac.compare_digest(digest, entry.sha256) and found is None:
                found = entry
        return Principal(name=found.name, scopes=frozenset(found.scopes)) if found else None


def client_token(default_file: Path | None = None) -> str | None:
    """The token a client sends: ``ISPLIT_ANALYZER_TOKEN``, else the first line of
    ``default_file`` when it exists, else None."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if default_file is not None and default_file.is_file():
        return default_file.read_text(encoding="utf-8").strip() or None
    return None


def bearer(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``token`` (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- ``isplit token create`` -----------------------------------------------------------------


def default_tokens_file() -> Path:
    """``ISPLIT_ANALYZER_TOKENS_FILE``, else the local stack's token file."""
    given = os.environ.get(TOKENS_FILE_ENV)
    if given:
        return Path(given)
    from isplit.dev.stack import tokens_file

    return tokens_file()


def cmd_token_create(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else default_tokens_file()
    token = add_token(path, args.name, parse_scopes(args.scopes))
    print(token)
    print(f"(shown once; its SHA-256 was appended to {path})", file=sys.stderr)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="analyzer API tokens")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="make a token, print it once, append its hash to the token file")
    c.add_argument("--name", required=True, help="the principal that owns what the token creates")
    c.add_argument("--scopes", default="read,submit", help=f"comma-separated: {', '.join(SCOPES)}")
    c.add_argument("--file", help=f"token file (default: ${TOKENS_FILE_ENV} or the local stack's)")
    c.set_defaults(func=cmd_token_create)
