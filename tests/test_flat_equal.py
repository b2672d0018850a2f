"""The indexer's fast lane (``workers/index_flat.py``) makes what the pydicom path makes.

For every file of a corpus and several option sets, both paths run on the
same bytes.  Where the lane takes a file, everything the indexer files
must be the same: the output file byte for byte, the ``DeidResult`` with
every recorded original (values, their types and the order of the records,
as the vault stores them), the SOP class, modality, transfer syntax and Q/R
main attributes.  Where the pydicom path refuses a file (a check, a PHI
risk), the lane must not take it.  The lane may leave any file to the
pydicom path, but it must take the common ones: the generated series and
the vendor-like CTs (tests/vendor_ct.py) in both little endian encodings
(in implicit VR, with private elements only pydicom's private dictionary
types), as the SCP writes them.

The corpus is tests/test_deid_equal.py's (three encodings and RLE, the
canary study, UN and untyped sequences, odd files, three character sets)
plus the vendor-like CTs and hostile variants of a plain file.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

import dicomgen
import vendor_ct
from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from ith_proxy.deid.engine import Deidentifier
from ith_proxy.deid.flat import FlatWalk
from ith_proxy.deid.risk import phi_risk
from ith_proxy.dicom import codestream
from ith_proxy.dicom import files as dicomfile
from ith_proxy.workers import index_checks, index_flat
from test_burned_in import COM, _compress, _frames, _insert, _with_pixels
from test_deid_equal import OPTION_SETS, SITE_PRIVATE, hard_cases

SECRET = b"0123456789abcdef0123456789abcdef-flat"
LITTLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _as_the_scp_writes(path: Path) -> Path:
    """The file again with the meta our SCP writes (our implementation class
    and version, the calling AE as Source AE)."""
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = " CT_SCANNER1"  # odd: padded
    out = path.with_name("scp-" + path.name)
    ds.save_as(out, enforce_file_format=True)
    return out


def _hostile(root: Path, plain: Path) -> list[Path]:
    """Variants of a plain file the checks or the risk tests refuse, or that
    only the pydicom path reads."""
    out = []
    edits = {
        "bad-uid": lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.abc"),
        "no-series": lambda ds: delattr(ds, "SeriesInstanceUID"),
        "burned-in": lambda ds: setattr(ds, "BurnedInAnnotation", "YES"),
        "burned-in-lower": lambda ds: setattr(ds, "BurnedInAnnotation", "yes "),
        "burned-in-no": lambda ds: setattr(ds, "BurnedInAnnotation", "NO"),
        "faces": lambda ds: setattr(ds, "RecognizableVisualFeatures", "YES"),
        "secondary-capture": lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7.4"),
        "no-pixels": lambda ds: delattr(ds, "PixelData"),
        "uid-as-lo": lambda ds: ds.add_new(0x0020000D, "LO", ds.StudyInstanceUID),
        "latin1-name": lambda ds: (
            setattr(ds, "SpecificCharacterSet", "ISO_IR 100"),
            setattr(ds, "PatientName", "Müller^Jörg"),
        ),
        "modality-multi": lambda ds: setattr(ds, "Modality", ["CT", "PT"]),
    }
    for name, edit in edits.items():
        ds = pydicom.dcmread(plain)
        edit(ds)
        if name == "secondary-capture":
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = root / f"hostile-{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    data = plain.read_bytes()
    ds = pydicom.dcmread(plain)
    for name, uid in {"meta-mismatch": ds.SOPInstanceUID, "class-mismatch": ds.SOPClassUID}.items():
        stored = uid.encode()  # its first copy is the file meta's (pydicom rewrites the meta)
        other = stored[:-1] + (b"1" if stored[-1:] != b"1" else b"2")
        path = root / f"hostile-{name}.dcm"
        path.write_bytes(data.replace(stored, other, 1))
        out.append(path)
    padding = b"\xfc\xff\xfc\xff" + b"OB\0\0" + bytes(6)  # (FFFC,FFFC) after the pixels
    for name, blob in {"cut": data[:-7], "trailer": data + padding}.items():
        path = root / f"hostile-{name}.dcm"
        path.write_bytes(blob)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """(all files, those the lane must take with the basic options)."""
    root = tmp_path_factory.mktemp("flat-equal")
    files: list[Path] = []
    common: list[Path] = []
    for i, ts in enumerate((*LITTLE, ExplicitVRBigEndian, RLELossless)):
        s = dicomgen.make_series(root / f"ct{i}", 2, rows=8, cols=8, transfer_syntax=ts)
        files += [Path(p) for p in s.files]
        scp = [_as_the_scp_writes(Path(p)) for p in s.files]
        files += scp
        if ts != ExplicitVRBigEndian:  # RLE: encapsulated, explicit VR little endian
            common += scp
    for vendor in vendor_ct.VENDORS:
        for ts in vendor_ct.TRANSFER_SYNTAXES:
            path = vendor_ct.write_vendor_ct(root / f"{vendor}-{ts}.dcm", vendor, ts)
            scp = _as_the_scp_writes(path)
            files += [path, scp]
            if ts in LITTLE and (vendor, ts) != ("philips", ImplicitVRLittleEndian):
                common.append(scp)  # (an untyped private sequence is un.settle's)
        utf8 = root / f"{vendor}-utf8.dcm"
        files.append(vendor_ct.write_vendor_ct(utf8, vendor, LITTLE[0], 1, charset="ISO_IR 192"))
    files += hard_cases(root)
    files += _hostile(root, common[0])
    # encapsulated pixel data: DCMTK's lossless JPEG (taken), and with a COM
    # segment in its codestream (a PHI risk: never taken)
    jpeg = _compress(common[0], root / "jpeg.dcm")
    common.append(jpeg)
    files.append(jpeg)
    frame = _frames(jpeg)[0]
    files.append(_with_pixels(jpeg, root / "hostile-jpeg-com.dcm", [_insert(frame, 2, COM)]))
    return files, common


def _slow(deid: Deidentifier, path: Path) -> tuple | str:
    """What the indexer's pydicom path files for ``path``, or the quarantine reason."""
    with open(path, "rb") as src:
        try:
            split = dicomfile.read_split(src, path)
            index_checks.check(split)
            if phi_risk(split.header, codestream.scan(src, split)):
                return "phi-risk"
        except (dicomfile.DicomFileError, index_checks.Inconsistent) as exc:
            return type(exc).__name__
        ds = split.header
        result = deid.apply(ds)
        if split.trailer is not None:
            deid.apply_fragment(split.trailer, result)
        out = io.BytesIO()
        dicomfile.write_joined(out, split, src)
        return (
            out.getvalue(),
            repr(dataclasses.asdict(result)),
            str(ds.SOPClassUID),
            str(ds.get("Modality", "") or ""),
            split.transfer_syntax,
            dicomfile.main_attributes(ds),
        )


def _fast(walk: FlatWalk, path: Path) -> tuple | None:
    with open(path, "rb") as src:
        prepared = index_flat.prepare(src, walk, True)
        if prepared is None:
            return None
        out = io.BytesIO()
        prepared.write(out, src)
        return (
            out.getvalue(),
            repr(dataclasses.asdict(prepared.result)),
            prepared.sop_class,
            prepared.modality,
            prepared.header.transfer_syntax,
            prepared.main,
        )


@pytest.mark.parametrize("options", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_the_fast_lane_files_what_the_pydicom_path_files(
    corpus: tuple[list[Path], list[Path]], options: frozenset[str]
) -> None:
    files, common = corpus
    walk = FlatWalk(Deidentifier(SECRET, options, SITE_PRIVATE))
    slow_deid = Deidentifier(SECRET, options, SITE_PRIVATE)
    taken = []
    for path in files:
        fast, slow = _fast(walk, path), _slow(slow_deid, path)
        if fast is None:
            continue
        taken.append(path)
        assert not isinstance(slow, str), f"{path.name}: taken, but the pydicom path says {slow}"
        for i, what in enumerate(("output", "result", "SOP class", "modality", "syntax", "main")):
            assert fast[i] == slow[i], f"{path.name}: the {what} differs"
    if walk.ok:  # the basic and retain options: the lane's profile
        assert set(common) <= set(taken), sorted(p.name for p in set(common) - set(taken))
    else:  # safe private elements kept, or cleaning: always the pydicom path
        assert taken == []


def test_the_lane_leaves_refused_and_unusual_files_to_pydicom(
    corpus: tuple[list[Path], list[Path]],
) -> None:
    """The checks' and risk tests' refusals, big endian, UN elements, a cut
    file, elements after the pixels, non-ASCII text: never the lane's."""
    files, _ = corpus
    walk = FlatWalk(Deidentifier(SECRET, OPTION_SETS["basic"], SITE_PRIVATE))
    taken = {p.name for p in files if _fast(walk, p) is not None}
    for name in (
        "hostile-bad-uid.dcm",
        "hostile-no-series.dcm",
        "hostile-meta-mismatch.dcm",
        "hostile-class-mismatch.dcm",
        "hostile-burned-in.dcm",
        "hostile-burned-in-lower.dcm",
        "hostile-faces.dcm",
        "hostile-secondary-capture.dcm",
        "hostile-no-pixels.dcm",
        "hostile-uid-as-lo.dcm",
        "hostile-latin1-name.dcm",
        "hostile-modality-multi.dcm",
        "hostile-cut.dcm",
        "hostile-trailer.dcm",
        "hostile-jpeg-com.dcm",
        "latin1-evr.dcm",
        "utf8-ivr.dcm",
        "odd-be.dcm",
        "siemens-utf8.dcm",
    ):
        assert name not in taken, name
    assert "hostile-burned-in-no.dcm" in taken  # "NO" is no risk
    assert not any(name.startswith(("un-", "ct2")) for name in taken)  # UN; big endian


def test_damaged_headers_are_refused_or_read_as_pydicom_reads_them(
    tmp_path: Path, corpus: tuple[list[Path], list[Path]]
) -> None:
    """A worst peer's header: every cut of a vendor CT's header, and random
    byte changes in it.  The lane never raises; what it takes, it files as
    the pydicom path does, and it never takes what that path refuses."""
    import random

    from ith_proxy.dicom import flat

    _, common = corpus
    source = next(p for p in common if p.name.startswith("scp-siemens"))
    data = source.read_bytes()
    with open(source, "rb") as fh:
        header = flat.read(fh)
    assert header is not None
    walk = FlatWalk(Deidentifier(SECRET, OPTION_SETS["basic"], SITE_PRIVATE))
    slow_deid = Deidentifier(SECRET, OPTION_SETS["basic"], SITE_PRIVATE)
    path = tmp_path / "damaged.dcm"
    for cut in range(0, header.pixel_start + 16, 5):
        path.write_bytes(data[:cut])
        assert _fast(walk, path) is None, cut
    rng = random.Random(11)
    taken = 0
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(132, header.pixel_start)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        fast = _fast(walk, path)
        if fast is None:
            continue
        taken += 1
        slow = _slow(slow_deid, path)
        assert not isinstance(slow, str), slow
        assert fast == slow
    assert taken > 50  # most single-byte damage is in values, which the lane still takes


@pytest.mark.parametrize("depth", [8, 40])
def test_nested_sequences_deeper_than_the_lane_takes_are_pydicom_s(
    tmp_path: Path, corpus: tuple[list[Path], list[Path]], depth: int
) -> None:
    """Sequences nested ``depth`` deep (a hostile file may nest thousands): the
    lane takes 8 and files them as pydicom's path does, and leaves 40 to it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from ith_proxy.dicom import flat

    _, common = corpus
    ds = pydicom.dcmread(common[0])
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.5.1"
    for level in range(depth):
        outer = Dataset()
        outer.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        outer.ReferencedImageSequence = Sequence([inner])
        outer.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.99.5.{level + 2}"
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    path = tmp_path / "nested.dcm"
    ds.save_as(path, enforce_file_format=True)
    walk = FlatWalk(Deidentifier(SECRET, OPTION_SETS["basic"], SITE_PRIVATE))
    fast = _fast(walk, path)
    if depth > flat.MAX_DEPTH:
        assert fast is None
    else:
        assert fast is not None
        assert fast == _slow(Deidentifier(SECRET, OPTION_SETS["basic"], SITE_PRIVATE), path)
