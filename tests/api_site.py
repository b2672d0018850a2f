"""The API of a real site served by the real ApiServer (waitress, the access
log, the JSON errors) on 127.0.0.1, for the API's tests.

``probe_app(rooms)`` is the site's real app (``Rooms.api()``: make_app) with
a few more routes declared by ``context.route`` on a real ``ApiContext`` of
the site, to test the route contract whatever the route modules hold:

- ``GET  /api/probe/whoami/``  any valid token: ``{"sub", "scopes"}``
- ``GET  /api/probe/phi/``     a token with the scope ``phi:read``
- ``POST /api/probe/echo/``    any valid token: the JSON object it was sent
- ``GET  /api/probe/boom/``    any valid token: raises (an unexpected error)
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import bottle

from ith_proxy.cli.common import audit_log
from ith_proxy.config import Config
from ith_proxy.store.catalog import Catalog
from ith_proxy.vault.records import Vault
from ith_proxy.web.access import RefusalLimiter
from ith_proxy.web.app import ApiServer
from ith_proxy.web.auth import Verifier
from ith_proxy.web.context import ApiContext, claims, json_object, json_response, route
from worker_rooms import Rooms

PHI = "PHIMARK^Jane"  # what the failing route's exception message carries


def probe_app(rooms: Rooms) -> bottle.Bottle:
    ctx = ApiContext(
        cfg=rooms.cfg,
        connect_catalog=lambda: Catalog(rooms.spool.catalog_file),
        open_vault=lambda: Vault(rooms.spool.vault_file, rooms.cfg.vault.key_file),
        audit=audit_log(rooms.cfg, append=True),
        authenticate=Verifier(rooms.cfg.api).authenticate,
        health=list,
    )
    app = rooms.api()  # the real app (health, openapi, JSON errors), and the probes

    @route(app, ctx, "GET", "/api/probe/whoami/")
    def whoami() -> bottle.HTTPResponse:
        caller = claims()
        return json_response(200, {"sub": caller.sub, "scopes": sorted(caller.scopes)})

    @route(app, ctx, "GET", "/api/probe/phi/", scope="phi:read")
    def phi() -> bottle.HTTPResponse:
        return json_response(200, {"ok": True})

    @route(app, ctx, "POST", "/api/probe/echo/")
    def echo() -> bottle.HTTPResponse:
        return json_response(200, json_object(bottle.request))

    @route(app, ctx, "GET", "/api/probe/boom/")
    def boom() -> bottle.HTTPResponse:
        raise ValueError(f"the route failed on {PHI}")

    return app


@contextmanager
def serving(
    cfg: Config, app: bottle.Bottle, limiter: RefusalLimiter | None = None, **api: object
) -> Iterator[str]:
    """``app`` served by ApiServer on 127.0.0.1 (a free port); yields the base URL.
    ``api`` overrides [api] settings (threads, channel_timeout, ...)."""
    api_cfg = dataclasses.replace(cfg.api, bind_address="127.0.0.1", port=0, **api)
    server = ApiServer(api_cfg, app, limiter)
    server.start()
    try:
        host, port = server.server.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def raw_request(url: str, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (a whole HTTP/1.1 request) to ``url``'s host and port on a
    plain socket; the status, headers and body of the answer (read until the
    server closes, or Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before it has read it all
        raw = b""
        while b"\r\n\r\n" not in raw:
            part = sock.recv(65536)
            if not part:
                break
            raw += part
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            part = sock.recv(65536)
            if not part:
                break
            body += part
        return status, headers, body


def as_json(body: bytes) -> object:
    return json.loads(body.decode())
