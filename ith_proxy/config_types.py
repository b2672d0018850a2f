"""The configuration's types: one frozen dataclass per INI section, and
``Config`` holding them all.  ``config.load`` builds them (it re-exports
them: rooms import them from ``ith_proxy.config``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
    workers: int = 1  # SCP processes on the port (SO_REUSEPORT when > 1; issue 11 prototype)
    in_flow_backlog: int = 256  # files in incoming/ over which answers are paced (0 = never)
    in_flow_delay: float = 1.0  # seconds an answer is paced at most (0 = never)


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
    processes: int = 2  # indexer processes; 2..N help only under a backlog (store/buckets.py)
    helper_idle: float = 30.0  # seconds a helper runs on without a backlog, then exits


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
    threads: int = 4  # waitress worker threads
    channel_timeout: int = 30  # seconds an idle connection is kept
    connection_limit: int = 100  # connections at once; more wait in the backlog


@dataclass(frozen=True)
class LinkConfig:
    ith_url: str
    ith_token: str = field(repr=False)
    ca_file: str = ""  # CA bundle for https/wss; empty: the system's
    heartbeat_interval: float = 30.0
    connect_timeout: float = 10.0
    reconnect_base: float = 1.0
    reconnect_cap: float = 60.0
    max_message_kb: int = 1024  # a larger WebSocket message from the backend closes the link

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
    """Q/R access and retrieve limits.  Each rule is ``("any",)``,
    ``("none",)`` or calling AE titles and/or ``"nodes"``; ``node_access``
    holds the ``[node:NAME] allow_<op>`` overrides as (node AE title, op,
    allowed).  The decision is dicom/qr_access.py's ``allowed``."""

    allow_find: tuple[str, ...] = ("any",)
    allow_get: tuple[str, ...] = ("any",)
    allow_move: tuple[str, ...] = ("nodes",)
    max_convert_mb: int = 256  # Implicit<->Explicit VR LE conversion is in memory
    node_access: tuple[tuple[str, str, bool], ...] = ()
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
    # "section.key" -> where its value came from: "default", the INI file's path,
    # ".env VAR" or "environment VAR" (status and GET /api/config/ show it)
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    qr: QrConfig = field(default_factory=QrConfig)  # Q/R access and limits (dicom/qr*.py)

    def local_nodes(self) -> tuple[NodeConfig, ...]:
        """The nodes this configuration defines: INI sections, then derived."""
        return self.nodes + self.derived_nodes
