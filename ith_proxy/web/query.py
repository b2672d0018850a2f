"""The read routes' inputs, checked: the study list's query parameters
(``cursor``, ``limit``, ``state``, ``modality``, ``since``) and study UIDs.

Anything else is 400 naming the field: an unknown or repeated parameter, a
value outside its pattern, a limit above 500 (refused, not cut down).  The
values only ever reach SQL as bound parameters (``store/browse.py``), and
the patterns here are those the OpenAPI document gives, so that every
schema-valid value is answered.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

import bottle

from ith_proxy.store.browse import MAX_LIMIT, Filters, Key
from ith_proxy.store.catalog import STATES
from ith_proxy.web.context import ApiError

DEFAULT_LIMIT = 50
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}")
PARAMS = ("cursor", "limit", "state", "modality", "since")
MAX_CURSOR = 120  # characters: a time, "_", a UID of at most 64
CURSOR_PATTERN = r"^-?[0-9]{1,17}(\.[0-9]{1,17})?(e[-+]?[0-9]{1,2})?_[0-9]+(\.[0-9]+)*$"
CURSOR = re.compile(CURSOR_PATTERN.strip("^$"))
SINCE_EPOCH = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
MAX_SINCE = 64


def check_uid(value: str, field: str = "study_instance_uid") -> str:
    if len(value) > 64 or not UID.fullmatch(value):
        raise ApiError(400, "not a DICOM UID", field)
    return value


def encode_cursor(key: Key) -> str:
    """``<last_received>_<study uid>``: readable, but a client passes it back as given."""
    return f"{key[0]!r}_{key[1]}"


def decode_cursor(text: str) -> Key:
    """The key a cursor stands for; 400 (field ``cursor``) for anything else."""
    if len(text) > MAX_CURSOR or not CURSOR.fullmatch(text):
        raise ApiError(400, "not a cursor this API gave", "cursor")
    when, _, uid = text.partition("_")
    return float(when), uid


def parse_since(text: str) -> float:
    """Epoch seconds, or ISO 8601 (no zone: UTC); 400 (field ``since``) otherwise."""
    bad = ApiError(400, "since must be ISO 8601 or epoch seconds", "since")
    if not 1 <= len(text) <= MAX_SINCE:
        raise bad
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise bad from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            return when.timestamp()
        except OverflowError:  # near year 1 with an offset east of UTC: before everything
            return -1e12
    if not math.isfinite(value) or not 0 <= value <= 1e11:
        raise bad
    return value


def parse_limit(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 4:
        raise ApiError(400, f"limit must be an integer 1..{MAX_LIMIT}", "limit")
    value = int(text)
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit must be an integer 1..{MAX_LIMIT}", "limit")
    return value


def list_params(query: bottle.FormsDict) -> tuple[Filters, Key | None, int]:
    """The list's query parameters, each checked; 400 naming the field."""
    for name in query.keys():
        if name not in PARAMS:
            raise ApiError(400, "unknown query parameter", name[:40])
        if len(query.getall(name)) > 1:
            raise ApiError(400, "given more than once", name)
    got = {name: query.getunicode(name) for name in PARAMS if name in query}
    for name, value in got.items():
        if value is None:  # not UTF-8
            raise ApiError(400, "not valid UTF-8", name)
    state = got.get("state")
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}", "state")
    modality = got.get("modality")
    if modality is not None:
        modality = modality.upper()
        if not MODALITY.fullmatch(modality):
            raise ApiError(400, "not a DICOM modality code", "modality")
    since = parse_since(got["since"]) if "since" in got else None
    after = decode_cursor(got["cursor"]) if "cursor" in got else None
    limit = parse_limit(got["limit"]) if "limit" in got else DEFAULT_LIMIT
    return Filters(state, modality, since), after, limit
