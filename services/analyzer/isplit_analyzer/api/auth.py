"""Who a request acts for: the bearer token's principal, and the scope a route needs.

``/healthz``, ``/readyz`` and ``/metrics`` are open; every ``/v1`` route depends on
:func:`require` with its scope. A missing or unknown token is a 401 (with
``WWW-Authenticate: Bearer``), a token without the scope a 403; what another principal owns
answers 404, as if it did not exist (``admin`` sees everything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from isplit.auth import Principal, TokenStore

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An analyzer token (`isplit token create`; the local stack's is in var/run/analyzer-token).",
)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="isplit"'}
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"description": "missing or unknown bearer token"},
    403: {"description": "the token lacks the scope this route needs"},
}


def get_token_store(request: Request) -> TokenStore:
    return request.app.state.tokens


def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Principal:
    """The principal of the request's bearer token (401 without a valid one)."""
    if credentials is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)", headers=CHALLENGE)
    principal = get_token_store(request).authenticate(credentials.credentials)
    if principal is None:
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return principal


def require(scope: str) -> Callable[..., Principal]:
    """A dependency: the request's principal, which must hold ``scope`` (403 otherwise)."""

    def _check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.allows(scope):
            raise HTTPException(403, f"token {principal.name!r} lacks the {scope!r} scope")
        return principal

    return _check


Reader = Annotated[Principal, Depends(require("read"))]
Submitter = Annotated[Principal, Depends(require("submit"))]


def visible(owner: str | None, principal: Principal) -> bool:
    """Whether ``principal`` may see a row owned by ``owner`` (its own, or any for admin)."""
    return principal.is_admin or owner == principal.name


Owned = TypeVar("Owned")


def owned_or_404(session: Session, row_type: type[Owned], row_id: str, principal: Principal, what: str) -> Owned:
    """The ``row_type`` row ``row_id`` if ``principal`` may see it; a 404 naming ``what`` otherwise
    (another principal's row is indistinguishable from a missing one)."""
    row: Any = session.get(row_type, row_id)
    if row is None or not visible(row.owner, principal):
        raise HTTPException(404, f"{what} {row_id!r} not found")
    return row
