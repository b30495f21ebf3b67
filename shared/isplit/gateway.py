"""The tail-serving gateway: the one door to a TorchServe pod's inference and management APIs.

TorchServe 0.12 cannot take its keys from a Secret: with token authorization on it makes random
keys at each start and writes them to ``key_file.json`` in its working directory, and ``/ping``
then needs a key too, so replicas behind one Service could not share keys and probes could not
pass. In the chart TorchServe therefore listens on 127.0.0.1 only, with its own token
authorization **on**, and this gateway (a second container of the pod) listens on the pod's
ports:

* each API (``inference``, ``management``) accepts only its release key
  (``Authorization: Bearer <key>``, constant-time compare; keys are files of a mounted Secret,
  re-read when they change, so a rotated Secret takes effect without a restart);
* an accepted request is forwarded with TorchServe's own key of that API, read from its
  ``key_file.json`` (re-read when TorchServe restarts and writes new keys);
* ``GET /ping`` on the inference port is open (kubelet probes, edge health checks) and answers
  TorchServe's own health;
* bodies are bounded in bytes and time and headers in time (:mod:`isplit.httpguard`, the
  analyzer's guards); refusals are RFC 9457 problems naming the reason, never a trace.

Run: ``python -m isplit.gateway --keys-dir /etc/isplit/tail-serving-auth --torchserve-key-file
/home/model-server/tmp/key_file.json`` (``--help`` lists the ports; defaults: inference
0.0.0.0:8080 -> 127.0.0.1:18080, management 0.0.0.0:8081 -> 127.0.0.1:18081).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from isplit import IsplitError
from isplit.httpguard import RequestBodyGuard, problem, protocol_with_header_timeout
from isplit.torchserve import read_keys

log = logging.getLogger("isplit.gateway")

APIS = ("inference", "management")
OPEN_PATHS = {("inference", "GET", "/ping")}
# Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself.
_DROPPED = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization",
}  # fmt: skip


class FileCache:
    """A small file's content, re-read when its modification time or size changes.

    ``parse`` turns the text into the value; ``None`` while the file does not exist.
    """

    def __init__(self, path: Path, parse: Callable[[Path], object]) -> None:
        self.path, self.parse = Path(path), parse
        self._stamp: tuple[int, int] | None = None
        self._value: object = None

    def get(self) -> object:
        try:
            st = self.path.stat()
        except OSError:
            self._stamp, self._value = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._value, self._stamp = self.parse(self.path), stamp
        return self._value


def _read_key(path: Path) -> str:
    return path.read_text().strip()


@dataclass
class Route:
    """One API of the gateway: where it forwards and which keys it checks and sends."""

    api: str
    upstream: str  # TorchServe's base URL, e.g. http://127.0.0.1:18080
    accepted: FileCache  # the release key clients must present
    torchserve_keys: FileCache  # TorchServe's key_file.json

    def accepts(self, authorization: str | None) -> bool:
        key = self.accepted.get()
        if not key or not authorization or not authorization.startswith("Bearer "):
            return False
        return hmac.compare_digest(authorization[len("Bearer ") :].strip().encode(), str(key).encode())

    def upstream_key(self) -> str | None:
        """TorchServe's key of this API; None before TorchServe has (completely) written its key file."""
        try:
            keys = self.torchserve_keys.get()
        except IsplitError:  # caught mid-write: the next request reads it again
            return None
        if keys is None:
            return None
        return keys.management if self.api == "management" else keys.inference  # type: ignore[attr-defined]


class Gateway:
    """The ASGI app of one API: check the caller's key, forward with TorchServe's."""

    def __init__(self, route: Route, client: httpx.AsyncClient) -> None:
        self.route, self.client = route, client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route, method, path = self.route, scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (route.api, method, path) not in OPEN_PATHS and not route.accepts(headers.get("authorization")):
            reason = (
                "missing bearer token" if "authorization" not in headers else f"invalid key for the {route.api} API"
            )
            await problem(401, reason, {"WWW-Authenticate": f'Bearer realm="{route.api}"'})(scope, receive, send)
            return
        upstream_key = route.upstream_key()
        if upstream_key is None:
            await problem(503, "TorchServe has not started yet (no key file)", {"Retry-After": "5"})(
                scope, receive, send
            )
            return
        body = bytearray()
        while True:  # bounded by RequestBodyGuard (bytes, idle and total time)
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        forwarded = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROPPED]
        forwarded.append((b"authorization", f"Bearer {upstream_key}".encode()))
        target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        try:
            answer = await self.client.request(method, route.upstream + target, content=bytes(body), headers=forwarded)
        except httpx.HTTPError as exc:
            log.warning("TorchServe %s API unreachable: %s", route.api, exc)
            await problem(502, f"TorchServe's {route.api} API is not reachable")(scope, receive, send)
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.multi_items()
               if k.lower().encode() not in _DROPPED]  # fmt: skip
        out.append((b"content-length", str(len(answer.content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code, "headers": out})
        await send({"type": "http.response.body", "body": answer.content})


class _Server(uvicorn.Server):
    """A Uvicorn server that leaves signals to :func:`serve` (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m isplit.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--inference-listen", type=_address, default=("0.0.0.0", 8080), metavar="HOST:PORT")
    p.add_argument("--inference-upstream", default="http://127.0.0.1:18080", help="TorchServe's inference API")
    p.add_argument("--management-listen", type=_address, default=("0.0.0.0", 8081), metavar="HOST:PORT")
    p.add_argument("--management-upstream", default="http://127.0.0.1:18081", help="TorchServe's management API")
    p.add_argument("--keys-dir", type=Path, required=True,
                   help="files inference-key and management-key: the keys clients must present")  # fmt: skip
    p.add_argument("--torchserve-key-file", type=Path, required=True, help="TorchServe's key_file.json")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="largest request body (TorchServe's)")
    p.add_argument("--body-idle-timeout", type=float, default=30.0, help="seconds a body may pause")
    p.add_argument("--body-timeout", type=float, default=300.0, help="seconds a body may take in all")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers")
    p.add_argument("--upstream-timeout", type=float, default=300.0, help="seconds TorchServe may take to answer")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Both APIs in one event loop until SIGTERM/SIGINT."""
    for api in APIS:
        if not (args.keys_dir / f"{api}-key").is_file():
            raise IsplitError(f"no {api} key: {args.keys_dir / f'{api}-key'} does not exist")
    torchserve_keys = FileCache(args.torchserve_key_file, read_keys)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.upstream_timeout, limits=limits) as client:
        servers = []
        for api in APIS:
            route = Route(api, getattr(args, f"{api}_upstream").rstrip("/"),
                          FileCache(args.keys_dir / f"{api}-key", _read_key), torchserve_keys)  # fmt: skip
            app = RequestBodyGuard(Gateway(route, client), lambda _scope: args.max_body_bytes,
                                   args.body_idle_timeout, args.body_timeout)  # fmt: skip
            host, port = getattr(args, f"{api}_listen")
            config = uvicorn.Config(app, host=host, port=port, http=protocol_with_header_timeout(args.header_timeout),
                                    log_level="warning", access_log=False, lifespan="off")  # fmt: skip
            servers.append(_Server(config))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
        log.info("gateway up: %s", ", ".join(f"{a} {getattr(args, f'{a}_listen')}" for a in APIS))
        await asyncio.gather(*(s.serve() for s in servers))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except IsplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
