"""A real ITH backend for the tests: HTTP and WebSocket on loopback (aiohttp).

It serves what the proxy talks to (DESIGN.md §5, docs/backend-protocol.md):

- ``GET /api/proxy/config/``: ``self.config`` (``config_status`` other than
  200, or ``config = None`` for a 503, stands for a backend that is down);
- ``POST /dicom-web/studies``: STOW-RS; each part is kept (``self.stow_parts``)
  and answered with a proper ReferencedSOPSequence;
- ``/ws/proxy/``: the WebSocket.  Every text message is recorded
  (``self.received``, parsed, and ``self.raw``); durable messages are acked
  (``auto_ack``: in a batch every ``ack_interval`` s, so a kill loses the
  acks still pending, as a crashed backend would) or by ``ack(ids)``.
  ``send``/``command`` push to the proxy; ``send_raw`` sends any text,
  ``send_bytes`` a binary frame.

Every request must carry ``Authorization: Token <token>`` (else 401).
``kill()`` drops the server and its connections at once; ``start()``
brings it back on the same port.  TLS: pass an ``ssl.SSLContext``.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import threading
import uuid
from collections.abc import Callable
from typing import Any, cast

from aiohttp import BodyPartReader, WSMsgType, web
from pydicom import dcmread

import tools
from helpers import wait_until

DURABLE = ("study.completed", "study.forwarded", "study.failed", "command.result")


class BackendSim:
    def __init__(
        self,
        *,
        token: str = "sim-token-0123456789",
        config: dict[str, Any] | str | None = None,
        auto_ack: bool = True,
        ack_interval: float = 0.1,
        tls: ssl.SSLContext | None = None,
        port: int | None = None,
    ) -> None:
        self.token = token
        self.config: dict[str, Any] | str | None = config if config is not None else {}
        self.config_status = 200
        self.auto_ack = auto_ack
        self.ack_interval = ack_interval
        self.tls = tls
        self.port = port or tools.free_port()
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []  # every WebSocket message, in order
        self.raw: list[str] = []
        self.acked: set[str] = set()  # ids the backend has "stored"
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, auth header
        self.stow_parts: list[bytes] = []
        self.stow_sop_uids: list[str] = []
        self.connections = 0
        self._pending_acks: list[str] = []
        self._ws: web.WebSocketResponse | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"ITH_URL": self.url, "ITH_TOKEN": self.token}

    def start(self) -> BackendSim:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._runner is None:
            raise RuntimeError("backend simulator did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/api/proxy/config/", self._config)
        app.router.add_post("/dicom-web/studies", self._stow)
        app.router.add_get("/ws/proxy/", self._websocket)
        runner = web.AppRunner(app, handle_signals=False)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.tls, reuse_address=True)
        loop.run_until_complete(site.start())
        self._runner = runner
        ack_task = loop.create_task(self._ack_loop())
        ready.set()
        loop.run_forever()
        ack_task.cancel()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def kill(self) -> None:
        """Stop at once: connections dropped, pending acks lost."""
        loop, ws = self._loop, self._ws
        if loop is None:
            return

        async def down() -> None:
            if ws is not None and ws._writer is not None:  # an abrupt end
                transport = ws._writer.transport
                transport.abort()
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        with self.lock:
            self._pending_acks.clear()
        self._ws = self._loop = self._runner = None

    def __enter__(self) -> BackendSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # --- HTTP ---

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization")
        with self.lock:
            self.requests.append((request.method, request.path, auth))
        return auth == f"Token {self.token}"

    async def _config(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"detail": "bad token"}, status=401)
        if self.config is None or self.config_status != 200:
            return web.Response(status=503 if self.config is None else self.config_status)
        body = self.config if isinstance(self.config, str) else json.dumps(self.config)
        return web.Response(text=body, content_type="application/json")

    async def _stow(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"detail": "bad token"}, status=401)
        reader = await request.multipart()
        refs = []
        while True:
            part = await reader.next()
            if part is None:
                break
            assert isinstance(part, BodyPartReader), "a nested multipart"
            data = await part.read()
            ds = dcmread(io.BytesIO(bytes(data)), force=True)
            with self.lock:
                self.stow_parts.append(bytes(data))
                self.stow_sop_uids.append(str(ds.SOPInstanceUID))
            refs.append(
                {
                    "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                }
            )
        body = {"00081199": {"vr": "SQ", "Value": refs}}
        return web.Response(text=json.dumps(body), content_type="application/dicom+json")

    # --- WebSocket ---

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"detail": "bad token"}, status=401)
        ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024, heartbeat=None)
        await ws.prepare(request)
        self._ws = ws
        with self.lock:
            self.connections += 1
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            with self.lock:
                self.raw.append(msg.data)
                self.received.append(message)
                if self.auto_ack and message.get("type") in DURABLE:
                    self._pending_acks.append(message["id"])
        if self._ws is ws:
            self._ws = None
        return ws

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            with self.lock:
                ids, self._pending_acks = self._pending_acks, []
            if ids and self._ws is not None and not self._ws.closed:
                await self._ws.send_str(json.dumps(self._message("ack", ids=ids)))
                with self.lock:
                    self.acked.update(ids)

    # --- the test's side ---

    @staticmethod
    def _message(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "id": str(uuid.uuid4()), "ts": "2026-12-02T00:00:00Z", **fields}

    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    def send_raw(self, text: str) -> None:
        assert self._loop is not None and self._ws is not None, "no proxy connected"
        asyncio.run_coroutine_threadsafe(self._ws.send_str(text), self._loop).result(30)

    def send_bytes(self, data: bytes) -> None:
        assert self._loop is not None and self._ws is not None, "no proxy connected"
        asyncio.run_coroutine_threadsafe(self._ws.send_bytes(data), self._loop).result(30)

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message))

    def command(self, kind: str, **fields: Any) -> str:
        """Send a command; return its id (the result's in_reply_to)."""
        message = self._message(kind, **fields)
        self.send(message)
        return str(message["id"])

    def ack(self, ids: list[str]) -> None:
        self.send(self._message("ack", ids=ids))
        with self.lock:
            self.acked.update(ids)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.received if m.get("type") == kind]

    def result_for(self, command_id: str, timeout: float = 30) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for m in self.of_type("command.result"):
                if m.get("in_reply_to") == command_id:
                    return m
            return None

        return cast(dict[str, Any], wait_until(find, timeout, f"command.result for {command_id}"))

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self.lock:
                return next((m for m in self.received if predicate(m)), None)

        return cast(dict[str, Any], wait_until(find, timeout, what))

    def wait_connected(self, timeout: float = 30, connections: int = 1) -> None:
        wait_until(
            lambda: self.connected() and self.connections >= connections and self.of_type("hello"),
            timeout,
            "the proxy's WebSocket",
        )
