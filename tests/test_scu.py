"""The outgoing DICOM side (dicom/scu.py, scu_assoc.py, scu_wire.py, move.py)
against real peers: Orthanc, DCMTK storescp, and an in-process pynetdicom SCP
where a test needs a peer that answers a chosen status or stalls."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, build_context, evt

import dicomgen
import tools
from ith_proxy.dicom import move as move_mod
from ith_proxy.dicom import scu, scu_wire, status, wake
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.dicom.scu_assoc import VERIFICATION, associate, close
from orthanc import OrthancProcess

CT = "1.2.840.10008.5.1.4.1.1.2"
T = scu.Timeouts(connect=5.0, acse=10.0, dimse=30.0)


@pytest.fixture(autouse=True)
def _libraries() -> None:
    configure_libraries()  # as every entry point does


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path / "orthanc") as node:
        yield node


def peer_of(node: OrthancProcess, ae: str = "ORTHANC") -> scu.Peer:
    return scu.Peer(ae, "127.0.0.1", node.dicom_port)


def dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        meta = scu_wire.read_meta(fh)
        return fh.read()[: meta.size - meta.offset]


# --- C-ECHO and the association ---------------------------------------------------


def test_echo_live_dead_port_and_wrong_called_ae(pacs: OrthancProcess) -> None:
    scu.echo(peer_of(pacs), "ITHTEST", T)

    with pytest.raises(scu.AssociationFailed) as dead:
        scu.echo(scu.Peer("ORTHANC", "127.0.0.1", tools.free_port()), "ITHTEST", T)
    assert dead.value.transient and "connection refused" in dead.value.reason

    with pytest.raises(scu.AssociationFailed) as wrong:  # DicomCheckCalledAet is true
        scu.echo(peer_of(pacs, "NOTORTHANC"), "ITHTEST", T)
    assert not wrong.value.transient
    assert "rejected permanently" in wrong.value.reason
    assert "Called AE title not recognised" in wrong.value.reason


def test_outgoing_association_has_nodelay_and_wakeups(pacs: OrthancProcess) -> None:
    assoc = associate(peer_of(pacs), "ITHTEST", T, [build_context(VERIFICATION)])
    try:
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.gettimeout() == T.dimse  # bounded I/O once connected
        assert hasattr(assoc.dul, wake._WAIT_ATTR) and hasattr(assoc, wake._WAIT_ATTR)
        assert assoc.send_c_echo().Status == 0
    finally:
        close(assoc)


def test_connect_that_hangs_fails_within_the_connect_timeout() -> None:
    with socket.socket() as listener:  # a full accept queue: further SYNs are dropped
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for f in fillers:
            f.setblocking(False)
            try:
                f.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        try:
            with pytest.raises(scu.AssociationFailed) as exc:
                scu.echo(scu.Peer("X", "127.0.0.1", port), "ITHTEST", scu.Timeouts(0.5, 5, 5))
        finally:
            for f in fillers:
                f.close()
    assert exc.value.transient
    assert "within 0.5 s" in exc.value.reason


def test_silent_peer_fails_within_the_acse_timeout() -> None:
    with socket.socket() as listener:  # connects (the kernel accepts), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        peer = scu.Peer("X", "127.0.0.1", listener.getsockname()[1])
        with pytest.raises(scu.AssociationFailed) as exc:
            scu.echo(peer, "ITHTEST", scu.Timeouts(5, 1, 5))
    assert exc.value.transient
    assert "within 1 s" in exc.value.reason


@pytest.mark.parametrize(
    ("peer", "calling", "words"),
    [
        (scu.Peer("A" * 17, "127.0.0.1", 104), "ITHTEST", "called AE title"),
        (scu.Peer("ORTHANC", "127.0.0.1", 104), "BAD\\AE", "calling AE title"),
        (scu.Peer("ORTHANC", "127.0.0.1", 0), "ITHTEST", "invalid port"),
        (scu.Peer("ORTHANC", "", 104), "ITHTEST", "no host"),
    ],
)
def test_bad_settings_fail_permanently_without_a_connection(
    peer: scu.Peer, calling: str, words: str
) -> None:
    with pytest.raises(scu.AssociationFailed) as exc:
        scu.echo(peer, calling, T)
    assert not exc.value.transient and words in exc.value.reason


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), None])
def test_timeouts_must_be_positive(bad: Any) -> None:
    with pytest.raises(ValueError, match="dimse timeout"):
        scu.Timeouts(5.0, 5.0, bad)


def test_unknown_host_is_transient() -> None:
    with pytest.raises(scu.AssociationFailed) as exc:
        scu.echo(scu.Peer("X", "no-such-host.invalid", 104), "ITHTEST", T)
    assert exc.value.transient and "cannot resolve" in exc.value.reason


# --- C-STORE ------------------------------------------------------------------------


def test_store_multi_series_study_to_orthanc(tmp_path: Path, pacs: OrthancProcess) -> None:
    ct = dicomgen.make_ct_series(tmp_path / "ct", 6, rows=128, cols=128)
    mr = dicomgen.make_series(
        tmp_path / "mr", 3, modality="MR", rows=64, cols=64, like=ct, series_number=2,
        transfer_syntax=ImplicitVRLittleEndian,
    )  # fmt: skip
    rle = dicomgen.make_ct_series(
        tmp_path / "rle", 2, rows=64, cols=64, like=ct, series_number=3, transfer_syntax=RLELossless
    )
    files = mr.files[:1] + ct.files + rle.files + mr.files[1:]
    seen: list[scu.Outcome] = []
    outcomes = scu.store(peer_of(pacs), "ITHTEST", files, T, seen.append)

    assert [o.path for o in outcomes] == files  # input order, one each
    assert sorted(seen, key=lambda o: files.index(o.path)) == outcomes
    assert all(o.result == "delivered" and o.status == 0 for o in outcomes), outcomes
    want = set(ct.sop_uids) | set(mr.sop_uids) | set(rle.sop_uids)
    assert {o.sop_uid for o in outcomes} == want
    assert pacs.sop_instance_uids(ct.study_uid) == want


def test_store_sends_the_data_set_bytes_unchanged(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 3, rows=256, cols=256)
    rle = dicomgen.make_ct_series(
        tmp_path / "rle", 1, rows=64, cols=64, transfer_syntax=RLELossless
    )
    with tools.StoreSCP(tmp_path / "out", extra=("+xa", "+B")) as scp:  # bit-preserving
        outcomes = scu.store(
            scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", src.files + rle.files, T
        )
        assert all(o.result == "delivered" for o in outcomes), outcomes
        received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in scp.received()}
    for path, uid in zip(src.files + rle.files, src.sop_uids + rle.sop_uids, strict=True):
        assert dataset_bytes(received[uid]) == dataset_bytes(path)


def test_refused_context_is_permanent_and_the_others_are_delivered(tmp_path: Path) -> None:
    explicit = dicomgen.make_ct_series(tmp_path / "e", 2, rows=64, cols=64)
    implicit = dicomgen.make_ct_series(
        tmp_path / "i", 2, rows=64, cols=64, like=explicit, transfer_syntax=ImplicitVRLittleEndian
    )
    rle = dicomgen.make_ct_series(tmp_path / "r", 1, rows=64, cols=64, transfer_syntax=RLELossless)
    files = explicit.files + rle.files + implicit.files
    # +xi: storescp accepts Implicit VR Little Endian only
    with tools.StoreSCP(tmp_path / "out", extra=("+xi",)) as scp:
        outcomes = scu.store(scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", files, T)
        got = {dcmread(p).SOPInstanceUID: p for p in scp.received()}
    by_uid = {o.sop_uid: o for o in outcomes}
    refused = by_uid[rle.sop_uids[0]]
    assert refused.result == "permanent" and refused.status is None
    assert refused.reason == (
        f"presentation context refused (SOP class {CT}, transfer syntax {RLELossless})"
    )
    # the Explicit VR files went over the Implicit VR fallback context, re-encoded
    for uid in explicit.sop_uids + implicit.sop_uids:
        assert by_uid[uid].result == "delivered"
        assert dcmread(got[uid]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    src = dcmread(explicit.files[0])
    assert dcmread(got[explicit.sop_uids[0]]).PixelData == src.PixelData
    assert set(got) == set(explicit.sop_uids + implicit.sop_uids)


def test_every_context_refused_gives_each_file_its_reason(tmp_path: Path) -> None:
    rle = dicomgen.make_ct_series(tmp_path / "r", 2, rows=64, cols=64, transfer_syntax=RLELossless)
    with tools.StoreSCP(tmp_path / "out", extra=("+xi",)) as scp:
        outcomes = scu.store(scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", rle.files, T)
        assert scp.received() == []
    assert [o.result for o in outcomes] == ["permanent", "permanent"]
    assert all(o.reason.startswith("presentation context refused") for o in outcomes)


def test_unreadable_files_are_permanent_and_the_rest_delivered(tmp_path: Path) -> None:
    good = dicomgen.make_ct_series(tmp_path / "ok", 2, rows=64, cols=64)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    missing = tmp_path / "gone.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.files[0].read_bytes()[:200])  # inside the file meta
    link = tmp_path / "link.dcm"
    link.symlink_to(good.files[1])  # never followed (fsio.open_read)
    files = [junk, good.files[0], missing, cut, link, good.files[1]]
    with tools.StoreSCP(tmp_path / "out") as scp:
        outcomes = scu.store(scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", files, T)
    results = [(o.result, o.reason) for o in outcomes]
    assert results[1] == results[5] == ("delivered", "0x0000 Success")
    assert results[0] == ("permanent", "not a DICOM Part 10 file (no DICM prefix)")
    assert results[2] == ("permanent", "cannot read the file: No such file or directory")
    assert results[3] == ("permanent", "the file meta is truncated")
    assert results[4][0] == "permanent" and "cannot read the file" in results[4][1]
    assert [o.path for o in outcomes] == files
    assert all(str(tmp_path) not in o.reason for o in outcomes)


def test_dead_peer_gives_every_file_a_transient_outcome(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 3, rows=64, cols=64)
    seen: list[scu.Outcome] = []
    peer = scu.Peer("ORTHANC", "127.0.0.1", tools.free_port())
    outcomes = scu.store(peer, "ITHTEST", src.files, T, seen.append)
    assert seen == outcomes
    assert all(o.result == "transient" and "connection refused" in o.reason for o in outcomes)
    assert [o.sop_uid for o in outcomes] == src.sop_uids
    assert scu.store(peer, "ITHTEST", [], T) == []  # nothing to send: no association


def test_rejected_association_makes_every_file_permanent(
    tmp_path: Path, pacs: OrthancProcess
) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 2, rows=64, cols=64)
    outcomes = scu.store(peer_of(pacs, "WRONG"), "ITHTEST", src.files, T)
    assert all(o.result == "permanent" and "rejected permanently" in o.reason for o in outcomes)
    assert pacs.instance_count() == 0


class RejectingPeer:
    """A raw TCP peer that answers every association request with one
    A-ASSOCIATE-RJ PDU and closes the connection at once, as Orthanc does.
    pynetdicom can handle the close before the PDU and call it an abort."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.pdu = bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)  # the A-ASSOCIATE-RQ (well under 64 KiB)
                conn.sendall(self.pdu)

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize(
    ("result", "expected", "why"),
    [
        (0x01, "permanent", "Called AE title not recognised"),
        (0x02, "transient", "Application context name not supported"),
    ],
    ids=["rj1", "rj2"],
)
def test_a_rejection_followed_by_a_close_is_read_as_a_rejection_every_time(
    result: int, expected: str, why: str
) -> None:
    """Against Orthanc a wrong called AE title was read about 1 time in 300 as
    an abort (transient) instead of a permanent rejection; the SCU now reads
    the RJ PDU's own result from the bytes received."""
    peer = RejectingPeer(result, 0x01, 0x07 if result == 0x01 else 0x02)
    try:
        seen = []
        for _ in range(150):
            with pytest.raises(scu.AssociationFailed) as err:
                scu.echo(scu.Peer("ANY", "127.0.0.1", peer.port), "ITHTEST", T)
            seen.append(("transient" if err.value.transient else "permanent", err.value.reason))
    finally:
        peer.close()
    assert set(seen) == {
        (expected, f"association rejected {expected}ly by the Service User: {why}")
    }


def test_peer_killed_mid_study_leaves_the_rest_transient_then_resumes(
    tmp_path: Path, pacs: OrthancProcess
) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 12, rows=256, cols=256)
    delivered_before_kill = 4

    def kill_after_some(outcome: scu.Outcome) -> None:
        if (
            outcome.result == "delivered"
            and outcome.sop_uid == src.sop_uids[delivered_before_kill - 1]
        ):
            assert pacs.proc is not None
            pacs.proc.kill()  # SIGKILL: no goodbye on the association
            pacs.proc.wait(20)

    outcomes = scu.store(peer_of(pacs), "ITHTEST", src.files, T, kill_after_some)
    results = [o.result for o in outcomes]
    assert results[:delivered_before_kill] == ["delivered"] * delivered_before_kill
    rest = outcomes[delivered_before_kill:]
    assert all(o.result == "transient" and o.reason.startswith("association aborted") for o in rest)
    assert all(o.reason == "association aborted" for o in rest[1:])

    pacs.start()  # same storage: resume with the ones not delivered
    again = scu.store(peer_of(pacs), "ITHTEST", [o.path for o in rest if o.path], T)
    assert all(o.result == "delivered" for o in again)
    assert pacs.sop_instance_uids(src.study_uid) == set(src.sop_uids)


class PySCP:
    """An in-process pynetdicom Storage SCP that answers each instance with a
    chosen status (or stalls), keeps the data set bytes it got, and has a
    small maximum PDU so that our fragmentation is exercised."""

    def __init__(self, answer: Callable[[str], Any], max_pdu: int = 4096) -> None:
        self.answer = answer
        self.got: dict[str, bytes] = {}
        ae = AE(ae_title="PYSCP")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae = ae
        self.port = tools.free_port()
        self.server: Any = None

    def _handle(self, event: Any) -> Any:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.got[uid] = event.request.DataSet.getvalue()
        return self.answer(uid)

    def __enter__(self) -> PySCP:
        handlers = [(evt.EVT_C_STORE, self._handle)]
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @property
    def peer(self) -> scu.Peer:
        return scu.Peer("PYSCP", "127.0.0.1", self.port)


def test_each_status_is_classified_as_the_peer_answered(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 5, rows=64, cols=64)
    failure = Dataset()
    failure.Status = 0xC001
    failure.ErrorComment = "cannot parse"
    answers: dict[str, Any] = dict(
        zip(src.sop_uids, [0x0000, 0xB000, 0xA700, failure, 0x0122], strict=True)
    )
    with PySCP(answers.__getitem__) as peer:
        outcomes = scu.store(peer.peer, "ITHTEST", src.files, T)
        got = dict(peer.got)
    assert [(o.result, o.status) for o in outcomes] == [
        ("delivered", 0x0000),
        ("delivered", 0xB000),
        ("transient", 0xA700),
        ("permanent", 0xC001),
        ("permanent", 0x0122),
    ]
    assert outcomes[1].warning == "0xB000 Coercion of data elements"
    assert outcomes[0].warning == "" and outcomes[2].warning == ""
    for path, uid in zip(src.files, src.sop_uids, strict=True):  # through 4 kB PDUs
        assert got[uid] == dataset_bytes(path)


def test_no_response_within_dimse_timeout_aborts_and_leaves_the_rest_transient(
    tmp_path: Path,
) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 3, rows=64, cols=64)

    def slow(uid: str) -> int:
        time.sleep(3 if uid == src.sop_uids[1] else 0)
        return 0

    with PySCP(slow) as peer:
        outcomes = scu.store(peer.peer, "ITHTEST", src.files, scu.Timeouts(5, 5, 1))
    assert [o.result for o in outcomes] == ["delivered", "transient", "transient"]
    assert outcomes[1].reason == "no C-STORE response within 1 s"
    assert outcomes[2].reason == "association aborted"


def test_peer_with_a_tiny_maximum_pdu_is_refused_permanently(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 2, rows=16, cols=16)
    with PySCP(lambda uid: 0, max_pdu=512) as peer:
        outcomes = scu.store(peer.peer, "ITHTEST", src.files, T)
        assert peer.got == {}
    assert all(o.result == "permanent" and "512 is below 1024" in o.reason for o in outcomes)


def test_a_file_replaced_during_the_send_is_transient(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 3, rows=16, cols=16)
    other = dicomgen.make_instance(tmp_path / "other", rows=16, cols=16)

    def replace_the_next(outcome: scu.Outcome) -> None:
        if outcome.sop_uid == src.sop_uids[0]:
            src.files[1].write_bytes(other.files[0].read_bytes())

    with PySCP(lambda uid: 0) as peer:
        outcomes = scu.store(peer.peer, "ITHTEST", src.files, T, replace_the_next)
    assert [o.result for o in outcomes] == ["delivered", "transient", "delivered"]
    assert outcomes[1].reason == "the file changed during the send"


def test_more_pairs_than_128_contexts_use_several_associations(tmp_path: Path) -> None:
    # 70 SOP classes x Explicit VR (+ the Implicit VR fallback) = 140 contexts
    src = dicomgen.make_ct_series(tmp_path / "src", 70, rows=16, cols=16)
    for n, path in enumerate(src.files):
        ds = dcmread(path)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = f"1.2.826.0.1.3680043.10.1.{n}"
        ds.save_as(path)
    classes = {f"1.2.826.0.1.3680043.10.1.{n}" for n in range(70)}
    profile = ("-xf", str(write_profile(tmp_path, classes)), "Any")
    with tools.StoreSCP(tmp_path / "out", extra=profile) as scp:
        outcomes = scu.store(scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", src.files, T)
        assert len(scp.received()) == 70
        assert scp.log_text().count("Association Received") == 2
    assert all(o.result == "delivered" for o in outcomes), outcomes[:3]


def write_profile(tmp_path: Path, classes: set[str]) -> Path:
    """A storescp association configuration accepting ``classes`` in Explicit
    and Implicit VR Little Endian (DCMTK's storescp.cfg format)."""
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += ["TransferSyntax1 = 1.2.840.10008.1.2.1", "TransferSyntax2 = 1.2.840.10008.1.2"]
    lines += ["[[PresentationContexts]]", "[Any]"]
    lines += [
        f"PresentationContext{n} = {uid}\\Uncompressed" for n, uid in enumerate(sorted(classes), 1)
    ]
    lines += [
        "[[Profiles]]",
        "[Any]",
        "PresentationContexts = Any",
        "TransferSyntaxes = Uncompressed",
    ]
    path = tmp_path / "storescp.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_store_logs_no_phi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 2, rows=64, cols=64)
    caplog.set_level(logging.DEBUG)
    with PySCP(lambda uid: 0xA700) as peer:
        scu.store(peer.peer, "ITHTEST", src.files, T)
    scu.store(scu.Peer("X", "127.0.0.1", tools.free_port()), "ITHTEST", src.files, T)
    assert "transient" in caplog.text
    for marker in src.markers() | {src.patient_name, src.patient_id, src.study_uid}:
        assert marker not in caplog.text


# --- the status table ---------------------------------------------------------------


def test_classify_is_the_shared_status_table() -> None:
    """One table for C-STORE and STOW-RS (its rows: tests/test_dicom_status.py)."""
    assert scu.classify is status.classify
    assert scu.classify(0xA700)[0] == "transient" and scu.classify(0xC000)[0] == "permanent"


# --- C-MOVE ---------------------------------------------------------------------------


def test_move_study_from_orthanc_to_storescp(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 4, rows=64, cols=64)
    other = dicomgen.make_ct_series(tmp_path / "other", 2, rows=64, cols=64)  # another study
    with tools.StoreSCP(tmp_path / "out", aet="DESTAE") as dest:
        modalities = {"DEST": ("DESTAE", "127.0.0.1", dest.port), "ME": ("ITHTEST", "127.0.0.1", 1)}
        with OrthancProcess(tmp_path / "orthanc", modalities=modalities) as source:
            for path in src.files + other.files:
                source.upload(path)
            peer = peer_of(source)
            result = move_mod.move(peer, "ITHTEST", src.study_uid, "DESTAE", T)
            assert (result.completed, result.failed, result.status, result.ok) == (4, 0, 0, True)
            arrived = {dcmread(p).SOPInstanceUID for p in dest.received()}
            assert arrived == set(src.sop_uids)

            unknown = move_mod.move(peer, "ITHTEST", src.study_uid, "NOSUCHAE", T)
            assert not unknown.ok and unknown.completed == 0
            assert unknown.reason == move_mod.describe(unknown.status)
            assert unknown.status != 0

            with pytest.raises(scu.ScuError, match="invalid Study Instance UID"):
                move_mod.move(peer, "ITHTEST", "1.2.x", "DESTAE", T)

            with pytest.raises(scu.AssociationFailed) as stranger:  # a calling AE it does not know
                move_mod.move(peer, "STRANGER", src.study_uid, "DESTAE", T)
            assert "aborted" in stranger.value.reason


# --- the wire ------------------------------------------------------------------------


def test_store_command_matches_pynetdicom_encoding() -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    for sop in ("1.2.3.4", "1.2.840.113619.2.55.3.604688119.971.1.100000000000001"):
        req = C_STORE()
        req.MessageID, req.Priority = 7, 0
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CT, sop
        req._dataset_path = (Path("x"), 0)  # a data set follows
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assert scu_wire.store_command(7, CT, sop) == encode(msg.command_set, True, True)


def test_parse_store_response_takes_only_whole_valid_responses() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 9, 0xB007
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CT, "1.2.3"
    rsp.ErrorComment = "a comment"
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 16384))
    pdv = pdata.presentation_data_value_list[0][1]
    assert scu_wire.parse_store_response(pdv) == (9, 0xB007)
    assert scu_wire.parse_store_response(b"\x01" + pdv[1:]) is None  # not the last fragment
    assert scu_wire.parse_store_response(pdv[:-3]) is None  # truncated
    assert scu_wire.parse_store_response(pdv + pdv[1:13]) is None  # an element twice
    assert scu_wire.parse_store_response(pdv.replace(b"\x01\x80", b"\x01\x00", 1)) is None  # an RQ


def test_send_message_frames_within_the_peer_maximum(tmp_path: Path) -> None:
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu import P_DATA_TF

    src = dicomgen.make_ct_series(tmp_path / "src", 1, rows=64, cols=64)
    path = src.files[0]
    sent = bytearray()
    with open(path, "rb") as fh:
        meta = scu_wire.read_meta(fh)
        command = scu_wire.store_command(3, meta.sop_class, meta.sop_instance)
        scu_wire.send_message(sent.extend, 5, 1024, command, fh, meta.size - meta.offset)
    message = DIMSEMessage()
    pos, done = 0, False
    while pos < len(sent):
        assert sent[pos] == 0x04 and not done
        length = int.from_bytes(sent[pos + 2 : pos + 6], "big")
        assert length <= 1024
        pdu = P_DATA_TF()
        pdu.decode(bytes(sent[pos : pos + 6 + length]))
        done = message.decode_msg(pdu.to_primitive())
        pos += 6 + length
    assert done
    assert message.command_set.AffectedSOPInstanceUID == src.sop_uids[0]
    assert message.data_set.getvalue() == dataset_bytes(path)
    with open(path, "rb") as fh, pytest.raises(scu_wire.WireError, match="maximum PDU length"):
        scu_wire.send_message(sent.extend, 5, 100, command, fh, 10)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b[:100], "no DICM prefix"),
        (lambda b: b[:132] + b"\x02\x00\x01\x00" + b[136:], "no group length"),
        (lambda b: b[:140] + (10**6).to_bytes(4, "little") + b[144:], "implausible"),
        (lambda b: b[:150], "truncated"),
    ],
)
def test_read_meta_refuses_broken_files(
    tmp_path: Path, mangle: Callable[[bytes], bytes], reason: str
) -> None:
    src = dicomgen.make_instance(tmp_path / "src")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(mangle(src.files[0].read_bytes()))
    with open(bad, "rb") as fh, pytest.raises(scu_wire.WireError, match=reason):
        scu_wire.read_meta(fh)


def test_read_meta_refuses_an_invalid_uid(tmp_path: Path) -> None:
    src = dicomgen.make_instance(tmp_path / "src")
    raw = src.files[0].read_bytes()
    uid = src.sop_uids[0].encode()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw.replace(uid, b"1.2.A" + uid[5:], 1))  # same length, in the meta
    with open(bad, "rb") as fh, pytest.raises(scu_wire.WireError, match="invalid sop instance"):
        scu_wire.read_meta(fh)


def test_store_is_interrupted_by_on_outcome_and_aborts(tmp_path: Path) -> None:
    src = dicomgen.make_ct_series(tmp_path / "src", 3, rows=64, cols=64)

    class Stop(Exception):
        pass

    def stop(outcome: scu.Outcome) -> None:
        raise Stop

    with tools.StoreSCP(tmp_path / "out") as scp:
        with pytest.raises(Stop):
            scu.store(scu.Peer(scp.aet, "127.0.0.1", scp.port), "ITHTEST", src.files, T, stop)
        assert len(scp.received()) == 1
    deadline = time.monotonic() + 10  # the aborted association's threads end
    while association_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert association_threads() == []


def association_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if type(t).__name__ in ("Association", "DULServiceProvider") and t.is_alive()
    ]
