"""Peak memory of the indexer on one ~1 GB multi-frame Enhanced CT instance.

Builds an Enhanced CT Image Storage instance of 512x512 16-bit frames
(default 2000 frames, about 1.05 GB) with shared and per-frame functional
groups that pydicom parses, and patient identity for the engine to replace.
The pixel data is written in chunks from one reusable frame buffer: the
instance is never held in memory.

The file is put into ``incoming/`` of a fresh spool in a temp dir (written
in ``spool/tmp`` and renamed), then a fresh Python subprocess builds the
rooms as tests/test_workers.py does (``config.load`` with
``DICOM_STORAGE_DIR``, ``Spool.ensure()``, ``Catalog``, ``Vault``,
``Indexer``), calls ``run_once()`` once and reports its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM`` from /proc/self/status).
Prints the peak in MB and PASS/FAIL against 250 MB. The temp dir is removed
afterwards unless ``--keep``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MB = 250.0
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
FRAME = 512 * 512 * 2

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
work = Path(sys.argv[1])

def vmhwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1

sys.path.insert(0, sys.argv[2])  # bench/: the same Indexer set-up as bench/deid.py
from deid import build_indexer

indexer, vault, catalog = build_indexer(work)
before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
handled = indexer.run_once()
seconds = time.perf_counter() - t0
print(json.dumps({
    "handled": handled, "processed": indexer.processed, "quarantined": indexer.quarantined,
    "seconds": seconds, "maxrss_before_kb": before_kb,
    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kb": vmhwm_kb(),
}))
vault.close()
catalog.close()
"""


def header_dataset(frames: int):
    """Enhanced CT header (no pixel data) with per-frame functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240115"
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101600", "101700"
    ds.AcquisitionDateTime = "20240115101700"
    ds.AccessionNumber, ds.Modality = "ACC-MEM-0001", "CT"
    ds.Manufacturer, ds.ManufacturerModelName = "BenchCo", "Bench"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SN-MEM-1", "1"
    ds.InstitutionName = "Bench General Hospital"
    ds.ReferringPhysicianName = "Doe^Referrer"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", "ENHANCED 1GB"
    ds.PatientName, ds.PatientID = "Memory^Patient", "MEM000123"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600302", "F", "063Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = "bench"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.AcquisitionNumber = 1
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionIndexSequence = Sequence([index])

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.68, 0.68], 0.5
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    frame_type.PixelPresentation, frame_type.VolumetricProperties = "MONOCHROME", "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    shared.CTImageFrameTypeSequence = Sequence([frame_type])
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    per_frame = []
    for i in range(frames):
        item = Dataset()
        content = Dataset()
        content.FrameAcquisitionNumber = 1
        content.StackID = "1"
        content.InStackPositionNumber = i + 1
        content.DimensionIndexValues = [i + 1]
        content.FrameAcquisitionDateTime = "20240115101700"
        item.FrameContentSequence = Sequence([content])
        position = Dataset()
        position.ImagePositionPatient = [-174.0, -174.0, -0.5 * i]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def write_instance(path: Path, frames: int) -> int:
    """Header with pydicom, then the pixel element written by hand, frame by frame."""
    import random
    import struct

    from pydicom.filewriter import dcmwrite

    ds = header_dataset(frames)
    dcmwrite(path, ds, enforce_file_format=True)
    rng = random.Random(1)
    frame = bytearray(rng.randbytes(FRAME))
    frame[1::2] = bytes(b & 0x0F for b in frame[1::2])  # 12 bits stored
    length = FRAME * frames
    if length >= 0xFFFFFFFF:
        raise SystemExit("too many frames for one explicit-length element")
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", length))
        chunk = 16
        for start in range(0, frames, chunk):
            n = min(chunk, frames - start)
            for k in range(n):
                frame[0:4] = (start + k).to_bytes(4, "little")
                fh.write(frame)
        fh.flush()
        os.fsync(fh.fileno())
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--frames", type=int, default=2000, help="512x512x2-byte frames (2000 = ~1.05 GB)"
    )
    ap.add_argument("--limit-mb", type=float, default=LIMIT_MB)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ith-bench-mem-"))
    try:
        spool = tmp / "spool"
        for d in ("tmp", "incoming"):
            (spool / d).mkdir(parents=True, exist_ok=True)
        staged = spool / "tmp" / "enhanced-ct.dcm"
        t0 = time.perf_counter()
        size = write_instance(staged, args.frames)
        os.rename(staged, spool / "incoming" / "enhanced-ct.dcm")
        print(
            f"Enhanced CT: {args.frames} frames 512x512x16 bit, {size / 1e6:.0f} MB "
            f"(written in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        for k in [k for k in env if k.startswith(("DICOM_", "ITH_", "API_", "JWT_", "VAULT_"))]:
            del env[k]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp), str(Path(__file__).resolve().parent)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print("FAIL: the indexer subprocess failed")
            return 1
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        outputs = list((spool / "studies").glob("*/*/*.dcm"))
        quarantine = list((spool / "quarantine").rglob("*.json"))
        peak_mb = max(report["maxrss_kb"], report["vmhwm_kb"]) / 1024
        print(
            f"indexer run_once: {report['seconds']:.1f} s, handled {report['handled']}, "
            f"processed {report['processed']}, quarantined {report['quarantined']}"
        )
        if quarantine:
            for q in quarantine:
                print(f"  quarantined: {q.parent.name}: {json.loads(q.read_text()).get('error')}")
        if outputs:
            print(f"output: {outputs[0].stat().st_size / 1e6:.0f} MB")
        print(f"RSS after imports and setup: {report['maxrss_before_kb'] / 1024:.1f} MB")
        print(
            f"peak RSS (ru_maxrss {report['maxrss_kb'] / 1024:.1f} MB, "
            f"VmHWM {report['vmhwm_kb'] / 1024:.1f} MB): {peak_mb:.1f} MB"
        )
        ok = report["processed"] == 1 and len(outputs) == 1 and peak_mb < args.limit_mb
        why = "" if report["processed"] == 1 and outputs else " (instance not processed)"
        print(
            f"target peak RSS < {args.limit_mb:.0f} MB: {'PASS' if ok else 'FAIL'} "
            f"({peak_mb:.1f} MB){why}"
        )
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
