"""wss:// and https:// to the backend verify the certificate: a backend whose
certificate comes from a CA made here is refused, until ``[link] ca_file``
names that CA (tests/backend_sim.py over TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backend_sim import BackendSim
from helpers import wait_until
from ith_proxy.link import config_fetch
from ith_proxy.store.settings import RuntimeSettings
from link_site import LinkSite


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server(tmp_path: Path, host: str = "127.0.0.1") -> tuple[Path, ssl.SSLContext]:
    """A CA certificate (written to ca.pem) and a server context whose
    certificate, for ``host``, that CA signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ith test CA"))
        .issuer_name(_name("ith test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("backend"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "srv.pem", tmp_path / "srv.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return ca_path, server


def test_wss_is_refused_without_the_ca_and_works_with_it(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, "ith_proxy.link")
    ca, server = make_ca_and_server(tmp_path)
    with BackendSim(tls=server, config={"study_timeout": 9}) as sim:
        assert sim.url.startswith("https://")
        untrusted = LinkSite(tmp_path / "a", sim).start()
        try:
            wait_until(
                lambda: "cannot connect: SSLCertVerificationError" in caplog.text,
                30,
                "a TLS refusal",
            )
            assert not sim.connected() and not sim.received and not sim.requests
            with pytest.raises(config_fetch.FetchError, match="TLS certificate not accepted"):
                config_fetch.fetch(untrusted.rooms.cfg)
        finally:
            untrusted.stop()
        trusted = LinkSite(tmp_path / "b", sim, link=f"ca_file = {ca}").start()
        try:
            sim.wait_connected()
            wait_until(
                lambda: "study_timeout" in RuntimeSettings(trusted.rooms.catalog).persisted(),
                30,
                "the config fetched over https",
            )
            ping = sim.command("ping")
            sim.wait_for(lambda m: m["type"] == "pong" and m["in_reply_to"] == ping, 30, "pong")
        finally:
            trusted.stop()


def test_a_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    ca, server = make_ca_and_server(tmp_path, host="127.0.0.2")
    with BackendSim(tls=server) as sim:
        s = LinkSite(tmp_path / "a", sim, link=f"ca_file = {ca}")
        try:
            with pytest.raises(config_fetch.FetchError, match="TLS certificate not accepted"):
                config_fetch.fetch(s.rooms.cfg)
        finally:
            s.rooms.close()


def test_an_unreadable_ca_file_is_reported_not_raised(tmp_path: Path) -> None:
    _ca, server = make_ca_and_server(tmp_path)
    with BackendSim(tls=server) as sim:
        s = LinkSite(tmp_path / "a", sim, link=f"ca_file = {tmp_path / 'missing.pem'}")
        try:
            with pytest.raises(config_fetch.FetchError, match="ca_file cannot be read"):
                config_fetch.fetch(s.rooms.cfg)
        finally:
            s.rooms.close()
