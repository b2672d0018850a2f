"""The backend link: the WebSocket session loop, with reconnects (DESIGN.md §5).

One thread (the service's ``link``) runs ``Link.run``.  A session connects
to ``{ITH_URL as ws/wss}/ws/proxy/`` with ``Authorization: Token``, sends
``hello``, then every unacked durable message in order, then loops:

- a ``health`` heartbeat every ``[link] heartbeat_interval`` seconds;
- an ``audit.head`` whenever the audit anchor's sequence number moves;
- the durable messages other rooms post (``store/linkbox.py``) as they come;
- each backend message: ``ping`` -> ``pong``, ``ack`` -> deleted from the
  linkbox, a command -> ``command.result`` (durable).

A reader thread per connection receives (a frame size bound, then the
queue of at most ``_INBOX`` messages: a fast backend is slowed, not
buffered).  A lost connection ends the session; the next one comes after
an exponential backoff with jitter up to ``[link] reconnect_cap``.  The
backend's config is fetched at start-up by the service; when that failed
it is fetched again here until it succeeds.  Nothing logged names the
token, and backend text is logged bounded and printable only.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websocket
from websocket._abnf import ABNF, frame_buffer

from ith_proxy.backoff import Backoff
from ith_proxy.config import Config
from ith_proxy.link import commands, config_fetch
from ith_proxy.link import protocol as p
from ith_proxy.store.audit import AuditError
from ith_proxy.store.audit import head as audit_head
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.linkbox import MAX_ACK_IDS, Linkbox
from ith_proxy.store.outbox import Outbox

log = logging.getLogger("ith_proxy.link")

_INBOX = 64  # backend messages waiting to be handled
_TICK = 0.2  # seconds between two looks at the linkbox and the audit anchor
_CLOSED = object()


class LinkDown(Exception):
    """The session ended; the text is safe to log."""


class _Limited(frame_buffer):
    """websocket-client's frame reader with a bound on each message (all its
    frames together): a larger one is refused before its payload is read."""

    def __init__(self, recv: Callable[[int], bytes], limit: int) -> None:
        super().__init__(recv, skip_utf8_validation=False)
        self.limit = limit
        self.pending = 0

    def recv_length(self) -> None:
        super().recv_length()
        if (
            self.header is not None
            and self.header[4] in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY, ABNF.OPCODE_CONT)
            and (self.length or 0) + self.pending > self.limit
        ):
            raise websocket.WebSocketProtocolException("message over the size limit")

    def recv_frame(self) -> ABNF:
        frame = super().recv_frame()
        if frame.opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY, ABNF.OPCODE_CONT):
            self.pending = 0 if frame.fin else self.pending + len(frame.data)
        return frame


def ws_url(ith_url: str) -> str:
    scheme, rest = ith_url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws/proxy/"


def describe(exc: BaseException) -> str:
    """A connection error in one safe line (never headers, never the token)."""
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return f"handshake refused: HTTP {exc.status_code}"
    reason = getattr(exc, "verify_message", None) or getattr(exc, "strerror", None)
    return f"{type(exc).__name__}" + (f": {p.safe(str(reason), 120)}" if reason else "")


class Link:
    def __init__(
        self,
        cfg: Config,
        catalog_file: Path,
        health: Callable[[], list[str]] = list,
        set_status: Callable[[str], None] = lambda _status: None,
        config_pending: bool = True,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.catalog_file = catalog_file
        self.health = health
        self.set_status = set_status
        self.config_pending = config_pending  # the backend's config still to fetch
        self.problems: list[str] = []  # the link's own, reported in health
        self.rand = rand
        self.backoff = Backoff(cfg.link.reconnect_base, cfg.link.reconnect_cap)
        self._fetch_attempts = 0
        self.greeted = False  # the current session got through hello
        self._next_fetch = 0.0

    # --- the thread ---

    def run(self, stop: threading.Event) -> None:
        catalog = Catalog(self.catalog_file)
        try:
            failures = 0
            while not stop.is_set():
                self.fetch_config(catalog)
                self.greeted = False
                try:
                    self.session(catalog, stop)
                except LinkDown as exc:
                    log.warning("link: %s", exc)
                except Exception as exc:  # a bug must not end the thread
                    log.error("link: session failed: %s", describe(exc))
                # a session that got through hello starts the backoff again
                failures = 1 if self.greeted else failures + 1
                self.set_status("disconnected")
                self._wait(catalog, stop, self.backoff.delay(failures, self.rand))
        finally:
            self.set_status("disconnected")
            catalog.close()

    def _wait(self, catalog: Catalog, stop: threading.Event, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return
            self.fetch_config(catalog)

    def fetch_config(self, catalog: Catalog) -> None:
        """Fetch and apply the backend's config if it is still pending and due."""
        if not self.config_pending or time.monotonic() < self._next_fetch:
            return
        try:
            report = config_fetch.fetch_and_apply(self.cfg, catalog)
        except config_fetch.FetchError as exc:
            self._fetch_attempts += 1
            delay = self.backoff.delay(self._fetch_attempts, self.rand)
            self._next_fetch = time.monotonic() + delay
            log.warning("link: backend config not fetched (%s); retry in %.1f s", exc, delay)
            return
        self.config_pending = False
        self.note_config(report)

    def note_config(self, report: dict[str, Any]) -> None:
        """Keep the anonymize refusal of the last config as a reported problem."""
        refused = report.get("refused", {})
        self.problems = [refused["anonymize"]] if "anonymize" in refused else []

    # --- one connection ---

    def _connect(self) -> websocket.WebSocket:
        link = self.cfg.link
        options: dict[str, Any] = {
            "header": [f"Authorization: Token {link.ith_token}"],
            "timeout": link.connect_timeout,
            "redirect_limit": 0,  # a redirect could carry the token elsewhere
            "enable_multithread": True,
        }
        if link.ith_url.startswith("https://"):
            options["sslopt"] = {"context": config_fetch.tls_context(self.cfg)}
        try:
            ws = websocket.create_connection(ws_url(link.ith_url), **options)
        except (websocket.WebSocketException, OSError, config_fetch.FetchError) as exc:
            raise LinkDown(f"cannot connect: {describe(exc)}") from None
        ws.frame_buffer = _Limited(ws._recv, link.max_message_kb * 1024)
        return ws

    def session(self, catalog: Catalog, stop: threading.Event) -> None:
        ws = self._connect()
        inbox: queue.Queue[object] = queue.Queue(_INBOX)
        done = threading.Event()  # set when the reader ends
        reader = threading.Thread(
            target=_read, args=(ws, inbox, done), name="link-reader", daemon=True
        )
        reader.start()
        try:
            self._talk(ws, catalog, inbox, stop, done)
        finally:
            try:
                ws.close(timeout=1)
            except (websocket.WebSocketException, OSError):
                pass
            ws.shutdown()  # the socket is closed whatever state the connection was in
            reader.join(timeout=5)

    def _send(self, ws: websocket.WebSocket, message: dict | str) -> None:
        try:
            ws.send(message if isinstance(message, str) else p.encode(message))
        except (websocket.WebSocketException, OSError) as exc:
            raise LinkDown(f"connection lost while sending: {describe(exc)}") from None

    def _talk(
        self,
        ws: websocket.WebSocket,
        catalog: Catalog,
        inbox: queue.Queue,
        stop: threading.Event,
        done: threading.Event,
    ) -> None:
        linkbox = Linkbox(catalog)
        self._send(ws, p.hello(commands.ae_title(self.cfg, catalog), self.cfg.deid.anonymize))
        sent = self._flush(ws, linkbox, 0)  # every unacked message again, in order
        self.greeted = True
        self.set_status("connected")
        log.info("link: connected to the backend (%d unacked message(s) sent again)", sent[1])
        anchor = _Anchor(self.cfg.vault.audit_anchor_file)
        anchor.changed()  # the heartbeat carries the head; audit.head tells moves
        next_health = 0.0
        cursor = sent[0]
        while not stop.is_set():
            if done.is_set() and inbox.empty():
                raise LinkDown("the connection was lost")
            if time.monotonic() >= next_health:
                self._send(ws, self._health(catalog, linkbox, anchor.head))
                next_health = time.monotonic() + self.cfg.link.heartbeat_interval
            if anchor.changed() and anchor.head is not None:
                self._send(ws, p.audit_head(anchor.head))
            cursor = self._flush(ws, linkbox, cursor)[0]
            self.fetch_config(catalog)  # while still pending, when due
            try:
                item = inbox.get(timeout=_TICK)
            except queue.Empty:
                continue
            while True:
                if item is _CLOSED:
                    raise LinkDown("the backend closed the connection")
                self._handle(ws, catalog, linkbox, item)
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break

    def _flush(self, ws: websocket.WebSocket, linkbox: Linkbox, after: int) -> tuple[int, int]:
        """Send the durable messages after ``seq``; return (last seq, count)."""
        count = 0
        while True:
            rows = linkbox.unacked(after)
            if not rows:
                return after, count
            for seq, body in rows:
                self._send(ws, body)
                after, count = seq, count + 1

    def _health(self, catalog: Catalog, linkbox: Linkbox, head: dict | None) -> dict:
        try:
            problems = list(self.health()) + self.problems
        except Exception as exc:  # the heartbeat still goes out
            problems = [f"health check failed ({type(exc).__name__})", *self.problems]
        if self.config_pending:
            problems.append("backend config not fetched yet")
        return p.health(
            "degraded" if problems else "ok",
            problems,
            catalog.counts()["studies_by_state"],
            Outbox(catalog).counts(),
            linkbox.depth(),
            head,
        )

    def _handle(
        self, ws: websocket.WebSocket, catalog: Catalog, linkbox: Linkbox, data: object
    ) -> None:
        try:
            msg = p.parse(data)  # type: ignore[arg-type]  # str or bytes from the reader
        except p.ProtocolError as exc:
            log.warning("link: unreadable backend message: %s", exc)
            linkbox.post("command.result", p.result_payload(None, False, {"message": str(exc)}))
            return
        if msg.type == "ping":
            self._send(ws, p.pong(msg.id))
            return
        if msg.type == "ack":
            ids = msg.body.get("ids")
            if isinstance(ids, list) and len(ids) <= MAX_ACK_IDS:
                linkbox.ack(ids)
                return
            reason = f"ack: ids must be a list of at most {MAX_ACK_IDS} message ids"
            log.warning("link: %s", reason)
            linkbox.post("command.result", p.result_payload(msg.id, False, {"message": reason}))
            return
        ok, detail = commands.run(self.cfg, catalog, msg)
        if msg.type == "config.update" and "anonymize" in detail.get("refused", {}):
            problem = commands.anonymize_problem(self.cfg, msg.body.get("anonymize"))
            self.problems = [problem] if problem else self.problems
        log.info("link: %s %s", p.safe(msg.type), "done" if ok else "refused")
        linkbox.post("command.result", p.result_payload(msg.id, ok, detail))


class _Anchor:
    """The audit chain's head ({seq, mac}), re-read only when the anchor
    file's stat changes (a cheap look every tick)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stat: tuple[int, int, int] | None = None
        self.head: dict | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
            stat: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stat = None
        if stat == self.stat:
            return False
        self.stat = stat
        try:
            head = audit_head(self.path)
        except AuditError:
            head = None
        moved = head != self.head
        self.head = head
        return moved


def _read(ws: websocket.WebSocket, inbox: queue.Queue, done: threading.Event) -> None:
    """The reader thread: each message into the inbox, then ``_CLOSED``."""
    try:
        while True:
            try:
                data = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue  # idle: the frame state is kept across timeouts
            if data in ("", b"") and not ws.connected:
                break
            while ws.connected:  # a full inbox slows the backend down
                try:
                    inbox.put(data, timeout=1)
                    break
                except queue.Full:
                    continue
    except (websocket.WebSocketException, OSError, ValueError) as exc:
        if ws.connected:
            log.warning("link: receive failed: %s", describe(exc))
    finally:
        done.set()  # the session sees _CLOSED, or this
        try:
            inbox.put(_CLOSED, timeout=5)
        except queue.Full:
            pass
