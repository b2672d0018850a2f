"""Configuration layers and validation, through the real CLI where it matters."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import tools
from ith_proxy import config

REPO = Path(__file__).resolve().parent.parent


def _cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return tools.run_cli(args, cwd, env, timeout=60)


def test_defaults_match_the_design(tmp_path: Path) -> None:
    cfg = config.load(env={}, cwd=tmp_path)
    assert cfg.scp.ae_title == "DICOMRCV"
    assert cfg.scp.port == 11112
    assert cfg.scp.bind_address == "0.0.0.0"
    assert cfg.scp.max_pdu_size == 16384
    assert cfg.scp.acse_timeout == 30
    assert cfg.scp.max_associations == 50
    assert cfg.scheduler.study_timeout == 60
    assert cfg.spool.dir == tmp_path / "spool"
    assert cfg.scp.auto_start is True
    assert cfg.deid.anonymize is True
    assert cfg.link.offline and cfg.link.ith_url == ""
    assert cfg.api.port == 8080 and cfg.api.bind_address == "0.0.0.0"
    assert cfg.vault.key_file == tmp_path / "secrets" / "vault.key"
    assert cfg.scp.transfer_syntaxes == ()
    assert cfg.spool.encrypt_incoming is True  # measured under 10% (docs/deid.md)
    assert cfg.deid.options() == frozenset() and cfg.deid.quarantine_burned_in is True


def test_every_design_environment_variable_works(tmp_path: Path) -> None:
    pubkey = tmp_path / "pub.pem"
    env = {
        "DICOM_AE_TITLE": "EDGE1",
        "DICOM_PORT": "4242",
        "DICOM_BIND_ADDRESS": "127.0.0.1",
        "DICOM_MAX_PDU_SIZE": "65536",
        "DICOM_ACSE_TIMEOUT": "12",
        "DICOM_MAX_ASSOCIATIONS": "7",
        "DICOM_STUDY_TIMEOUT": "90",
        "DICOM_STORAGE_DIR": str(tmp_path / "s"),
        "DICOM_AUTO_START": "false",
        "DICOM_ANONYMIZE_PATIENTS": "no",
        "ITH_URL": "https://ith.example/",
        "ITH_TOKEN": "tok",
        "API_BIND_ADDRESS": "127.0.0.2",
        "API_PORT": "9090",
        "JWT_SECRET": "s3",
        "JWT_PUBLIC_KEY_FILE": str(pubkey),
        "JWT_AUDIENCE": "aud",
        "JWT_ISSUER": "iss",
        "VAULT_KEY_FILE": str(tmp_path / "k" / "v.key"),
    }
    cfg = config.load(env=env, cwd=tmp_path)
    assert (cfg.scp.ae_title, cfg.scp.port, cfg.scp.bind_address) == ("EDGE1", 4242, "127.0.0.1")
    assert (cfg.scp.max_pdu_size, cfg.scp.acse_timeout, cfg.scp.max_associations) == (65536, 12, 7)
    assert cfg.scheduler.study_timeout == 90
    assert cfg.spool.dir == tmp_path / "s"
    assert cfg.scp.auto_start is False and cfg.deid.anonymize is False
    assert cfg.link.ith_url == "https://ith.example" and cfg.link.ith_token == "tok"
    assert not cfg.link.offline
    assert (cfg.api.bind_address, cfg.api.port) == ("127.0.0.2", 9090)
    assert (cfg.api.jwt_secret, cfg.api.jwt_public_key_file) == ("s3", str(pubkey))
    assert (cfg.api.jwt_audience, cfg.api.jwt_issuer) == ("aud", "iss")
    assert cfg.vault.key_file == tmp_path / "k" / "v.key"
    assert cfg.vault.secret_file == tmp_path / "k" / "site.secret"


def test_layers_apply_in_order(tmp_path: Path) -> None:
    ini = tmp_path / "conf" / "proxy.ini"
    ini.parent.mkdir()
    ini.write_text(
        "[scp]\nport = 2000\nae_title = FROMINI\nmax_associations = 3\n"
        "[scheduler]\nstudy_timeout = 5\n"
    )
    (tmp_path / ".env").write_text(
        "# comment\nexport DICOM_PORT=3000\nDICOM_AE_TITLE='FROMENVFILE'\n"
    )
    cfg = config.load(env={"DICOM_PORT": "4000"}, cwd=tmp_path)
    assert cfg.scp.port == 4000  # environment beats .env
    assert cfg.scp.ae_title == "FROMENVFILE"  # .env beats the INI
    assert cfg.scp.max_associations == 3  # INI beats the default
    assert cfg.scheduler.study_timeout == 5
    assert cfg.scp.acse_timeout == 30  # default


def test_ith_proxy_config_and_flag_pick_the_file(tmp_path: Path) -> None:
    a = tmp_path / "a.ini"
    a.write_text("[scp]\nport = 1111\n")
    b = tmp_path / "b.ini"
    b.write_text("[scp]\nport = 2222\n")
    assert config.load(env={"ITH_PROXY_CONFIG": str(a)}, cwd=tmp_path).scp.port == 1111
    assert config.load(str(b), env={"ITH_PROXY_CONFIG": str(a)}, cwd=tmp_path).scp.port == 2222
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(str(tmp_path / "missing.ini"), env={}, cwd=tmp_path)


def test_shipped_ini_documents_every_key() -> None:
    """conf/proxy.ini carries every setting with its default and a comment."""
    text = (REPO / "conf" / "proxy.ini").read_text()
    parsed = config._read_ini(REPO / "conf" / "proxy.ini")
    for s in config.SETTINGS:
        assert parsed.has_option(s.section, s.key), f"[{s.section}] {s.key} missing"
        if s.env:
            assert s.env in text, f"{s.env} not mentioned in proxy.ini"
    commented = False  # a key must sit under a comment block (keys may share one)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            commented = True
        elif not line or line.startswith("["):
            commented = False
        else:
            assert commented, f"uncommented key: {line}"
    # the shipped file must load and equal the built-in defaults
    shipped = config.load(str(REPO / "conf" / "proxy.ini"), env={}, cwd=REPO)
    assert shipped.scp == config.load(env={}, cwd=Path("/nonexistent-dir")).scp


@pytest.mark.parametrize(
    "env, key",
    [
        ({"DICOM_PORT": "abc"}, "[scp] port"),
        ({"DICOM_PORT": "70000"}, "[scp] port"),
        ({"DICOM_STUDY_TIMEOUT": "-1"}, "[scheduler] study_timeout"),
        ({"DICOM_ACSE_TIMEOUT": "0"}, "[scp] acse_timeout"),
        ({"DICOM_AE_TITLE": "A_TITLE_LONGER_THAN_16"}, "[scp] ae_title"),
        ({"DICOM_MAX_ASSOCIATIONS": "0"}, "[scp] max_associations"),
        ({"DICOM_MAX_PDU_SIZE": "100"}, "[scp] max_pdu_size"),
        ({"DICOM_ANONYMIZE_PATIENTS": "maybe"}, "[deid] anonymize"),
        ({"API_PORT": "http"}, "[api] port"),
        ({"ITH_URL": "ftp://x"}, "[link] ith_url"),
    ],
)
def test_bad_value_stops_startup_naming_the_key(tmp_path: Path, env: dict, key: str) -> None:
    result = _cli(["run"], tmp_path, env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and lines[0].startswith("ith-proxy: config error:")
    assert not (tmp_path / "spool").exists()  # nothing started


def test_bad_value_in_ini_names_key_and_file(tmp_path: Path) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text("[spool]\nmin_free_mb = lots\n")
    result = _cli(["--config", str(ini), "run"], tmp_path)
    assert result.returncode == 2
    assert "[spool] min_free_mb" in result.stderr and "x.ini" in result.stderr
    # --config is accepted after the command too
    result = _cli(["run", "--config", str(ini)], tmp_path)
    assert result.returncode == 2 and "[spool] min_free_mb" in result.stderr


def test_unknown_key_and_bad_syntax_are_errors(tmp_path: Path) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text("[scp]\nportt = 1\n")
    result = _cli(["--config", str(ini), "status"], tmp_path)
    assert result.returncode == 2 and "unknown setting [scp] portt" in result.stderr
    ini.write_text("this is not an ini file\n")
    result = _cli(["--config", str(ini), "status"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_vault_key_inside_spool_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="outside the spool"):
        config.load(env={"VAULT_KEY_FILE": str(tmp_path / "spool" / "k")}, cwd=tmp_path)


def test_deid_option_names_are_written_once() -> None:
    """config.DEID_OPTIONS is the one list: each is a [deid] setting, a
    DeidConfig field, a table column, a method code and a builder column."""
    import dataclasses
    import importlib.util

    from ith_proxy.deid import profile

    # the table builder is a developer script outside the package: load it by path
    spec = importlib.util.spec_from_file_location("build_table", REPO / "tools" / "build_table.py")
    assert spec is not None and spec.loader is not None
    build_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_table)

    names = set(config.DEID_OPTIONS)
    assert {s.key for s in config.SETTINGS if s.section == "deid"} >= names
    assert {f.name for f in dataclasses.fields(config.DeidConfig)} >= names
    assert set(profile.OPTION_COLUMNS) == names
    assert set(profile.METHOD_CODES) - {"basic"} == names
    assert names <= set(build_table.OPTION_KEYS)
    every = config.DeidConfig(anonymize=True, **dict.fromkeys(names, True))
    assert every.options() == names


# --- nodes, [scu], [forward], retention (issue 8) ---

NODES_INI = """
[node:pacs]
kind = dicom
ae_title = MAINPACS
host = pacs.example.org
port = 104

[node:research]
kind = DICOMweb
url = https://web.example.org/dicom-web/
auth_header = Bearer s3cr3t
"""


def test_forwarding_defaults(tmp_path: Path) -> None:
    cfg = config.load(env={}, cwd=tmp_path)
    assert cfg.scu == config.ScuConfig(connect_timeout=10, acse_timeout=30, dimse_timeout=60)
    assert cfg.forward == config.ForwardConfig(
        destinations=(),
        max_attempts=10,
        backoff_base=10,
        backoff_cap=3600,
        stow_batch_mb=16,
        stow_batch_instances=100,
    )
    assert cfg.spool.retention_hours == 0  # never purge
    assert cfg.nodes == () and cfg.derived_nodes == () and cfg.local_nodes() == ()


def test_ith_url_derives_the_backend_node(tmp_path: Path) -> None:
    env = {"ITH_URL": "https://ith.example/base/", "ITH_TOKEN": "t0k"}
    cfg = config.load(env=env, cwd=tmp_path)
    (backend,) = cfg.derived_nodes
    assert (backend.name, backend.kind, backend.source) == ("backend", "dicomweb", "derived")
    assert backend.url == "https://ith.example/base/dicom-web"
    assert backend.auth_header == "Token t0k"
    assert cfg.forward.destinations == ("backend",)  # the default when ITH_URL is set
    assert "t0k" not in repr(cfg)  # neither the token nor the header it makes
    secret = config.load(env={**env, "JWT_SECRET": "jwt-s3cr3t"}, cwd=tmp_path)
    assert "jwt-s3cr3t" not in repr(secret)
    no_token = config.load(env={"ITH_URL": "http://ith.example"}, cwd=tmp_path)
    assert no_token.derived_nodes[0].auth_header == ""
    with pytest.raises(config.ConfigError, match=r"\[link\] ith_token") as caught:
        config.load(env={**env, "ITH_TOKEN": "t0k\nX: y"}, cwd=tmp_path)
    assert "t0k" not in str(caught.value)


@pytest.mark.parametrize(
    "value, ith_url, expected",
    [
        ("", "", ()),
        ("", "https://ith.example", ("backend",)),
        ("none", "https://ith.example", ()),
        ("pacs, research pacs PACS", "", ("pacs", "research")),
        ("pacs", "https://ith.example", ("pacs",)),
    ],
)
def test_forward_destinations(tmp_path: Path, value: str, ith_url: str, expected: tuple) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text(f"[forward]\ndestinations = {value}\n")
    cfg = config.load(str(ini), env={"ITH_URL": ith_url}, cwd=tmp_path)
    assert cfg.forward.destinations == expected


def test_node_sections_are_read(tmp_path: Path) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text(NODES_INI + "[scu]\nconnect_timeout = 2.5\n[spool]\nretention_hours = 48\n")
    cfg = config.load(str(ini), env={}, cwd=tmp_path)
    pacs, web = cfg.nodes
    assert pacs == config.NodeConfig("pacs", "dicom", "MAINPACS", "pacs.example.org", 104)
    assert (web.name, web.kind, web.url) == (
        "research",
        "dicomweb",
        "https://web.example.org/dicom-web",
    )
    assert web.auth_header == "Bearer s3cr3t" and web.source == "ini"
    assert "s3cr3t" not in repr(cfg)
    assert cfg.scu.connect_timeout == 2.5 and cfg.spool.retention_hours == 48
    assert cfg.forward.destinations == ()  # a node is not a destination by itself


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[node:x]\nkind = dicom\nae_title = X\nhost = h\nport = 1\ncolour = red\n", "unknown key"),
        ("[node:x]\nkind = dimse\nurl = http://x\n", "kind must be one of"),
        ("[node:x]\nkind = dicomweb\nurl = http://x\nname = pacs\n", "unknown key name"),
        ("[node:x]\nkind = dicom\nae_title = X\nhost = h\n", "needs port"),
        ("[node:x]\nkind = dicomweb\n", "needs url"),
        ("[node:x]\nurl = http://x\n", "kind must be one of"),
        ("[node:x]\nkind = dicomweb\nurl = http://x\nhost = h\n", "host is not a field"),
        ("[node:x]\nkind = dicomweb\nurl = http://u:pw@x\n", "credentials"),
        ("[node:x]\nkind = dicomweb\nurl = http://x\nauth_header = Bearer\n", "auth_header"),
        ("[node:x]\nkind = dicom\nae_title = X\nhost = h\nport = 0\n", "port: 0 is outside"),
        ("[node:x y]\nkind = dicomweb\nurl = http://x\n", "node name"),
        ("[node:]\nkind = dicomweb\nurl = http://x\n", "node name"),
        ("[node:backend]\nkind = dicomweb\nurl = http://x\n", "reserved"),
        ("[node:PACS]\nkind = dicomweb\nurl = http://x\n", "the same name as [node:pacs]"),
        ("[node:y]\nkind = dicom\nae_title = MAINPACS\nhost = h\nport = 1\n", "also [node:pacs]"),
    ],
)
def test_a_bad_node_section_is_a_one_line_error_naming_it(
    tmp_path: Path, extra: str, message: str
) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text(NODES_INI + extra)
    with pytest.raises(config.ConfigError, match=re.escape(message)) as caught:
        config.load(str(ini), env={}, cwd=tmp_path)
    text = str(caught.value)
    assert "\n" not in text and "[node:" in text and "x.ini" in text
    assert "pw" not in text and "s3cr3t" not in text


@pytest.mark.parametrize(
    "ini_text, key",
    [
        ("[forward]\ndestinations = none, pacs\n", "[forward] destinations"),
        ("[forward]\ndestinations = pa/cs\n", "[forward] destinations"),
        ("[forward]\nbackoff_base = 60\nbackoff_cap = 30\n", "[forward] backoff_cap"),
        ("[forward]\nmax_attempts = 0\n", "[forward] max_attempts"),
        ("[forward]\nstow_batch_mb = 0\n", "[forward] stow_batch_mb"),
        ("[forward]\nretries = 3\n", "unknown setting [forward] retries"),
        ("[scu]\ndimse_timeout = 0\n", "[scu] dimse_timeout"),
        ("[scu]\nconnect_timeout = nan\n", "[scu] connect_timeout"),
        ("[spool]\nretention_hours = -1\n", "[spool] retention_hours"),
    ],
)
def test_bad_forwarding_settings(tmp_path: Path, ini_text: str, key: str) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text(ini_text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(ini), env={}, cwd=tmp_path)
    assert key in str(caught.value)


def test_a_bad_node_section_stops_the_cli(tmp_path: Path) -> None:
    ini = tmp_path / "x.ini"
    ini.write_text("[node:pacs]\nkind = dicom\nae_title = P\nhost = h\nport = 104\ntls = yes\n")
    result = _cli(["--config", str(ini), "status"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[node:pacs]" in lines[0] and "unknown key tls" in lines[0]


def test_the_shipped_ini_node_examples_load(tmp_path: Path) -> None:
    """The commented [node:...] examples in conf/proxy.ini are valid as written."""
    text = (REPO / "conf" / "proxy.ini").read_text()
    block = text.split("# [node:pacs]", 1)[1].split("\n\n", 1)[0]
    example = "[node:pacs]" + "\n".join(line.removeprefix("# ") for line in block.splitlines())
    ini = tmp_path / "x.ini"
    ini.write_text(example.replace("#", ""))
    cfg = config.load(str(ini), env={}, cwd=tmp_path)
    assert [(n.name, n.kind) for n in cfg.nodes] == [("pacs", "dicom"), ("research", "dicomweb")]
