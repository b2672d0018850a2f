"""C-GET SCP (issue 9) against a real proxy: studies sent by storescu and
indexed, then retrieved by DCMTK getscu and by a pynetdicom SCU.

Every stored instance comes back byte for byte after its file meta; levels
and unique key lists of both models; identifier errors; the Implicit <->
Explicit VR Little Endian conversion; failed sub-operations (0xB000, 0xA702)
with their Failed SOP Instance UID List and logged reason; purged studies;
Q/R access refusals (0x0124)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

import tools
from ith_proxy.store.catalog import Catalog
from qr_retrieve_site import (
    EXPLICIT,
    IMPLICIT,
    PATIENT_GET,
    STUDY_GET,
    Stored,
    dataset_bytes,
    final_counts,
    getscu,
    received_files,
    retrieve,
    small_study,
    store_study,
)

INI = """
[scheduler]
study_timeout = 1
[scp]
transfer_syntaxes = rle
[node:noget]
kind = dicom
ae_title = NOGET
host = 127.0.0.1
port = 9
allow_get = false
"""


class Site:
    def __init__(self, proxy: tools.ProxyProcess, tmp: Path) -> None:
        self.proxy, self.tmp = proxy, tmp

    def study(self, n: int, name: str, extra: tuple[str, ...] = (), **kwargs: object) -> Stored:
        return store_study(self.proxy, small_study(self.tmp / name, n, **kwargs), extra)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("qr_get")
    with tools.ProxyProcess(tmp / "p", config_text=INI) as proxy:
        yield Site(proxy, tmp)


@pytest.fixture(scope="module")
def four(site: Site) -> Stored:
    return site.study(4, "four")


def test_a_200_instance_study_comes_back_byte_identical(site: Site, tmp_path: Path) -> None:
    big = site.study(200, "big")
    out = tmp_path / "got"
    result = getscu(
        site.proxy.dicom_port,
        out,
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={big.study}"],
        extra=["+B"],  # getscu writes what it received, as received
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_counts(result.stdout + result.stderr) == {
        "remaining": 0,
        "completed": 200,
        "failed": 0,
        "warning": 0,
    }
    got = received_files(out)
    assert set(got) == set(big.files)
    different = [
        uid for uid, path in got.items() if dataset_bytes(path) != dataset_bytes(big.files[uid])
    ]
    assert different == []


def test_patient_root_levels_by_getscu(site: Site, four: Stored, tmp_path: Path) -> None:
    uids = sorted(four.files)
    cases = {
        "patient": ["QueryRetrieveLevel=PATIENT", f"PatientID={four.patient_id}"],
        "study": [
            "QueryRetrieveLevel=STUDY",
            f"PatientID={four.patient_id}",
            f"StudyInstanceUID={four.study}",
        ],
        "series": [
            "QueryRetrieveLevel=SERIES",
            f"PatientID={four.patient_id}",
            f"StudyInstanceUID={four.study}",
            f"SeriesInstanceUID={four.series}",
        ],
        "image": [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={four.study}",
            f"SeriesInstanceUID={four.series}",
            f"SOPInstanceUID={uids[0]}\\{uids[2]}",
        ],
    }
    for name, keys in cases.items():
        result = getscu(site.proxy.dicom_port, tmp_path / name, keys, model="-P")
        assert result.returncode == 0, result.stdout + result.stderr
        expected = {uids[0], uids[2]} if name == "image" else set(uids)
        assert set(received_files(tmp_path / name)) == expected, name


def test_study_root_levels_lists_and_pending_counts(site: Site, four: Stored) -> None:
    port = site.proxy.dicom_port
    other = site.study(2, "other")
    both = retrieve(
        port,
        STUDY_GET,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": [four.study, other.study]},
    )
    assert both.final == 0x0000 and len(both.received) == 6
    # one pending response per sub-operation but the last, counts adding up
    assert both.statuses[:-1] == [0xFF00] * 5
    for k, (remaining, completed, failed, warning) in enumerate(both.counts[:-1]):
        assert (remaining, completed, failed, warning) == (5 - k, k + 1, 0, 0)
    assert both.counts[-1] == (None, 6, 0, 0)

    series = retrieve(
        port,
        STUDY_GET,
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": four.study,
            "SeriesInstanceUID": four.series,
        },
    )
    assert series.final == 0x0000 and len(series.received) == 4
    # a key above the level that does not fit: nothing matches, success with no sub-operation
    wrong = retrieve(
        port,
        STUDY_GET,
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": other.study,
            "SeriesInstanceUID": four.series,
        },
    )
    assert wrong.statuses == [0x0000] and wrong.counts == [(None, 0, 0, 0)]
    unknown = retrieve(
        port, STUDY_GET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4"}
    )
    assert unknown.statuses == [0x0000] and not unknown.received


@pytest.mark.parametrize(
    ("model", "identifier", "status"),
    [
        (STUDY_GET, {"QueryRetrieveLevel": "PATIENT", "PatientID": "X"}, 0xA900),
        (PATIENT_GET, {"QueryRetrieveLevel": "STUDY"}, 0xA900),  # no unique key
        (STUDY_GET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, 0xA900),
        (STUDY_GET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, 0xA900),
        (STUDY_GET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "../../etc"}, 0xA900),
        (STUDY_GET, {"QueryRetrieveLevel": "WORLD", "StudyInstanceUID": "1.2"}, 0xA900),
        (STUDY_GET, {"StudyInstanceUID": "1.2"}, 0xA900),  # no level
        (
            STUDY_GET,
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": ["1.2", "1.3"],
                "SeriesInstanceUID": "1.4",
            },
            0xA900,
        ),  # a list above the retrieve level
        (PATIENT_GET, {"QueryRetrieveLevel": "PATIENT", "PatientID": "*"}, 0xA900),
        (
            STUDY_GET,
            {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": [f"1.2.{n}" for n in range(10001)]},
            0xC000,
        ),  # more keys than MAX_KEYS
    ],
)
def test_identifier_errors_are_failure_statuses(
    site: Site, model: str, identifier: dict, status: int
) -> None:
    got = retrieve(site.proxy.dicom_port, model, identifier)
    assert got.statuses == [status] and not got.received
    assert site.proxy.running


def test_explicit_is_converted_for_a_requester_that_takes_implicit_only(
    site: Site, four: Stored
) -> None:
    # (DCMTK 3.6.7 getscu +xi still proposes Explicit VR LE: pynetdicom is the peer here)
    for path in four.files.values():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == EXPLICIT
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": four.study}
    got = retrieve(site.proxy.dicom_port, STUDY_GET, identifier, storage_ts=(IMPLICIT,))
    assert got.final == 0x0000 and got.counts[-1] == (None, 4, 0, 0)
    assert {str(ds.SOPInstanceUID) for ds in got.received} == set(four.files)
    for ds in got.received:
        stored = dcmread(four.files[str(ds.SOPInstanceUID)])
        assert ds.file_meta.TransferSyntaxUID == IMPLICIT
        assert ds == stored  # every element, pixels included
        assert ds.PixelData == stored.PixelData


def test_implicit_is_converted_for_getscu_that_takes_explicit(site: Site, tmp_path: Path) -> None:
    # storescu -xi: the study is stored in Implicit VR LE, as sent
    implicit = site.study(3, "implicit", extra=("-xi",), transfer_syntax=IMPLICIT)
    for path in implicit.files.values():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == IMPLICIT
    out = tmp_path / "explicit"
    keys = ["QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={implicit.series}"]
    # getscu proposes Explicit VR LE only (see above); +B: it writes what it received
    result = getscu(site.proxy.dicom_port, out, keys, extra=["+xi", "+B"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_counts(result.stdout + result.stderr)["completed"] == 3
    got = received_files(out)
    assert set(got) == set(implicit.files)
    for uid, path in got.items():
        received, stored = dcmread(path), dcmread(implicit.files[uid])
        assert received.file_meta.TransferSyntaxUID == EXPLICIT
        assert received == stored
        assert received.PixelData == stored.PixelData


def test_a_syntax_that_cannot_be_converted_fails_each_sub_operation_with_a_reason(
    site: Site, tmp_path: Path
) -> None:
    # -xr: storescu proposes RLE (stored as received, [scp] transfer_syntaxes)
    rle = site.study(2, "rle", extra=("-xr",), transfer_syntax="1.2.840.10008.1.2.5")
    got = retrieve(
        site.proxy.dicom_port,
        STUDY_GET,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": rle.study},
    )
    assert got.final == 0xA702 and not got.received
    assert got.counts[-1] == (None, 0, 2, 0)
    assert sorted(got.failed_uids) == sorted(rle.files)
    log = site.proxy.stderr_text()
    for uid in rle.files:
        assert f"C-GET sub-operation for {uid} failed: the requester accepted no context" in log


def test_a_missing_file_fails_its_sub_operation_only(site: Site) -> None:
    three = site.study(3, "three")
    gone = sorted(three.files)[1]
    three.files[gone].unlink()
    got = retrieve(
        site.proxy.dicom_port,
        STUDY_GET,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study},
    )
    assert got.final == 0xB000
    assert got.counts[-1] == (None, 2, 1, 0)
    assert got.failed_uids == [gone]
    assert {str(ds.SOPInstanceUID) for ds in got.received} == set(three.files) - {gone}
    assert (
        f"C-GET sub-operation for {gone} failed: cannot open the stored file"
        in site.proxy.stderr_text()
    )

    for path in three.files.values():
        path.unlink(missing_ok=True)
    none = retrieve(
        site.proxy.dicom_port,
        STUDY_GET,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": three.study},
    )
    assert none.final == 0xA702 and none.counts[-1] == (None, 0, 3, 0)
    assert sorted(none.failed_uids) == sorted(three.files)


def test_a_purged_study_is_not_served(site: Site) -> None:
    purged = site.study(2, "purged")
    cat = Catalog(site.proxy.spool / "catalog.sqlite3")
    try:
        with cat.conn:  # what retention leaves: rows marked purged (the files stay here)
            now = time.time()
            cat.conn.execute(
                "UPDATE studies SET purged_at = ? WHERE study_uid = ?", (now, purged.study)
            )
            cat.conn.execute(
                "UPDATE instances SET purged_at = ? WHERE study_uid = ?", (now, purged.study)
            )
    finally:
        cat.close()
    for level, key, value in (
        ("STUDY", "StudyInstanceUID", purged.study),
        ("IMAGE", "SOPInstanceUID", sorted(purged.files)),
    ):
        got = retrieve(site.proxy.dicom_port, STUDY_GET, {"QueryRetrieveLevel": level, key: value})
        assert got.statuses == [0x0000] and got.counts == [(None, 0, 0, 0)] and not got.received


def test_access_control_refuses_with_0124(site: Site, four: Stored, tmp_path: Path) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": four.study}
    refused = retrieve(site.proxy.dicom_port, STUDY_GET, identifier, calling_ae="NOGET")
    assert refused.statuses == [0x0124] and not refused.received
    assert "C-GET from NOGET refused (0x0124)" in site.proxy.stderr_text()
    allowed = retrieve(site.proxy.dicom_port, STUDY_GET, identifier, calling_ae="SOMEONE")
    assert allowed.final == 0x0000 and len(allowed.received) == 4


def test_c_cancel_stops_the_sub_operations_with_fe00(site: Site) -> None:
    twenty = site.study(20, "twenty")
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": twenty.study}
    got = retrieve(site.proxy.dicom_port, STUDY_GET, identifier, cancel_after=3)
    # the C-CANCEL reached the proxy before the third C-STORE response: no fourth
    assert got.final == 0xFE00 and len(got.received) == 3
    assert got.counts[-1] == (17, 3, 0, 0)
    assert "cancelled after 3" in site.proxy.stderr_text()


def test_another_pynetdicom_is_refused() -> None:
    from ith_proxy.dicom import get_stream

    get_stream.check_library()  # the installed, pinned one
    with pytest.raises(get_stream.LibraryMismatch, match=r"3\.0\.5 is installed"):
        get_stream.check_library("3.0.5")


def test_access_rules_from_the_ini(tmp_path: Path) -> None:
    from ith_proxy.config import ConfigError, load
    from ith_proxy.dicom.qr_access import allowed

    def cfg(text: str):  # type: ignore[no-untyped-def]  # returns config.QrConfig, imported above
        ini = tmp_path / "proxy.ini"
        ini.write_text(text)
        return load(str(ini), env={}, cwd=tmp_path).qr

    node = "[node:pacs]\nkind = dicom\nae_title = PACS\nhost = h\nport = 104\n"
    default = cfg("")
    nodes = {"PACS"}.__contains__
    assert allowed(default, "find", "ANYONE", nodes) and allowed(default, "get", "ANYONE", nodes)
    assert not allowed(default, "move", "ANYONE", nodes) and allowed(default, "move", "PACS", nodes)

    listed = cfg(
        "[qr]\nallow_get = VIEWER, nodes\nallow_find = none\n" + node + "allow_find = true\n"
    )
    assert allowed(listed, "get", "VIEWER", nodes) and allowed(listed, "get", "PACS", nodes)
    assert not allowed(listed, "get", "OTHER", nodes)
    assert allowed(listed, "find", "PACS", nodes) and not allowed(listed, "find", "VIEWER", nodes)

    refused = cfg(node + "allow_get = no\n")
    assert not allowed(refused, "get", "PACS", nodes) and allowed(refused, "get", "X", nodes)

    for bad in (
        "[qr]\nallow_move = any, PACS\n",
        "[qr]\nallow_get =\n",
        "[qr]\nallow_find = WAY_TOO_LONG_AE_TITLE\n",
        node + "allow_move = maybe\n",
        "[node:web]\nkind = dicomweb\nurl = https://x.org/dicom-web\nallow_get = true\n",
        "[qr]\nallow_delete = any\n",
    ):
        with pytest.raises(ConfigError):
            cfg(bad)
