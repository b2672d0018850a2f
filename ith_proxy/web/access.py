"""``api.log``: one line per HTTP request, and no flood of refusals.

Each request is written by :class:`AccessLog` (a WSGI middleware around the
app) when its answer has been sent, to the logger ``ith_proxy.api``::

    2026-12-02T04:00:00.123Z GET /api/status/ 200 3.1ms sub=backend rid=6f1c...

UTC time, method, path, status, duration, the token's ``sub`` (``-`` when no
token was verified) and the request id (set here for every request, sent
back as ``X-Request-Id``, and in the audit record of the request).  The
query string is never written (it may carry anything), nor any header, body
or token; the path is cut at 200 characters and anything but printable
ASCII in it is escaped, so that a request cannot forge a log line.

A request answered 4xx without a verified token (a 401 for a missing or bad
token, a 404 or 413 from a stranger) is *anonymous*: such lines are written
at most ``burst`` per ``window`` seconds; the rest are counted, and one line
says how many were left out when the window ends, so an unauthenticated
flood cannot grow the logs.  A 401 line names the refusal reason that
``web.auth`` kept (``expired``, ``malformed token``: never the token).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from ith_proxy.web.auth import REFUSAL
from ith_proxy.web.context import CLAIMS, REQUEST_ID

log = logging.getLogger("ith_proxy.api")

MAX_PATH = 200
BURST = 20  # anonymous refusals written per window
WINDOW = 60.0  # seconds


def clean(text: str, limit: int = MAX_PATH, spaces: bool = False) -> str:
    """``text`` as printable ASCII (a space as ``%20`` unless ``spaces``, any
    other character as ``\\xNN``/``\\uNNNN``), cut at ``limit`` characters."""
    shown = "".join(" " if spaces and ch == " " else _char(ch) for ch in text[:limit])
    if len(text) > limit:
        shown += f"...(+{len(text) - limit})"
    return shown


def _char(ch: str) -> str:
    if " " < ch <= "~":
        return ch
    if ch == " ":
        return "%20"
    return ch.encode("unicode_escape").decode("ascii")


class RefusalLimiter:
    """At most ``burst`` anonymous refusals written per ``window`` seconds."""

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._written = 0
        self._suppressed: Counter[int] = Counter()

    def admit(self, status: int) -> tuple[bool, str | None]:
        """Whether to write this refusal, and the summary of the window that ended."""
        with self._lock:
            now = self._clock()
            summary = None
            if now - self._start >= self.window:
                summary = self._summary(now)
                self._start, self._written = now, 0
                self._suppressed.clear()
            if self._written < self.burst:
                self._written += 1
                return True, summary
            self._suppressed[status] += 1
            return False, summary

    def _summary(self, now: float) -> str | None:
        total = sum(self._suppressed.values())
        if not total:
            return None
        kinds = ", ".join(f"{code}: {n}" for code, n in sorted(self._suppressed.items()))
        return (
            f"{total} more refused requests without a valid token suppressed "
            f"in the last {now - self._start:.0f}s ({kinds})"
        )


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """WSGI middleware writing the ``api.log`` line of each request."""

    def __init__(self, app: Callable[..., Iterable[bytes]], limiter: RefusalLimiter) -> None:
        self.app = app
        self.limiter = limiter

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.monotonic()
        seen: list[int] = []
        request_id = environ.setdefault(REQUEST_ID, uuid.uuid4().hex)

        def recording(status: str, headers: list, exc_info: Any = None) -> Any:
            seen[:] = [int(status.split(" ", 1)[0] or 0)]
            headers = [h for h in headers if h[0].lower() != "x-request-id"]
            return start_response(status, [*headers, ("X-Request-Id", request_id)], exc_info)

        try:
            body = self.app(environ, recording)
        except BaseException:
            self.write(environ, 500, started)
            raise
        return _Logged(body, lambda: self.write(environ, seen[0] if seen else 500, started))

    def write(self, environ: dict[str, Any], status: int, started: float) -> None:
        claims = environ.get(CLAIMS)
        fields = [
            str(environ.get("REQUEST_METHOD") or "-"),
            str(environ.get("PATH_INFO") or "-"),
            status,
            (time.monotonic() - started) * 1000,
            claims.sub if claims is not None else "-",
            str(environ.get(REQUEST_ID, "-")),
        ]
        if claims is None and 400 <= status < 500:
            refused(self.limiter, fields, environ.get(REFUSAL))
        else:
            log.info(LINE, *_args(fields))


LINE = "%s %s %s %d %.1fms sub=%s rid=%s"


def _args(fields: list[Any]) -> list[object]:
    method, path, status, ms, sub, rid = fields
    return [utc_now(), clean(method, 16), clean(path), status, ms, clean(sub, 64), clean(rid, 64)]


def refused(limiter: RefusalLimiter, fields: list[Any], reason: str | None = None) -> None:
    """An anonymous refusal (``fields``: method, path, status, ms, sub, request
    id): written while the limiter admits it, with the refusal reason."""
    admitted, summary = limiter.admit(fields[2])
    if summary:
        log.warning("%s", summary)
    if admitted:
        if reason:
            log.info(LINE + " refused=%s", *_args(fields), clean(reason, 80, spaces=True))
        else:
            log.info(LINE, *_args(fields))


class _Logged:
    """The response body, passed on; the line is written when it is closed."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done()
