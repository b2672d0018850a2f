"""Logging: rotated files under ``spool/logs/``, never any PHI.

- ``main.log``  everything from ith_proxy at the configured level
- ``dicom.log`` associations and DIMSE outcomes (ith_proxy.dicom, pynetdicom)
- ``api.log``   HTTP access and API events (ith_proxy.api, waitress)
- ``error.log`` warnings and errors from all of the above

pynetdicom is held at WARNING: at INFO and below it logs request
identifiers and UIDs.  Messages name anonymized UIDs and opaque spool names
only.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import warnings
from pathlib import Path

from .config import LogConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


def _silence_pydicom() -> None:
    """pydicom's log records and warnings can quote element values (PHI)."""
    pyd = logging.getLogger("pydicom")
    pyd.setLevel(logging.CRITICAL)
    pyd.propagate = False
    if not pyd.handlers:
        pyd.addHandler(logging.NullHandler())
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def _rotating(path: Path, cfg: LogConfig, level: int) -> logging.Handler:
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def setup(log_dir: Path, cfg: LogConfig, console: bool = True) -> None:
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("main.log", "dicom.log", "api.log", "error.log"):
        path = log_dir / name
        path.touch(mode=0o600, exist_ok=True)
    level = getattr(logging, cfg.level)
    root = logging.getLogger("ith_proxy")
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    errors = _rotating(log_dir / "error.log", cfg, logging.WARNING)
    root.addHandler(_rotating(log_dir / "main.log", cfg, level))
    root.addHandler(errors)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(FORMAT))
        stream.setLevel(level)
        root.addHandler(stream)
    dicom = _rotating(log_dir / "dicom.log", cfg, logging.DEBUG)
    logging.getLogger("ith_proxy.dicom").addHandler(dicom)
    pnd = logging.getLogger("pynetdicom")
    pnd.setLevel(logging.WARNING)
    pnd.propagate = False
    for h in list(pnd.handlers):
        pnd.removeHandler(h)
    pnd.addHandler(dicom)
    pnd.addHandler(errors)
    _silence_pydicom()
    api = _rotating(log_dir / "api.log", cfg, logging.DEBUG)
    logging.getLogger("ith_proxy.api").addHandler(api)
    waitress = logging.getLogger("waitress")
    waitress.setLevel(logging.WARNING)
    waitress.propagate = False
    waitress.addHandler(api)
    waitress.addHandler(errors)


class _Dispatch(logging.Handler):
    """Hand a record from a worker process to the logger of the same name here."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def listen(queue) -> logging.handlers.QueueListener:
    """In the service: write records that worker processes put on ``queue``."""
    listener = logging.handlers.QueueListener(queue, _Dispatch())
    listener.start()
    return listener


def setup_worker(queue, cfg: LogConfig) -> None:
    """In a worker process: send every record to the service's files via ``queue``."""
    root = logging.getLogger("ith_proxy")
    root.setLevel(getattr(logging, cfg.level))
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(queue))
    _silence_pydicom()
