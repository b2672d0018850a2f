"""Configuration: built-in defaults < INI file < .env < environment.

Every setting is declared once in ``SETTINGS`` (section, key, default, parser,
environment variable).  ``load()`` applies the layers in order, validates each
value (parsers in ``config_values``) and returns frozen dataclasses.  An
invalid value raises ``ConfigError`` naming the key, which the CLI turns
into a one-line message and exit code 2.

``[node:NAME]`` sections are read and validated here into ``Config.nodes``;
the node registry (``store.nodes``) loads them into the catalog at start-up.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ith_proxy import config_values as v

DEFAULT_INI = "conf/proxy.ini"

# Our DICOM implementation identity (a UUID-derived UID: no registered root needed).
IMPLEMENTATION_CLASS_UID = "2.25.147690321735923934756230664937154452785"
IMPLEMENTATION_VERSION = "ITH_PROXY_01"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the key."""


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
    Setting("scp", "ae_title", "DICOMRCV", v.ae_title, "DICOM_AE_TITLE"),
    Setting("scp", "port", "11112", v.integer(1, 65535), "DICOM_PORT"),
    Setting("scp", "bind_address", "0.0.0.0", v.text, "DICOM_BIND_ADDRESS"),
    Setting("scp", "max_pdu_size", "16384", v.max_pdu, "DICOM_MAX_PDU_SIZE"),
    Setting("scp", "acse_timeout", "30", v.seconds, "DICOM_ACSE_TIMEOUT"),
    Setting("scp", "dimse_timeout", "30", v.seconds),
    Setting("scp", "network_timeout", "60", v.seconds),
    Setting("scp", "artim_timeout", "5", v.seconds),
    Setting("scp", "max_associations", "50", v.integer(1, 1000), "DICOM_MAX_ASSOCIATIONS"),
    Setting("scp", "allowed_calling_aes", "", v.ae_list),
    Setting("scp", "transfer_syntaxes", "", v.transfer_syntaxes),
    Setting("scp", "auto_start", "true", v.boolean, "DICOM_AUTO_START"),
    Setting("scp", "max_instance_mb", "4096", v.integer(1, 1 << 22)),
    Setting("spool", "dir", "./spool", v.text, "DICOM_STORAGE_DIR"),
    Setting("spool", "min_free_mb", "512", v.integer(0, 10**9)),
    Setting("spool", "tmp_max_age", "3600", v.seconds),
    Setting("spool", "encrypt_incoming", "true", v.boolean),
    Setting("spool", "retention_hours", "0", v.hours_or_zero),
    Setting("indexer", "rescan_interval", "10", v.seconds),
    Setting("indexer", "batch_size", "64", v.integer(1, 10000)),
    Setting("indexer", "stuck_after", "300", v.seconds),
    Setting("indexer", "max_attempts", "3", v.integer(2, 100)),
    Setting("indexer", "memory_limit_mb", "1024", v.integer(0, 10**7)),
    Setting("scheduler", "study_timeout", "60", v.seconds, "DICOM_STUDY_TIMEOUT"),
    Setting("scheduler", "interval", "1", v.seconds),
    Setting("deid", "anonymize", "true", v.boolean, "DICOM_ANONYMIZE_PATIENTS"),
    *(Setting("deid", name, "false", v.boolean) for name in DEID_OPTIONS),
    Setting("deid", "safe_private", "", v.parse_safe_private),
    Setting("deid", "quarantine_burned_in", "true", v.boolean),
    Setting("vault", "key_file", "", v.text, "VAULT_KEY_FILE"),
    Setting("api", "bind_address", "0.0.0.0", v.text, "API_BIND_ADDRESS"),
    Setting("api", "port", "8080", v.integer(1, 65535), "API_PORT"),
    Setting("api", "jwt_secret", "", v.text, "JWT_SECRET"),
    Setting("api", "jwt_public_key_file", "", v.text, "JWT_PUBLIC_KEY_FILE"),
    Setting("api", "jwt_audience", "", v.text, "JWT_AUDIENCE"),
    Setting("api", "jwt_issuer", "", v.text, "JWT_ISSUER"),
    Setting("scu", "connect_timeout", "10", v.seconds),
    Setting("scu", "acse_timeout", "30", v.seconds),
    Setting("scu", "dimse_timeout", "60", v.seconds),
    # empty: `backend` when ITH_URL is set, else none; `none`: none at all
    Setting("forward", "destinations", "", v.node_names),
    Setting("forward", "max_attempts", "10", v.integer(1, 1000)),
    Setting("forward", "backoff_base", "10", v.seconds),
    Setting("forward", "backoff_cap", "3600", v.seconds),
    Setting("forward", "stow_batch_mb", "16", v.integer(1, 4096)),
    Setting("forward", "stow_batch_instances", "100", v.integer(1, 10000)),
    Setting("link", "ith_url", "", v.link_url, "ITH_URL"),
    Setting("link", "ith_token", "", v.text, "ITH_TOKEN"),
    # C-FIND answers at most this many matches, then 0xA700 (0: no limit); dicom/qr.py
    Setting("qr", "max_find_results", "0", v.integer(0, 10**9)),
    Setting("log", "level", "INFO", v.choice("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("log", "max_bytes", "10485760", v.integer(4096, 2**40)),
    Setting("log", "backups", "5", v.integer(0, 1000)),
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
    retention_hours: float = 0  # 0: forwarded studies are kept for ever


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
    jwt_secret: str = field(repr=False)
    jwt_public_key_file: str
    jwt_audience: str
    jwt_issuer: str


@dataclass(frozen=True)
class LinkConfig:
    ith_url: str
    ith_token: str = field(repr=False)

    @property
    def offline(self) -> bool:
        return not self.ith_url


@dataclass(frozen=True)
class ScuConfig:
    """Bounds on every outgoing association (C-ECHO, C-STORE, C-MOVE SCU)."""

    connect_timeout: float = 10
    acse_timeout: float = 30
    dimse_timeout: float = 60


@dataclass(frozen=True)
class ForwardConfig:
    """Where completed studies go and how failed sends are retried.

    ``destinations`` are node names, checked when a study is forwarded (nodes
    may also come from the API or the backend): an unknown one is a
    permanent failure of that destination, not a start-up error.
    """

    destinations: tuple[str, ...] = ()
    max_attempts: int = 10
    backoff_base: float = 10
    backoff_cap: float = 3600
    stow_batch_mb: int = 16
    stow_batch_instances: int = 100


@dataclass(frozen=True)
class NodeConfig:
    """A node from a ``[node:NAME]`` section (source ``ini``) or derived from
    ``ITH_URL`` (source ``derived``).  ``auth_header`` is a secret: not in repr."""

    name: str
    kind: str  # dicom | dicomweb
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    auth_header: str = field(default="", repr=False)
    source: str = "ini"


@dataclass(frozen=True)
class QrConfig:
    max_find_results: int = 0  # C-FIND answers before 0xA700 (0: no limit)


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
    scu: ScuConfig = field(default_factory=ScuConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    nodes: tuple[NodeConfig, ...] = ()  # the [node:NAME] sections
    derived_nodes: tuple[NodeConfig, ...] = ()  # `backend`, when ITH_URL is set
    qr: QrConfig = field(default_factory=QrConfig)  # the Q/R SCP (issue 9)
    # "section.key" -> where its value came from: "default", the INI file's path,
    # ".env VAR" or "environment VAR" (status and GET /api/config/ show it)
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def local_nodes(self) -> tuple[NodeConfig, ...]:
        """The nodes this configuration defines: INI sections, then derived."""
        return self.nodes + self.derived_nodes


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        return v.dotenv(text)
    except ValueError as exc:
        raise ConfigError(f"{path}:{exc}") from None


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
        if section.startswith(v.NODE_PREFIX):
            continue  # validated whole by _read_nodes
        for key in parser[section]:
            if (section, key) not in known:
                raise ConfigError(f"{path}: unknown setting [{section}] {key}")
    return parser


BACKEND_NODE = "backend"


def _read_nodes(parser: configparser.ConfigParser, path: Path) -> tuple[NodeConfig, ...]:
    sections = [(s, parser[s]) for s in parser.sections() if s.startswith(v.NODE_PREFIX)]
    try:
        return tuple(NodeConfig(**values) for values in v.node_sections(sections))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _derived_nodes(link: LinkConfig) -> tuple[NodeConfig, ...]:
    """The ``backend`` node: STOW-RS to ``{ITH_URL}/dicom-web``."""
    if link.offline:
        return ()
    try:
        url = v.http_url(f"{link.ith_url}/dicom-web")
    except ValueError as exc:
        raise ConfigError(f"[link] ith_url: {exc}") from None
    try:
        auth = v.auth_header(f"Token {link.ith_token}") if link.ith_token else ""
    except ValueError:
        raise ConfigError("[link] ith_token: must be visible ASCII (no spaces)") from None
    return (NodeConfig(BACKEND_NODE, "dicomweb", url=url, auth_header=auth, source="derived"),)


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
    dotenv = read_dotenv(cwd / ".env")
    layered = {**dotenv, **environ}
    ini_file, named = ini_path(path, layered)
    if not ini_file.is_absolute():
        ini_file = cwd / ini_file
    parser = configparser.ConfigParser(interpolation=None)
    if ini_file.exists():
        parser = _read_ini(ini_file)
    elif named:
        raise ConfigError(f"config file {ini_file} does not exist")

    values: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for s in SETTINGS:
        raw, origin = s.default, "default"
        if parser.has_option(s.section, s.key):
            raw, origin = parser.get(s.section, s.key), str(ini_file)
        if s.env and s.env in layered:
            where = "environment" if s.env in environ else ".env"
            raw, origin = layered[s.env], f"{where} {s.env}"
        origins[f"{s.section}.{s.key}"] = origin
        try:
            value = s.parse(raw)
        except ValueError as exc:
            where = f" ({origin})" if origin != "default" else ""
            raise ConfigError(f"[{s.section}] {s.key}{where}: {exc}") from None
        values.setdefault(s.section, {})[s.key] = value

    forward = values["forward"]
    if [d.lower() for d in forward["destinations"]] == ["none"]:
        forward["destinations"] = ()
    elif any(d.lower() == "none" for d in forward["destinations"]):
        raise ConfigError("[forward] destinations: 'none' cannot be combined with node names")
    elif not forward["destinations"] and values["link"]["ith_url"]:
        forward["destinations"] = (BACKEND_NODE,)
    if forward["backoff_cap"] < forward["backoff_base"]:
        raise ConfigError("[forward] backoff_cap: must not be smaller than backoff_base")
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

    link = LinkConfig(**values["link"])
    return Config(
        scp=ScpConfig(**values["scp"]),
        spool=SpoolConfig(
            dir=spool_dir,
            min_free_mb=values["spool"]["min_free_mb"],
            tmp_max_age=values["spool"]["tmp_max_age"],
            encrypt_incoming=values["spool"]["encrypt_incoming"],
            retention_hours=values["spool"]["retention_hours"],
        ),
        indexer=IndexerConfig(**values["indexer"]),
        scheduler=SchedulerConfig(**values["scheduler"]),
        deid=DeidConfig(**values["deid"]),
        vault=VaultConfig(key_file=key_path, secret_file=key_path.with_name("site.secret")),
        api=ApiConfig(**values["api"]),
        link=link,
        log=LogConfig(**values["log"]),
        source=str(ini_file) if ini_file.exists() else "",
        scu=ScuConfig(**values["scu"]),
        forward=ForwardConfig(**forward),
        nodes=_read_nodes(parser, ini_file),
        derived_nodes=_derived_nodes(link),
        qr=QrConfig(**values["qr"]),
        origins=origins,
    )
