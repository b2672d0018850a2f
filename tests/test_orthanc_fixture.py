"""The Orthanc test node itself: it starts, stores over DICOM and REST, serves
DICOMweb, and keeps its data across stop() and start() (the outage tests
rely on that)."""

from __future__ import annotations

from pathlib import Path

import dicomgen
import tools
from orthanc import OrthancProcess


def test_orthanc_stores_and_keeps_data_across_a_restart(tmp_path: Path) -> None:
    src = dicomgen.make_instance(tmp_path / "src")
    sop = src.sop_uids[0]
    with OrthancProcess(tmp_path / "orthanc", dicomweb=True) as pacs:
        res = tools.storescu(pacs.dicom_port, src.files, aec="ORTHANC")
        assert res.returncode == 0, res.stderr
        assert pacs.instance_count() == 1
        pacs.stop()
        pacs.start()
        assert pacs.instance_count() == 1
        uids = pacs.sop_instance_uids()
        assert uids == {sop}
        assert pacs.sop_instance_uids(src.study_uid) == {sop}
        studies = pacs.get("/dicom-web/studies")  # QIDO-RS through the plugin
        assert len(studies) == 1
