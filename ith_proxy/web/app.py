"""The HTTP API: a Bottle app made by ``make_app`` and served by waitress.

``make_app`` builds the ``ApiContext`` (configuration, a catalog connection
factory, a vault opener, the audit log, the token check, health and the
service's ``Control``) and lets each route module in ``ROUTES`` install its
routes with ``context.route``.  Health is public and reported by a callable
the service passes in; it never connects to the DICOM port.  The OpenAPI
document (``web.openapi``) is public too.

Every error is a JSON body ``{"error": ...}``, whoever answers it: a route
(``ApiError``), Bottle (404, 405, a route that raised: 500, never a
traceback) or waitress itself (a body over the limit: 413, a request it
cannot parse: 400, a header block too large: 431).

``ApiServer`` runs waitress with ``[api] threads``, ``channel_timeout`` and
``connection_limit``.  waitress reads each request whole (headers and body,
at most ``MAX_BODY`` plus framing) before a worker thread sees it, so a slow
or idle client holds a connection, never a thread; an idle connection is
closed after ``channel_timeout`` seconds; past ``connection_limit`` new
connections wait in the listen backlog.  ``web.access`` writes the
``api.log`` line of each request.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import bottle
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server
from waitress.task import ErrorTask

from ith_proxy.config import ApiConfig, Config
from ith_proxy.store.audit import AuditLog
from ith_proxy.store.catalog import Catalog
from ith_proxy.vault.records import Vault
from ith_proxy.web import metrics, nodes, openapi, phi, settings, status, studies
from ith_proxy.web.access import AccessLog, RefusalLimiter, refused
from ith_proxy.web.auth import Verifier
from ith_proxy.web.context import MAX_BODY, ApiContext, Authenticate, Control, json_response, route

log = logging.getLogger("ith_proxy.api")

HealthFn = Callable[[], list[str]]

# the route modules, each with install(app, ctx) and its OPENAPI paths
ROUTES = (status, studies, phi, nodes, settings, metrics)

# what waitress reads of a request at most: the body limit plus chunked framing
# (a body between MAX_BODY and this gets its 413 from context.json_body)
READ_LIMIT = MAX_BODY + 64 * 1024
MAX_HEADERS = 64 * 1024  # bytes of request line and headers (431 above)

# the service's start-up warning when neither JWT key is set
NO_JWT_KEY = (
    "no JWT key is configured ([api] jwt_secret, jwt_public_key_file): every token "
    "is refused; only GET /api/health/ and GET /api/openapi.json answer"
)

_MESSAGES = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: f"the request body is larger than {MAX_BODY} bytes",
    431: "the request headers are too large",
    500: "internal error",
}


def error_body(status: int, reason: str = "") -> str:
    """The JSON body of an error nobody wrote a message for."""
    return json.dumps({"error": _MESSAGES.get(status, reason.lower() or "error")})


def api_document() -> dict:
    """The OpenAPI document of every route (web.openapi)."""
    return openapi.document(
        [openapi.OPENAPI, *(m.OPENAPI for m in ROUTES)], [getattr(m, "SCHEMAS", {}) for m in ROUTES]
    )


def make_app(
    cfg: Config,
    connect_catalog: Callable[[], Catalog],
    open_vault: Callable[[], Vault],
    audit: AuditLog,
    *,
    health: HealthFn,
    control: Control | None = None,
    authenticate: Authenticate | None = None,
) -> bottle.Bottle:
    ctx = ApiContext(
        cfg=cfg,
        connect_catalog=connect_catalog,
        open_vault=open_vault,
        audit=audit,
        authenticate=authenticate or Verifier(cfg.api).authenticate,
        health=health,
        control=control,
    )
    app = bottle.Bottle()
    document = json.dumps(api_document())

    @route(app, ctx, "GET", "/api/health/", public=True)
    def get_health() -> bottle.HTTPResponse:
        problems = health()
        if problems:
            return json_response(503, {"status": "degraded", "problems": problems})
        return json_response(200, {"status": "ok"})

    @route(app, ctx, "GET", "/api/openapi.json", public=True)
    def get_openapi() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(
            status=200, body=document, headers={"Content-Type": "application/json"}
        )

    for module in ROUTES:
        module.install(app, ctx)

    def any_error(err: bottle.HTTPError) -> str:
        # Bottle's own answers (no route, wrong method, a route that raised):
        # JSON, never Bottle's HTML page with its traceback
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Cache-Control", "no-store")
        return error_body(err.status_code, bottle.HTTP_CODES.get(err.status_code, ""))

    app.default_error_handler = any_error
    return app


class _ErrorsToLog(io.TextIOBase):
    """``wsgi.errors`` (waitress makes it stderr): Bottle writes a failed
    route's traceback there, message and path included.  Log the exception
    being handled instead; the log's formatter names only types and places."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        exc = sys.exc_info()
        if exc[0] is not None:
            log.error("unhandled %s in an API request", exc[0].__name__, exc_info=exc)
        return len(text)


def _errors_to_log(app: bottle.Bottle):
    errors = _ErrorsToLog()

    def wsgi(environ, start_response):
        environ["wsgi.errors"] = errors
        return app(environ, start_response)

    return wsgi


def listening(server: MultiSocketServer | BaseWSGIServer) -> str:
    """``host:port`` of each listening socket: a bind address that resolves to
    several addresses (``localhost``: 127.0.0.1 and ::1) gets one socket each,
    and waitress then returns a MultiSocketServer."""
    if isinstance(server, MultiSocketServer):
        return ", ".join(f"{host}:{port}" for host, port in server.effective_listen)
    host, port = server.getsockname()
    return f"{host}:{port}"


def _channel(limiter: RefusalLimiter) -> type[HTTPChannel]:
    """waitress's channel, its own error answers in JSON and in ``api.log``:
    a request it refuses before the app (too large, unparsable) is an
    anonymous refusal, rate-limited like a 401."""

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            request: Any = self.request  # a waitress HTTPRequestParser with its error
            err = request.error
            body = error_body(err.code, err.reason).encode()
            self.status = f"{err.code} {err.reason}"
            headers: Any = self.response_headers
            headers.extend([("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)
            # a request line waitress could not parse has neither: "-" keeps the fields
            path = str(getattr(request, "path", "") or "-")
            method = str(getattr(request, "command", "") or "-")
            refused(limiter, [method, path, err.code, 0.0, "-", "-"], "refused by waitress")

    class JsonChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonChannel


class ApiServer:
    """waitress in a thread, with a clean shutdown."""

    def __init__(
        self, cfg: ApiConfig, app: bottle.Bottle, limiter: RefusalLimiter | None = None
    ) -> None:
        limiter = limiter or RefusalLimiter()
        self.server = create_server(
            AccessLog(_errors_to_log(app), limiter),
            host=cfg.bind_address,
            port=cfg.port,
            threads=cfg.threads,
            channel_timeout=cfg.channel_timeout,
            cleanup_interval=max(1, min(30, cfg.channel_timeout // 2)),
            connection_limit=cfg.connection_limit,
            max_request_body_size=READ_LIMIT,
            max_request_header_size=MAX_HEADERS,
            expose_tracebacks=False,
            ident="ith-proxy",
        )
        channel = _channel(limiter)
        # every listening socket's server (one, or a MultiSocketServer's map of them)
        sockets: Any = getattr(self.server, "map", None) or {}
        for server in [self.server, *sockets.values()]:
            if isinstance(server, BaseWSGIServer):
                server.channel_class = channel
        self._thread = threading.Thread(target=self._serve, name="api-server", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run()
        except OSError:
            pass  # closed by stop()

    def start(self) -> None:
        self._thread.start()
        log.info("API listening on %s", listening(self.server))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Let the handler threads finish the request in hand and exit (up to
        5 s, waitress's ``shutdown``), then close the sockets and the trigger.
        A one-socket waitress server's ``close`` alone leaves its handler
        threads running: one that finished a request later wrote its wake-up
        byte to the closed trigger's descriptor number, by then another
        file's (in the test process, a subprocess's exec-error pipe: the
        test then waited for ever on a proxy that had started fine)."""
        self.server.task_dispatcher.shutdown()
        self.server.close()
