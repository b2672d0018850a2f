"""Secrets are never silently regenerated: the keys are created for a new
spool (no vault, no catalog) or by ``ith-proxy init``; on an existing spool a
missing vault.key or site.secret stops start-up with one line naming it, and
nothing is created.  Real processes on real folders."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

import tools
from ith_proxy.vault.keyfiles import VaultKeyError, load_site_secret
from ith_proxy.vault.keys import load_keys

REPO = Path(__file__).resolve().parent.parent
SECRETS = ("vault.key", "site.secret", "audit.key")


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _old_site(work: Path, spool_has: str, missing: str) -> dict[str, bytes]:
    """A site that has run before (its spool holds ``spool_has``), whose key
    folder lacks ``missing``; returns the key folder's files as they are."""
    spool = work / "spool"
    spool.mkdir(parents=True)
    (spool / spool_has).write_bytes(b"")  # an empty SQLite file is a valid database
    keys = work / "secrets"
    _write_secret(keys / "vault.key", base64.urlsafe_b64encode(os.urandom(32)) + b"\n")
    _write_secret(keys / "site.secret", os.urandom(32).hex().encode() + b"\n")
    (keys / missing).unlink()
    return {p.name: p.read_bytes() for p in keys.iterdir()}


def _cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    (work / "proxy.ini").touch()
    env = {
        "DICOM_STORAGE_DIR": str(work / "spool"),
        "VAULT_KEY_FILE": str(work / "secrets" / "vault.key"),
        "ITH_PROXY_CONFIG": str(work / "proxy.ini"),
    }
    return tools.run_cli(args, work, env)


def test_run_on_a_new_spool_creates_every_key_and_warns_they_share_a_disk(tmp_path) -> None:
    """The README's two commands: a fresh checkout's ./spool just runs."""
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.health()[0] == 200
    keys = proxy.workdir / "secrets"
    for name in SECRETS:
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    main_log = (proxy.spool / "logs" / "main.log").read_text()
    assert "generated a new vault key" in main_log
    # the default layout puts ./secrets beside ./spool, on one filesystem
    assert "are on the same filesystem" in main_log
    assert "are on the same filesystem" in (proxy.spool / "logs" / "error.log").read_text()


@pytest.mark.parametrize("spool_has", ["vault.phi", "catalog.sqlite3"])
@pytest.mark.parametrize("missing", ["vault.key", "site.secret"])
def test_a_missing_secret_on_an_existing_spool_stops_start_and_creates_nothing(
    tmp_path: Path, spool_has: str, missing: str
) -> None:
    work = tmp_path / "p"
    before = _old_site(work, spool_has, missing)
    err = tools.refused_start(work)
    assert str(work / "secrets" / missing) in err and "missing" in err
    # nothing created: not the missing file, not the audit key, nothing else
    keys = work / "secrets"
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_loading_a_missing_secret_never_creates_it(tmp_path: Path) -> None:
    """Every reader (service, indexer process, CLI) refuses by default."""
    with pytest.raises(VaultKeyError, match="does not exist"):
        load_keys(tmp_path / "k" / "vault.key")
    with pytest.raises(VaultKeyError, match="does not exist"):
        load_site_secret(tmp_path / "k" / "site.secret")
    assert not (tmp_path / "k").exists()


def test_init_creates_the_keys_of_a_new_site(tmp_path: Path) -> None:
    result = _cli(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    keys = tmp_path / "secrets"
    assert sorted(p.name for p in keys.iterdir()) == sorted(SECRETS)
    for name in SECRETS:
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert len(load_keys(keys / "vault.key")) == 1
    # the service then runs on them (the spool is new) and keeps them
    before = {name: (keys / name).read_bytes() for name in SECRETS}
    with tools.ProxyProcess(tmp_path) as proxy:
        assert proxy.health()[0] == 200
    assert {name: (keys / name).read_bytes() for name in SECRETS} == before


@pytest.mark.parametrize("present", ["vault.key", "site.secret", "all"])
def test_init_refuses_when_a_key_exists_and_touches_nothing(tmp_path: Path, present: str) -> None:
    keys = tmp_path / "secrets"
    if present == "all":
        assert _cli(tmp_path, "init").returncode == 0
    else:
        _write_secret(keys / present, os.urandom(32).hex().encode() + b"\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in keys.iterdir()}
    result = _cli(tmp_path, "init")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "already exist" in result.stderr
    assert str(keys / (present if present != "all" else "vault.key")) in result.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in keys.iterdir()} == before
