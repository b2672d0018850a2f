"""The rooms of one site on real spool folders, wired by hand: config (from an
INI text and environment), spool, catalog, vault and an Indexer to drive with
run_once(), plus the CLI run against the same site."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tools
from ith_proxy import config
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import init_secrets, load_site_secret
from ith_proxy.vault.records import Vault
from ith_proxy.workers.indexer import Indexer

REPO = Path(__file__).resolve().parent.parent


class Rooms:
    def __init__(self, root: Path, ini: str = "", env: dict | None = None) -> None:
        configure_libraries()  # as the indexer process does
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ini = root / "proxy.ini"
        self.ini.write_text(ini)
        self.env = {
            "DICOM_STORAGE_DIR": str(root / "spool"),
            "VAULT_KEY_FILE": str(root / "secrets" / "vault.key"),
            "ITH_PROXY_CONFIG": str(self.ini),
            **(env or {}),
        }
        self.cfg = config.load(env=self.env, cwd=root)
        self.spool = Spool(self.cfg.spool.dir)
        self.spool.ensure()
        init_secrets(self.cfg.vault.key_file)  # a new site's keys, as `run` makes them
        self.catalog = Catalog(self.spool.catalog_file)
        self.vault = Vault(self.spool.vault_file, self.cfg.vault.key_file)
        self.indexer = Indexer(
            self.cfg,
            self.spool,
            self.catalog,
            self.vault,
            load_site_secret(self.cfg.vault.secret_file),
        )

    def close(self) -> None:
        self.vault.close()
        self.catalog.close()

    def api(self, health=list, **kwargs):
        """The API app of this site (web.app.make_app), its own connections per
        request, the audit log under the site's keys; ``kwargs`` go to make_app."""
        from ith_proxy.cli.common import audit_log
        from ith_proxy.web.app import make_app

        return make_app(
            self.cfg,
            connect_catalog=lambda: Catalog(self.spool.catalog_file),
            open_vault=lambda: Vault(self.spool.vault_file, self.cfg.vault.key_file),
            audit=audit_log(self.cfg, append=True),
            health=health,
            **kwargs,
        )

    @contextlib.contextmanager
    def scu(self, **kwargs: Any) -> Iterator[Any]:
        """A pynetdicom association (CT Image Storage, Explicit VR Little
        Endian) from TESTSCU to this site's SCP, established, released after;
        ``kwargs`` go to ``AE.associate`` (``evt_handlers``, ``max_pdu``)."""
        from pynetdicom import AE

        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        cfg = self.cfg.scp
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title, **kwargs)
        assert assoc.is_established
        try:
            yield assoc
        finally:
            assoc.release()

    def drop(self, name: str, data: bytes) -> Path:
        path = self.spool.incoming / name
        path.write_bytes(data)
        return path

    def cli(self, *args: str, ini: str | None = None) -> subprocess.CompletedProcess:
        if ini is not None:
            self.ini.write_text(ini)
        env = {k: v for k, v in os.environ.items() if not k.startswith(tools.PROXY_ENV_PREFIXES)}
        env.update(self.env, PYTHONPATH=str(REPO))
        return subprocess.run(
            [sys.executable, "-m", "ith_proxy.cli", *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
