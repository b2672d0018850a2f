"""Logging: rotated files under ``spool/logs/``, never any PHI.

- ``main.log``  everything from ith_proxy at the configured level, and
  warnings from any other library
- ``dicom.log`` associations and DIMSE outcomes (ith_proxy.dicom, pynetdicom)
- ``api.log``   HTTP access and API events (ith_proxy.api, waitress)
- ``error.log`` warnings and errors from all of the above

ith_proxy's own messages name anonymized UIDs and opaque spool names only,
and pass as written.  Third-party messages may quote values (pynetdicom logs
a non-conformant UID as it received it), so every handler carries
:class:`RedactFilter`: a record from any other logger (pynetdicom, pydicom,
waitress, watchdog, the root logger, ``py.warnings``) keeps its logger name
and level, but its arguments are never formatted in, and in the rest of its
text every quoted value, person name and token with digits in it is
replaced by ``<redacted>``, behind a fixed prefix.

Exception messages are never written, whoever logs them: every handler
uses :class:`SafeFormatter`, which renders a traceback as the type name of
each exception in the chain and each frame's ``file:line in function``.
Uncaught exceptions in any thread, and in the indexer process, go through
the same formatter; a failing handler prints nothing
(``logging.raiseExceptions`` is off: its report would quote the record).
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import re
import socket
import sys
import threading
import traceback
import warnings
from pathlib import Path

from ith_proxy.config import LogConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
OWN = "ith_proxy"
REDACTED = "<redacted>"
PREFIX = "[third-party message, values redacted] "
_TAG = "_ith_proxy_handler"  # marks handlers set up here (replaced on a second setup)
MAX_MESSAGE = 1 << 17  # one record from a worker process, at most (JSON bytes)
MAX_TEXT = 1 << 14  # a worker's message text beyond this is cut

# quoted text (also an unclosed quote up to the end of the line)
_QUOTED = re.compile(r"""'[^'\n]*(?:'|$)|"[^"\n]*(?:"|$)""", re.MULTILINE)
_TOKEN = re.compile(r"""[^\s'"`,;:()\[\]{}<>=]+""")
# tokens with digits that cannot carry an identifier: small numbers, DIMSE
# status codes, state machine names (Sta6, Evt19, AR-1)
_HARMLESS = re.compile(r"\d{1,4}|0x[0-9A-Fa-f]{4}|[A-Za-z]{2,4}-?\d{1,2}")
# a %-style placeholder: what a third-party logger fills in is a value
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")


def _token(match: re.Match) -> str:
    token = match.group(0)
    if "^" in token or "@" in token:  # person names (PN), e-mail addresses
        return REDACTED
    if token.isascii() and not any(c.isdigit() for c in token):
        return token
    core = token.rstrip(".")
    if core.isascii() and _HARMLESS.fullmatch(core):
        return token
    return REDACTED


def redact(text: str) -> str:
    """``text`` with quoted values, UIDs, numbers of 5+ digits, person names
    and any token with digits or non-ASCII letters replaced by ``<redacted>``."""
    text = _QUOTED.sub(f"'{REDACTED}'", text)
    return _TOKEN.sub(_token, text)


def _own(name: str) -> bool:
    return name == OWN or name.startswith(OWN + ".")


class RedactFilter(logging.Filter):
    """On a handler: rewrite every record not from ith_proxy's own loggers
    (in place, once; ``args`` are dropped so nothing unredacted is pickled
    onto the indexer's log socket)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _own(record.name) or getattr(record, "ith_redacted", False):
            return True
        text = str(record.msg)
        if record.args:  # the arguments are values: never formatted in
            text = _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else REDACTED, text)
        record.msg = PREFIX + redact(text)
        record.args = ()
        record.ith_redacted = True
        return True


def exception_lines(exc: BaseException | None) -> list[str]:
    """An exception chain as type names and ``file:line in function`` frames,
    oldest first, like Python's own report but without any message."""
    if exc is None:
        return ["NoneType (no exception)"]
    chain: list[BaseException] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    lines: list[str] = []
    for i, item in enumerate(reversed(chain)):
        if i:
            lines.append("which led to:")
        kind = type(item)
        lines.append(f"{kind.__module__}.{kind.__qualname__} (message not logged)")
        for frame, lineno in traceback.walk_tb(item.__traceback__):
            code = frame.f_code
            lines.append(f"  {code.co_filename}:{lineno} in {code.co_name}")
        for sub in item.exceptions[:10] if isinstance(item, BaseExceptionGroup) else ():
            lines.extend("  | " + line for line in exception_lines(sub))
    return lines


class SafeFormatter(logging.Formatter):
    """A formatter whose tracebacks never hold an exception's message."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return "\n".join(exception_lines(ei[1]))

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None  # text another formatter cached may hold a message
        return super().format(record)


def _handler(handler: logging.Handler, level: int, fmt: str = FORMAT) -> logging.Handler:
    handler.setLevel(level)
    handler.setFormatter(SafeFormatter(fmt))
    handler.addFilter(RedactFilter())
    setattr(handler, _TAG, True)
    return handler


def _rotating(path: Path, cfg: LogConfig, level: int) -> logging.Handler:
    return _handler(
        logging.handlers.RotatingFileHandler(
            path, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8"
        ),
        level,
    )


def _attach(
    name: str, level: int | None, propagate: bool, *handlers: logging.Handler
) -> logging.Logger:
    logger = logging.getLogger(name)
    if level is not None:
        logger.setLevel(level)
    logger.propagate = propagate
    for h in list(logger.handlers):
        if getattr(h, _TAG, False) or logger is not logging.getLogger():
            logger.removeHandler(h)
    for h in handlers:
        logger.addHandler(h)
    return logger


def _silence_pydicom() -> None:
    """pydicom's log records and warnings can quote element values (PHI)."""
    _attach("pydicom", logging.CRITICAL, False, logging.NullHandler())
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def _uncaught_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value
    logging.getLogger(f"{OWN}.uncaught").error(
        "uncaught %s in thread %s",
        args.exc_type.__name__,
        name,
        exc_info=(args.exc_type, exc, args.exc_traceback) if exc is not None else None,
    )


def _uncaught(kind, value, tb) -> None:
    logging.getLogger(f"{OWN}.uncaught").critical(
        "uncaught %s", kind.__name__, exc_info=(kind, value, tb)
    )


def _common() -> None:
    """Process-wide: warnings become records, uncaught exceptions are logged
    by type and place, and nothing reaches stderr around the handlers."""
    logging.captureWarnings(True)
    logging.raiseExceptions = False
    logging.lastResort = _handler(logging.StreamHandler(sys.stderr), logging.WARNING)
    threading.excepthook = _uncaught_thread
    sys.excepthook = _uncaught
    _silence_pydicom()


def setup(log_dir: Path, cfg: LogConfig, console: bool = True) -> None:
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("main.log", "dicom.log", "api.log", "error.log"):
        path = log_dir / name
        path.touch(mode=0o600, exist_ok=True)
    level = getattr(logging, cfg.level)
    main = _rotating(log_dir / "main.log", cfg, level)
    errors = _rotating(log_dir / "error.log", cfg, logging.WARNING)
    shown = [main, errors]
    if console:
        shown.append(_handler(logging.StreamHandler(sys.stderr), level))
    _attach(OWN, level, False, *shown)
    dicom = _rotating(log_dir / "dicom.log", cfg, logging.DEBUG)
    _attach(f"{OWN}.dicom", None, True, dicom)
    # pynetdicom is held at WARNING: at INFO and below it logs identifiers
    _attach("pynetdicom", logging.WARNING, False, dicom, errors)
    api = _rotating(log_dir / "api.log", cfg, logging.DEBUG)
    _attach(f"{OWN}.api", None, True, api)
    _attach("waitress", logging.WARNING, False, api, errors)
    # every other library (watchdog, apsw, urllib3, py.warnings) ends at the root
    _attach("", logging.WARNING, True, *shown)
    _common()


class Listener:
    """In the service: a thread that writes the records worker processes
    send over the log socket (one SOCK_SEQPACKET message each)."""

    def __init__(self, sock: socket.socket, wake: socket.socket | None = None) -> None:
        self._sock = sock
        self._wake = wake  # the sending end: an empty message after every record stops us
        self._thread = threading.Thread(target=self._run, name="log-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                return
            if not data:  # stop(): the empty message, or the socket shut down
                return
            try:
                fields = json.loads(data)
            except ValueError:
                continue
            if isinstance(fields, dict):
                record = logging.makeLogRecord(fields)
                logging.getLogger(record.name).handle(record)

    def stop(self) -> None:
        """Write every record sent so far, then end the thread."""
        try:
            if self._wake is not None:
                self._wake.send(b"")
                self._thread.join(timeout=5)
        except OSError:
            pass
        if self._thread.is_alive():
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._thread.join(timeout=5)


def listen(sock: socket.socket, wake: socket.socket | None = None) -> Listener:
    """In the service: write records that worker processes send on ``sock``
    (``wake``: the pair's sending end, for a stop after the last record)."""
    return Listener(sock, wake)


class _SocketHandler(logging.handlers.QueueHandler):
    """In a worker process: each record, formatted (``prepare``), as one JSON
    message on the log socket (no pickle: the service builds only a record)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no queue: enqueue sends
        self._sock = sock

    def enqueue(self, record: logging.LogRecord) -> None:
        if len(record.msg) > MAX_TEXT:
            record.msg = record.message = record.msg[:MAX_TEXT] + " [truncated]"
        self._sock.send(json.dumps(record.__dict__, default=str).encode())


def _detach_all() -> None:
    """Remove (and close) every handler set up here, on every logger: a
    forked worker inherits the service's file handlers and must not write."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for h in list(logger.handlers):
            if getattr(h, _TAG, False):
                logger.removeHandler(h)
                h.close()


def setup_worker(sock: socket.socket, cfg: LogConfig) -> None:
    """In a worker process: send every record to the service's files via
    ``sock``, redacted and formatted (tracebacks without messages) here,
    before it is sent."""
    _detach_all()
    out = _handler(_SocketHandler(sock), logging.NOTSET, "%(message)s")
    _attach(OWN, getattr(logging, cfg.level), False, out)
    _attach("", logging.WARNING, True, out)
    _common()


def uncaught_logged(fn):
    """For a process entry point: an exception that ends ``fn`` is logged by
    type and place and the process exits 1 (multiprocessing would print its
    message to stderr)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:
            logging.getLogger(f"{OWN}.uncaught").critical(
                "%s ended on uncaught %s", fn.__name__, type(exc).__name__, exc_info=True
            )
            raise SystemExit(1) from None

    return run
