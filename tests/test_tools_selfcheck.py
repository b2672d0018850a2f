"""Self-checks of the test helpers (tests/tools.py, tests/dicomgen.py) against
real DCMTK and dicom3tools, so a broken helper cannot hide a broken proxy."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
)

import dicomgen
import tools

# --------------------------------------------------------------------------
# dicomgen
# --------------------------------------------------------------------------


def test_generated_files_are_readable_by_dcmdump(tmp_path: Path) -> None:
    series = [
        dicomgen.make_small_series(tmp_path / "ct", 2),
        dicomgen.make_mr_instance(tmp_path / "mr"),
        dicomgen.make_pet_instance(tmp_path / "pt"),
        dicomgen.make_instance_of_class(tmp_path / "sc", SecondaryCaptureImageStorage),
        dicomgen.make_instance_of_class(tmp_path / "rt", RTPlanStorage),
    ]
    series += [
        dicomgen.make_small_series(tmp_path / f"ts{i}", 1, transfer_syntax=ts)
        for i, ts in enumerate(
            [
                ImplicitVRLittleEndian,
                DeflatedExplicitVRLittleEndian,
                ExplicitVRBigEndian,
                RLELossless,
            ]
        )
    ]
    for s in series:
        for f in s.files:
            res = tools.run_tool(["dcmdump", "-q", f])
            assert res.returncode == 0, res.stderr
            assert s.phi["PatientID"] in res.stdout
            assert s.sop_uids[0] in res.stdout or len(s.files) > 1
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == s.transfer_syntax
            assert ds.SOPClassUID == s.sop_class_uid


@pytest.mark.parametrize("modality", ["CT", "MR", "PT"])
def test_generated_images_pass_dciodvfy(tmp_path: Path, modality: str) -> None:
    s = dicomgen.make_instance(tmp_path, modality)
    res = tools.run_tool(["dciodvfy", s.files[0]])
    errors = [line for line in (res.stderr + res.stdout).splitlines() if line.startswith("Error")]
    assert errors == []


def test_rle_encoding_round_trips_through_dcmtk(tmp_path: Path) -> None:
    raw = dicomgen.make_small_series(tmp_path / "raw", 1, seed=7)
    rle = dicomgen.make_small_series(tmp_path / "rle", 1, seed=7, transfer_syntax=RLELossless)
    out = tmp_path / "decoded.dcm"
    res = tools.run_tool(["dcmdrle", rle.files[0], out])
    assert res.returncode == 0, res.stderr
    assert pydicom.dcmread(out).PixelData == pydicom.dcmread(raw.files[0]).PixelData


def test_markers_uids_and_second_series(tmp_path: Path) -> None:
    a = dicomgen.make_small_series(tmp_path / "a", 3)
    b = dicomgen.make_small_series(tmp_path / "b", 2, like=a, series_number=2)
    assert a.study_uid == b.study_uid and a.series_uid != b.series_uid
    assert a.phi == b.phi  # same patient and study
    assert len(set(a.sop_uids) | set(b.sop_uids)) == 5
    assert a.phi["StudyInstanceUID"] == a.study_uid
    assert a.series_phi["SeriesInstanceUID"] == a.series_uid
    assert all(m.startswith(dicomgen.MARKER_PREFIX) for m in a.markers())
    assert len(a.markers()) >= 15
    blob = b"".join(f.read_bytes() for f in a.files)
    for s in a.leak_strings():
        assert s.encode() in blob, s
    # distinct pixel data per instance
    assert len({pydicom.dcmread(f).PixelData for f in a.files}) == 3
    plain = dicomgen.make_small_series(tmp_path / "c", 1, markers=False)
    assert plain.markers() == set()


def test_generation_is_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    s = dicomgen.make_ct_series(tmp_path, 200)
    elapsed = time.monotonic() - t0
    assert len(s.files) == 200
    assert s.files[0].stat().st_size > 512 * 512 * 2
    assert elapsed < 30, f"200 CT files took {elapsed:.1f}s"


# --------------------------------------------------------------------------
# storescu / echoscu against DCMTK storescp
# --------------------------------------------------------------------------


def test_storescu_acks_parsed_against_real_storescp(tmp_path: Path) -> None:
    s = dicomgen.make_small_series(tmp_path / "in", 5)
    with tools.StoreSCP(tmp_path / "out") as scp:
        res = tools.storescu(scp.port, s.files, aec=scp.aet)
        assert res.returncode == 0, res.stderr
        results = tools.parse_storescu(res)
        assert [r.status for r in results] == ["Success"] * 5
        assert sorted(tools.acked_files(res)) == sorted(s.files)
        assert tools.acked_sop_uids(res) == set(s.sop_uids)
        received = scp.received()
    assert len(received) == 5
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == set(s.sop_uids)


def test_storescu_directory_mode_and_echo(tmp_path: Path) -> None:
    s = dicomgen.make_small_series(tmp_path / "in" / "sub", 3)
    with tools.StoreSCP(tmp_path / "out") as scp:
        assert tools.echoscu(scp.port, aec=scp.aet).returncode == 0
        res = tools.storescu(scp.port, tmp_path / "in", aec=scp.aet)
        assert tools.acked_sop_uids(res) == set(s.sop_uids)


def test_storescu_no_listener_acks_nothing(tmp_path: Path) -> None:
    s = dicomgen.make_small_series(tmp_path, 1)
    res = tools.storescu(tools.free_port(), s.files, timeout=60)
    assert res.returncode != 0
    assert tools.acked_files(res) == []


# Verbatim DCMTK 3.6.7 output (pynetdicom SCP answering 0xC000, 0x0000,
# 0xB000, 0xA700, ... and one file with an unsupported SOP class, with -nh),
# then a storescp --abort-after run.
_OBSERVED = """\
I: checking input files ...
I: Requesting Association
I: Association Accepted (Max Send PDV: 16370)
I: Sending file: /t/IMG001_00001.dcm
I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit
I: Sending Store Request (MsgID 1, CT)
I: Received Store Response (Error: CannotUnderstand)
I: Sending file: /t/IMG001_00002.dcm
I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit
I: Sending Store Request (MsgID 2, CT)
XMIT: .I: Received Store Response (Success)
I: Sending file: /t/IMG001_00003.dcm
I: Sending Store Request (MsgID 3, CT)
I: Received Store Response (Warning: CoercionOfDataElements)
I: Sending file: /t/IMG001_00004.dcm
I: Sending Store Request (MsgID 4, CT)
I: Received Store Response (Refused: OutOfResources)
I: Sending file: /t/rtp/INSTANCE.dcm
E: No presentation context for: (RP) 1.2.840.10008.5.1.4.1.1.481.5
I: Sending file: /t/with space.dcm
I: Sending Store Request (MsgID 8, CT)
I: Received Store Response (Success)
I: Releasing Association
I: Sending file: /t/IMG001_00005.dcm
I: Sending Store Request (MsgID 1, CT)
E: Store Failed, file: /t/IMG001_00005.dcm:
E: 0006:0317 Peer aborted Association (or never connected)
I: Peer Aborted Association
"""


def test_parse_storescu_outcomes() -> None:
    r = tools.parse_storescu(_OBSERVED)
    assert [x.path for x in r] == [
        "/t/IMG001_00001.dcm",
        "/t/IMG001_00002.dcm",
        "/t/IMG001_00003.dcm",
        "/t/IMG001_00004.dcm",
        "/t/rtp/INSTANCE.dcm",
        "/t/with space.dcm",
        "/t/IMG001_00005.dcm",
    ]
    assert [x.status for x in r] == [
        "Error: CannotUnderstand",
        "Success",
        "Warning: CoercionOfDataElements",
        "Refused: OutOfResources",
        None,
        "Success",
        None,
    ]
    assert r[4].error is not None and "No presentation context" in r[4].error
    assert r[6].error is not None and "Peer aborted" in r[6].error
    assert tools.acked_files(_OBSERVED) == [Path("/t/IMG001_00002.dcm"), Path("/t/with space.dcm")]
    assert len(tools.acked_files(_OBSERVED, include_warnings=True)) == 3


# --------------------------------------------------------------------------
# ProxyProcess mechanics, with a stand-in for the proxy
# --------------------------------------------------------------------------

_FAKE_PROXY = textwrap.dedent(
    """
    import http.server, json, os, signal, socket, subprocess, sys, threading
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open("child.pid", "w") as f:
        f.write(str(child.pid))
    keys = [k for k in os.environ if k.startswith(("DICOM_", "API_", "VAULT_", "ITH_", "JWT_"))]
    with open("env.json", "w") as f:
        json.dump({k: os.environ[k] for k in keys + ["PYTHONPATH"]} | {"cwd": os.getcwd()}, f)
    dicom = socket.socket()
    dicom.bind((os.environ["DICOM_BIND_ADDRESS"], int(os.environ["DICOM_PORT"])))
    dicom.listen()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(200 if self.path == "/api/health/" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            print("http", *a, file=sys.stderr)
    address = (os.environ["API_BIND_ADDRESS"], int(os.environ["API_PORT"]))
    srv = http.server.ThreadingHTTPServer(address, H)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
    print("fake proxy up", file=sys.stderr, flush=True)
    srv.serve_forever()
    """
)


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X"):  # zombie: dead, just not reaped by init
            return False
        time.sleep(0.05)
    return True


def test_proxy_process_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "fake_proxy.py"
    script.write_text(_FAKE_PROXY)
    monkeypatch.setenv("DICOM_AE_TITLE", "LEAKED")  # must not be inherited
    monkeypatch.setenv("JWT_SECRET", "LEAKED")
    work = tmp_path / "work"
    proxy = tools.ProxyProcess(
        work, command=[sys.executable, str(script)], env={"ITH_URL": ""}, config_text="[scp]\n"
    )
    with proxy:
        assert proxy.running
        assert proxy.health() == (200, {"status": "ok"})
        assert tools.port_listening(proxy.dicom_port)
        env = json.loads((work / "env.json").read_text())
        assert env["cwd"] == str(work)
        assert env["DICOM_PORT"] == str(proxy.dicom_port)
        assert env["API_PORT"] == str(proxy.api_port)
        assert env["DICOM_STORAGE_DIR"] == str(proxy.spool) == str(work / "spool")
        assert env["VAULT_KEY_FILE"] == str(work / "secrets" / "vault.key")
        assert env["ITH_PROXY_CONFIG"] == str(work / "proxy.ini")
        assert (work / "proxy.ini").read_text() == "[scp]\n"
        assert env["ITH_URL"] == ""
        assert "DICOM_AE_TITLE" not in env and "JWT_SECRET" not in env
        assert env["PYTHONPATH"].split(":")[0] == str(tools.REPO_ROOT)

        ports = (proxy.dicom_port, proxy.api_port)
        old_pid = proxy.pid
        proxy.restart()
        assert proxy.pid != old_pid and (proxy.dicom_port, proxy.api_port) == ports
        assert proxy.health()[0] == 200

        child = int((work / "child.pid").read_text())
        assert proxy.kill9() == -9
        assert not proxy.running
        assert not _alive(child), "kill9 must take the proxy's children down too"
        proxy.start()
        assert proxy.stop() == 0  # clean SIGTERM handling in the stand-in
    assert not proxy.running
    assert proxy.stderr_text().count("fake proxy up") == 3


def test_proxy_process_reports_early_exit(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        "import sys; print('boom: bad config', file=sys.stderr); sys.exit(3)",
    ]
    proxy = tools.ProxyProcess(tmp_path, command=cmd)
    with pytest.raises(tools.ProxyStartError, match=r"(?s)code 3.*boom: bad config"):
        proxy.start()
    assert not proxy.running


def test_proxy_process_start_timeout_kills(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    proxy = tools.ProxyProcess(tmp_path, command=cmd)
    with pytest.raises(tools.ProxyStartError, match="not ready"):
        proxy.start(timeout=1)
    assert not proxy.running


def test_require_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="dcmtk"):
        tools.TOOL_PACKAGES["no-such-tool-xyz"] = "dcmtk"
        try:
            tools.require_tool("no-such-tool-xyz")
        finally:
            del tools.TOOL_PACKAGES["no-such-tool-xyz"]
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        tools.require_tool("no-such-tool-xyz")
    assert tools.require_tool("Orthanc").endswith("/Orthanc")
