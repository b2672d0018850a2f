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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ith_proxy import config_values as v
from ith_proxy.config_types import (  # re-exported: rooms import them from here
    DEID_OPTIONS,
    ApiConfig,
    Config,
    DeidConfig,
    ForwardConfig,
    IndexerConfig,
    LinkConfig,
    LogConfig,
    NodeConfig,
    QrConfig,
    SchedulerConfig,
    ScpConfig,
    ScuConfig,
    SpoolConfig,
    VaultConfig,
)

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
    Setting("scp", "workers", "1", v.integer(1, 16)),
    Setting("scp", "in_flow_backlog", "256", v.integer(0, 1_000_000)),
    Setting("scp", "in_flow_delay", "1", v.seconds_or_zero(10)),
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
    Setting("indexer", "processes", "2", v.integer(1, 8)),
    Setting("indexer", "helper_idle", "30", v.seconds),
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
    Setting("api", "threads", "4", v.integer(1, 64)),
    Setting("api", "channel_timeout", "30", v.integer(1, 3600)),
    Setting("api", "connection_limit", "100", v.integer(1, 10000)),
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
    # Q/R access (dicom/qr_access.py); [node:NAME] allow_<op> = true|false overrides
    Setting("qr", "allow_find", "any", v.qr_rule),
    Setting("qr", "allow_get", "any", v.qr_rule),
    Setting("qr", "allow_move", "nodes", v.qr_rule),
    Setting("qr", "max_convert_mb", "256", v.integer(0, 1 << 22)),
    Setting("link", "ca_file", "", v.text),
    Setting("link", "heartbeat_interval", "30", v.seconds),
    Setting("link", "connect_timeout", "10", v.seconds),
    Setting("link", "reconnect_base", "1", v.seconds),
    Setting("link", "reconnect_cap", "60", v.seconds),
    Setting("link", "max_message_kb", "1024", v.integer(16, 65536)),
    # C-FIND answers at most this many matches, then 0xA700 (0: no limit); dicom/qr.py
    Setting("qr", "max_find_results", "0", v.integer(0, 10**9)),
    Setting("log", "level", "INFO", v.choice("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("log", "max_bytes", "10485760", v.integer(4096, 2**40)),
    Setting("log", "backups", "5", v.integer(0, 1000)),
)


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


_QR_NODE_KEYS = tuple(f"allow_{op}" for op in v.QR_OPERATIONS)


def _read_nodes(parser: configparser.ConfigParser, path: Path) -> tuple[NodeConfig, ...]:
    sections = [
        (s, {k: val for k, val in parser[s].items() if k not in _QR_NODE_KEYS})
        for s in parser.sections()
        if s.startswith(v.NODE_PREFIX)
    ]
    try:
        return tuple(NodeConfig(**values) for values in v.node_sections(sections))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_node_access(
    parser: configparser.ConfigParser, path: Path, nodes: tuple[NodeConfig, ...]
) -> tuple[tuple[str, str, bool], ...]:
    """``[node:NAME] allow_find|allow_get|allow_move = true|false`` of dicom nodes."""
    by_name = {n.name: n for n in nodes}
    out: list[tuple[str, str, bool]] = []
    for section in parser.sections():
        if not section.startswith(v.NODE_PREFIX):
            continue
        node = by_name.get(section[len(v.NODE_PREFIX) :])
        for key in _QR_NODE_KEYS:
            if not parser.has_option(section, key):
                continue
            if node is None or node.kind != "dicom":
                raise ConfigError(f"{path}: [{section[:80]}] {key}: only for a dicom node")
            try:
                out.append((node.ae_title, key[len("allow_") :], v.boolean(parser[section][key])))
            except ValueError as exc:
                raise ConfigError(f"{path}: [{section[:80]}] {key}: {exc}") from None
    return tuple(out)


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
    if values["link"]["reconnect_cap"] < values["link"]["reconnect_base"]:
        raise ConfigError("[link] reconnect_cap: must not be smaller than reconnect_base")
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
    nodes = _read_nodes(parser, ini_file)
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
        nodes=nodes,
        qr=QrConfig(**values["qr"], node_access=_read_node_access(parser, ini_file, nodes)),
        derived_nodes=_derived_nodes(link),
        origins=origins,
    )
