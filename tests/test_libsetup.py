"""Library internals (issue 6): importing ith_proxy changes no pydicom or
pynetdicom global, one explicit ``configure_libraries()`` does; assoc_wake
patches nothing on a pynetdicom version it was not written for."""

from __future__ import annotations

import json
from pathlib import Path

import tools

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# library settings: one explicit call, no import side effects
# --------------------------------------------------------------------------

_SETTINGS = """
import json
from pydicom import config as pc
from pynetdicom import _config as nc
def settings():
    return [pc.settings.reading_validation_mode, pc.settings.writing_validation_mode,
            nc.LOG_REQUEST_IDENTIFIERS, nc.LOG_RESPONSE_IDENTIFIERS, nc.LOG_HANDLER_LEVEL,
            nc.ENFORCE_UID_CONFORMANCE]
"""


def test_importing_ith_proxy_changes_no_library_global(tmp_path: Path) -> None:
    res = tools.run_python(
        _SETTINGS
        + """
before = settings()
import ith_proxy.dicom.scp, ith_proxy.dicom.files, ith_proxy.workers.indexer
import ith_proxy.service, ith_proxy.cli
import ith_proxy.deid, ith_proxy.dicom.wake, ith_proxy.web.app, ith_proxy.vault.keys
print(json.dumps([before, settings(), pc.IGNORE]), flush=True)
from ith_proxy.dicom.libsetup import configure_libraries
configure_libraries()
print(json.dumps(settings()))
""",
        tmp_path,
    )
    before, after_import, ignore = json.loads(res.stdout.splitlines()[0])
    assert after_import == before
    assert res.returncode == 0, res.stderr
    configured = json.loads(res.stdout.splitlines()[1])
    assert configured == [ignore, ignore, False, False, "none", before[5]]


# --------------------------------------------------------------------------
# assoc_wake on a pynetdicom it does not know
# --------------------------------------------------------------------------


def test_assoc_wake_falls_back_to_stock_polling_on_another_pynetdicom(tmp_path: Path) -> None:
    res = tools.run_python(
        """
        import io, logging, queue, socketserver, threading, time
        import pynetdicom
        pynetdicom.__version__ = "3.1.0"
        import pynetdicom.association, pynetdicom.dul
        from pynetdicom import AE, evt
        from pynetdicom.transport import RequestHandler
        from ith_proxy.dicom import wake as assoc_wake
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        logging.getLogger("ith_proxy").addHandler(handler)
        logging.getLogger("ith_proxy").setLevel(logging.DEBUG)

        class Handler(RequestHandler):  # as ith_proxy.dicom.ae wires every association
            def _create_association(self):
                assoc = super()._create_association()
                assoc_wake.wake_on_work(assoc)
                self.server.made.append(assoc)
                return assoc

        scp = AE(ae_title="FALLBACK")
        scp.add_supported_context("1.2.840.10008.1.1")
        server = scp.make_server(("127.0.0.1", 0), request_handler=Handler,
                                 evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)])
        server.made = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        scu = AE(ae_title="SCU")
        scu.add_requested_context("1.2.840.10008.1.1")
        statuses = []
        for _ in range(3):
            assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="FALLBACK")
            statuses.append(assoc.send_c_echo().Status)
            assoc.release()
        socketserver.BaseServer.shutdown(server)  # as ith_proxy.dicom.ae.Server does
        server.server_close()
        made = server.made
        print(statuses == [0, 0, 0], len(made) == 3,
              time is pynetdicom.dul.time, time is pynetdicom.association.time,
              all(type(a.dimse.msg_queue) is queue.Queue for a in made),
              all(type(a.dul.to_provider_queue) is queue.Queue for a in made),
              not any(hasattr(a, "_ith_wait") or hasattr(a.dul, "_ith_wait") for a in made))
        print(out.getvalue().count("\\n"))
        print(out.getvalue())
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    flags, count, text = res.stdout.split("\n", 2)
    assert flags == "True True True True True True True", res.stdout
    assert count == "1", text
    assert "pynetdicom 3.1.0 is not 3.0.4" in text and "stock" in text
