"""The HTTP API: a Bottle app made by ``make_app`` and served by waitress.

``make_app`` builds the ``ApiContext`` (configuration, a catalog connection
factory, a vault opener, the audit log, the token check, health and the
service's ``Control``) and lets each route module in ``ROUTES`` install its
routes with ``context.route``.  Health is public and reported by a callable
the service passes in; it never connects to the DICOM port.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Callable

import bottle
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

from ith_proxy.config import ApiConfig, Config
from ith_proxy.store.audit import AuditLog
from ith_proxy.store.catalog import Catalog
from ith_proxy.vault.records import Vault
from ith_proxy.web import metrics, nodes, phi, settings, status, studies
from ith_proxy.web.auth import Verifier
from ith_proxy.web.context import ApiContext, Authenticate, Control, json_response, route

log = logging.getLogger("ith_proxy.api")

HealthFn = Callable[[], list[str]]

# the route modules, each with install(app, ctx) and its OPENAPI paths
ROUTES = (status, studies, phi, nodes, settings, metrics)


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

    @route(app, ctx, "GET", "/api/health/", public=True)
    def get_health() -> bottle.HTTPResponse:
        problems = health()
        if problems:
            return json_response(503, {"status": "degraded", "problems": problems})
        return json_response(200, {"status": "ok"})

    for module in ROUTES:
        module.install(app, ctx)

    @app.error(404)
    def not_found(_err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "not found"})

    @app.error(405)
    def not_allowed(_err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "method not allowed"})

    @app.error(500)
    def server_error(_err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"error": "internal error"})

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


class ApiServer:
    """waitress in a thread, with a clean shutdown."""

    def __init__(self, cfg: ApiConfig, app: bottle.Bottle) -> None:
        self.server = create_server(
            _errors_to_log(app), host=cfg.bind_address, port=cfg.port, threads=4, ident="ith-proxy"
        )
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
        self.server.close()
