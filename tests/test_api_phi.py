"""POST /api/phi-metadata/: the original patient- and study-level values of a
study from the vault, one audit record per request by an authenticated
caller (fsynced before the answer, no PHI in it), no PHI when the audit
cannot be written.  The real API of a real site on a loopback socket, a
canary study indexed into its vault, and, at the end, a real proxy process
fed by DCMTK storescu."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import canary
import dicomgen
import tokens
import tools
from helpers import catalog_counts, wait_indexed
from ith_proxy.config import ApiConfig
from ith_proxy.deid.originals import gather, present
from ith_proxy.deid.profile import level_of
from ith_proxy.store.audit import format_head, head
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.retention import Retention
from ith_proxy.web.app import ApiServer, listening
from worker_rooms import Rooms

PATH = "/api/phi-metadata/"
READ = tokens.mint("phi:read")


def unknown(uid: str) -> str:
    """The audit target of a UID that names no study: a digest, never the UID."""
    return "unknown:" + hashlib.sha256(uid.encode()).hexdigest()[:16]


class Site:
    """A site with one canary study indexed and its API listening."""

    def __init__(self, root: Path) -> None:
        self.corpus = canary.build_canary(root / "corpus", series=(2, 1), drop=False)
        self.rooms = Rooms(root / "site", "[spool]\nencrypt_incoming = false\n", tokens.ENV)
        for i, inst in enumerate(self.corpus.instances):
            path = self.rooms.drop(f"canary-{i}.dcm", inst.path.read_bytes())
            os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))  # the order received
        while self.rooms.indexer.run_once():
            pass
        uids = self.rooms.catalog.study_uids()
        assert len(uids) == 1, uids
        self.uid = uids[0]
        self.server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), self.rooms.api())
        self.server.start()
        self.url = "http://" + listening(self.server.server)

    @property
    def audit_file(self) -> Path:
        return self.rooms.spool.logs / "audit.log"

    def records(self) -> list[dict]:
        if not self.audit_file.is_file():
            return []
        return [json.loads(line) for line in self.audit_file.read_bytes().splitlines()]

    def post(self, body, token: str | None = READ, headers=None):
        """(status, parsed body, response headers)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + PATH, data=data, method="POST", headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, raw, got = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, raw, got = exc.code, exc.read(), exc.headers
        return status, json.loads(raw), got

    def audited(self, outcome: str, target: str) -> dict:
        """The request just answered left exactly this one new record."""
        record = self.records()[-1]
        assert record["action"] == "phi.read", record
        assert record["detail"]["outcome"] == outcome, record
        assert record["target"] == target, record
        assert record["actor"] == "api:tester" and record["detail"]["ip"] == "127.0.0.1"
        assert len(record["detail"]["request_id"]) == 32
        return record

    def close(self) -> None:
        self.server.stop()
        self.rooms.close()


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.close()


def _vault_originals(site: Site) -> dict[str, object]:
    """Every patient- and study-level original the vault holds for the study."""
    out: dict[str, object] = {}
    for offset in site.rooms.catalog.instance_vault_offsets(site.uid):
        record = site.rooms.vault.get(offset)
        for level in ("patient", "study"):
            for keyword, value in record["phi"].get(level, {}).items():
                out.setdefault(keyword, present(keyword, value))
    return out


def _as_api(marker: canary.Marker) -> object:
    if isinstance(marker.value, bytes):
        return {"InlineBinary": base64.b64encode(marker.value).decode()}
    return marker.value


def test_phi_read_returns_every_original_patient_and_study_value(site: Site) -> None:
    status, body, headers = site.post({"study_instance_uid": site.uid})
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body["study_instance_uid"] == site.uid
    phi = body["phi"]
    assert phi["PatientName"] == site.corpus.patient_name
    assert phi["PatientID"] == site.corpus.patient_id
    assert phi["StudyInstanceUID"] == site.corpus.study_uid != site.uid
    # every value the vault holds at these levels, and nothing else
    assert phi == _vault_originals(site)
    # every planted top-level patient or study marker comes back as planted
    planted = [
        m
        for m in site.corpus.markers
        if m.top_level and m.row and level_of(m.path) in ("patient", "study")
    ]
    assert len(planted) > 20, planted
    # the canary gives some study-level attributes (InstitutionName ...) one
    # value per series: those, and only those, are conflicts
    split = {
        top
        for m in site.corpus.markers
        if m.row
        and m.scope not in ("study", "patient")
        and level_of(top := m.path.split("[")[0].split(".")[0]) in ("patient", "study")
    }
    assert set(body["conflicts"]) == split and "InstitutionName" in split
    for keyword in split:
        values = body["conflicts"][keyword]
        assert len(values) == 2 and values[0] == phi[keyword], (keyword, values)
    for marker in planted:
        if 0 not in marker.instances:  # the answer holds the first instance's values
            continue
        got = phi.get(marker.path)
        want = _as_api(marker)
        assert got is not None, marker
        if isinstance(got, list) and not isinstance(want, list):
            got = got[0] if len(got) == 1 else got
        assert str(got) == str(want) or got == want, (marker.path, got, want)
    record = site.audited("success", site.uid)
    assert record["detail"]["instances"] == len(site.corpus.instances)
    # the audit log, and every log, holds no PHI
    needles = site.corpus.needles()
    assert not canary.find_needles(site.rooms.spool.logs, needles)
    assert not canary.find_needles(site.rooms.root / "secrets", needles)


def test_without_the_scope_403_is_audited_and_reveals_nothing(site: Site) -> None:
    for scope in ("", "studies:read", "phi:write phi:reader"):
        before = len(site.records())
        status, body, headers = site.post(
            {"study_instance_uid": site.uid}, token=tokens.mint(scope)
        )
        assert status == 403 and "phi:read" in body["error"], body
        assert headers["Cache-Control"] == "no-store"
        assert len(site.records()) == before + 1
        site.audited("403", site.uid)
    # the scope is judged before the body: no UID check, no existence check
    status, body, _ = site.post(b"not json", token=tokens.mint("studies:read"))
    assert status == 403, body
    site.audited("403", "-")
    status, body, _ = site.post({"study_instance_uid": "1.2.3"}, token=tokens.mint(""))
    assert status == 403, body
    site.audited("403", unknown("1.2.3"))


def test_unknown_uid_is_404_and_audited(site: Site) -> None:
    status, body, headers = site.post({"study_instance_uid": "2.25.1234567890"})
    assert status == 404 and body["field"] == "study_instance_uid", body
    assert headers["Cache-Control"] == "no-store"
    # a UID that names no study here may be an original one: only its digest is recorded
    site.audited("404", unknown("2.25.1234567890"))


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        (b"[]", "body"),
        ({}, "study_instance_uid"),
        ({"study_instance_uid": None}, "study_instance_uid"),
        ({"study_instance_uid": 1.2}, "study_instance_uid"),
        ({"study_instance_uid": ["1.2"]}, "study_instance_uid"),
        ({"study_instance_uid": ""}, "study_instance_uid"),
        ({"study_instance_uid": "1." + "2" * 63}, "study_instance_uid"),
        ({"study_instance_uid": "1..2"}, "study_instance_uid"),
        ({"study_instance_uid": "1.2.3\n"}, "study_instance_uid"),
        ({"study_instance_uid": "DOE^JOHN"}, "study_instance_uid"),
        ({"study_instance_uid": "1.2.\u0663"}, "study_instance_uid"),
        ({"study_instance_uid": "1.2", "PatientName": "x"}, "PatientName"),
    ],
)
def test_malformed_requests_are_400_naming_the_field_and_audited(site: Site, body, field) -> None:
    before = len(site.records())
    status, answer, _ = site.post(body)
    assert status == 400 and answer["field"] == field, answer
    assert set(answer) == {"error", "field"}
    assert len(site.records()) == before + 1
    # a malformed UID is never written to the audit log (it may be anything, PHI too)
    target = unknown("1.2") if field == "PatientName" else "-"
    site.audited("400", target)


def test_oversized_body_is_413_and_audited(site: Site) -> None:
    big = json.dumps({"study_instance_uid": site.uid, "pad": "x" * (1 << 20)}).encode()
    status, body, _ = site.post(big)
    assert status == 413, body
    site.audited("413", "-")


def test_no_valid_token_is_401_and_not_audited(site: Site) -> None:
    before = site.audit_file.read_bytes() if site.audit_file.exists() else b""
    for token in (
        None,
        "garbage",
        tokens.mint("phi:read", key="another-secret-0123456789abcdef-0123456789"),
    ):
        status, body, _ = site.post({"study_instance_uid": site.uid}, token=token)
        assert status == 401 and "phi" not in body, body
    after = site.audit_file.read_bytes() if site.audit_file.exists() else b""
    assert after == before


def test_forwarded_for_header_does_not_forge_the_audited_ip(site: Site) -> None:
    """The audited IP is the TCP peer's (REMOTE_ADDR).  Waitress drops an
    X-Forwarded-For from an untrusted peer by default, and web.context reads
    REMOTE_ADDR, never Bottle's remote_addr (which believes the header)."""
    status, _, _ = site.post(
        {"study_instance_uid": site.uid}, headers={"X-Forwarded-For": "10.6.6.6, DOE^JOHN"}
    )
    assert status == 200
    record = site.audited("success", site.uid)
    assert "10.6.6.6" not in json.dumps(record)


def test_a_corrupt_vault_record_is_500_generic_and_audited(site: Site) -> None:
    offsets = site.rooms.catalog.instance_vault_offsets(site.uid)
    vault = site.rooms.spool.vault_file
    data = bytearray(vault.read_bytes())
    data[offsets[-1] + 40] ^= 0x01  # one bit of the last instance's record
    vault.write_bytes(bytes(data))
    status, body, headers = site.post({"study_instance_uid": site.uid})
    assert status == 500 and body == {"error": "the original values could not be read"}
    assert headers["Cache-Control"] == "no-store"
    site.audited("error", site.uid)


def test_a_missing_vault_key_is_500_generic_and_audited(site: Site) -> None:
    key = site.rooms.cfg.vault.key_file
    key.rename(key.with_name("vault.key.moved"))
    status, body, _ = site.post({"study_instance_uid": site.uid})
    assert status == 500 and body == {"error": "the original values could not be read"}
    site.audited("error", site.uid)


def _no_phi(site: Site, body: dict) -> None:
    text = json.dumps(body)
    assert "phi" not in body and site.corpus.patient_name not in text
    assert not any(n in text for n in site.corpus.needles())


def test_no_phi_when_the_audit_anchor_cannot_be_written(site: Site) -> None:
    """The anchor beside the keys is a directory: the record cannot be made
    durable with its anchor, so the caller gets 500 and no value."""
    assert site.post({"study_instance_uid": site.uid})[0] == 200  # the anchor exists now
    anchor = site.rooms.cfg.vault.audit_anchor_file
    anchor.unlink()
    anchor.mkdir()
    status, body, headers = site.post({"study_instance_uid": site.uid})
    assert status == 500, body
    assert "audit" in body["error"] and headers["Cache-Control"] == "no-store"
    _no_phi(site, body)


def test_no_phi_when_the_audit_log_cannot_be_written(site: Site) -> None:
    """The audit log is a directory (no file can be appended to)."""
    site.rooms.spool.logs.mkdir(parents=True, exist_ok=True)
    if site.audit_file.exists():
        site.audit_file.unlink()
    site.audit_file.mkdir()
    for token in (READ, tokens.mint("studies:read")):
        status, body, _ = site.post({"study_instance_uid": site.uid}, token=token)
        assert status == 500, body
        _no_phi(site, body)


def test_concurrent_requests_each_leave_one_record_in_an_unbroken_chain(site: Site) -> None:
    tokens_ = [READ, tokens.mint("studies:read")]
    bodies = [{"study_instance_uid": site.uid}, {"study_instance_uid": "2.25.7"}]
    jobs = [(tokens_[i % 2], bodies[i // 2 % 2]) for i in range(24)]
    before = len(site.records())
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda job: site.post(job[1], token=job[0])[0], jobs))
    assert sorted(statuses) == sorted([200] * 6 + [404] * 6 + [403] * 12)
    records = site.records()[before:]
    outcomes = sorted(r["detail"]["outcome"] for r in records)
    assert outcomes == sorted(["success"] * 6 + ["404"] * 6 + ["403"] * 12)
    assert len({r["detail"]["request_id"] for r in records}) == 24
    verify = site.rooms.cli("audit", "verify")
    assert verify.returncode == 0, verify.stderr


def test_a_purged_study_is_still_answered(site: Site) -> None:
    """Retention purges the files and keeps the rows; the vault is never purged."""
    sops = [
        row[0]
        for row in site.rooms.catalog.conn.execute(
            "SELECT sop_uid FROM instances WHERE study_uid = ?", (site.uid,)
        )
    ]
    assert Retention(site.rooms.catalog).mark_purged(site.uid, sops, time.time()) == len(sops)
    shutil.rmtree(site.rooms.spool.root / "studies" / site.uid)
    status, body, _ = site.post({"study_instance_uid": site.uid})
    assert status == 200 and body["phi"]["PatientID"] == site.corpus.patient_id, body


def test_instances_that_disagree_give_the_first_value_and_list_the_conflict(tmp_path: Path) -> None:
    """A hostile sender gives two instances of one study different names."""
    corpus = canary.build_canary(
        tmp_path / "corpus",
        series=(2,),
        drop=False,
        edit=lambda ds, inst: setattr(ds, "PatientName", f"FIRST^{inst.index}"),
    )
    rooms = Rooms(tmp_path / "site", "[spool]\nencrypt_incoming = false\n", tokens.ENV)
    try:
        for i, inst in enumerate(corpus.instances):
            path = rooms.drop(f"c{i}.dcm", inst.path.read_bytes())
            os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
        while rooms.indexer.run_once():
            pass
        uid = rooms.catalog.study_uids()[0]
        server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), rooms.api())
        server.start()
        try:
            status, body = tools.http_json(
                "POST",
                f"http://{listening(server.server)}{PATH}",
                {"study_instance_uid": uid},
                token=READ,
            )
        finally:
            server.stop()
    finally:
        rooms.close()
    assert status == 200, body
    assert body["phi"]["PatientName"] == "FIRST^0"
    assert body["conflicts"] == {"PatientName": ["FIRST^0", "FIRST^1"]}


def _index(rooms: Rooms, files, prefix: str) -> None:
    for i, path in enumerate(files):
        rooms.drop(f"{prefix}{i}.dcm", Path(path).read_bytes())
    while rooms.indexer.run_once():
        pass


def _serve(rooms: Rooms) -> ApiServer:
    server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), rooms.api())
    server.start()
    return server


def test_a_realistic_study_and_a_record_of_another_study(tmp_path: Path) -> None:
    """dicomgen's realistic values come back as written; a catalog row that
    points at another study's vault record is refused (500, audited), never
    handed out."""
    rooms = Rooms(tmp_path / "site", "[spool]\nencrypt_incoming = false\n", tokens.ENV)
    try:
        one = dicomgen.make_small_series(tmp_path / "one", 2, markers=False)
        two = dicomgen.make_small_series(tmp_path / "two", 1, markers=False, seed=1)
        _index(rooms, one.files, "one-")
        _index(rooms, two.files, "two-")
        uids = {}
        for uid in rooms.catalog.study_uids():
            record = rooms.vault.get(rooms.catalog.instance_vault_offsets(uid)[0])
            uids[record["phi"]["study"]["StudyInstanceUID"]] = uid
        server = _serve(rooms)
        url = f"http://{listening(server.server)}{PATH}"
        try:
            status, body = tools.http_json(
                "POST", url, {"study_instance_uid": uids[one.study_uid]}, token=READ
            )
            assert status == 200, body
            for keyword, value in one.phi.items():
                got = body["phi"][keyword]
                assert got == (value.split("\\") if isinstance(got, list) else value), keyword
            # the first instance of study one now points at study two's record
            other = rooms.catalog.instance_vault_offsets(uids[two.study_uid])[0]
            rooms.catalog.conn.execute(
                "UPDATE instances SET vault_offset = ? WHERE study_uid = ?"
                " AND received_at = (SELECT min(received_at) FROM instances WHERE study_uid = ?)",
                (other, uids[one.study_uid], uids[one.study_uid]),
            )
            status, body = tools.http_json(
                "POST", url, {"study_instance_uid": uids[one.study_uid]}, token=READ
            )
            assert status == 500 and body == {"error": "the original values could not be read"}
            assert two.phi["PatientID"] not in json.dumps(body)
        finally:
            server.stop()
        last = json.loads((rooms.spool.logs / "audit.log").read_bytes().splitlines()[-1])
        assert (last["target"], last["detail"]["outcome"]) == (uids[one.study_uid], "error")
    finally:
        rooms.close()


def test_values_are_shaped_for_json() -> None:
    assert present("PatientName", "DOE^JOHN") == "DOE^JOHN"
    assert present("OtherPatientIDs", "A\\B") == ["A", "B"]
    assert present("OtherPatientIDs", "A") == ["A"]
    assert present("OtherPatientIDs", "") == []
    assert present("PatientComments", "a\\b") == "a\\b"  # LT: one value, backslash and all
    assert present("PatientWeight", 71.5) == "71.5"
    assert present("PatientAge", None) == ""
    assert present("(0009,1010)", b"\x00\xff") == {"InlineBinary": "AP8="}
    assert present("OtherPatientIDsSequence", [{"PatientID": "X", "TypeOfPatientID": "TEXT"}]) == [
        {"PatientID": "X", "TypeOfPatientID": "TEXT"}
    ]
    found = gather(
        [
            {"phi": {"patient": {"PatientName": "A^B"}, "series": {"SeriesDescription": "x"}}},
            {"phi": {"patient": {"PatientName": "A^B"}, "study": {"StudyID": "7"}}},
        ]
    )
    assert found.values == {"PatientName": "A^B", "StudyID": "7"} and found.conflicts == {}
    with pytest.raises(ValueError):
        gather([{"v": 1}])


def test_phi_end_to_end_through_a_real_proxy(tmp_path: Path) -> None:
    """A canary study sent with storescu to a real proxy; the original identity
    back through the API with phi:read; 403 without it and 404 for an unknown
    UID, both audited; no PHI in any log; audit verify passes after it all."""
    corpus = canary.build_canary(tmp_path / "corpus", series=(2,), drop=False)
    proxy = tools.ProxyProcess(tmp_path / "proxy", env={**tokens.ENV, "DICOM_STUDY_TIMEOUT": "2"})
    with proxy:
        result = tools.storescu(proxy.dicom_port, corpus.network_files, aet="CANARYSCU")
        assert len(tools.acked_files(result)) == len(corpus.network_files), result.stderr[-2000:]
        wait_indexed(proxy.spool, len(corpus.network_files))
        assert catalog_counts(proxy.spool)["studies"] == 1
        cat = Catalog(proxy.spool / "catalog.sqlite3", readonly=True)
        try:
            uid = cat.study_uids()[0]
        finally:
            cat.close()
        status, body = proxy.api("POST", PATH, {"study_instance_uid": uid}, token=READ)
        assert status == 200, body
        assert body["phi"]["PatientName"] == corpus.patient_name
        assert body["phi"]["PatientID"] == corpus.patient_id
        assert body["phi"]["StudyInstanceUID"] == corpus.study_uid
        status, body = proxy.api(
            "POST", PATH, {"study_instance_uid": uid}, token=tokens.mint("studies:read")
        )
        assert status == 403 and "phi" not in body, body
        status, body = proxy.api("POST", PATH, {"study_instance_uid": "2.25.42"}, token=READ)
        assert status == 404, body
        status, body = proxy.api("POST", PATH, {"study_instance_uid": uid})
        assert status == 401
    audit = [
        json.loads(line) for line in (proxy.spool / "logs" / "audit.log").read_bytes().splitlines()
    ]
    phi = [(r["target"], r["detail"]["outcome"]) for r in audit if r["action"] == "phi.read"]
    assert phi == [(uid, "success"), (uid, "403"), (unknown("2.25.42"), "404")]
    # no PHI in any log: the spool's logs and the process's own output
    needles = corpus.needles(network_only=True)
    for path in [*(proxy.spool / "logs").iterdir(), proxy.stdout_path, proxy.stderr_path]:
        data = path.read_bytes()
        assert corpus.patient_name.encode() not in data, path
        assert not [n for n in needles if canary.file_has(path, n)], path
    verify = proxy.cli("audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert f"{len(audit)} records intact" in verify.stdout
    # the head the link sends the backend is the last record's
    kept = head(proxy.workdir / "secrets" / "audit.anchor")
    assert kept == {"seq": audit[-1]["seq"], "mac": audit[-1]["mac"]}
    verify = proxy.cli("audit", "verify", "--head", format_head(kept))
    assert verify.returncode == 0, verify.stderr
