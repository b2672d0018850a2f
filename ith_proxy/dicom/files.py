"""Read a DICOM file's header without its pixels, and write a new header
followed by the original pixel bytes, streamed and byte-identical.

Pixel Data (and Float/Double Float Pixel Data) is never loaded: the reader
notes where the element starts and ends, and the writer copies that byte
range in chunks.  Elements after the pixel data (rare: padding, signatures)
are parsed as a small trailing dataset so they can be de-identified too.

The source is a path or any seekable binary file object (the indexer passes
a decrypting reader for encrypted input).  From a real file the pixel bytes
are copied in the kernel; from a source with ``copy_to(out, n)`` (the
decrypting reader) by that method, chunk by chunk straight into ``out``;
from anything else in 1 MiB chunks.
"""

from __future__ import annotations

import errno
import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import UID

from ith_proxy.dicom import fastread, file_meta
from ith_proxy.dicom.scu_wire import WireError, meta_group
from ith_proxy.fsio import open_read

# Headers are read and written as they are, without value validation: set by
# libsetup.configure_libraries(), which every entry point calls.

CHUNK = 1 << 20
_LONG_VRS = frozenset(b"OB OW OF OD OL OV SQ UC UN UR UT SV UV".split())
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"}


class DicomFileError(ValueError):
    """The file is not a DICOM Part 10 file this proxy can process."""


@dataclass
class SplitFile:
    path: Path | None  # where it was read from, if it was read from a path
    header: Dataset  # everything before the pixel data, with file_meta
    pixel_start: int  # byte offset of the pixel data element (== size if none)
    pixel_end: int  # byte offset just past it
    trailer: Dataset | None  # elements after the pixel data, if any
    size: int

    @property
    def transfer_syntax(self) -> str:
        return str(self.header.file_meta.TransferSyntaxUID)


def element_end(fh: BinaryIO, start: int, implicit: bool, little: bool) -> int:
    """Offset just past the (pixel data) element starting at ``start``."""
    e = "<" if little else ">"
    fh.seek(start)
    head = fh.read(8)
    if len(head) < 8:
        raise DicomFileError("truncated pixel data element")
    if implicit:
        length = struct.unpack(e + "L", head[4:8])[0]
        pos = start + 8
    elif head[4:6] in _LONG_VRS:
        extra = fh.read(4)
        if len(extra) < 4:
            raise DicomFileError("truncated pixel data element")
        length = struct.unpack(e + "L", extra)[0]
        pos = start + 12
    else:
        length = struct.unpack(e + "H", head[6:8])[0]
        pos = start + 8
    if length != 0xFFFFFFFF:
        return pos + length
    while True:  # encapsulated: items until the sequence delimiter
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            raise DicomFileError("encapsulated pixel data has no sequence delimiter")
        group, elem, ilen = struct.unpack(e + "HHL", item)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or ilen == 0xFFFFFFFF:
            raise DicomFileError("malformed encapsulated pixel data")
        pos += ilen


def read_split(source: Path | str | BinaryIO, path: Path | None = None) -> SplitFile:
    """Parse the header only; locate the pixel data byte range.

    ``source`` is a path, or a seekable binary file object that the caller
    keeps open for ``write_joined`` (``path`` then only names it).
    """
    if isinstance(source, (str, os.PathLike)):
        with open_read(source) as fh:
            return _read_split(fh, Path(source))
    return _read_split(source, path)


_PIXEL_TAGS = fastread.PIXEL_TAGS
# Groups 0000 (command), 0002 (file meta) and the illegal 0001/0003 never
# belong in a dataset; 0004 (directory records) may: Table E.1-1 lists
# (0004,1511) Referenced SOP Instance UID in File.
FIRST_DATASET_GROUP = fastread.FIRST_DATASET_GROUP


def _at_pixels(tag, vr, length) -> bool:
    return tag in _PIXEL_TAGS


def _encoding(ts: UID) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the dataset, from the meta's transfer
    syntax only; deflate is refused here, before any byte of the body is read."""
    if not isinstance(ts, str):  # e.g. several values (a backslash): no transfer syntax
        raise DicomFileError("unreadable file meta: the transfer syntax is not one UID")
    if str(ts) in DEFLATED:
        raise DicomFileError("deflated transfer syntax is not supported")
    if ts.is_transfer_syntax:
        return ts.is_implicit_VR, ts.is_little_endian
    return False, True  # private/unknown: explicit VR LE (PS3.5 A.4), as pydicom does


def _read_meta(fh: BinaryIO) -> tuple[bytes, FileMetaDataset]:
    """The preamble and OUR file meta: exactly (0002,0000) group-length bytes.

    Whatever follows the group is the dataset, even if it starts with more
    group-0002 elements (those are refused by the caller, never merged in).
    The group is parsed by ``fastread`` when it can, else by pydicom.
    """
    try:
        head, raw = meta_group(fh)
    except WireError as exc:
        raise DicomFileError(f"unreadable DICOM: {exc}") from None
    fast = fastread.meta_elements(raw)
    meta = FileMetaDataset(_pydicom_meta_elements(raw) if fast is None else fast)
    if "TransferSyntaxUID" not in meta:
        raise DicomFileError("no file meta / transfer syntax")
    return head[:128], meta


def _pydicom_meta_elements(raw: bytes) -> Dataset:
    try:
        elems = read_dataset(io.BytesIO(raw), False, True)
    except Exception as exc:
        raise DicomFileError(f"unreadable file meta: {type(exc).__name__}") from None
    if any(tag >> 16 != 2 for tag in elems._dict):
        raise DicomFileError("file meta holds elements outside group 0002")
    return elems


def _pydicom_header(
    fh: BinaryIO, preamble: bytes, meta: FileMetaDataset, implicit: bool, little: bool
) -> FileDataset:
    """The dataset from fh's position up to the pixel data, read by pydicom
    (what ``fastread`` does not handle)."""
    body = fh.tell()
    first = fh.read(2)
    fh.seek(body)
    if len(first) == 2 and struct.unpack("<H" if little else ">H", first)[0] < FIRST_DATASET_GROUP:
        raise DicomFileError("dataset holds file meta or command elements")
    try:
        dataset = read_dataset(fh, implicit, little, stop_when=_at_pixels)
    except MemoryError:
        raise  # over [indexer] memory_limit_mb: the indexer's "failed", not bad input
    except Exception as exc:  # pydicom raises many types on garbage
        raise DicomFileError(f"unreadable DICOM: {type(exc).__name__}") from None
    if dataset._dict and min(dataset._dict) >> 16 < FIRST_DATASET_GROUP:
        raise DicomFileError("dataset holds file meta or command elements")
    # read_dataset gave the dataset this encoding (its _read_implicit/_read_little)
    header = FileDataset(fh, dataset, preamble, meta, implicit, little)
    header.set_original_encoding(implicit, little, dataset._character_set)
    return header


def _read_split(fh: BinaryIO, path: Path | None) -> SplitFile:
    """Our file meta up to its group length, then the dataset decoded with the
    meta's (the negotiated) transfer syntax.  File meta or command elements
    inside the dataset are an error (unparseable), not dropped: the meta is
    never taken from the dataset, and such input is hostile or broken."""
    size = fh.seek(0, 2)
    fh.seek(0)
    preamble, meta = _read_meta(fh)
    ts = meta.TransferSyntaxUID
    implicit, little = _encoding(ts)
    body = fh.tell()
    fast = fastread.dataset_elements(fh, body, size, implicit, little)
    if fast is None:
        fh.seek(body)
        header = _pydicom_header(fh, preamble, meta, implicit, little)
        start = fh.tell()
    else:
        elements, start = fast
        fh.seek(start)  # where pydicom's read leaves it
        header = FileDataset(fh, elements, preamble, meta, implicit, little)
        header.set_original_encoding(implicit, little, header._character_set)
    if start >= size:
        return SplitFile(path, header, size, size, None, size)
    end = element_end(fh, start, implicit, little)
    if end > size:
        raise DicomFileError("pixel data is truncated")
    trailer = None
    if end < size:
        fh.seek(end)
        try:
            trailer = read_dataset(fh, implicit, little, size - end)
        except MemoryError:
            raise
        except Exception as exc:
            raise DicomFileError(
                f"unreadable elements after pixel data: {type(exc).__name__}"
            ) from None
        if trailer._dict and min(trailer._dict) >> 16 < FIRST_DATASET_GROUP:
            raise DicomFileError("file meta or command elements after the pixel data")
    return SplitFile(path, header, start, end, trailer, size)


def copy_range(out: BinaryIO, src: BinaryIO, remaining: int) -> None:
    """Append ``remaining`` bytes from src's position to out; in the kernel when
    possible, or by the source's own bulk ``copy_to`` (a decrypting reader)."""
    copy_to = getattr(src, "copy_to", None)
    if copy_to is not None:
        copy_to(out, remaining)
        return
    offset = src.tell()
    try:
        out_fd, src_fd = out.fileno(), src.fileno()
    except (AttributeError, io.UnsupportedOperation):
        out_fd = src_fd = -1
    if out_fd >= 0 and remaining > 0:
        out.flush()  # the kernel appends at the fd's offset
        try:
            while remaining > 0:
                n = os.copy_file_range(src_fd, out_fd, min(remaining, 1 << 30), offset)
                if n == 0:
                    raise DicomFileError("source shrank while copying")
                offset += n
                remaining -= n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            src.seek(offset)  # not supported here: finish with plain copies
    while remaining > 0:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            raise DicomFileError("source shrank while copying")
        out.write(chunk)
        remaining -= len(chunk)


def copy_raw(out: BinaryIO, source: Path | BinaryIO) -> None:
    """Copy a file (a path or a seekable file object) unchanged, in chunks."""
    if isinstance(source, (str, os.PathLike)):
        with open_read(source) as src:
            copy_range(out, src, os.fstat(src.fileno()).st_size)
        return
    size = source.seek(0, 2)
    source.seek(0)
    copy_range(out, source, size)


LONG_VR_NAMES = frozenset(vr.decode() for vr in _LONG_VRS)


def _encode_dataset(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """Encode a dataset; untouched raw elements are copied as read.

    Elements the de-identifier never decoded are still RawDataElements
    holding their original bytes: they are framed with struct and appended,
    which is several times cheaper than pydicom's per-element writer and
    keeps retained values byte-identical.  Decoded elements (changed values,
    sequences) and raw ones pydicom would still read (a deferred value) go
    through pydicom.  The elements are taken from the dataset's own dict in
    tag order, sorted as ints: ``get_item`` per tag and BaseTag comparisons
    cost more than the framing (issue 11).
    """
    order = "<" if little else ">"
    short, long_ = struct.Struct(order + "HH2sH").pack, struct.Struct(order + "HH2s2xL").pack
    implicit_head = struct.Struct(order + "HHL").pack
    encodings = ds.get("SpecificCharacterSet", "iso8859")
    parts: list[bytes] = []
    fp: DicomFileLike | None = None
    buf = io.BytesIO()
    elements = ds._dict
    for tag in sorted(elements, key=int):  # BaseTag's own __lt__ is Python code
        elem = elements[tag]
        if not tag & 0xFFFF or tag >> 16 in (0x0000, 0x0002):  # int ops: no property calls
            continue  # command and file meta groups are no dataset content; group lengths
        if (
            type(elem) is RawDataElement
            and elem.value is not None
            and elem.length != 0xFFFFFFFF
            and elem.is_implicit_VR == implicit
            and elem.is_little_endian == little
        ):
            value, vr = elem.value, elem.VR
            group, element = tag >> 16, tag & 0xFFFF
            if implicit:
                parts += (implicit_head(group, element, len(value)), value)
                continue
            if vr in LONG_VR_NAMES:
                parts += (long_(group, element, vr.encode(), len(value)), value)
                continue
            if vr and len(value) <= 0xFFFF:
                parts += (short(group, element, vr.encode(), len(value)), value)
                continue
        if fp is None:
            fp = DicomFileLike(buf)
            fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_data_element(fp, ds[tag], encodings)
        parts.append(buf.getvalue())
        buf.seek(0)
        buf.truncate()
    return b"".join(parts)


def write_joined(out: BinaryIO, split: SplitFile, src: BinaryIO | None = None) -> None:
    """Write split.header (as it is now), the original pixel bytes, the trailer.

    The pixel bytes come from ``src`` (the file object read_split parsed), or
    from ``split.path`` reopened.
    """
    if src is None:
        if split.path is None:
            raise ValueError("write_joined needs the source file object")
        with open_read(split.path) as fh:
            return write_joined(out, split, fh)
    ts = split.header.file_meta.TransferSyntaxUID
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    head = file_meta.encode(split.header.file_meta)  # preamble zeroed, allowed elements only
    out.write(head + _encode_dataset(split.header, implicit, little))
    src.seek(split.pixel_start)
    copy_range(out, src, split.pixel_end - split.pixel_start)
    if split.trailer is not None and len(split.trailer):
        out.write(_encode_dataset(split.trailer, implicit, little))


# Q/R main attributes (issue 9) by catalog level and column, read from the
# de-identified header the indexer already holds: anonymized values, as stored.
MAIN_ATTRIBUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "patient": (("birth_date", "PatientBirthDate"), ("sex", "PatientSex")),
    "study": (
        ("study_date", "StudyDate"),
        ("study_time", "StudyTime"),
        ("accession", "AccessionNumber"),
        ("study_id", "StudyID"),
        ("description", "StudyDescription"),
        ("referring", "ReferringPhysicianName"),
    ),
    "series": (
        ("series_number", "SeriesNumber"),
        ("description", "SeriesDescription"),
        ("body_part", "BodyPartExamined"),
        ("series_date", "SeriesDate"),
        ("series_time", "SeriesTime"),
    ),
    "instance": (("instance_number", "InstanceNumber"), ("number_of_frames", "NumberOfFrames")),
}
_MAIN_TEXT_LIMIT = 1024  # a catalog column holds a short value, never a blob
MAIN_TAGS = tuple(
    (level, tuple((column, int(tag_for_keyword(kw) or 0)) for column, kw in pairs))
    for level, pairs in MAIN_ATTRIBUTES.items()
)
NO_MAIN_TEXT = frozenset(("SQ", "UN", "OB", "OW"))  # VRs whose main attribute is stored empty
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


def _main_text(value: Any) -> str:
    if value is None or isinstance(value, (bytes, bytearray, Dataset)):
        return ""
    if isinstance(value, (list, tuple, MultiValue)):  # pydicom's Sequence is a MultiValue
        if any(isinstance(v, Dataset) for v in value):
            return ""
        text = "\\".join(_main_text(v) for v in value)
    else:
        text = str(value)
    return text.strip()[:_MAIN_TEXT_LIMIT]


def _main_value(ds: Dataset, tag: int) -> str:
    """One main attribute's text: printable ASCII bytes as they are (no pydicom
    conversion: ~20x cheaper), anything else through pydicom."""
    elem = ds.get_item(tag)
    if elem is None or elem.VR in NO_MAIN_TEXT:
        return ""
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if raw is None:
            return ""
        text = printable(raw)
        if text is not None:
            return text
        elem = ds[tag]
    return _main_text(elem.value)


def printable(raw: bytes) -> str | None:
    """A main attribute's printable ASCII bytes as the catalog keeps them, else None."""
    if _PRINTABLE.fullmatch(raw):
        return raw.decode("ascii").strip(" ")[:_MAIN_TEXT_LIMIT]
    return None


def main_attributes(ds: Dataset) -> dict[str, dict[str, str]]:
    """The Q/R main attributes of a (de-identified) header, by level and column.

    A value that does not decode (a hostile header) is stored empty: the
    instance itself was already accepted."""
    out: dict[str, dict[str, str]] = {}
    for level, pairs in MAIN_TAGS:
        values = out.setdefault(level, {})
        for column, tag in pairs:
            try:
                values[column] = _main_value(ds, tag)
            except Exception:  # a value pydicom cannot decode
                values[column] = ""
    return out
