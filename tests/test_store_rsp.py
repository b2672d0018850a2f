"""C-STORE answers packed by hand (ith_proxy/dicom/store_rsp.py, issue 11):

- the packed command set is byte for byte what pynetdicom 3.0.4 encodes, for
  odd and even UID lengths, every status the SCP answers and the extreme
  message IDs;
- a response pynetdicom would carry more in (an Error Comment, an Offending
  Element) is left to pynetdicom;
- a real SCP answers each C-STORE of a pynetdicom SCU through the packed
  path: the SCU decodes success, and the failure the SCP finds (a data set
  that starts in group 0004), with the request's UIDs and message ID.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

import dicomgen
import tools
from ith_proxy.dicom import store_rsp
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms

CT = "1.2.840.10008.5.1.4.1.1.2"


def _response(sop_class: str, sop: str, message_id: int, status: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    return rsp


def _stock(rsp: C_STORE, context_id: int = 1) -> bytes:
    """The command set PDV pynetdicom 3.0.4 sends for this response."""
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    pdvs = [
        pdv for p in msg.encode_msg(context_id, 16384) for pdv in p.presentation_data_value_list
    ]
    assert len(pdvs) == 1 and pdvs[0][1][0] == 0x03
    assert pdvs[0][1][1:] == encode(msg.command_set, True, True)
    return pdvs[0][1][1:]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB000, 0xC211])
@pytest.mark.parametrize("message_id", [1, 2, 4711, 0xFFFF])
@pytest.mark.parametrize(
    "sop", ["1.2.3", "1.2.34", "2.25." + "9" * 59, "1.2.840.113619.2.55.3.1234567.12"]
)
def test_command_set_is_byte_for_byte_pynetdicoms(status: int, message_id: int, sop: str) -> None:
    for sop_class in (CT, "1.2.840.10008.5.1.4.1.1.12.1"):  # odd and even lengths
        rsp = _response(sop_class, sop, message_id, status)
        assert store_rsp._plain(rsp) == _stock(rsp)
        assert store_rsp.command_set(sop_class, message_id, status, sop) == _stock(rsp)


def test_a_response_with_more_in_it_is_left_to_pynetdicom() -> None:
    rsp = _response(CT, "1.2.3", 1, 0xC000)
    assert store_rsp._plain(rsp) is not None
    rsp.ErrorComment = "something"
    assert store_rsp._plain(rsp) is None
    rsp = _response(CT, "1.2.3", 1, 0xC000)
    rsp.OffendingElement = [0x00100010]
    assert store_rsp._plain(rsp) is None
    find = C_STORE()  # a request (no MessageIDBeingRespondedTo)
    find.MessageID = 1
    assert store_rsp._plain(find) is None


def test_a_real_scp_answers_through_the_packed_path(tmp_path: Path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    env = {
        "DICOM_STORAGE_DIR": str(tmp_path / "spool"),
        "DICOM_PORT": str(tools.free_port()),
        "DICOM_BIND_ADDRESS": "127.0.0.1",
        "VAULT_KEY_FILE": str(tmp_path / "secrets" / "vault.key"),
    }
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = false\n", env)
    answers: list = []
    packed: list[bool] = []

    def on_recv(event: evt.Event) -> None:  # the SCU side: every decoded answer
        cs = event.message.command_set
        answers.append(
            (cs.MessageIDBeingRespondedTo, cs.Status, cs.AffectedSOPInstanceUID, cs.CommandField)
        )

    try:
        scp = StorageSCP(rooms.cfg, rooms.spool)
        scp.start()
        try:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
            assoc = ae.associate(
                "127.0.0.1",
                rooms.cfg.scp.port,
                ae_title=rooms.cfg.scp.ae_title,
                evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)],
            )
            assert assoc.is_established
            try:
                datasets = [dcmread(f) for f in series.files]
                for ds, msg_id in zip(datasets, (7, 300, 0xFFFF), strict=True):
                    assert assoc.send_c_store(ds, msg_id=msg_id).Status == 0x0000
                    packed += [
                        getattr(a.dimse, "_ith_store_rsp", False)
                        for a in scp.ae.active_associations
                    ]
                bad = dcmread(series.files[0])
                bad.SOPInstanceUID = "1.2.3.4.5"
                bad.add_new(0x00041130, "CS", "X")  # a DICOMDIR's group: refused
                assert assoc.send_c_store(bad, msg_id=9).Status == 0xC000
            finally:
                assoc.release()
        finally:
            scp.stop()
        assert packed and all(packed)
        assert [a[0] for a in answers] == [7, 300, 0xFFFF, 9]
        assert [a[1] for a in answers] == [0, 0, 0, 0xC000]
        assert {a[3] for a in answers} == {0x8001}
        assert [a[2] for a in answers] == [ds.SOPInstanceUID for ds in datasets] + ["1.2.3.4.5"]
        assert len(rooms.spool.incoming_names()) == 3
    finally:
        rooms.close()


def test_install_is_idempotent() -> None:
    class Dimse:
        maximum_pdu_size = 16384

        def send_msg(self, primitive, context_id):  # pragma: no cover - never reached
            raise AssertionError

    class Assoc:
        dimse = Dimse()

    assoc = Assoc()
    store_rsp.install(assoc)
    first = assoc.dimse.send_msg
    store_rsp.install(assoc)
    assert assoc.dimse.send_msg is first
