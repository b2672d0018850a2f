"""No PHI in any log (issue 6, "Logs"); library settings: test_libsetup.py.

* Third-party log records (pynetdicom quotes a non-conformant UID as it got
  it) are redacted on every handler; ith_proxy's own pass as written.
* Exception messages are never logged, whoever logs the exception: the
  formatter writes type names and file:line only, the whole chain.
* End to end: a real proxy gets non-conformant UIDs and PHI canaries
  through every refusal path a client can reach; nothing in spool/logs or
  the proxy's stdout/stderr names any of them.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt

import dicomgen
import tools
from helpers import catalog_counts, find_bytes, wait_until
from ith_proxy import logs

REPO = Path(__file__).resolve().parent.parent
PHI = "PHIMARK-LOGS-Doe^Jane"


# --------------------------------------------------------------------------
# the filter and the formatter
# --------------------------------------------------------------------------


def _emit(name: str, level: int, msg, *args, exc_info=None) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.SafeFormatter(logs.FORMAT))
    handler.addFilter(logs.RedactFilter())
    handler.handle(logging.LogRecord(name, level, __file__, 1, msg, args, exc_info))
    return out.getvalue()


@pytest.mark.parametrize(
    "uid", ["1.2.840.01.5.77", "1.2.840.10008.ABC.12345", "1.2.3.4 ", "1." + "9" * 70]
)
def test_third_party_values_and_uids_are_redacted(uid: str) -> None:
    text = _emit(
        "pynetdicom.utils",
        logging.WARNING,
        f"Non-conformant 'Affected SOP Instance UID' value '{uid}'",
    )
    assert uid.strip() not in text and "'Affected" not in text
    assert "WARNING pynetdicom.utils" in text and logs.PREFIX.strip() in text
    assert "Non-conformant" in text
    bare = _emit("pynetdicom.dimse", logging.ERROR, "Invalid UID %s for %s", uid, PHI)
    assert uid.strip() not in bare and "PHIMARK" not in bare
    assert "ERROR pynetdicom.dimse" in bare
    message = bare.split("ERROR pynetdicom.dimse", 1)[1]  # not the timestamp: ",771" has 77
    assert "77" not in message


def test_redaction_reaches_exception_objects_logged_as_messages() -> None:
    exc = ValueError(f"Invalid 'Affected SOP Instance UID' value '1.2.840.01.5.99' {PHI}")
    text = _emit("pynetdicom.dimse", logging.ERROR, exc)  # LOGGER.exception(exc) does this
    assert "1.2.840.01.5.99" not in text and "Jane" not in text and "PHIMARK" not in text


@pytest.mark.parametrize(
    "name",
    [
        "waitress",
        "watchdog.observers",
        "root",
        "py.warnings",
        "apsw",
        "urllib3.connectionpool",
        "pydicom",
    ],
)
def test_every_third_party_logger_is_redacted(name: str) -> None:
    text = _emit(name, logging.DEBUG, "value '%s' uid 1.2.840.113619.2.55", PHI)
    assert "PHIMARK" not in text and "113619" not in text and name in text


def test_own_records_pass_as_written() -> None:
    text = _emit("ith_proxy.indexer", logging.INFO, "indexed study %s", "2.25.1234567")
    assert "indexed study 2.25.1234567" in text and logs.PREFIX not in text


def _chained() -> BaseException:
    try:
        try:
            raise KeyError(f"{PHI} 1.2.840.01.5.42")
        except KeyError as inner:
            raise ValueError(f"cannot read {PHI}") from inner
    except ValueError as outer:
        return outer


@pytest.mark.parametrize("name", ["ith_proxy.indexer", "pynetdicom.dimse"])
def test_tracebacks_name_types_and_places_never_messages(name: str) -> None:
    exc = _chained()
    text = _emit(
        name,
        logging.ERROR,
        "indexer pass failed; retrying",
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    assert "PHIMARK" not in text and "Jane" not in text and "1.2.840.01.5.42" not in text
    assert "builtins.KeyError (message not logged)" in text
    assert "builtins.ValueError (message not logged)" in text
    assert f"{__file__}:" in text and "in _chained" in text
    assert text.index("KeyError") < text.index("which led to:") < text.index("ValueError")


def test_a_message_cached_by_another_formatter_is_not_reused() -> None:
    exc = _chained()
    record = logging.LogRecord(
        "ith_proxy.x", logging.ERROR, __file__, 1, "failed", (), (type(exc), exc, exc.__traceback__)
    )
    logging.Formatter().format(record)  # e.g. a default handler that ran first
    assert "PHIMARK" in record.exc_text
    assert "PHIMARK" not in logs.SafeFormatter(logs.FORMAT).format(record)


# --------------------------------------------------------------------------
# the process-wide set-up: files, console, warnings, hooks, the worker socket
# --------------------------------------------------------------------------


def test_service_logging_redacts_every_path_to_a_file_or_stderr(tmp_path: Path) -> None:
    res = tools.run_python(
        f"""
        import logging, sys, threading, warnings
        from pathlib import Path
        from ith_proxy import logs
        from ith_proxy.config import LogConfig
        PHI = {PHI!r}
        logs.setup(Path("logs"), LogConfig("DEBUG", 1 << 20, 2), console=True)
        logging.getLogger("pynetdicom.utils").warning(
            "Non-conformant 'Affected SOP Instance UID' value '1.2.840.01.5.4242'")
        logging.getLogger("pynetdicom.dimse").exception(ValueError("x 1.2.840.01.5.4243 " + PHI))
        logging.getLogger("waitress").error("bad request from %s", PHI)
        logging.getLogger("watchdog.observers").warning("cannot watch %s", PHI)
        logging.getLogger("apsw").error(PHI + " 1.2.840.01.5.4244")
        logging.warning("root " + PHI)
        warnings.warn("a warning quoting " + PHI)
        logging.getLogger("ith_proxy").error("bad args %d", PHI)  # handler error report
        try:
            try:
                raise KeyError(PHI)
            except KeyError as e:
                raise RuntimeError("wrapped " + PHI) from e
        except RuntimeError:
            logging.getLogger("ith_proxy.indexer").exception("indexer pass failed; retrying")
        def boom():
            raise ValueError("thread " + PHI + " 1.2.840.01.5.4245")
        t = threading.Thread(target=boom, name="dul-reactor")
        t.start(); t.join()
        logging.getLogger("ith_proxy").info("still here")
        raise OSError("uncaught " + PHI)
        """,
        tmp_path,
    )
    assert res.returncode == 1, res.stderr
    texts = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    texts["stderr"], texts["stdout"] = res.stderr, res.stdout
    leaks = [
        f"{name}: {needle}"
        for name, text in texts.items()
        for needle in ("PHIMARK", "Jane", "1.2.840.01.5", "4242", "4243", "4244", "4245")
        if needle in text
    ]
    assert leaks == [], texts
    main, dicom, errors = texts["main.log"], texts["dicom.log"], texts["error.log"]
    assert "WARNING pynetdicom.utils" in dicom and "Non-conformant" in dicom
    assert "WARNING pynetdicom.utils" in errors
    assert "ERROR waitress" in texts["api.log"]
    for name in ("WARNING watchdog.observers", "ERROR apsw", "WARNING root", "WARNING py.warnings"):
        assert name in main and name in errors, name
    assert "uncaught ValueError in thread dul-reactor" in errors
    assert "builtins.ValueError (message not logged)" in errors
    assert "builtins.KeyError (message not logged)" in errors  # the chained one
    assert "CRITICAL ith_proxy.uncaught [MainThread] uncaught OSError" in errors
    assert "still here" in main


def test_worker_records_are_redacted_and_formatted_before_the_socket(tmp_path: Path) -> None:
    res = tools.run_python(
        f"""
        import json, logging, socket, threading, warnings
        from ith_proxy import logs
        from ith_proxy.config import LogConfig
        PHI = {PHI!r}
        read, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        logs.setup_worker(send, LogConfig("INFO", 1 << 20, 2))
        logging.getLogger("pynetdicom").warning("value '%s' 1.2.840.01.5.4246", PHI)
        logging.getLogger("watchdog").warning("watching " + PHI)
        warnings.warn("warn " + PHI)
        try:
            raise KeyError(PHI)
        except KeyError:
            logging.getLogger("ith_proxy.indexer").exception("indexer pass failed; retrying")
        t = threading.Thread(target=lambda: 1 / 0 if PHI else 0, name="commit")
        t.start(); t.join()

        @logs.uncaught_logged
        def entry():
            raise RuntimeError(PHI)
        try:
            entry()
        except SystemExit as e:
            code = e.code
        blobs = []
        read.setblocking(False)
        while True:
            try:
                blobs.append(read.recv(logs.MAX_MESSAGE))
            except BlockingIOError:
                break
        print(code, len(blobs), any(PHI.encode() in b or b"4246" in b for b in blobs))
        for b in blobs:
            r = logging.makeLogRecord(json.loads(b))
            print(repr((r.name, r.levelname, r.args, r.getMessage())))
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "1 6 False", res.stdout
    assert "PHIMARK" not in res.stdout + res.stderr
    records = "\n".join(lines[1:])
    assert "'pynetdicom', 'WARNING', None" in records and logs.PREFIX in records
    assert (
        "('ith_proxy.indexer', 'ERROR', None, 'indexer pass failed; retrying\\n"
        "builtins.KeyError (message not logged)" in records
    )
    assert "uncaught ZeroDivisionError in thread commit" in records
    assert "entry ended on uncaught RuntimeError" in records
    assert "'py.warnings', 'WARNING'" in records and "'watchdog', 'WARNING'" in records


def test_a_forked_worker_writes_no_file_and_the_service_writes_its_records(tmp_path: Path) -> None:
    """A worker forked after ``logs.setup`` drops every inherited file handler
    (on ith_proxy.dicom, pynetdicom, waitress too): its records reach the
    files only through the service's listener."""
    res = tools.run_python(
        """
        import logging, os, socket
        from pathlib import Path
        from ith_proxy import logs
        from ith_proxy.config import LogConfig
        cfg = LogConfig("INFO", 1 << 20, 2)
        logs.setup(Path("logs"), cfg, console=False)
        read, send = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            logs.setup_worker(send, cfg)
            every = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
            files = [h for lg in every for h in getattr(lg, "handlers", [])
                     if isinstance(h, logging.FileHandler)]
            logging.getLogger("ith_proxy.dicom.files").warning("from the worker %d", len(files))
            os._exit(0)
        os.waitpid(pid, 0)
        listener = logs.listen(read)
        logging.getLogger("ith_proxy").info("from the service")
        import time
        deadline = time.monotonic() + 30
        while "from the worker" not in Path("logs/dicom.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listener.stop()
        print("done")
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    logs_dir = tmp_path / "logs"
    for name in ("dicom.log", "main.log", "error.log"):  # each exactly once: no direct write
        assert (logs_dir / name).read_text().count("from the worker 0") == 1, name
    assert "from the service" in (logs_dir / "main.log").read_text()


def test_a_failing_api_route_writes_its_exception_type_not_its_message(tmp_path: Path) -> None:
    port = tools.free_port()
    res = tools.run_python(
        f"""
        import urllib.error, urllib.request
        from pathlib import Path
        from ith_proxy import logs
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from worker_rooms import Rooms
        from ith_proxy.web.app import ApiServer
        from ith_proxy.config import ApiConfig, LogConfig
        logs.setup(Path("logs"), LogConfig("INFO", 1 << 20, 2), console=True)
        def health():
            raise ValueError("health of " + {PHI!r})
        app = Rooms(Path("site").resolve()).api(health)
        server = ApiServer(ApiConfig("127.0.0.1", {port}, "", "", "", ""), app)
        server.start()
        try:
            urllib.request.urlopen("http://127.0.0.1:{port}/api/health/?{PHI}", timeout=30)
        except urllib.error.HTTPError as exc:
            print(exc.code, exc.read().decode())
        server.stop()
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    texts = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert [
        name
        for name, text in {**texts, "stderr": res.stderr}.items()
        if "PHIMARK" in text or "Jane" in text
    ] == []
    assert res.stdout.strip() == '500 {"error": "internal error"}'
    assert "unhandled ValueError in an API request" in texts["error.log"]
    assert "builtins.ValueError (message not logged)" in texts["api.log"]


# --------------------------------------------------------------------------
# end to end: a real proxy, a real client, every refusal path
# --------------------------------------------------------------------------


class _Uids:
    """Non-conformant UIDs that all carry one random digit token."""

    def __init__(self) -> None:
        self.token = "".join(secrets.choice("123456789") for _ in range(12))
        t = self.token
        self.leading_zeros = [f"1.2.840.01.5.{t}.{i}" for i in range(1, 12)]
        self.letters = f"1.2.840.10008.{t}.PHIMARKUID"
        self.too_long = f"1.2.840.{t}." + "7" * 60
        self.trailing_space = f"1.2.826.0.{t}.99 "

    def needles(self) -> set[str]:
        return {
            self.token,
            *self.leading_zeros,
            self.letters,
            self.too_long,
            self.trailing_space.strip(),
            "PHIMARKUID",
        }


def _retag(src: Path, dst: Path, sop: str, study: str | None, series: str, **extra: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    if study is None:
        del ds.StudyInstanceUID
    else:
        ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _garbage(dst: Path, sop: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    dst.write_bytes(
        buf.getvalue()
        + b"\x10\x00\x10\x00PN\x30\x00"
        + PHI.encode()
        + os.urandom(2000)
        + sop.encode()
    )
    return dst


def _client() -> AE:
    ae = AE(ae_title="LOGTEST")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _store(ae: AE, port: int, item) -> int | None:
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRCV")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(item)
        return status.Status if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def _abort_mid_transfer(ae: AE, port: int, ds: Dataset) -> None:
    """Abort the association once a few P-DATA PDUs of a large dataset are out."""
    sent = threading.Event()
    count = [0]

    def on_pdu(event) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            count[0] += 1
            if count[0] == 5:
                sent.set()

    ae.maximum_pdu_size = 16384
    ae.dimse_timeout = 5  # the aborted C-STORE gets no answer
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="DICOMRCV",
        max_pdu=16384,
        evt_handlers=[(evt.EVT_PDU_SENT, on_pdu)],
    )
    assert assoc.is_established
    sender = threading.Thread(target=lambda: assoc.send_c_store(ds))
    sender.start()
    assert sent.wait(60)
    assoc.abort()
    sender.join(60)


@pytest.fixture
def quiet_client():
    """The client's own pynetdicom warnings quote the canaries: keep them out of
    the test report."""
    client_log = logging.getLogger("pynetdicom")
    old = client_log.level
    client_log.setLevel(logging.CRITICAL)
    yield
    client_log.setLevel(old)


def test_no_uid_or_canary_reaches_any_log_end_to_end(
    tmp_path: Path, monkeypatch, quiet_client
) -> None:
    # the client: sends files as they are (garbage too), and validates nothing
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    uids = _Uids()
    z = iter(uids.leading_zeros)
    src = dicomgen.make_instance(tmp_path / "src", token=uids.token[:8])
    base = src.files[0]
    out = tmp_path / "send"
    out.mkdir()
    canaries = src.markers() | {PHI, src.patient_name, src.patient_id}
    sends = {
        # unparseable -> quarantine
        "garbage": _garbage(out / "garbage.dcm", next(z)),
        # inconsistent (UID with letters, no study) -> quarantine
        "letters": _retag(base, out / "letters.dcm", uids.letters, None, next(z)),
        # phi-risk -> quarantine
        "burned": _retag(
            base, out / "burned.dcm", next(z), next(z), next(z), BurnedInAnnotation="YES"
        ),
        # accepted: a legacy modality's leading-zero UIDs, one with a trailing space
        "legacy": _retag(base, out / "legacy.dcm", next(z), next(z), uids.trailing_space),
    }
    with tools.ProxyProcess(tmp_path / "proxy", env={"DICOM_LOG_LEVEL": "DEBUG"}) as proxy:
        ae = _client()
        statuses = {name: _store(ae, proxy.dicom_port, path) for name, path in sends.items()}
        assert all(s == 0 for s in statuses.values()), statuses
        # an Affected SOP Instance UID over 64 characters: the proxy drops the message
        too_long = pydicom.dcmread(base)
        too_long.SOPInstanceUID = uids.too_long
        too_long.file_meta.MediaStorageSOPInstanceUID = uids.too_long
        with monkeypatch.context() as patched:
            patched.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
            try:
                _store(ae, proxy.dicom_port, too_long)
            except (RuntimeError, ValueError):
                pass  # the proxy aborts the association
        # a rejected association (wrong called AE), and a non-conformant abstract syntax
        bad = AE(ae_title="LOGTEST")
        bad.add_requested_context(next(z))
        bad.add_requested_context(CTImageStorage)
        assert bad.associate("127.0.0.1", proxy.dicom_port, ae_title="NOTTHEPROXY").is_rejected
        odd = bad.associate("127.0.0.1", proxy.dicom_port, ae_title="DICOMRCV")
        assert odd.is_established
        odd.release()
        # an abort in the middle of a large instance
        big = pydicom.dcmread(base)
        big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = next(z)
        big.PixelData = os.urandom(4 << 20)
        _abort_mid_transfer(_client(), proxy.dicom_port, big)
        assert tools.echoscu(proxy.dicom_port).returncode == 0
        quarantine = proxy.spool / "quarantine"
        wait_until(
            lambda: (
                len(list(quarantine.rglob("*.json"))) >= 3
                and catalog_counts(proxy.spool)["instances"] >= 1
            ),
            120,
            "ingest",
        )
    logs_dir = proxy.spool / "logs"
    needles = uids.needles() | canaries
    leaks = find_bytes(logs_dir, needles) + [
        f"{p.name}: {n}"
        for p in (proxy.stdout_path, proxy.stderr_path)
        for n in needles
        if n in p.read_text(errors="replace")
    ]
    assert leaks == []
    dicom_log = (logs_dir / "dicom.log").read_text()
    assert "Non-conformant '<redacted>' value '<redacted>'" in dicom_log  # seen, redacted
    assert "an invalid dimse message" in dicom_log.lower()  # the too-long UID, dropped
    reasons = sorted(p.parent.name for p in quarantine.rglob("*.json"))
    assert len(reasons) == 3 and {"inconsistent", "phi-risk"} <= set(reasons)  # garbage: either
