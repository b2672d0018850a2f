"""The STOW-RS client (dicom/stow.py, dicom/stow_reply.py).

Against a real Orthanc with the DICOMweb plugin: batches, an outage, and a
real per-instance failure. Against a tiny real HTTP server on 127.0.0.1
(``Canned``): every row of the response table, the request's framing, an
early answer, stalls, TLS, and that a 300 MB batch is streamed rather than
built in memory.
"""

from __future__ import annotations

import datetime
import email.parser
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import dicomgen
import tools
from ith_proxy.dicom.stow import Endpoint, Outcome, RequestFailed, plan_batches, store
from ith_proxy.dicom.stow_reply import REASON_CAP, classify_http
from orthanc import OrthancProcess

SECRET = "Token s3cr3t-never-logged"
BIG = {"batch_bytes": 1 << 40, "batch_instances": 10_000, "timeout": 20.0}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dicomgen.Series:
    return dicomgen.make_small_series(tmp_path_factory.mktemp("stow") / "src", 4, rows=16, cols=16)


# --- a tiny real HTTP server ---


class Canned:
    """Answers every POST with one canned response; records what it got."""

    def __init__(self, status: int = 200, body: bytes | dict[str, Any] = b"", **how: Any) -> None:
        self.status = status
        self.body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.how = how  # read_body=False, stall=True, drip=True, tls=SSLContext, then=status
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                canned.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if how.get("tls"):
            self.httpd.socket = how["tls"].wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if how.get("tls") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers["Content-Length"])
        got = {"path": h.path, "headers": dict(h.headers), "length": length, "read": 0}
        self.requests.append(got)
        kept = bytearray()
        while self.how.get("read_body", True) and got["read"] < length:
            piece = h.rfile.read(min(1 << 20, length - got["read"]))
            if not piece:
                break
            got["read"] += len(piece)
            if len(kept) < 1 << 20:
                kept += piece
        got["body"] = bytes(kept)
        if self.how.get("stall"):
            self.release.wait(30)
            return
        status = self.how.get("then", self.status) if len(self.requests) > 1 else self.status
        h.send_response(status)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(self.body)))
        h.end_headers()
        if self.how.get("drip"):
            for i in range(len(self.body)):
                h.wfile.write(self.body[i : i + 1])
                h.wfile.flush()
                time.sleep(0.2)
        else:
            h.wfile.write(self.body)

    def __enter__(self) -> Canned:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def seq(tag: str, *items: tuple[str | None, int | None]) -> dict[str, Any]:
    """A DICOM JSON sequence of (ReferencedSOPInstanceUID, reason) items; the
    reason is a FailureReason in 00081198, a WarningReason in 00081199."""
    code_tag = "00081197" if tag == "00081198" else "00081196"
    values = []
    for uid, code in items:
        item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}
        if uid is not None:
            item["00081155"] = {"vr": "UI", "Value": [uid]}
        if code is not None:
            item[code_tag] = {"vr": "US", "Value": [code]}
        values.append(item)
    return {tag: {"vr": "SQ", "Value": values}} if values else {tag: {"vr": "SQ"}}


def failed(*items: tuple[str | None, int | None]) -> dict[str, Any]:
    return seq("00081198", *items)


def referenced(*items: tuple[str | None, int | None]) -> dict[str, Any]:
    return seq("00081199", *items)


def send(canned: Canned, files: list[Path], **kw: Any) -> list[Outcome]:
    with canned:
        return store(Endpoint(canned.url, SECRET), files, **{**BIG, **kw})


def refused(canned: Canned, files: list[Path], **kw: Any) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        send(canned, files, **kw)
    assert SECRET not in info.value.reason and "s3cr3t" not in info.value.reason
    return info.value


# --- against Orthanc ---


def test_a_study_goes_to_orthanc_in_several_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = dicomgen.make_small_series(tmp_path / "a", 5)
    b = dicomgen.make_small_series(tmp_path / "b", 4, like=a, series_number=2)
    files = a.files + b.files
    # the largest: generated UIDs differ in length, so the files do by a few bytes
    # (with the first file's size, three larger ones did not fit in a batch)
    size = max(f.stat().st_size for f in files)
    seen: list[Outcome] = []
    caplog.set_level(logging.DEBUG, logger="ith_proxy.dicom.stow")
    with OrthancProcess(tmp_path / "orthanc", dicomweb=True) as pacs:
        out = store(
            Endpoint(pacs.dicomweb_url, SECRET),
            files,
            batch_bytes=3 * size,
            batch_instances=100,
            timeout=30,
            on_outcome=seen.append,
        )
        stored = pacs.sop_instance_uids(a.study_uid)
    assert [o.sop_uid for o in out] == a.sop_uids + b.sop_uids
    assert {(o.result, o.status, o.reason, o.warning) for o in out} == {
        ("delivered", 200, "stored", "")
    }
    assert seen == out
    assert stored == set(a.sop_uids + b.sop_uids)
    batches = [r for r in caplog.records if "STOW-RS to" in r.getMessage()]
    assert len(batches) == 3  # 9 files, 3 a batch
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in repr(Endpoint("http://x", SECRET))


def test_orthanc_down_then_back(tmp_path: Path, series: dicomgen.Series) -> None:
    pacs = OrthancProcess(tmp_path / "orthanc", dicomweb=True).start()
    try:
        pacs.stop()
        with pytest.raises(RequestFailed) as info:
            store(Endpoint(pacs.dicomweb_url), series.files, **BIG)
        assert info.value.transient and info.value.status is None
        assert "ConnectionRefusedError" in info.value.reason
        pacs.start()
        out = store(Endpoint(pacs.dicomweb_url), series.files, **BIG)
        assert [o.result for o in out] == ["delivered"] * 4
        assert pacs.sop_instance_uids() == set(series.sop_uids)
    finally:
        pacs.stop()


def test_orthanc_refuses_a_corrupt_instance_among_good_ones(tmp_path: Path) -> None:
    """Orthanc 1.10 + DICOMweb 1.7 answer a batch with a part it cannot parse
    by 400 and a body whose ReferencedSOPSequence names the stored ones, the
    bad part in no sequence. A file that is no Part 10 file is not sent."""
    s = dicomgen.make_small_series(tmp_path / "src", 3)
    cut = tmp_path / "cut.dcm"
    whole = s.files[1].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])  # the meta intact, the data set cut
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all" * 10)
    with OrthancProcess(tmp_path / "orthanc", dicomweb=True) as pacs:
        out = store(Endpoint(pacs.dicomweb_url), [s.files[0], cut, s.files[2], junk], **BIG)
        stored = pacs.sop_instance_uids()
    good, bad, good2, none = out
    assert (good.result, good.status, good.sop_uid) == ("delivered", 400, s.sop_uids[0])
    assert (good2.result, good2.sop_uid) == ("delivered", s.sop_uids[2])
    assert (bad.result, bad.status, bad.sop_uid) == ("permanent", 400, s.sop_uids[1])
    assert bad.reason == "HTTP 400 Bad Request: not stored"
    assert (none.result, none.status, none.sop_uid) == ("permanent", None, "junk")
    assert none.reason.startswith("not a DICOM Part 10 file")
    assert stored == {s.sop_uids[0], s.sop_uids[2]}


# --- the response table, row by row, against a real socket ---


def test_http_statuses_for_a_whole_batch() -> None:
    assert classify_http(200) == ("delivered", "HTTP 200 OK")
    assert classify_http(202) == ("delivered", "HTTP 202 Accepted")
    for status in (408, 429, 500, 502, 503, 504, 599):
        assert classify_http(status)[0] == "transient", status
    for status in (400, 401, 403, 404, 409, 413, 415, 301, 302, 100):
        assert classify_http(status)[0] == "permanent", status
    assert "redirects are not followed" in classify_http(307)[1]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
@pytest.mark.parametrize("with_body", [False, True])
def test_busy_or_broken_servers_are_transient(
    series: dicomgen.Series, status: int, with_body: bool
) -> None:
    body = failed((series.sop_uids[0], 0xC000)) if with_body else b""
    e = refused(Canned(status, body), series.files)
    assert e.transient and e.status == status and e.reason.startswith(f"HTTP {status} ")


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413])
def test_other_4xx_without_a_stow_body_are_permanent(series: dicomgen.Series, status: int) -> None:
    e = refused(Canned(status, b"<html><body>Nope</body></html>"), series.files)
    assert not e.transient and e.status == status
    assert re.fullmatch(rf"HTTP {status} [A-Za-z ]+: <html><body>Nope</body></html>", e.reason)
    e = refused(Canned(status, {"HttpError": "Unauthorized"}), series.files)
    assert not e.transient and e.status == status


def test_409_is_judged_per_instance(series: dicomgen.Series) -> None:
    u = series.sop_uids
    body = failed((u[0], 0xA700), (u[1], 0xC000), (u[3], 0xB000))
    out = send(Canned(409, body), series.files)
    assert [(o.result, o.status) for o in out] == [
        ("transient", 409),
        ("permanent", 409),
        ("permanent", 409),
        ("delivered", 409),
    ]
    assert out[0].reason == "FailureReason 0xA700 Out of resources"
    assert out[1].reason == "FailureReason 0xC000 Cannot understand"
    assert out[2].reason == "HTTP 409 Conflict: not stored"
    assert out[3].warning == "0xB000 Coercion of data elements"


def test_200_with_a_failed_instance(series: dicomgen.Series) -> None:
    u = series.sop_uids
    body = {
        **failed((u[1], 0x0122), ("1.2.3.999", 0xC000), (None, 0xC000)),
        **referenced((u[0], None)),
    }
    out = send(Canned(200, body), series.files)
    assert [o.result for o in out] == ["delivered", "permanent", "delivered", "delivered"]
    assert out[1].reason == "FailureReason 0x0122 SOP class not supported"


def test_202_with_warnings_and_failures(series: dicomgen.Series) -> None:
    u = series.sop_uids
    body = referenced((u[0], 0xB000), (u[1], None), (u[2], 0xB007), (u[3], 0))
    out = send(Canned(202, body), series.files)
    assert [(o.result, o.reason) for o in out] == [("delivered", "stored")] * 4
    assert [o.warning for o in out] == [
        "0xB000 Coercion of data elements",
        "",
        "0xB007 Data set does not match SOP class",
        "",
    ]
    # a failure the server could not name: the unnamed ones are not acknowledged
    body = {**referenced((u[0], None)), **failed((None, 0xC000), (u[2], None))}
    out = send(Canned(202, body), series.files)
    assert [(o.result, o.reason) for o in out] == [
        ("delivered", "stored"),
        ("transient", "not acknowledged in the response"),
        ("transient", "failed without a FailureReason"),
        ("transient", "not acknowledged in the response"),
    ]


@pytest.mark.parametrize(
    "body", [b"", b"{}", json.dumps({**failed(), **referenced()}).encode()], ids=str
)
@pytest.mark.parametrize("status", [200, 202])
def test_2xx_without_failures_delivers_all(
    series: dicomgen.Series, status: int, body: bytes
) -> None:
    out = send(Canned(status, body), series.files)
    assert [(o.result, o.status) for o in out] == [("delivered", status)] * 4


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "not JSON"),
        (b"<NativeDicomModel/>", "not JSON"),
        (b"[{}, {}]", "not a DICOM JSON object"),
        (b'{"00081198": "oops"}', "(0008,1198) is not a sequence"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b" " * (16 * 1024 * 1024 + 10), "response over 16777216 bytes"),
    ],
    ids=["garbage", "xml", "list", "bad-sequence", "deep", "huge"],
)
def test_a_bad_2xx_body_is_transient(series: dicomgen.Series, body: bytes, why: str) -> None:
    e = refused(Canned(200, body), series.files)
    assert e.transient and e.status == 200
    assert e.reason == f"HTTP 200 OK with a bad body: {why}"


def test_an_error_body_is_capped_and_the_secret_blanked(series: dicomgen.Series) -> None:
    body = (b"echo: Authorization: " + SECRET.encode() + b"\x00\x1b[31m" + b"x" * 20_000) * 900
    e = refused(Canned(401, body), series.files)
    assert not e.transient and e.status == 401
    assert len(e.reason) <= len("HTTP 401 Unauthorized: ") + REASON_CAP + 3
    assert e.reason.startswith("HTTP 401 Unauthorized: echo: Authorization: [auth] [31mx")
    assert e.reason.endswith("...")


def test_a_redirect_is_not_followed(series: dicomgen.Series) -> None:
    e = refused(Canned(301, b""), series.files)
    assert not e.transient and "redirects are not followed" in e.reason


# --- the request itself ---


def test_the_request_is_multipart_related_with_the_files_as_they_are(
    series: dicomgen.Series,
) -> None:
    canned = Canned(200, referenced(*((u, None) for u in series.sop_uids)))
    send(canned, series.files, batch_instances=3)
    assert len(canned.requests) == 2
    first = canned.requests[0]
    headers = first["headers"]
    assert first["path"] == "/dicom-web/studies"
    assert headers["Accept"] == "application/dicom+json"
    assert headers["Authorization"] == SECRET
    ctype = headers["Content-Type"]
    m = re.fullmatch(
        r'multipart/related; type="application/dicom"; boundary=(ith-proxy-\w{48})', ctype
    )
    assert m
    assert first["read"] == first["length"] == len(first["body"])
    msg = email.parser.BytesParser().parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + first["body"]
    )
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    for part, path in zip(parts, series.files[:3], strict=True):
        assert part.get_content_type() == "application/dicom"
        assert part.get_payload(decode=True) == path.read_bytes()
        assert m.group(1).encode() not in path.read_bytes()
    assert canned.requests[1]["headers"]["Content-Type"] != ctype  # a new boundary each time


def test_plan_batches() -> None:
    assert plan_batches([], 10, 10) == []
    assert plan_batches([4, 4, 4, 4], 8, 10) == [range(2), range(2, 4)]
    assert plan_batches([4, 4, 4, 4], 100, 3) == [range(3), range(3, 4)]
    assert plan_batches([1, 50, 1, 1], 10, 10) == [range(1), range(1, 2), range(2, 4)]
    assert plan_batches([50], 10, 10) == [range(1)]


def test_an_early_answer_is_read(series: dicomgen.Series, tmp_path: Path) -> None:
    """A server that answers 401 before reading a large body, then closes."""
    big = tmp_path / "big.dcm"
    big.write_bytes(series.files[0].read_bytes() + b"\0" * (64 << 20))
    canned = Canned(401, b"go away", read_body=False)
    e = refused(canned, [big])
    assert (e.reason, e.transient, e.status) == ("HTTP 401 Unauthorized: go away", False, 401)
    assert canned.requests[0]["read"] == 0


def test_a_server_that_never_answers_times_out(series: dicomgen.Series) -> None:
    e = refused(Canned(200, b"", stall=True), series.files, timeout=1.0)
    assert e.transient and e.reason.endswith("timed out")


def test_a_dripping_response_is_cut_off(series: dicomgen.Series) -> None:
    e = refused(Canned(200, b"{}" + b" " * 100, drip=True), series.files, timeout=1.0)
    assert e.transient and e.reason == "HTTP 200 OK with a bad body: response too slow"


def test_unsendable_files_and_endpoints(series: dicomgen.Series, tmp_path: Path) -> None:
    link = tmp_path / "link.dcm"
    link.symlink_to(series.files[0])
    canned = Canned(200, b"")
    out = send(canned, [tmp_path, link, series.files[1]])
    assert [(o.sop_uid, o.result, o.status) for o in out] == [
        (tmp_path.name, "permanent", None),
        ("link", "permanent", None),
        (series.sop_uids[1], "delivered", 200),
    ]
    assert out[1].reason == "file unreadable (OSError)"  # ELOOP: never through a link
    for url, auth in [
        ("ftp://127.0.0.1/dicom-web", ""),
        ("http:///dicom-web", ""),
        ("http://user:pw@127.0.0.1/dicom-web", ""),
        ("http://127.0.0.1/dicom-web?token=x", ""),
        ("http://127.0.0.1:99999/dicom-web", ""),
        ("http://127.0.0.1/dicom web", ""),
        ("http://127.0.0.1/dicom-web", SECRET + "\r\nX-Evil: 1"),
    ]:
        with pytest.raises(RequestFailed) as info:
            store(Endpoint(url, auth), series.files, **BIG)
        assert not info.value.transient and info.value.reason.startswith("bad DICOMweb endpoint")
        assert "s3cr3t" not in info.value.reason and "pw" not in info.value.reason
    with pytest.raises(ValueError, match="positive"):
        store(Endpoint(canned.url), series.files, batch_bytes=0, batch_instances=1, timeout=1)


def test_a_failed_request_stops_the_send_and_keeps_what_was_settled(
    series: dicomgen.Series,
) -> None:
    seen: list[Outcome] = []
    canned = Canned(200, b"", then=503)
    e = refused(canned, series.files, batch_instances=2, on_outcome=seen.append)
    assert e.transient and e.status == 503
    assert [o.sop_uid for o in e.outcomes] == series.sop_uids[:2] == [o.sop_uid for o in seen]
    assert len(canned.requests) == 2  # the third batch is not sent


# --- TLS ---


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ith-proxy test")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_verifies_the_server(
    series: dicomgen.Series, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _certificate(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    e = refused(Canned(200, b"", tls=ctx), series.files)
    assert e.transient and "TLS certificate not accepted" in e.reason
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted by the default context
    canned = Canned(200, b"", tls=ctx)
    out = send(canned, series.files)
    assert [o.result for o in out] == ["delivered"] * 4
    assert canned.requests[0]["read"] == canned.requests[0]["length"]


# --- streaming ---


def test_a_300_mb_batch_is_streamed_not_built(tmp_path: Path, series: dicomgen.Series) -> None:
    """Ten 30 MiB files (sparse) in one batch; the client runs in its own
    process and its peak RSS grows by far less than the payload."""
    head = series.files[0].read_bytes()
    files = []
    for i in range(10):
        path = tmp_path / f"big{i}.dcm"
        with path.open("wb") as f:
            f.write(head)
            f.truncate(30 << 20)
        files.append(str(path))
    with Canned(200, b"") as canned:
        res = tools.run_python(
            f"""
            import json, resource
            from pathlib import Path
            from ith_proxy.dicom.stow import Endpoint, store
            files = [Path(p) for p in {files!r}]
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = store(Endpoint({canned.url!r}), files, batch_bytes=1 << 40,
                        batch_instances=100, timeout=60)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({{"grew_kib": after - before, "results": [o.result for o in out]}}))
            """,
            cwd=tools.REPO_ROOT,
        )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["results"] == ["delivered"] * 10
    assert len(canned.requests) == 1
    assert canned.requests[0]["read"] == canned.requests[0]["length"] > 300 << 20
    assert report["grew_kib"] < 32 * 1024, report  # vs. 300 MiB sent
