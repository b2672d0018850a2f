"""What a STOW-RS response means for each instance of the batch (PS3.18 10.5).

Pure: status and body in, one verdict per instance out (``stow.py`` does
the sending). DICOM statuses in the response go through ``dicom/status.py``,
the table the C-STORE SCU uses too.

| response | action |
|---|---|
| connect error, TLS error, timeout, reset, no response | request failed, transient |
| 408, 429, 5xx (the body is ignored) | request failed, transient |
| 2xx whose body is not DICOM JSON, is cut, or is over 16 MiB | request failed, transient (1) |
| 1xx, 3xx (redirects are not followed) | request failed, permanent |
| 4xx without a STOW-RS body (2): 400, 401, 403, 404, 409, 413... | request failed, permanent |
| 2xx, or 4xx with a STOW-RS body | judged per instance: |
| - named in FailedSOPSequence (0008,1198) | by its FailureReason (0008,1197) (3) |
| - named in ReferencedSOPSequence (0008,1199) | delivered, WarningReason (0008,1196) kept |
| - in neither, HTTP 200 | delivered (200: all stored) |
| - in neither, other 2xx, no FailedSOPSequence item | delivered |
| - in neither, other 2xx (202) with failed items | transient: not acknowledged |
| - in neither, 4xx (409; Orthanc's 400 for a bad part) | permanent: not stored |

(1) perhaps stored: sent again. (2) a DICOM JSON object with a
ReferencedSOPSequence or a FailedSOPSequence. (3) the table of
``dicom/status.py``: 0xA7xx transient; 0xCxxx, 0xA9xx, 0x0122, 0x0124,
0x0211, 0x0212 permanent; a warning (0xBxxx, 0x0107, 0x0116) delivered
with the warning recorded; no FailureReason given: transient.
"Request failed" stops the sending: the rest of the study is not sent.
A response naming an instance in both sequences counts it failed.
Reasons quote at most ``REASON_CAP`` printable characters of an error body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ith_proxy.dicom.status import DELIVERED, PERMANENT, TRANSIENT, classify

MAX_RESPONSE = 16 * 1024 * 1024  # bytes of response body read at most
REASON_CAP = 160  # characters of a server's error text kept in a reason
_FAILED, _REFERENCED = "00081198", "00081199"
_UID, _FAILURE, _WARNING = "00081155", "00081197", "00081196"


@dataclass(frozen=True)
class Verdict:
    result: str  # "delivered" | "transient" | "permanent"
    reason: str
    warning: str = ""


class BatchFailed(Exception):
    """The response decides the whole batch, and the sending stops."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def classify_http(status: int) -> tuple[str, str]:
    """(result, reason) of an HTTP status for a batch as a whole."""
    try:
        text = f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        text = f"HTTP {status}"
    if 200 <= status < 300:
        return DELIVERED, text
    if status in (408, 429) or 500 <= status < 600:
        return TRANSIENT, text
    if 300 <= status < 400:
        return PERMANENT, f"{text} (redirects are not followed: check the URL)"
    return PERMANENT, text


def judge(
    status: int, body: bytes, problem: str, uids: Sequence[str], secret: str = ""
) -> list[Verdict]:
    """One verdict per SOP Instance UID sent, or BatchFailed. ``problem``
    says why the body could not be read whole; ``secret`` (the auth header)
    is blanked out of any quoted error text."""
    result, text = classify_http(status)
    if result == TRANSIENT:
        raise BatchFailed(text, transient=True)
    if not 200 <= status < 500:
        raise BatchFailed(text, transient=False)
    ok = status < 300
    reply = None
    if not problem:
        try:
            reply = _parse(body) if body.strip() or not ok else _Reply({}, {}, False, 0)
        except ValueError as e:
            problem = str(e)
    if reply is None and ok:
        raise BatchFailed(f"{text} with a bad body: {problem}", transient=True)
    if reply is None or not (ok or reply.sequences):
        raise BatchFailed(f"{text}{_snippet(body, secret)}", transient=False)
    return [_verdict(uid, status, text, reply) for uid in uids]


def _verdict(uid: str, status: int, text: str, reply: _Reply) -> Verdict:
    ok = status < 300
    if uid in reply.failed:
        code = reply.failed[uid]
        if code is None:
            return Verdict(TRANSIENT, "failed without a FailureReason")
        result, desc = classify(code)
        if result == DELIVERED:
            return Verdict(DELIVERED, "stored", desc)
        return Verdict(result, f"FailureReason {desc}")
    if uid in reply.referenced:
        return Verdict(DELIVERED, "stored", reply.referenced[uid])
    if status == 200 or (ok and not reply.failed_items):
        return Verdict(DELIVERED, "stored")
    if ok:
        return Verdict(TRANSIENT, "not acknowledged in the response")
    return Verdict(PERMANENT, f"{text}: not stored")


@dataclass(frozen=True)
class _Reply:
    failed: dict[str, int | None]  # SOP Instance UID -> FailureReason
    referenced: dict[str, str]  # SOP Instance UID -> warning ("" for none)
    sequences: bool  # the body has either sequence
    failed_items: int  # items in FailedSOPSequence, named or not


def _parse(body: bytes) -> _Reply:
    """The per-instance part of a response in DICOM JSON; ValueError when
    the body is no DICOM JSON object."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict):
        raise ValueError("not a DICOM JSON object")
    failed_items = _items(doc, _FAILED)
    referenced_items = _items(doc, _REFERENCED)
    if failed_items is None and referenced_items is None:
        return _Reply({}, {}, False, 0)
    failed: dict[str, int | None] = {}
    for item in failed_items or []:
        if uid := _uid(item):
            failed[uid] = _code(item, _FAILURE)
    referenced: dict[str, str] = {}
    for item in referenced_items or []:
        if uid := _uid(item):
            code = _code(item, _WARNING)
            referenced[uid] = "" if code in (None, 0) else classify(code)[1]
    return _Reply(failed, referenced, True, len(failed_items or []))


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]] | None:
    elem = doc.get(tag)
    if elem is None:
        return None
    if not isinstance(elem, dict) or not isinstance(elem.get("Value", []), list):
        raise ValueError(f"({tag[:4]},{tag[4:]}) is not a sequence")
    return [i for i in elem.get("Value", []) if isinstance(i, dict)]


def _first(item: dict[str, Any], tag: str) -> object:
    elem = item.get(tag)
    if not isinstance(elem, dict):
        return None
    value = elem.get("Value")
    return value[0] if isinstance(value, list) and value else None


def is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c in "0123456789." for c in value)


def _uid(item: dict[str, Any]) -> str:
    value = _first(item, _UID)
    return value.strip() if isinstance(value, str) and is_uid(value.strip()) else ""


def _code(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        return value
    return None


def _snippet(body: bytes, secret: str) -> str:
    """A short, printable excerpt of an error body for the reason, or ""."""
    text = body[: REASON_CAP * 4 + 2 * len(secret)].decode("utf-8", "replace")
    for hidden in (secret, secret.split()[-1]) if secret.strip() else ():
        text = text.replace(hidden, "[auth]")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not text:
        return ""
    return ": " + (text[:REASON_CAP] + "..." if len(text) > REASON_CAP else text)
