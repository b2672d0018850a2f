"""Configuration: built-in defaults < INI file < .env < environment.

Every setting is declared once in ``SETTINGS`` (section, key, default, parser,
environment variable).  ``load()`` applies the layers in order, validates each
value and returns frozen dataclasses.  An invalid value raises ``ConfigError``
naming the key, which the CLI turns into a one-line message and exit code 2.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_INI = "conf/proxy.ini"

# Our DICOM implementation identity (a UUID-derived UID: no registered root needed).
IMPLEMENTATION_CLASS_UID = "2.25.147690321735923934756230664937154452785"
IMPLEMENTATION_VERSION = "ITH_PROXY_01"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the key."""


# --- value parsers: each takes the raw string and returns the typed value ---


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{raw.strip()} must be a positive number of seconds")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false)")


def _ae_title(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("an AE title cannot be empty")
    if len(value) > 16:
        raise ValueError(f"{value!r} is longer than 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(f"{value!r} has characters not allowed in an AE title")
    return value


def _ae_list(raw: str) -> tuple[str, ...]:
    return tuple(_ae_title(part) for part in raw.replace(",", " ").split())


def _text(raw: str) -> str:
    return raw.strip()


def _url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def _max_pdu(raw: str) -> int:
    value = _int(0, 2**32 - 1)(raw)
    if 0 < value < 4096:
        raise ValueError(f"{value} is too small (0 = unlimited, else >= 4096)")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper()
        if value not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return value

    return parse


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


def _transfer_syntaxes(raw: str) -> tuple[str, ...]:
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


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: str
    parse: Callable[[str], Any]
    env: str | None = None


# The PS3.15 Annex E options of [deid], each a boolean setting, a DeidConfig
# field and a column of the table (deid.profile): the names are written here once.
DEID_OPTIONS = (
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "retain_patient_characteristics",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_uids",
    "clean_descriptors",
    "retain_safe_private",
)

SETTINGS: tuple[Setting, ...] = (
    Setting("scp", "ae_title", "DICOMRCV", _ae_title, "DICOM_AE_TITLE"),
    Setting("scp", "port", "11112", _int(1, 65535), "DICOM_PORT"),
    Setting("scp", "bind_address", "0.0.0.0", _text, "DICOM_BIND_ADDRESS"),
    Setting("scp", "max_pdu_size", "16384", _max_pdu, "DICOM_MAX_PDU_SIZE"),
    Setting("scp", "acse_timeout", "30", _seconds, "DICOM_ACSE_TIMEOUT"),
    Setting("scp", "dimse_timeout", "30", _seconds),
    Setting("scp", "network_timeout", "60", _seconds),
    Setting("scp", "artim_timeout", "5", _seconds),
    Setting("scp", "max_associations", "50", _int(1, 1000), "DICOM_MAX_ASSOCIATIONS"),
    Setting("scp", "allowed_calling_aes", "", _ae_list),
    Setting("scp", "transfer_syntaxes", "", _transfer_syntaxes),
    Setting("scp", "auto_start", "true", _bool, "DICOM_AUTO_START"),
    Setting("scp", "max_instance_mb", "4096", _int(1, 1 << 22)),
    Setting("spool", "dir", "./spool", _text, "DICOM_STORAGE_DIR"),
    Setting("spool", "min_free_mb", "512", _int(0, 10**9)),
    Setting("spool", "tmp_max_age", "3600", _seconds),
    Setting("spool", "encrypt_incoming", "true", _bool),
    Setting("indexer", "rescan_interval", "10", _seconds),
    Setting("indexer", "batch_size", "64", _int(1, 10000)),
    Setting("indexer", "stuck_after", "300", _seconds),
    Setting("indexer", "max_attempts", "3", _int(2, 100)),
    Setting("indexer", "memory_limit_mb", "1024", _int(0, 10**7)),
    Setting("scheduler", "study_timeout", "60", _seconds, "DICOM_STUDY_TIMEOUT"),
    Setting("scheduler", "interval", "1", _seconds),
    Setting("deid", "anonymize", "true", _bool, "DICOM_ANONYMIZE_PATIENTS"),
    *(Setting("deid", name, "false", _bool) for name in DEID_OPTIONS),
    Setting("deid", "safe_private", "", parse_safe_private),
    Setting("deid", "quarantine_burned_in", "true", _bool),
    Setting("vault", "key_file", "", _text, "VAULT_KEY_FILE"),
    Setting("api", "bind_address", "0.0.0.0", _text, "API_BIND_ADDRESS"),
    Setting("api", "port", "8080", _int(1, 65535), "API_PORT"),
    Setting("api", "jwt_secret", "", _text, "JWT_SECRET"),
    Setting("api", "jwt_public_key_file", "", _text, "JWT_PUBLIC_KEY_FILE"),
    Setting("api", "jwt_audience", "", _text, "JWT_AUDIENCE"),
    Setting("api", "jwt_issuer", "", _text, "JWT_ISSUER"),
    Setting("link", "ith_url", "", _url, "ITH_URL"),
    Setting("link", "ith_token", "", _text, "ITH_TOKEN"),
    Setting("log", "level", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("log", "max_bytes", "10485760", _int(4096, 2**40)),
    Setting("log", "backups", "5", _int(0, 1000)),
)


@dataclass(frozen=True)
class ScpConfig:
    ae_title: str
    port: int
    bind_address: str
    max_pdu_size: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    artim_timeout: float
    max_associations: int
    allowed_calling_aes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    auto_start: bool
    max_instance_mb: int = 4096  # larger instances abort the association


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path
    min_free_mb: int
    tmp_max_age: float
    encrypt_incoming: bool = True


@dataclass(frozen=True)
class IndexerConfig:
    rescan_interval: float
    batch_size: int
    stuck_after: float
    max_attempts: int = 3
    memory_limit_mb: int = 1024  # 0: no limit


@dataclass(frozen=True)
class SchedulerConfig:
    study_timeout: float
    interval: float


@dataclass(frozen=True)
class DeidConfig:
    anonymize: bool
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    clean_descriptors: bool = False
    retain_safe_private: bool = False
    safe_private: tuple[tuple[int, str, int], ...] = ()  # extra (group, creator, elem)
    quarantine_burned_in: bool = True

    def options(self) -> frozenset[str]:
        """The active Annex E option names."""
        return frozenset(n for n in DEID_OPTIONS if getattr(self, n))


@dataclass(frozen=True)
class VaultConfig:
    key_file: Path
    secret_file: Path  # site secret for keyed pseudonyms, beside the key

    @property
    def audit_key_file(self) -> Path:
        """The audit log's own MAC key, beside the vault key."""
        return self.key_file.with_name("audit.key")

    @property
    def audit_anchor_file(self) -> Path:
        """The audit log's last sequence number and MAC, beside the keys."""
        return self.key_file.with_name("audit.anchor")


@dataclass(frozen=True)
class ApiConfig:
    bind_address: str
    port: int
    jwt_secret: str
    jwt_public_key_file: str
    jwt_audience: str
    jwt_issuer: str


@dataclass(frozen=True)
class LinkConfig:
    ith_url: str
    ith_token: str

    @property
    def offline(self) -> bool:
        return not self.ith_url


@dataclass(frozen=True)
class LogConfig:
    level: str
    max_bytes: int
    backups: int


@dataclass(frozen=True)
class Config:
    scp: ScpConfig
    spool: SpoolConfig
    indexer: IndexerConfig
    scheduler: SchedulerConfig
    deid: DeidConfig
    vault: VaultConfig
    api: ApiConfig
    link: LinkConfig
    log: LogConfig
    source: str = field(default="", compare=False)  # the INI file used, if any


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {first}") from None
    known = {(s.section, s.key) for s in SETTINGS}
    for section in parser.sections():
        if section.startswith("node:") or section == "forward":
            continue  # owned by the forwarder's node registry
        for key in parser[section]:
            if (section, key) not in known:
                raise ConfigError(f"{path}: unknown setting [{section}] {key}")
    return parser


def ini_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The INI file to read, and whether the user named it (then it must exist)."""
    if explicit:
        return Path(explicit), True
    if env.get("ITH_PROXY_CONFIG"):
        return Path(env["ITH_PROXY_CONFIG"]), True
    return Path(DEFAULT_INI), False


def load(
    path: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Config:
    """Build the configuration from all layers; raise ConfigError on a bad value."""
    cwd = cwd or Path.cwd()
    environ = dict(os.environ if env is None else env)
    layered = {**read_dotenv(cwd / ".env"), **environ}
    ini_file, named = ini_path(path, layered)
    if not ini_file.is_absolute():
        ini_file = cwd / ini_file
    parser = configparser.ConfigParser(interpolation=None)
    if ini_file.exists():
        parser = _read_ini(ini_file)
    elif named:
        raise ConfigError(f"config file {ini_file} does not exist")

    values: dict[str, dict[str, Any]] = {}
    for s in SETTINGS:
        raw, origin = s.default, "default"
        if parser.has_option(s.section, s.key):
            raw, origin = parser.get(s.section, s.key), str(ini_file)
        if s.env and s.env in layered:
            raw, origin = layered[s.env], f"environment {s.env}"
        try:
            value = s.parse(raw)
        except ValueError as exc:
            where = f" ({origin})" if origin != "default" else ""
            raise ConfigError(f"[{s.section}] {s.key}{where}: {exc}") from None
        values.setdefault(s.section, {})[s.key] = value

    if values["deid"]["retain_long_full_dates"] and values["deid"]["retain_long_modified_dates"]:
        raise ConfigError(
            "[deid] retain_long_modified_dates: cannot be combined with "
            "retain_long_full_dates (choose one)"
        )
    spool_dir = Path(values["spool"]["dir"] or "./spool")
    if not spool_dir.is_absolute():
        spool_dir = (cwd / spool_dir).resolve()
    key_file = values["vault"]["key_file"]
    key_path = Path(key_file) if key_file else spool_dir.parent / "secrets" / "vault.key"
    if not key_path.is_absolute():
        key_path = (cwd / key_path).resolve()
    if spool_dir == key_path.parent or spool_dir in key_path.parents:
        raise ConfigError(f"[vault] key_file: {key_path} must live outside the spool {spool_dir}")

    return Config(
        scp=ScpConfig(**values["scp"]),
        spool=SpoolConfig(
            dir=spool_dir,
            min_free_mb=values["spool"]["min_free_mb"],
            tmp_max_age=values["spool"]["tmp_max_age"],
            encrypt_incoming=values["spool"]["encrypt_incoming"],
        ),
        indexer=IndexerConfig(**values["indexer"]),
        scheduler=SchedulerConfig(**values["scheduler"]),
        deid=DeidConfig(**values["deid"]),
        vault=VaultConfig(key_file=key_path, secret_file=key_path.with_name("site.secret")),
        api=ApiConfig(**values["api"]),
        link=LinkConfig(**values["link"]),
        log=LogConfig(**values["log"]),
        source=str(ini_file) if ini_file.exists() else "",
    )
