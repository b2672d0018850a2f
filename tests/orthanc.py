"""A real Orthanc (Debian's ``orthanc`` package) as a PACS node for tests.

``OrthancProcess`` runs ``/usr/sbin/Orthanc`` on free loopback ports with a
fresh SQLite index and storage under its work dir. ``stop()`` and ``start()``
keep the ports and the stored data, so a test can take the PACS down in the
middle of a send and bring the same one back. With ``dicomweb=True`` the
DICOMweb plugin (``orthanc-dicomweb``) serves STOW-RS/QIDO-RS/WADO-RS under
``dicomweb_url``. ``modalities`` tells Orthanc about DICOM peers by name,
``{"PROXY": ("PROXYAE", "127.0.0.1", 11112)}``, as a C-MOVE source needs.

Missing Orthanc or its plugin fails the test under ``CI=true`` and skips it
otherwise (``tools.require_tool``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import tools

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancProcess:
    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "ORTHANC",
        dicomweb: bool = False,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.exe = tools.require_tool("Orthanc")
        if dicomweb and not DICOMWEB_PLUGIN.is_file():
            msg = f"{DICOMWEB_PLUGIN} missing (Debian package 'orthanc-dicomweb')"
            if tools.in_ci():
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = tools.free_port()
        self.http_port = tools.free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.base_url}/dicom-web"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        config: dict[str, Any] = {
            "Name": "ith-proxy-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StorageCompression": False,
            "OverwriteInstances": True,
            "DicomModalities": {
                name: [ae, host, port] for name, (ae, host, port) in (modalities or {}).items()
            },
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "EnableWado": True},
            **(extra or {}),
        }
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    # --- life cycle ---

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.exe, str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=tools.clean_env(),
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self._tail()}")
            try:
                self.get("/system", timeout=1)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc not ready within {timeout} s: {self._tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL); its data and ports are kept."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- REST ---

    def get(self, path: str, timeout: float = 10) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(
            self.base_url + path, data=body, method="POST", headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Store a DICOM file through the REST API; return its Orthanc instance id."""
        return str(self.post("/instances", Path(path).read_bytes(), "application/dicom")["ID"])

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self, study_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs stored (of one study, by its StudyInstanceUID)."""
        query: dict[str, Any] = {"Level": "Instance", "Expand": True, "Query": {}}
        if study_uid is not None:
            query["Query"]["StudyInstanceUID"] = study_uid
        found = self.post("/tools/find", json.dumps(query).encode())
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}
