"""Append-only, hash-chained audit log of PHI access: ``spool/logs/audit.log``.

One JSON object per line. Each record carries the MAC of the record before it
(``prev``) and its own MAC (``mac``), an HMAC-SHA256 over its canonical JSON. The
MAC key is the audit log's own (``audit.key`` beside the vault key, 0600, read by
the service and the operator only), named in each record by its key id
(``kid``). Logs from before that key existed were MACed under a key derived from
the site secret; their records carry no ``kid`` and still verify. A key only
changes through an ``audit.key-change`` record, signed by the old key, that
names the new key's id, so verify follows the chain from key to key, and a
record signed by any other key than the one in effect is a fault. So a record
cannot be changed, removed, reordered or forged without ``ith-proxy audit
verify`` pointing at the line, unless the attacker also holds the audit key.

Cutting records off the end, or deleting the log, leaves a valid chain behind;
so each append also writes an anchor outside the spool, beside the keys
(``audit.anchor``: the last sequence number, its MAC and key id), durably (tmp,
fsync, rename, fsync dir) under the same lock. verify, and every append, compare
the log with it.  An attacker who holds the box can cut the anchor too; so
the chain head (``head()``: the anchor's sequence number and MAC) also goes
off the box, to the backend (the link sends it), and ``verify(head=...)``
(``ith-proxy audit verify --head SEQ:MAC``) checks the log against a head
kept there: the log must still hold record SEQ, with that MAC.

A record is written, and fsynced, *before* the access it describes: if it (or its
anchor) cannot be written, the access is refused. Appends are serialized with
``flock`` so a running service and a CLI command can both write. A crash in the
middle of an append can leave a torn last line; the next append starts on a new
line and marks itself ``after_torn``, and verify accepts a torn line only where
such a record follows it. The file is never rewritten and never rotated, and
never opened through a symbolic link.

Records name things by non-PHI handles only (anonymized UIDs, quarantine item
names, the operator's account from the real uid): the log itself must hold no PHI.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import pwd
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ith_proxy.fsio import append_whole, fsync_dir, replace_private

GENESIS = "0" * 64
_KEY_LABEL = b"ith-proxy audit log v1"
_KID_LABEL = b"ith-proxy audit key id v1"
KEY_CHANGE = "audit.key-change"
_TAIL = 65536  # bytes read back to find the last record (records are far smaller)
HEAD_USAGE = "SEQ:MAC (a record number, then that record's MAC: 64 hex digits)"
_HEAD = re.compile(r"([1-9][0-9]{0,17}):([0-9a-f]{64})")


class AuditError(RuntimeError):
    """The audit record could not be written, so the access must not happen."""


class AuditBroken(RuntimeError):
    """verify found a record that is not what was written, or records missing."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Summary:
    records: int
    first: str | None
    last: str | None
    torn: int
    anchored: int | None = None  # the anchor's sequence number, None without one
    headed: int | None = None  # the sequence number of the head checked, if one was given


def audit_key(site_secret: bytes) -> bytes:
    """The legacy MAC key, derived from the site secret (logs written before
    ``audit.key``): verifies records without a ``kid``."""
    return hmac.new(site_secret, _KEY_LABEL, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """A key's public name in records and anchor (reveals nothing of the key)."""
    return hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:16]


def _key_name(kid: str | None) -> str:
    return f"audit key {kid}" if kid else "the site-secret-derived key"


@dataclass(frozen=True)
class AuditKeys:
    """The key that signs new records, and every key that verifies old ones."""

    signing: bytes
    signing_id: str | None  # None: the legacy key (records carry no kid)
    known: dict  # kid -> key
    legacy: bytes | None  # verifies records without a kid

    @classmethod
    def of(cls, keys: list[bytes], legacy: bytes | None = None) -> AuditKeys:
        """From audit.key's keys (the first signs) and the legacy key, if any."""
        return cls(keys[0], key_id(keys[0]), {key_id(k): k for k in keys}, legacy)

    @classmethod
    def legacy_only(cls, key: bytes) -> AuditKeys:
        return cls(key, None, {}, key)

    def key_for(self, kid: str | None) -> bytes | None:
        return self.legacy if kid is None else self.known.get(kid)


def cli_actor() -> str:
    """Who runs this CLI command: the account of the real uid (not $USER, which
    anyone can set), and the sudo caller if any."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    via = os.environ.get("SUDO_USER")
    return f"cli:{user}(uid {uid})" + (f" via sudo from {via}" if via else "")


def _write_anchor(path: Path, body: dict) -> None:
    """Replace the anchor durably: tmp beside it, fsync, rename, fsync the folder."""
    replace_private(path, json.dumps(body, sort_keys=True).encode() + b"\n")


def read_anchor(path: Path | None) -> dict | None:
    """The anchor's content, None when there is none; AuditError when unreadable."""
    if path is None:
        return None
    try:
        anchor = json.loads(Path(path).read_bytes())
        if (
            isinstance(anchor, dict)
            and isinstance(anchor.get("seq"), int)
            and isinstance(anchor.get("mac"), str)
        ):
            return anchor
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    raise AuditError(f"the audit anchor {path} is unreadable")


def head(anchor: Path | None) -> dict | None:
    """The chain head, ``{"seq": int, "mac": str}``, from the anchor: what the
    backend keeps so that ``verify(head=...)`` can see records cut off the end
    together with the anchor.  None when there is no anchor (no record yet);
    AuditError when it is unreadable."""
    found = read_anchor(anchor)
    return None if found is None else {"seq": found["seq"], "mac": found["mac"]}


def format_head(found: dict) -> str:
    """``SEQ:MAC``, as ``audit verify --head`` takes it."""
    return f"{found['seq']}:{found['mac']}"


def parse_head(text: str) -> tuple[int, str]:
    """(seq, mac) from ``SEQ:MAC``; ValueError naming the form otherwise."""
    match = _HEAD.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"a head is {HEAD_USAGE}")
    return int(match.group(1)), match.group(2)


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
    def __init__(self, path: Path, keys: AuditKeys | bytes, anchor: Path | None = None) -> None:
        self.path = Path(path)
        self.keys = keys if isinstance(keys, AuditKeys) else AuditKeys.legacy_only(keys)
        self.anchor = Path(anchor) if anchor is not None else None

    def record(self, actor: str, action: str, target: str, **detail: object) -> dict:
        """Append one record and fsync it; raise AuditError if that fails."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
            raise AuditError(f"cannot open audit log {self.path}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._append(fd, created, actor, action, target, detail)
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)  # releases the lock

    def _body(
        self,
        seq: int,
        prev: str,
        kid: str | None,
        actor: str,
        action: str,
        target: str,
        detail: dict,
        torn: bool,
    ) -> dict:
        body: dict = {
            "seq": seq,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "actor": actor,
            "action": action,
            "target": target,
            "prev": prev,
        }
        if kid:
            body["kid"] = kid
        if detail:
            body["detail"] = detail
        if torn:
            body["after_torn"] = True
        return body

    def _append(
        self, fd: int, created: bool, actor: str, action: str, target: str, detail: dict
    ) -> dict:
        line, needs_newline, torn = _last_line(fd)
        in_effect: str | None = self.keys.signing_id
        if line:
            try:
                last = json.loads(line)
                seq, prev = int(last["seq"]) + 1, str(last["mac"])
                in_effect = last.get("kid")
                if last.get("action") == KEY_CHANGE:
                    in_effect = last["detail"]["new"]
            except (ValueError, KeyError, TypeError):
                raise AuditError(
                    "the last audit record is unreadable; run: ith-proxy audit verify"
                ) from None
        else:
            seq, prev = 1, GENESIS
        self._check_anchor(seq - 1, prev)
        bodies = []
        if in_effect != self.keys.signing_id:
            old = self.keys.key_for(in_effect)
            if old is None or self.keys.signing_id is None:
                raise AuditError(
                    f"the audit log's last record is under {_key_name(in_effect)}, "
                    "which is not loaded (audit.key lost or replaced?); restore "
                    "it, or move the audit log and its anchor aside"
                )
            change = self._body(
                seq,
                prev,
                in_effect,
                actor,
                KEY_CHANGE,
                self.keys.signing_id,
                {"new": self.keys.signing_id},
                torn,
            )
            change["mac"] = _mac(old, change)
            bodies.append(change)
            seq, prev, torn = seq + 1, change["mac"], False
        body = self._body(seq, prev, self.keys.signing_id, actor, action, target, detail, torn)
        body["mac"] = _mac(self.keys.signing, body)
        bodies.append(body)
        data = (b"\n" if needs_newline else b"") + b"".join(
            json.dumps(b, sort_keys=True, separators=(",", ":")).encode() + b"\n" for b in bodies
        )
        # whole or not at all (we hold the lock: nobody appended since fstat)
        append_whole(fd, [data], os.fstat(fd).st_size, sync=True)
        if created:
            fsync_dir(self.path.parent)
        if self.anchor is not None:
            try:
                _write_anchor(
                    self.anchor,
                    {"seq": body["seq"], "mac": body["mac"], "kid": self.keys.signing_id},
                )
            except OSError as exc:
                raise AuditError(
                    f"cannot write the audit anchor {self.anchor}: {exc.strerror or exc}"
                ) from None
        return body

    def _check_anchor(self, last_seq: int, last_mac: str) -> None:
        """Refuse to append to a log shorter than its anchor: the new record
        would hide that records were cut off or the log was deleted."""
        anchor = read_anchor(self.anchor)
        if anchor is None:
            return
        if last_seq < anchor["seq"] or (
            last_seq == anchor["seq"] and not hmac.compare_digest(last_mac, anchor["mac"])
        ):
            raise AuditError(
                f"the audit log ends at record {last_seq} but its anchor "
                f"{self.anchor} names record {anchor['seq']}: records were "
                "removed or the log replaced; run: ith-proxy audit verify"
            )

    def verify(self, head: tuple[int, str] | None = None) -> Summary:
        """Check every record's MAC, key, sequence and chain, the log against
        its anchor and, given a ``head`` (seq, mac) kept off the box, that the
        log holds record seq with that MAC; raise AuditBroken at the first fault."""
        anchor = read_anchor(self.anchor)
        at_head: tuple[int, str] | None = None  # (line, mac) of the head's record
        prev, seq, first, last, torn_lines = GENESIS, 0, None, None, 0
        in_effect: str | None = None
        anchored: tuple[int, str] | None = None  # (line, mac) of the anchor's record
        pending_torn: int | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if head is not None:
                raise AuditBroken(
                    None,
                    f"the log is missing, but the head kept off the box names record {head[0]}",
                ) from None
            if anchor is not None:
                raise AuditBroken(
                    None,
                    f"the log is missing, but its anchor {self.anchor} "
                    f"says it held {anchor['seq']} records",
                ) from None
            raise
        with os.fdopen(fd, "rb") as fh:
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
                kid = body.get("kid")
                key = self.keys.key_for(kid) if isinstance(kid, (str, type(None))) else None
                if key is None:
                    raise AuditBroken(
                        number,
                        f"signed with {_key_name(kid)}, which is not "
                        "loaded (audit.key, or the site secret)",
                    )
                if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, body)):
                    raise AuditBroken(
                        number,
                        "MAC mismatch: the record was altered, or the "
                        "key (audit.key, or the site secret for older "
                        "records) is not the one that wrote it",
                    )
                if seq and kid != in_effect:
                    raise AuditBroken(
                        number,
                        f"signed with {_key_name(kid)} while "
                        f"{_key_name(in_effect)} is in effect (keys "
                        f"change only by an {KEY_CHANGE} record)",
                    )
                if body.get("prev") != prev:
                    raise AuditBroken(
                        number,
                        "chain broken: a record before it was removed, reordered or replaced",
                    )
                if body.get("seq") != seq + 1:
                    raise AuditBroken(number, f"sequence {body.get('seq')} follows {seq}")
                in_effect = kid
                if body.get("action") == KEY_CHANGE:
                    new = (body.get("detail") or {}).get("new")
                    if not isinstance(new, str):
                        raise AuditBroken(number, "key change names no key")
                    in_effect = new
                prev, seq, last = mac, seq + 1, body.get("at")
                first = first or last
                if anchor is not None and seq == anchor["seq"]:
                    anchored = (number, mac)
                if head is not None and seq == head[0]:
                    at_head = (number, mac)
        if pending_torn is not None:
            raise AuditBroken(pending_torn, "unreadable record")
        if anchor is not None:
            if anchored is None:
                raise AuditBroken(
                    None,
                    f"the log ends at record {seq}, but its anchor "
                    f"{self.anchor} says it held {anchor['seq']}: records "
                    "were cut off the end, or the log was replaced",
                )
            if not hmac.compare_digest(anchored[1], anchor["mac"]):
                raise AuditBroken(
                    anchored[0],
                    f"record {anchor['seq']} is not the one its "
                    f"anchor {self.anchor} names: the log was "
                    "replaced",
                )
        if head is not None:
            self._check_head(head, at_head, seq)
        return Summary(
            records=seq,
            first=first,
            last=last,
            torn=torn_lines,
            anchored=anchor["seq"] if anchor else None,
            headed=head[0] if head is not None else None,
        )

    @staticmethod
    def _check_head(head: tuple[int, str], at_head: tuple[int, str] | None, last: int) -> None:
        if at_head is None:
            raise AuditBroken(
                None,
                f"the log ends at record {last}, but the head kept off the box names "
                f"record {head[0]}: records were cut off the end (with the anchor), "
                "or the log was replaced",
            )
        if not hmac.compare_digest(at_head[1], head[1]):
            raise AuditBroken(
                at_head[0],
                f"record {head[0]} is not the one the head kept off the box names: "
                "the log was replaced or rewritten from there",
            )
