"""The synthetic CT data sets of the benches, their shares, and fresh copies.

``make_dataset`` writes CT slices with pydicom.  ``split_shares`` hard-links a
data set into N directories (one per association of the parallel mode).
``Refresher`` writes copies of a data set with new Study/Series/SOP Instance
UIDs by byte replacement (same length), so the same proxy can take it again
and again as new instances (memory and sustained modes).  See bench/README.md.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DATASETS = {
    "large": (200, 512, "200-slice 512x512 16-bit CT"),
    "small": (1000, 64, "1000 small 64x64 CT instances"),
}


def make_dataset(out: Path, count: int, size: int) -> int:
    """Write ``count`` CT slices of size x size into ``out``; return total bytes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True)
    pixels = bytearray(os.urandom(size * size * 2))
    pixels[1::2] = bytes(b & 0x0F for b in pixels[1::2])  # 12 bits stored
    study, frame = generate_uid(), generate_uid()
    per_series = 200 if count <= 200 else 100
    series = [generate_uid() for _ in range((count + per_series - 1) // per_series)]
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.ContentTime = f"1016{i % 60:02d}"
        ds.AccessionNumber, ds.Modality = "ACC20240115001", "CT"
        ds.Manufacturer, ds.InstitutionName = "BenchCo", "Bench General Hospital"
        ds.ReferringPhysicianName = "Doe^Referrer"
        ds.StudyDescription, ds.SeriesDescription = "CT CHEST", f"AXIAL {size}"
        ds.PatientName, ds.PatientID = "Bench^Patient^Q", "BENCH000123"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600302", "F", "063Y"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "CHEST", "1.25", "120"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[i // per_series]
        ds.StudyID, ds.SeriesNumber = "1", i // per_series + 1
        ds.InstanceNumber = i % per_series + 1
        z = -100.0 - 1.25 * (i % per_series)
        ds.ImagePositionPatient = [-175.0, -175.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.SliceLocation = z
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [350.0 / size, 350.0 / size]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        pixels[0:4] = i.to_bytes(4, "little")  # varying prefix, same buffer
        ds.PixelData = bytes(pixels)
        ds.save_as(out / f"ct{i:05d}.dcm", enforce_file_format=True)
    return sum(p.stat().st_size for p in out.iterdir())


def split_shares(data: Path, n: int, out: Path) -> list[Path]:
    """Hard-link the files of ``data`` into ``n`` directories under ``out``
    (file i goes to share i mod n); return the share directories."""
    shares = [out / f"share{k:02d}" for k in range(n)]
    for d in shares:
        d.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(data))):
        os.link(data / name, shares[i % n] / name)
    return shares


def _fresh_uid(old: str) -> str:
    """``old`` with its last 20 digits replaced by random ones (the first not 0)."""
    return old[:-20] + random.choice("123456789") + "".join(random.choices("0123456789", k=19))


class Refresher:
    """Copies of one data set with fresh UIDs, for sending it again as new
    instances: per copy one new study, new series and new SOP Instance UIDs
    (the same lengths, so only bytes change, not the element lengths)."""

    def __init__(self, data: Path) -> None:
        from pydicom import dcmread

        self.files: list[tuple[str, bytes, str]] = []  # (name, bytes, SOP UID)
        self.study = ""
        self.series: set[str] = set()
        for name in sorted(os.listdir(data)):
            raw = (data / name).read_bytes()
            ds = dcmread(data / name, stop_before_pixels=True)
            self.study = ds.StudyInstanceUID
            self.series.add(ds.SeriesInstanceUID)
            self.files.append((name, raw, ds.SOPInstanceUID))
        uids = [self.study, *self.series, *(sop for _, _, sop in self.files)]
        if not all(len(u) >= 40 and u[-21:].isdigit() for u in uids):
            raise ValueError("Refresher needs the long generated UIDs of make_dataset")

    def write(self, out: Path, shares: int = 1) -> list[Path]:
        """Write one fresh copy into ``shares`` directories under ``out``
        (file i into share i mod shares); return those directories."""
        study = {self.study.encode(): _fresh_uid(self.study).encode()}
        series = {s.encode(): _fresh_uid(s).encode() for s in self.series}
        dirs = [out / f"share{k:02d}" for k in range(shares)]
        for d in dirs:
            d.mkdir(parents=True)
        for i, (name, raw, sop) in enumerate(self.files):
            data = raw.replace(sop.encode(), _fresh_uid(sop).encode())
            for old, new in (*study.items(), *series.items()):
                data = data.replace(old, new)
            (dirs[i % shares] / name).write_bytes(data)
        return dirs
