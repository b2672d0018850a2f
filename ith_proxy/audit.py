"""Append-only, hash-chained audit log of PHI access: ``spool/logs/audit.log``.

One JSON object per line. Each record carries the MAC of the record before it
(``prev``) and its own MAC (``mac``), an HMAC-SHA256 over its canonical JSON under
a key derived from the site secret, which lives outside the spool beside the vault
key. So a record cannot be changed, removed, reordered or forged without
``ith-proxy audit verify`` pointing at the line, unless the attacker also holds
the site secret.

A record is written, and fsynced, *before* the access it describes: if it cannot
be written, the access is refused. Appends are serialized with ``flock`` so a
running service and a CLI command can both write. A crash in the middle of an
append can leave a torn last line; the next append starts on a new line and marks
itself ``after_torn``, and verify accepts a torn line only where such a record
follows it. The file is never rewritten and never rotated.

Records name things by non-PHI handles only (anonymized UIDs, quarantine item
names, the operator's account): the log itself must hold no PHI.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

GENESIS = "0" * 64
_KEY_LABEL = b"ith-proxy audit log v1"
_TAIL = 65536  # bytes read back to find the last record (records are far smaller)


class AuditError(RuntimeError):
    """The audit record could not be written, so the access must not happen."""


class AuditBroken(RuntimeError):
    """verify found a record that is not what was written."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Summary:
    records: int
    first: str | None
    last: str | None
    torn: int


def audit_key(site_secret: bytes) -> bytes:
    return hmac.new(site_secret, _KEY_LABEL, hashlib.sha256).digest()


def cli_actor() -> str:
    """Who runs this CLI command: the login, and the sudo caller if any."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    via = os.environ.get("SUDO_USER")
    return f"cli:{user}(uid {os.getuid()})" + (f" via sudo from {via}" if via else "")


def _mac(key: bytes, body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _last_line(fd: int) -> tuple[bytes, bool, bool]:
    """(last whole record, whether the file lacks its final newline, whether that
    unterminated tail is a torn partial record rather than a whole one)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b"", False, False
    start = max(0, size - _TAIL)
    tail = os.pread(fd, size - start, start)
    lines = tail.split(b"\n")
    unterminated = lines.pop()  # b"" when the file ends with a newline
    if unterminated:
        try:  # crash after the record but before its newline: the record is whole
            if isinstance(json.loads(unterminated), dict):
                return unterminated, True, False
        except ValueError:
            pass
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines and start > 0:
        raise AuditError("audit log tail is unreadable (no record in its last 64 KiB)")
    return (lines[-1] if lines else b""), bool(unterminated), bool(unterminated)


class AuditLog:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self._key = key

    def record(self, actor: str, action: str, target: str, **detail: object) -> dict:
        """Append one record and fsync it; raise AuditError if that fails."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._append(fd, created, actor, action, target, detail)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.path}: "
                             f"{exc.strerror or exc}") from None
        finally:
            os.close(fd)  # releases the lock

    def _append(self, fd: int, created: bool, actor: str, action: str, target: str,
                detail: dict) -> dict:
        line, needs_newline, torn = _last_line(fd)
        if line:
            try:
                last = json.loads(line)
                seq, prev = int(last["seq"]) + 1, str(last["mac"])
            except (ValueError, KeyError, TypeError):
                raise AuditError("the last audit record is unreadable; "
                                 "run: ith-proxy audit verify") from None
        else:
            seq, prev = 1, GENESIS
        body: dict = {"seq": seq, "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                      "actor": actor, "action": action, "target": target, "prev": prev}
        if detail:
            body["detail"] = detail
        if torn:
            body["after_torn"] = True
        body["mac"] = _mac(self._key, body)
        data = (b"\n" if needs_newline else b"") + \
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):  # a full disk gives a short write
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError:
            try:  # leave no torn record behind (we hold the lock: nobody appended since)
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
        if created:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return body

    def verify(self) -> Summary:
        """Check every record's MAC, sequence and chain; raise AuditBroken at the first fault."""
        prev, seq, first, last, torn_lines = GENESIS, 0, None, None, 0
        pending_torn: int | None = None
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    body = json.loads(raw)
                    if not isinstance(body, dict):
                        raise ValueError
                except ValueError:
                    if not raw.endswith(b"\n"):  # torn last line: a crash mid-append
                        torn_lines += 1
                        break
                    if pending_torn is not None:
                        raise AuditBroken(pending_torn, "unreadable record") from None
                    pending_torn = number
                    continue
                if pending_torn is not None:
                    if not body.get("after_torn"):
                        raise AuditBroken(pending_torn, "unreadable record")
                    torn_lines += 1
                    pending_torn = None
                mac = body.pop("mac", None)
                if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(self._key, body)):
                    raise AuditBroken(number, "MAC mismatch: the record was altered, or the "
                                              "site secret is not the one that wrote it")
                if body.get("prev") != prev:
                    raise AuditBroken(number, "chain broken: a record before it was removed, "
                                              "reordered or replaced")
                if body.get("seq") != seq + 1:
                    raise AuditBroken(number, f"sequence {body.get('seq')} follows {seq}")
                prev, seq, last = mac, seq + 1, body.get("at")
                first = first or last
        if pending_torn is not None:
            raise AuditBroken(pending_torn, "unreadable record")
        return Summary(records=seq, first=first, last=last, torn=torn_lines)
