"""Value parsers and validators for configuration and node definitions.

Each parser takes a raw value and returns the typed value, or raises
``ValueError`` with a short message; the caller adds the key or section.
They are shared by ``config`` (INI, ``.env``, environment) and by the node
registry (``store.nodes``), which validates what the API and the backend
send with the same rules: neither is trusted.

A secret (an auth header) is never quoted in a message, and neither is a
URL (it may carry a token in its path).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

# --- plain values ---


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


def _number(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{raw.strip()} is not a finite number")
    return value


def seconds(raw: str) -> float:
    value = _number(raw)
    if not value > 0:
        raise ValueError(f"{raw.strip()} must be a positive number of seconds")
    return value


def _zero_to(most: float, unit: str) -> Callable[[str], float]:
    """A number of ``unit`` from 0 (meaning "never") to ``most``."""

    def parse(raw: str) -> float:
        value = _number(raw)
        if not 0 <= value <= most:
            raise ValueError(f"{raw.strip()} must be between 0 and {most:g} {unit}")
        return value

    return parse


def seconds_or_zero(most: float) -> Callable[[str], float]:
    return _zero_to(most, "seconds")


# A number of hours, 0 allowed (meaning "never"), at most about 100 years.
hours_or_zero = _zero_to(876000, "hours")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def boolean(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def text(raw: str) -> str:
    return raw.strip()


def choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper()
        if value not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return value

    return parse


def max_pdu(raw: str) -> int:
    value = integer(0, 2**32 - 1)(raw)
    if 0 < value < 4096:
        raise ValueError(f"{value} is too small (0 = unlimited, else >= 4096)")
    return value


# --- DICOM values ---


def ae_title(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("an AE title cannot be empty")
    if len(value) > 16:
        raise ValueError(f"{value[:40]!r} is longer than 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(f"{value!r} has characters not allowed in an AE title")
    return value


def ae_list(raw: str) -> tuple[str, ...]:
    return tuple(ae_title(part) for part in raw.replace(",", " ").split())


QR_OPERATIONS = ("find", "get", "move")  # [qr] allow_<op>, [node:NAME] allow_<op>


def qr_rule(raw: str) -> tuple[str, ...]:
    """Who may run a Q/R operation: ``any``, ``none``, or calling AE titles
    and/or ``nodes`` (any dicom node's AE title), space or comma separated."""
    parts = raw.replace(",", " ").split()
    if not parts:
        raise ValueError("empty: write any, none, nodes or AE titles")
    lowered = [p.lower() for p in parts]
    for word in ("any", "none"):
        if word in lowered:
            if len(parts) > 1:
                raise ValueError(f"{word!r} cannot be combined with other entries")
            return (word,)
    return tuple("nodes" if p.lower() == "nodes" else ae_title(p) for p in parts)


# Extra transfer syntaxes a site may enable; stored as received.
TRANSFER_SYNTAX_NAMES = {
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg-lossless-p14": "1.2.840.10008.1.2.4.57",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg-ls-near-lossless": "1.2.840.10008.1.2.4.81",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpeg2000": "1.2.840.10008.1.2.4.91",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-extended": "1.2.840.10008.1.2.4.51",
    "rle": "1.2.840.10008.1.2.5",
    "big-endian": "1.2.840.10008.1.2.2",
}


def transfer_syntaxes(raw: str) -> tuple[str, ...]:
    out = []
    for part in raw.replace(",", " ").split():
        uid = TRANSFER_SYNTAX_NAMES.get(part.lower(), part)
        if uid not in TRANSFER_SYNTAX_NAMES.values():
            known = ", ".join(TRANSFER_SYNTAX_NAMES)
            raise ValueError(f"unknown transfer syntax {part!r} (known: {known})")
        out.append(uid)
    return tuple(dict.fromkeys(out))


_SAFE_PRIVATE = re.compile(r"\(?([0-9A-Fa-f]{4}),\s*xx([0-9A-Fa-f]{2})\)?\s+(.+)")


def parse_safe_private(raw: str) -> tuple[tuple[int, str, int], ...]:
    """'gggg,xxee CREATOR; ...' -> ((group, CREATOR, element low byte), ...)."""
    out = []
    for entry in raw.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        m = _SAFE_PRIVATE.fullmatch(entry)  # fullmatch: '$' would take a final newline
        if not m or int(m.group(1), 16) % 2 == 0:
            raise ValueError(f"bad entry {entry!r} (want 'gggg,xxee CREATOR' with an odd group)")
        out.append((int(m.group(1), 16), m.group(3).strip().upper(), int(m.group(2), 16)))
    return tuple(out)


# --- network values ---


def link_url(raw: str) -> str:
    """The backend base URL: empty (offline) or http(s)."""
    value = raw.strip().rstrip("/")
    if value and not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def host(raw: str) -> str:
    """A DNS name or an IP address literal (IPv6 with or without brackets)."""
    value = raw.strip()
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise ValueError(f"{value[:80]!r} is not a host name or IP address")
    return name


def port(raw: str) -> int:
    return integer(1, 65535)(raw)


def http_url(raw: str) -> str:
    """A DICOMweb base URL: http(s), a host, an optional path; nothing else."""
    value = raw.strip().rstrip("/")
    if not value:
        raise ValueError("a URL is required")
    if len(value) > 2048 or any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError("the URL is too long or has spaces or characters outside ASCII")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError("the URL must start with http:// or https:// and name a host")
    if "@" in parts.netloc:
        raise ValueError("the URL must not carry credentials (use auth_header)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("the URL must not have a query or fragment")
    try:
        _ = parts.port  # evaluated for its ValueError on a bad port
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    host(parts.hostname or "")
    return value


# "Scheme credentials": an HTTP auth-scheme token, one space, then visible
# ASCII (spaces inside allowed, as in Digest).  No CR/LF: the value goes into
# a request header as is.
_AUTH = re.compile(
    r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,63} [\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?"
)


def auth_header(raw: str) -> str:
    """The Authorization header for a DICOMweb node, or empty; never quoted."""
    value = raw.strip()
    if value and (len(value) > 8192 or not _AUTH.fullmatch(value)):
        raise ValueError(
            "auth_header must be 'Scheme credentials' (e.g. 'Bearer ...' or 'Token ...')"
            " in visible ASCII, at most 8192 characters"
        )
    return value


def dotenv(text: str) -> dict[str, str]:
    """``KEY=value`` lines, ``#`` comments, ``export`` prefixes, optional quotes."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


# --- nodes ---

NODE_KINDS = ("dicom", "dicomweb")
# a node's fields by kind: (required, optional)
NODE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dicom": (("ae_title", "host", "port"), ()),
    "dicomweb": (("url",), ("auth_header",)),
}
_NODE_PARSERS: dict[str, Callable[[str], Any]] = {
    "ae_title": ae_title,
    "host": host,
    "port": port,
    "url": http_url,
    "auth_header": auth_header,
}
# names a user may not give a node: the derived backend node, and the word that
# means "no destinations" in [forward] destinations
RESERVED_NODE_NAMES = ("backend", "none")
NODE_PREFIX = "node:"  # an INI section [node:NAME]
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def node_name(raw: str) -> str:
    value = raw.strip()
    if not _NODE_NAME.fullmatch(value):
        raise ValueError(
            f"node name {value[:80]!r} must be 1-64 of A-Z a-z 0-9 _ . -"
            " and start with a letter or digit"
        )
    return value


def node_names(raw: str) -> tuple[str, ...]:
    """A comma/space separated list of node names, duplicates (any case) dropped."""
    out: dict[str, str] = {}
    for part in raw.replace(",", " ").split():
        name = node_name(part)
        out.setdefault(name.lower(), name)
    return tuple(out.values())


def _as_text(key: str, value: object) -> str:
    if isinstance(value, str):
        if len(value) > 16384:
            raise ValueError(f"{key} is too long")
        return value
    if key == "port" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key} must be a string")


def node_fields(raw: Mapping[str, object]) -> dict[str, Any]:
    """Validate one node definition (name, kind and the kind's fields).

    Returns every field (name, kind, ae_title, host, port, url, auth_header),
    empty for those the kind does not use.  Strict: an unknown key, a field
    of the other kind or a missing one is an error, so a definition that
    means more than we understand (say, a future ``tls``) is never half used.
    """
    name = node_name(_as_text("name", raw.get("name", "")))
    allowed = {"name", "kind", *_NODE_PARSERS}
    unknown = sorted(str(k)[:40] for k in raw if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)}")
    kind = _as_text("kind", raw.get("kind", "")).strip().lower()
    if kind not in NODE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(NODE_KINDS)}")
    required, optional = NODE_FIELDS[kind]
    out: dict[str, Any] = {"name": name, "kind": kind}
    out.update(ae_title="", host="", port=0, url="", auth_header="")
    for key, parse in _NODE_PARSERS.items():
        value = raw.get(key)
        given = value is not None and value != ""
        if key in required and not given:
            raise ValueError(f"a {kind} node needs {key}")
        if key not in required and key not in optional:
            if given:
                raise ValueError(f"{key} is not a field of a {kind} node")
            continue
        if given:
            try:
                out[key] = parse(_as_text(key, value))
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    return out


def node_sections(sections: Iterable[tuple[str, Mapping[str, object]]]) -> list[dict[str, Any]]:
    """The ``[node:NAME]`` sections of an INI file, validated: names unique (in
    any case) and not reserved, AE titles unique among dicom nodes."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    aes: dict[str, str] = {}
    for section, keys in sections:
        name = section[len(NODE_PREFIX) :]
        where = f"[{section[:80]}]"
        if "name" in keys:
            raise ValueError(f"{where}: unknown key name (the section names the node)")
        try:
            values = node_fields({**keys, "name": name})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if values["name"] != name:  # surrounding spaces
            raise ValueError(f"{where}: write the section as [node:{values['name']}]")
        if name.lower() in RESERVED_NODE_NAMES:
            raise ValueError(f"{where}: the node name {name!r} is reserved")
        if name.lower() in names:
            raise ValueError(f"{where}: the same name as [{names[name.lower()]}]")
        names[name.lower()] = section
        ae = values["ae_title"]
        if values["kind"] == "dicom":
            if ae in aes:
                raise ValueError(f"{where}: AE title {ae!r} is also [{aes[ae]}]")
            aes[ae] = section
        out.append(values)
    return out
