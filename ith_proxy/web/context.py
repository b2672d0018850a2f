"""What every route module of the API gets: its context, its errors, JSON in
and out, and the one way a route is declared.

A route module is ``ith_proxy/web/<group>.py`` with

- ``install(app, ctx)``: adds its routes with ``route(app, ctx, ...)``;
- ``OPENAPI``: its part of the OpenAPI document's ``paths``, and optionally
  ``SCHEMAS`` (components shared by name): how to write them is in
  ``web/openapi.py``.  Every route must be documented (a test checks).

Read a body only with ``json_body`` / ``json_object`` (bounded, 413 over
1 MB), never ``request.body`` or ``request.json``.

``route`` puts the authentication in front of every route that is not
public (a missing or bad token: 401; a valid one without the scope: 403),
turns ``ApiError`` into a JSON body, and hands the route the caller's
``Claims``.  The service hands the API a *connection factory*: each request
opens (and closes) its own catalog connection, never a shared one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import bottle

from ith_proxy.config import Config
from ith_proxy.store.audit import AuditError, AuditLog
from ith_proxy.store.catalog import Catalog
from ith_proxy.vault.records import Vault

MAX_BODY = 1024 * 1024  # a larger request body gets 413
CLAIMS = "ith.claims"  # environ keys set per request
REQUEST_ID = "ith.request_id"


class ApiError(Exception):
    """An error answered as ``{"error": message, "field": field}``; ``reason``
    is kept for ``api.log`` and never sent (why a token was refused)."""

    def __init__(
        self, status: int, message: str, field: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason

    def response(self) -> bottle.HTTPResponse:
        body: dict[str, object] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return json_response(self.status, body, headers)


@dataclass(frozen=True)
class Claims:
    """A verified token: its subject and scopes (the ``scope`` claim, split)."""

    sub: str
    scopes: frozenset[str]
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise ApiError(403, f"this token lacks the scope {scope!r}")


class Control(Protocol):
    """What the running service lets the API see and do (the service implements it)."""

    def scp_status(self) -> dict[str, object]:
        """``state`` (running | stopped), ``ae_title``, ``port``, ``associations``,
        ``instances_received``, ``bytes_received`` (since start)."""
        ...

    def settings_changed(self) -> list[str]:
        """Apply the persisted runtime settings now (restart the SCP on a new AE
        title or port); return the problems, one line each (empty: all applied)."""
        ...

    def echo(self, node: str) -> str:
        """C-ECHO a node; return a one-line result; raise ValueError(one line)."""
        ...

    def link_state(self) -> str:
        """``offline``, ``connected`` or ``disconnected``."""
        ...


Authenticate = Callable[[bottle.BaseRequest], Claims]


@dataclass(frozen=True)
class ApiContext:
    cfg: Config
    connect_catalog: Callable[[], Catalog]  # a new connection; the caller closes it
    open_vault: Callable[[], Vault]  # a new vault reader; the caller closes it
    audit: AuditLog
    authenticate: Authenticate  # 401 as ApiError; never returns without a valid token
    health: Callable[[], list[str]]
    control: Control | None = None  # None only where no service runs (tests of one room)


def json_response(
    status: int, body: object, headers: Mapping[str, str] | None = None
) -> bottle.HTTPResponse:
    out = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    out.update(headers or {})
    return bottle.HTTPResponse(status=status, body=json.dumps(body), headers=out)


def json_body(request: bottle.BaseRequest) -> object:
    """The request's JSON body; 413 over MAX_BODY, 400 when it is not JSON.

    Read here, at most MAX_BODY + 1 bytes, never through Bottle's
    ``request.body`` / ``request.json``: Bottle reads a chunked body whole
    (into a temporary file past ``MEMFILE_MAX``) before anyone can refuse it.
    (waitress de-chunks and bounds every body before the app sees it; this
    bound holds under any server.)"""
    length = request.content_length
    if length > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = _read_bounded(request, MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", "body") from None


def _read_bounded(request: bottle.BaseRequest, limit: int) -> bytes:
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return b""
    if request.chunked:
        out = bytearray()
        try:
            for part in request._iter_chunked(stream.read, 65536):
                out += part
                if len(out) >= limit:
                    break
        except bottle.HTTPError:
            raise ApiError(400, "the chunked request body is malformed", "body") from None
        return bytes(out)
    length = request.content_length
    return stream.read(min(length, limit)) if length > 0 else b""


def json_object(request: bottle.BaseRequest) -> dict[str, Any]:
    body = json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "body")
    return body


def claims() -> Claims:
    """The caller of the current request (set by ``route``)."""
    return bottle.request.environ[CLAIMS]


def route(
    app: bottle.Bottle,
    ctx: ApiContext,
    method: str,
    path: str,
    *,
    scope: str | None = None,
    public: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a route: authenticated unless ``public``; ``scope`` required when given."""

    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(**kwargs: Any) -> Any:
            bottle.request.environ.setdefault(REQUEST_ID, uuid.uuid4().hex)
            try:
                if not public:
                    caller = ctx.authenticate(bottle.request)
                    bottle.request.environ[CLAIMS] = caller
                    if scope is not None:
                        caller.require(scope)
                return fn(**kwargs)
            except ApiError as exc:
                return exc.response()

        app.route(path, method, guarded, name=f"{method} {path}")
        return fn

    return declare


def audit(ctx: ApiContext, action: str, target: str, outcome: str, **detail: object) -> None:
    """Write the audit record of this request (fsynced) before it is answered:
    the caller's ``sub``, client IP, request id, action, target (an anonymized
    UID or a node or setting name: never PHI) and outcome (success, 403, 404,
    error ...).  If it cannot be written, the request fails with 500 and does
    nothing more."""
    caller = bottle.request.environ.get(CLAIMS)
    try:
        ctx.audit.record(
            f"api:{caller.sub}" if caller is not None else "api:-",
            action,
            target,
            outcome=outcome,
            # the peer's address: never X-Forwarded-For, which any client can set
            ip=bottle.request.environ.get("REMOTE_ADDR") or "",
            request_id=bottle.request.environ.get(REQUEST_ID, ""),
            **detail,
        )
    except AuditError:
        raise ApiError(500, "the audit record could not be written; nothing was done") from None
