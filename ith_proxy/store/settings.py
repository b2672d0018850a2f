"""The runtime settings: the few settings that may change while the proxy runs.

DESIGN.md §5: ``ae_title``, ``dicom_port``, ``study_timeout`` and
``forward_to`` may be set by the backend (``GET /api/proxy/config/``,
``config.update``) or by ``PUT /api/config/``.  They are persisted in the
catalog (migration 4), and that layer sits above every other one for these
keys only: the backend is the authority once it has spoken.  The node list
is the fourth runtime setting; it lives in the node registry (``store.nodes``).

``anonymize`` is local only: remote control must never switch
de-identification off.  ``validate`` refuses it; ``local_only`` picks it
out of a backend message so that the caller can log and report it.

Everything reaching this room is untrusted (an HTTP body, a WebSocket
message): each value is validated with the configuration's own rules, and a
refusal names the field.  All SQL for the table is here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ith_proxy import config_values as v
from ith_proxy.config import Config
from ith_proxy.store.catalog import Catalog

SOURCES = ("api", "backend")
LOCAL_ONLY = ("anonymize",)
MAX_STUDY_TIMEOUT = 7 * 24 * 3600.0  # a week: a larger quiet time is a mistake
MAX_FORWARD_TO = 64

# key -> (config section, config key): where the value lives in Config
PLACES: dict[str, tuple[str, str]] = {
    "ae_title": ("scp", "ae_title"),
    "dicom_port": ("scp", "port"),
    "study_timeout": ("scheduler", "study_timeout"),
    "forward_to": ("forward", "destinations"),
}
KEYS = tuple(PLACES)


class SettingsError(ValueError):
    """A runtime setting is refused; ``field`` names it (the API's 400 body)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Persisted:
    value: Any  # validated by validate() before it was written
    source: str  # api | backend
    updated_at: float


def _ae_title(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return v.ae_title(raw)


def _port(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError("must be an integer")
    if not 1 <= raw <= 65535:
        raise ValueError(f"{raw} is outside 1..65535")
    return raw


def _study_timeout(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError("must be a number of seconds")
    value = float(raw)
    if not 0 < value <= MAX_STUDY_TIMEOUT:  # also refuses NaN and infinity
        raise ValueError(f"must be between 0 and {int(MAX_STUDY_TIMEOUT)} seconds")
    return value


def _forward_to(raw: object) -> list[str]:
    if not isinstance(raw, list):
        raise ValueError("must be a list of node names")
    if len(raw) > MAX_FORWARD_TO:
        raise ValueError(f"lists more than {MAX_FORWARD_TO} nodes")
    names: dict[str, str] = {}
    for item in raw:
        if not isinstance(item, str):
            raise ValueError("must be a list of node names")
        name = v.node_name(item)
        names.setdefault(name.lower(), name)
    return list(names.values())


_PARSERS = {
    "ae_title": _ae_title,
    "dicom_port": _port,
    "study_timeout": _study_timeout,
    "forward_to": _forward_to,
}


def local_only(partial: Mapping[str, object]) -> dict[str, object]:
    """The local-only keys (``anonymize``) a backend message carries; the
    caller logs and reports them, then leaves them out."""
    return {k: partial[k] for k in LOCAL_ONLY if k in partial}


def validate(partial: object) -> dict[str, object]:
    """The checked values of a partial settings object; SettingsError names
    the first field refused (an unknown key, ``anonymize``, a bad value)."""
    if not isinstance(partial, Mapping):
        raise SettingsError("body", "must be a JSON object of runtime settings")
    out: dict[str, object] = {}
    for key, raw in partial.items():
        if key in LOCAL_ONLY:
            raise SettingsError(str(key), "is local only and cannot be changed remotely")
        parse = _PARSERS.get(key) if isinstance(key, str) else None
        if parse is None:
            shown = str(key)[:64].encode("ascii", "backslashreplace").decode()
            shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
            raise SettingsError(shown, "is not a runtime setting")
        try:
            out[key] = parse(raw)
        except ValueError as exc:
            raise SettingsError(key, str(exc)) from None
    return out


class RuntimeSettings:
    """The persisted layer, over one catalog connection."""

    def __init__(self, catalog: Catalog) -> None:
        self._conn = catalog.conn

    def persisted(self) -> dict[str, Persisted]:
        rows = self._conn.execute(
            "SELECT key, value, source, updated_at FROM runtime_settings"
        ).fetchall()
        return {
            str(k): Persisted(json.loads(str(val)), str(src), float(at))  # type: ignore[arg-type]  # SQLite REAL
            for k, val, src, at in rows
        }

    def _begin(self) -> None:
        """A write transaction taken at once: two writers (the API's threads,
        the link) never meet in a read that must then be upgraded."""
        self._conn.execute("BEGIN IMMEDIATE")

    def update(self, partial: object, source: str, now: float | None = None) -> list[str]:
        """Validate and persist a partial settings object in one transaction;
        return the keys whose value changed.  Nothing is written if any
        field is refused.  Every key given is written, even with its value
        unchanged (its source and time are), so that ``fingerprint`` moves on
        every accepted write: a held SCP starts on the first one."""
        if source not in SOURCES:
            raise ValueError(f"unknown settings source {source!r}")
        values = validate(partial)
        now = time.time() if now is None else now
        changed = []
        self._begin()
        try:
            current = self.persisted()
            for key, value in values.items():
                old = current.get(key)
                self._put(key, value, source, now)
                if old is None or old.value != value:
                    changed.append(key)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return changed

    def _put(self, key: str, value: object, source: str, at: float) -> None:
        self._conn.execute(
            "INSERT INTO runtime_settings(key, value, source, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = excluded.value, source = excluded.source, "
            "updated_at = excluded.updated_at",
            (key, json.dumps(value), source, at),
        )

    def restore(
        self, previous: Mapping[str, Persisted | None], written: Mapping[str, object]
    ) -> list[str]:
        """Undo a write that could not be applied: each key of ``previous``
        gets its old row back (or none), but only while it still holds the
        value ``written`` (another writer's later value is kept).  Returns
        the keys restored."""
        restored = []
        self._begin()
        try:
            current = self.persisted()
            for key, old in previous.items():
                now = current.get(key)
                if key not in KEYS or now is None or now.value != written.get(key):
                    continue
                if old is None:
                    self._conn.execute("DELETE FROM runtime_settings WHERE key = ?", (key,))
                else:
                    self._put(key, old.value, old.source, old.updated_at)
                restored.append(key)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return restored

    def fingerprint(self) -> tuple:
        """Changes on every accepted write (the service polls it)."""
        return tuple(
            self._conn.execute(
                "SELECT key, value, source, updated_at FROM runtime_settings ORDER BY key"
            ).fetchall()
        )


def effective(cfg: Config, persisted: Mapping[str, Persisted]) -> Config:
    """``cfg`` with the persisted layer on top."""
    scp, scheduler, forward = cfg.scp, cfg.scheduler, cfg.forward
    if "ae_title" in persisted:
        scp = replace(scp, ae_title=str(persisted["ae_title"].value))
    if "dicom_port" in persisted:
        scp = replace(scp, port=int(persisted["dicom_port"].value))
    if "study_timeout" in persisted:
        timeout = float(persisted["study_timeout"].value)
        scheduler = replace(scheduler, study_timeout=timeout)
    if "forward_to" in persisted:
        forward = replace(forward, destinations=tuple(persisted["forward_to"].value))
    return replace(cfg, scp=scp, scheduler=scheduler, forward=forward)


def describe(cfg: Config, persisted: Mapping[str, Persisted]) -> dict[str, dict[str, object]]:
    """Each runtime setting's effective value and where it came from: ``api``
    or ``backend`` (persisted), else the configuration's origin (``default``,
    the INI path, ``environment VAR``, ``.env VAR``)."""
    current = effective(cfg, persisted)
    out: dict[str, dict[str, object]] = {}
    for key, (section, name) in PLACES.items():
        value = getattr(getattr(current, section), name)
        if isinstance(value, tuple):
            value = list(value)
        if key in persisted:
            source = persisted[key].source
        else:
            source = cfg.origins.get(f"{section}.{name}", "default")
        out[key] = {"value": value, "source": source}
    return out
