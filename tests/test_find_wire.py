"""dicom/find_wire: the hand-encoded C-FIND answers are byte for byte what
pydicom (through pynetdicom's ``encode``) makes of the same answer as a
Dataset (dicom/qr._answer), in Implicit and Explicit VR Little Endian, with
values of every kind the catalog holds: None, numbers, odd lengths, UIDs,
backslash lists, non-ASCII text, and empty return keys of other VRs
(sequences, binary VRs).  The fragments of an answer larger than the peer's
maximum PDU are reassembled to the same bytes.  End to end (real sockets,
findscu, both profiles) is tests/test_qr_find.py."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from ith_proxy import config
from ith_proxy.dicom import find_wire, qr, qr_match

STUDY_ROOT = qr_match.STUDY_ROOT_FIND
STUDY_UID = "1.2.826.0.1.3680043.10.7777.1.42"  # odd length: padded with NUL

# values per keyword, as the catalog's rows give them
VALUES = {
    "PatientName": "Müller^Jürgen",  # non-ASCII: UTF-8 and ISO_IR 192
    "PatientID": "ITH-0042",
    "PatientBirthDate": None,
    "PatientSex": "O",
    "StudyDate": "20200211",
    "StudyTime": "101530.5",  # odd length: padded with a space
    "AccessionNumber": None,
    "StudyID": "7",
    "StudyDescription": "CT THORAX",
    "ReferringPhysicianName": "",
    "ModalitiesInStudy": "CT\\MR",  # a list, as group_concat gives it
    "NumberOfStudyRelatedSeries": 2,  # a count: an int
    "NumberOfStudyRelatedInstances": 201,
    "StudyInstanceUID": STUDY_UID,
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> config.Config:
    return config.load(env={}, cwd=tmp_path_factory.mktemp("cfg"))


def _query(**asked: object) -> qr_match.Query:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in asked.items():
        setattr(ds, keyword, value)
    return qr_match.parse(ds, STUDY_ROOT)


def _row(query: qr_match.Query, values: dict) -> tuple:
    return (STUDY_UID, *tuple(values.get(kw) for kw in query.spec.returns))


def _both(query: qr_match.Query, row: tuple, cfg: config.Config, explicit: bool):
    by_hand = qr._encoded(query, row, cfg, explicit)
    by_pydicom = encode(qr._answer(query, row, cfg, None), not explicit, True, False)
    return by_hand, by_pydicom


@pytest.mark.parametrize("explicit", [False, True], ids=["implicit", "explicit"])
def test_every_kind_of_value_encodes_as_pydicom_does(cfg, explicit: bool) -> None:
    asked = dict.fromkeys(VALUES, "")
    asked.update(
        RetrieveAETitle="",  # from the proxy itself
        InstanceAvailability="",
        ReferencedStudySequence=[],  # an empty sequence return key
        Modality="",  # a SERIES key at STUDY level: returned empty
        Rows=None,  # US, an IMAGE-level key: returned empty
        PatientComments="",  # LT, no catalog column: returned empty
    )
    query = _query(**asked)
    assert qr._encodable(query)
    by_hand, by_pydicom = _both(query, _row(query, VALUES), cfg, explicit)
    assert by_hand == by_pydicom
    assert b"ISO_IR 192" in by_hand and "Müller".encode() in by_hand


@pytest.mark.parametrize("explicit", [False, True], ids=["implicit", "explicit"])
def test_plain_ascii_answers_carry_no_character_set(cfg, explicit: bool) -> None:
    query = _query(PatientName="ANON*", PatientID="", StudyInstanceUID="")
    values = dict(VALUES, PatientName="ANON^ITH-0042")
    by_hand, by_pydicom = _both(query, _row(query, values), cfg, explicit)
    assert by_hand == by_pydicom
    assert b"ISO_IR" not in by_hand


def test_a_value_too_long_for_its_length_field_falls_back(cfg) -> None:
    """Explicit VR: a 2-byte length cannot hold it, so the answer goes the
    Dataset way (None here), never a truncated length."""
    query = _query(StudyDescription="", StudyInstanceUID="")
    row = _row(query, dict(VALUES, StudyDescription="X" * 70000))
    assert qr._encoded(query, row, cfg, True) is None
    assert qr._encoded(query, row, cfg, False) is not None  # implicit: 4-byte lengths


def test_header_keys_and_odd_vrs_take_the_dataset_way() -> None:
    image = Dataset()
    image.QueryRetrieveLevel = "IMAGE"
    image.StudyInstanceUID = STUDY_UID
    image.SeriesInstanceUID = "1.2.3"
    image.SOPInstanceUID = ""
    plain = qr_match.parse(image, STUDY_ROOT)
    assert qr._encodable(plain)
    image.ImageType = ""  # no catalog column: read from the stored header
    assert not qr._encodable(qr_match.parse(image, STUDY_ROOT))


def _reassemble(pdvs: list[tuple[int, bytes]], kind: int) -> bytes:
    data = b""
    for context, value in pdvs:
        assert context == 7
        if value[0] & 0x01 == kind:
            data += value[1:]
    return data


@pytest.mark.parametrize("limit", [40, 100, 16384])
def test_fragments_reassemble_to_the_same_bytes(limit: int) -> None:
    command = find_wire.pending_command(STUDY_ROOT, 5)
    identifier = bytes(range(256)) * 3
    pdvs = find_wire._pdvs(7, command, identifier, limit)
    if pdvs is None:
        pdvs = find_wire._fragments(7, 1, command, limit) + find_wire._fragments(
            7, 0, identifier, limit
        )
        for _, value in pdvs:
            assert 6 + len(value) - 1 <= limit  # item header (6) + fragment fits the PDU
        lasts = [value[0] & 0x02 for _, value in pdvs]
        assert lasts.count(0x02) == 2  # one last fragment each for command and data
    assert _reassemble(pdvs, 1) == command
    assert _reassemble(pdvs, 0) == identifier
    assert pdvs[0][1][0] & 0x01 and not pdvs[-1][1][0] & 0x01  # command first, data last


def test_the_command_set_is_what_pynetdicom_encodes() -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 513
    primitive.AffectedSOPClassUID = STUDY_ROOT
    primitive.Status = 0xFF00
    primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = C_FIND_RSP()
    msg.primitive_to_message(primitive)
    command_pdu = next(iter(msg.encode_msg(1, 16384)))  # then the identifier's PDU
    stock = list(command_pdu.presentation_data_value_list)
    assert stock[0][1] == b"\x03" + find_wire.pending_command(STUDY_ROOT, 513)
