"""The backend protocol's messages: building what the proxy sends, and
parsing what the backend sends (DESIGN.md §5; docs/backend-protocol.md).

Everything from the backend is untrusted.  ``parse`` turns one WebSocket
text message into an ``Incoming`` or raises ``ProtocolError`` with a short,
printable reason (never the message itself): not UTF-8, not JSON, JSON
constants (NaN, Infinity), nesting too deep, not an object, a ``type`` or
``id`` that is not a short printable string.  The size bound is enforced
before this, on the frames (``client.py``).  Whether the type is known is
the command room's business (an unknown type is answered ok=false).

Nothing built here carries PHI: anonymized UIDs, counts, node names and
fixed phrases only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ith_proxy import __version__
from ith_proxy.store.linkbox import envelope

COMMANDS = ("config.update", "nodes.sync", "study.dispatch", "node.echo")
INCOMING = (*COMMANDS, "ping", "ack")
ENVELOPE = ("type", "id", "ts")
_TEXT_MAX = 64


class ProtocolError(ValueError):
    """A backend message that cannot be read; the text is safe to log."""


@dataclass(frozen=True)
class Incoming:
    type: str
    id: str | None  # the command's id, echoed as in_reply_to
    body: dict[str, Any]  # everything beside type, id and ts

    @property
    def known(self) -> bool:
        return self.type in INCOMING


def safe(value: object, limit: int = _TEXT_MAX) -> str:
    """A value from the backend made fit for a log line: printable, bounded."""
    text = value if isinstance(value, str) else type(value).__name__
    out = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _no_constants(name: str) -> object:
    raise ValueError(f"JSON constant {name} is not allowed")


def _short_text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _TEXT_MAX and value.isprintable()


def parse(data: str | bytes) -> Incoming:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("not UTF-8 text") from None
    try:
        message = json.loads(data, parse_constant=_no_constants)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    kind, message_id = message.get("type"), message.get("id")
    if not _short_text(kind):
        raise ProtocolError("'type' is not a short printable string")
    if message_id is not None and not _short_text(message_id):
        raise ProtocolError("'id' is not a short printable string")
    body = {k: v for k, v in message.items() if k not in ENVELOPE}
    return Incoming(str(kind), message_id, body)


def encode(message: Mapping[str, object]) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


# --- what the proxy sends (the durable ones go through store/linkbox.py) ---


def hello(ae_title: str, anonymize: bool, now: float | None = None) -> dict:
    """The first message of every connection."""
    payload = {
        "version": __version__,
        "ae_title": ae_title,
        "mode": "anonymize" if anonymize else "identified",
    }
    return envelope("hello", payload, now)


def health(
    status: str,
    problems: Sequence[str],
    studies: Mapping[str, int],
    outbox: Mapping[str, int],
    linkbox_depth: int,
    audit_head: Mapping[str, object] | None,
    now: float | None = None,
) -> dict:
    """The heartbeat; ``outbox_depth`` is the forwarding entries still pending."""
    payload = {
        "status": status,
        "problems": list(problems),
        "studies": dict(studies),
        "outbox_depth": int(outbox.get("pending", 0)),
        "outbox": dict(outbox),
        "linkbox_depth": linkbox_depth,
        "audit_head": dict(audit_head) if audit_head else None,
    }
    return envelope("health", payload, now)


def audit_head(head: Mapping[str, object], now: float | None = None) -> dict:
    """Sent when the audit chain's head moves (a PHI access was recorded)."""
    return envelope("audit.head", {"audit_head": dict(head)}, now)


def pong(in_reply_to: str | None, now: float | None = None) -> dict:
    return envelope("pong", {"in_reply_to": in_reply_to}, now)


def result_payload(in_reply_to: str | None, ok: bool, detail: Mapping[str, object]) -> dict:
    """The fields of a ``command.result`` (posted durably by the link)."""
    return {"in_reply_to": in_reply_to, "ok": ok, "detail": dict(detail)}
