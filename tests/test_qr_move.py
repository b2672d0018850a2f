"""C-MOVE SCP (issue 9) against a real proxy: DCMTK movescu (and a pynetdicom
SCU, for every status and count) asks it to send stored studies to its
[node:NAME] peers, a DCMTK storescp and a real Orthanc.

Every instance arrives byte for byte after its file meta; an unknown
destination is 0xA801 and no connection is opened; a destination that is
down fails every sub-operation (0xA702) within the [scu] timeouts; a caller
that may not move gets 0x0124."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import pytest

import tools
from forward_e2e import SLOW_LUA
from orthanc import OrthancProcess
from qr_retrieve_site import (
    PATIENT_MOVE,
    STUDY_MOVE,
    Stored,
    dataset_bytes,
    movescu,
    received_files,
    retrieve,
    small_study,
    store_study,
)


def _node(name: str, ae_title: str, port: int, extra: str = "") -> str:
    return (
        f"\n[node:{name}]\nkind = dicom\nae_title = {ae_title}\nhost = 127.0.0.1\n"
        f"port = {port}\n{extra}"
    )


class Site:
    def __init__(self, proxy: tools.ProxyProcess, scp: tools.StoreSCP, listener: socket.socket):
        self.proxy, self.scp, self.listener = proxy, scp, listener


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """An Orthanc that takes ~0.1 s per received instance."""
    workdir = tmp_path_factory.mktemp("slow")
    script = workdir / "slow.lua"
    script.write_text(SLOW_LUA)
    with OrthancProcess(workdir, aet="SLOW", extra={"LuaScripts": [str(script)]}) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancProcess, slow: OrthancProcess
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("qr_move")
    listener = _listening()
    silent = _listening()  # the kernel completes the TCP handshake; nothing ever answers
    dead = tools.free_port()  # nothing listens there
    own = tools.free_port()  # the proxy's DICOM port
    with tools.StoreSCP(tmp / "scp", extra=("+xa", "+B")) as scp:
        ini = (
            "[scheduler]\nstudy_timeout = 1\n"
            "[scu]\nconnect_timeout = 3\nacse_timeout = 5\ndimse_timeout = 10\n"
            "[qr]\nallow_move = MOVER, nodes\n"
            + _node("scp", scp.aet, scp.port)
            + _node("pacs", orthanc.aet, orthanc.dicom_port)
            + _node("slow", slow.aet, slow.dicom_port)
            + _node("dead", "DEAD", dead)
            + _node("listener", "LISTENER", listener.getsockname()[1])
            + _node("silent", "SILENT", silent.getsockname()[1])
            + _node("nomove", "NOMOVE", dead, "allow_move = false\n")
            + _node("self", "DICOMRCV", own)  # the proxy itself, by mistake
        )
        with tools.ProxyProcess(tmp / "p", config_text=ini, dicom_port=own) as proxy:
            yield Site(proxy, scp, listener)
    listener.close()
    silent.close()


@pytest.fixture(scope="module")
def big(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return store_study(site.proxy, small_study(tmp_path_factory.mktemp("big"), 200))


@pytest.fixture(scope="module")
def three(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return store_study(site.proxy, small_study(tmp_path_factory.mktemp("three"), 3))


def test_a_200_instance_study_moves_to_storescp_byte_identical(site: Site, big: Stored) -> None:
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={big.study}"]
    result = movescu(site.proxy.dicom_port, site.scp.aet, keys)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr  # movescu -v prints no counts (see the Orthanc test)
    assert "Received Final Move Response (Success)" in output
    assert output.count("(Pending)") == 199
    got = received_files(site.scp.out_dir)
    assert set(big.files) <= set(got)
    different = [u for u in big.files if dataset_bytes(got[u]) != dataset_bytes(big.files[u])]
    assert different == []


def test_a_200_instance_study_moves_to_orthanc_byte_identical(
    site: Site, big: Stored, orthanc: OrthancProcess
) -> None:
    got = retrieve(
        site.proxy.dicom_port,
        STUDY_MOVE,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": big.study},
        calling_ae="MOVER",
        move_to=orthanc.aet,
    )
    assert got.final == 0x0000 and got.counts[-1] == (None, 200, 0, 0)
    # a pending response after each sub-operation but the last, counts adding up
    assert got.statuses[:-1] == [0xFF00] * 199
    assert [c[0] for c in got.counts[:-1]] == list(range(199, 0, -1))
    assert all(r + c + f + w == 200 for r, c, f, w in got.counts[:-1] if r is not None)
    query = {"Level": "Instance", "Expand": True, "Query": {"StudyInstanceUID": big.study}}
    found = orthanc.post("/tools/find", json.dumps(query).encode())
    held = {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in found}
    assert set(held) == set(big.files)
    for uid, orthanc_id in held.items():
        url = f"{orthanc.base_url}/instances/{orthanc_id}/file"
        with urllib.request.urlopen(url, timeout=30) as resp:
            copy = site.proxy.workdir / "orthanc-copy.dcm"
            copy.write_bytes(resp.read())
        assert dataset_bytes(copy) == dataset_bytes(big.files[uid]), uid


def test_patient_root_levels_by_movescu(site: Site, three: Stored) -> None:
    uids = sorted(three.files)
    keys = {
        "PATIENT": ["QueryRetrieveLevel=PATIENT", f"PatientID={three.patient_id}"],
        "IMAGE": [
            "QueryRetrieveLevel=IMAGE",
            f"PatientID={three.patient_id}",
            f"StudyInstanceUID={three.study}",
            f"SeriesInstanceUID={three.series}",
            f"SOPInstanceUID={uids[1]}",
        ],
    }
    for level, expected in (("PATIENT", 3), ("IMAGE", 1)):
        result = movescu(site.proxy.dicom_port, site.scp.aet, keys[level], model="-P")
        assert result.returncode == 0, result.stdout + result.stderr
        output = result.stdout + result.stderr
        assert "Received Final Move Response (Success)" in output, level
        assert output.count("(Pending)") == expected - 1, level
    assert set(three.files) <= set(received_files(site.scp.out_dir))


def test_an_unknown_destination_is_a801_and_no_connection_is_opened(
    site: Site, three: Stored
) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study}
    got = retrieve(
        site.proxy.dicom_port, STUDY_MOVE, identifier, calling_ae="MOVER", move_to="NOBODY"
    )
    assert got.statuses == [0xA801] and got.counts == [(None, 0, 0, 0)]
    # the answer came after the lookup: any connection would be waiting by now
    with pytest.raises(BlockingIOError):
        site.listener.accept()
    # the same through DCMTK movescu
    result = movescu(
        site.proxy.dicom_port,
        "nobody",
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={three.study}"],
    )
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in result.stderr
    with pytest.raises(BlockingIOError):
        site.listener.accept()


def test_the_proxy_itself_is_no_move_destination(site: Site, three: Stored) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study}
    held = len(list((site.proxy.spool / "studies").glob("*/*/*.dcm")))
    got = retrieve(
        site.proxy.dicom_port, STUDY_MOVE, identifier, calling_ae="MOVER", move_to="DICOMRCV"
    )
    assert got.statuses == [0xA801]
    assert "move destination is this proxy's own AE title" in site.proxy.stderr_text()
    assert not any((site.proxy.spool / "incoming").iterdir())
    assert len(list((site.proxy.spool / "studies").glob("*/*/*.dcm"))) == held


def test_a_destination_that_is_down_fails_every_sub_operation(site: Site, three: Stored) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study}
    got = retrieve(
        site.proxy.dicom_port, STUDY_MOVE, identifier, calling_ae="MOVER", move_to="DEAD"
    )
    assert got.final == 0xA702 and got.counts[-1] == (None, 0, 3, 0)
    assert sorted(got.failed_uids) == sorted(three.files)
    log = site.proxy.stderr_text()
    for uid in three.files:
        assert f"C-MOVE sub-operation for {uid} failed: connection refused" in log


def test_a_caller_that_may_not_move_gets_0124(site: Site, three: Stored) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study}
    for caller in ("NOMOVE", "STRANGER"):  # a node's allow_move = false; neither listed nor a node
        got = retrieve(
            site.proxy.dicom_port, STUDY_MOVE, identifier, calling_ae=caller, move_to="STORESCP"
        )
        assert got.statuses == [0x0124], caller
    # a node may move ([qr] allow_move = MOVER, nodes): the storescp node asks for itself
    got = retrieve(
        site.proxy.dicom_port,
        PATIENT_MOVE,
        {"QueryRetrieveLevel": "PATIENT", "PatientID": three.patient_id},
        calling_ae=site.scp.aet,
        move_to=site.scp.aet,
    )
    assert got.final == 0x0000 and got.counts[-1] == (None, 3, 0, 0)


def test_a_destination_that_never_answers_fails_within_the_acse_timeout(
    site: Site, three: Stored
) -> None:
    identifier = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": three.series}
    got = retrieve(
        site.proxy.dicom_port, STUDY_MOVE, identifier, calling_ae="MOVER", move_to="SILENT"
    )
    assert got.final == 0xA702 and got.counts[-1] == (None, 0, 3, 0)
    # [scu] acse_timeout = 5 bounds the wait for the association answer
    assert "failed: no answer to the association request within 5 s" in site.proxy.stderr_text()


def test_c_cancel_stops_a_move_with_fe00(site: Site, big: Stored, slow: OrthancProcess) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": big.study}
    got = retrieve(
        site.proxy.dicom_port,
        STUDY_MOVE,
        identifier,
        calling_ae="MOVER",
        move_to=slow.aet,
        cancel_after=1,
    )
    # ~0.1 s per instance at the destination: the cancel arrives long before the 200th
    assert got.final == 0xFE00
    remaining, completed, failed, warning = got.counts[-1]
    assert remaining is not None and remaining > 0
    assert remaining + completed + failed + warning == 200
    assert slow.instance_count() < 200
