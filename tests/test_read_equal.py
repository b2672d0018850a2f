"""The indexer's header read (issue 11) gives what pydicom's read gave.

``files.read_split`` parses the file meta and the dataset up to the pixel
data with ``dicom.fastread`` and falls back to pydicom's ``read_dataset``
for whatever that does not handle.  The reference below is the previous
``_read_split`` (pydicom for the meta and the dataset), verbatim in effect.
Both read the same source object and must give the same objects: every
element of the header and of the meta (type, every RawDataElement field,
decoded elements and sequences item by item, attribute by attribute), the
preamble, the encodings, the pixel range and the trailer; or raise the
same error with the same message.  The corpus: Explicit VR LE, Implicit VR
LE, Explicit VR BE and RLE series, the canary study, files as the SCP
writes them, hand-made datasets (private tags, undefined-length sequences
with empty and nested items, a character set before a sequence, zero-length
and odd-length values, duplicate tags, unknown VRs, multi-frame pixels,
elements after the pixel data, a header longer than one read), an
encrypted source, and every truncation and some corruptions of the header.
"""

from __future__ import annotations

import io
import random
import struct
import weakref
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import corpus as corpus_files
from ith_proxy.dicom import fastread, scp
from ith_proxy.dicom import files as dicomfile
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.dicom.scu_wire import WireError, meta_group
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import Keyring

configure_libraries()  # as every entry point does (validation: IGNORE)
DicomFileError = dicomfile.DicomFileError


def _reference(fh: BinaryIO, path: Path | None) -> dicomfile.SplitFile:
    """files._read_split before the fast reader: pydicom for meta and dataset."""
    size = fh.seek(0, 2)
    fh.seek(0)
    try:
        head, raw = meta_group(fh)
    except WireError as exc:
        raise DicomFileError(f"unreadable DICOM: {exc}") from None
    try:
        elems = read_dataset(io.BytesIO(raw), False, True)
    except Exception as exc:
        raise DicomFileError(f"unreadable file meta: {type(exc).__name__}") from None
    if any(tag >> 16 != 2 for tag in elems._dict):
        raise DicomFileError("file meta holds elements outside group 0002")
    meta = FileMetaDataset(elems)
    if "TransferSyntaxUID" not in meta:
        raise DicomFileError("no file meta / transfer syntax")
    preamble = head[:128]
    implicit, little = dicomfile._encoding(meta.TransferSyntaxUID)
    body = fh.tell()
    first = fh.read(2)
    fh.seek(body)
    if len(first) == 2 and struct.unpack("<H" if little else ">H", first)[0] < 4:
        raise DicomFileError("dataset holds file meta or command elements")
    try:
        dataset = read_dataset(fh, implicit, little, stop_when=dicomfile._at_pixels)
    except MemoryError:
        raise
    except Exception as exc:
        raise DicomFileError(f"unreadable DICOM: {type(exc).__name__}") from None
    if dataset._dict and min(dataset._dict) >> 16 < 4:
        raise DicomFileError("dataset holds file meta or command elements")
    header = FileDataset(fh, dataset, preamble, meta, implicit, little)
    header.set_original_encoding(implicit, little, dataset._character_set)
    start = fh.tell()
    if start >= size:
        return dicomfile.SplitFile(path, header, size, size, None, size)
    end = dicomfile.element_end(fh, start, implicit, little)
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
        if trailer._dict and min(trailer._dict) >> 16 < 4:
            raise DicomFileError("file meta or command elements after the pixel data")
    return dicomfile.SplitFile(path, header, start, end, trailer, size)


def _same(a: Any, b: Any, where: str, seen: set[tuple[int, int]]) -> None:
    """a and b are the same: types, values, attributes, recursively."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if a is b or (id(a), id(b)) in seen:
        return
    if isinstance(a, io.IOBase):
        raise AssertionError(f"{where}: not the file object both were read from")
    if isinstance(a, (bytes, str, int, float)):  # UID, BaseTag, PersonName bytes...
        assert a == b, f"{where}: {a!r} != {b!r}"
        return
    seen.add((id(a), id(b)))
    if isinstance(a, weakref.ref):
        _same(a(), b(), where + "()", seen)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            _same(ka, kb, f"{where} key {ka!r}", seen)
            _same(va, vb, f"{where}[{ka!r}]", seen)
    elif isinstance(a, (list, tuple)):  # RawDataElement, lists in attributes
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        names = getattr(a, "_fields", None) or range(len(a))  # a RawDataElement's fields
        for name, x, y in zip(names, a, b, strict=True):
            _same(x, y, f"{where}.{name}", seen)
    elif hasattr(a, "__dict__") and not isinstance(a, type) and not callable(a):
        _same(vars(a), vars(b), f"{where}.__dict__", seen)  # Dataset, DataElement, Sequence
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _compare(source: Path | bytes | BinaryIO) -> str:
    """Read ``source`` both ways from one file object; 'fast', 'fallback' or
    the error both raised."""
    if isinstance(source, bytes):
        fh: BinaryIO = io.BytesIO(source)
    elif isinstance(source, Path):
        fh = open(source, "rb")  # noqa: SIM115  (closed below, after both reads)
    else:
        fh = source
    with fh:
        try:
            want: dicomfile.SplitFile | str = _reference(fh, None)
        except Exception as exc:  # DicomFileError, or what the reference let through
            want = f"error: {type(exc).__name__}: {exc}"
        try:
            got: dicomfile.SplitFile | str = dicomfile.read_split(fh, None)
        except Exception as exc:
            got = f"error: {type(exc).__name__}: {exc}"
        if isinstance(want, str) or isinstance(got, str):
            assert got == want
            return want
        _same(got, want, "split", set())
        fh.seek(0)
        _, raw = meta_group(fh)
        ts = want.header.file_meta.TransferSyntaxUID
        fast = fastread.dataset_elements(fh, fh.tell(), want.size, *dicomfile._encoding(ts))
    if fastread.meta_elements(raw) is None:
        return "fallback (meta)"
    return "fast" if fast is not None else "fallback"


# ---------------------------------------------------------------------------
# hand-made datasets
# ---------------------------------------------------------------------------

_LONG = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
UNDEFINED = 0xFFFFFFFF


def _el(tag: int, vr: bytes, value: bytes, enc: str, length: int | None = None) -> bytes:
    """One element; enc is 'ivr', 'evr' or 'be'; length overrides len(value)."""
    order = ">" if enc == "be" else "<"
    n = len(value) if length is None else length
    if enc == "ivr":
        return struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, n) + value
    if vr in _LONG:
        return struct.pack(order + "HH2s2xL", tag >> 16, tag & 0xFFFF, vr, n) + value
    return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr, n) + value


def _item(body: bytes, enc: str, undefined: bool) -> bytes:
    order = ">" if enc == "be" else "<"
    if not undefined:
        return struct.pack(order + "HHL", 0xFFFE, 0xE000, len(body)) + body
    head = struct.pack(order + "HHL", 0xFFFE, 0xE000, UNDEFINED)
    return head + body + struct.pack(order + "HHL", 0xFFFE, 0xE00D, 0)


def _seq_end(enc: str) -> bytes:
    return struct.pack(">HHL" if enc == "be" else "<HHL", 0xFFFE, 0xE0DD, 0)


def _file(ts: str, body: bytes) -> bytes:
    """As the SCP writes it: our file meta, then the dataset."""
    return scp.file_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5.6.7", ts, "TEST") + body


def _handmade(enc: str) -> dict[str, bytes]:
    ts = {"ivr": ImplicitVRLittleEndian, "evr": ExplicitVRLittleEndian, "be": ExplicitVRBigEndian}
    e = lambda tag, vr, value, length=None: _el(tag, vr, value, enc, length)  # noqa: E731  (short)
    text = e(0x00100010, b"PN", b"\x1b-AM\xfcller^J\xf6rg ") + e(0x00100020, b"LO", b"P1")
    inner = _item(e(0x00081150, b"UI", b"1.2.3\x00"), enc, True)
    nested = e(0x00081140, b"SQ", inner + _seq_end(enc), UNDEFINED)
    items = (
        _item(text, enc, True)
        + _item(b"", enc, True)  # an empty item of undefined length
        + _item(b"", enc, False)  # an empty item of defined length
        + _item(nested + e(0x00081155, b"UI", b"1.2.9"), enc, False)
    )
    undefined_sq = e(0x00081115, b"SQ", items + _seq_end(enc), UNDEFINED)
    defined_sq = e(0x00082112, b"SQ", _item(text, enc, False))  # stays raw
    start = (
        e(0x00080005, b"CS", b"ISO 2022 IR 100")  # the sequences' items are read with it
        + e(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00")
        + e(0x00080018, b"UI", b"1.2.3.4.5.6.7\x00")
        + e(0x00080050, b"SH", b"")  # zero length
        + e(0x00080060, b"CS", b"OT")
        + e(0x00081030, b"LO", b"odd")  # odd length
    )
    pixels = e(0x00280010, b"US", b"\x00\x04" if enc == "be" else b"\x04\x00")
    pixels += e(0x7FE00010, b"OB", bytes(range(48)))
    trailer = e(0xFFFCFFFC, b"OB", bytes(6))
    private = e(0x00091010, b"LO", b"CREATOR X ") + e(0x00091011, b"OB", b"\x01\x02\x03")
    cases = {
        "sequences": start + e(0x00081111, b"SQ", b"") + undefined_sq + defined_sq,
        "private": start + private + e(0x00200011, b"IS", b""),
        "trailer": start + text + pixels + trailer,
        "no pixels": start + text,
        "empty charset": e(0x00080005, b"CS", b"") + undefined_sq,
        "duplicate and out of order": start
        + text
        + e(0x00080060, b"CS", b"MR")
        + e(0x00080016, b"UI", b"1.2.3\x00"),
        "long header": start + e(0x00091011, b"OB", bytes(100_001)) + text + undefined_sq,
        "value across the first read": start + e(0x00091011, b"OB", bytes(32_700)) + text,
        "sequence across the first read": start
        + e(0x00091011, b"OB", bytes(32_600))
        + undefined_sq,
        "unknown VR": start + _el(0x00091010, b"XX", b"ab", "evr") + text,
        "lowercase VR": start + _el(0x00091010, b"ab", b"cd", "evr") + text,
        "undefined OB": start + e(0x00091011, b"OB", b"\x01\x02" + _seq_end(enc), UNDEFINED),
        "undefined UN": start
        + e(0x00091011, b"UN", _item(text, enc, False) + _seq_end(enc), UNDEFINED),
        "item at the top": start + _seq_end(enc) + text,
        "meta in the dataset": e(0x00020010, b"UI", b"1.2.840.10008.1.2\x00") + start,
        "command in the dataset": start + e(0x00000100, b"US", b"\x01\x00"),
        "cut header": start + text + b"\x10\x00\x20",
        "cut value": start + text + e(0x00081030, b"LO", b"abcdef", 400),
        "cut pixels": start + text + e(0x7FE00010, b"OB", bytes(10), 400),
    }
    return {name: _file(ts[enc], body) for name, body in cases.items()}


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    files = corpus_files.encodings_and_canary(root)
    for path in files[:: len(files) // 6]:  # as the SCP writes them: its meta, the dataset
        raw = path.read_bytes()
        ts = dicomfile.read_split(path).transfer_syntax
        scp_like = root / f"scp-{path.name}"
        scp_like.write_bytes(_file(ts, raw[144 + struct.unpack("<L", raw[140:144])[0] :]))
        files.append(scp_like)
    return files


def test_the_corpus_reads_as_pydicom_reads_it(corpus: list[Path]) -> None:
    taken = [_compare(path) for path in corpus]
    assert len(taken) > 30
    assert taken.count("fast") == len(taken), list(zip(corpus, taken, strict=True))


@pytest.mark.parametrize("enc", ["evr", "ivr", "be"])
def test_handmade_datasets_read_as_pydicom_reads_them(enc: str) -> None:
    taken = {name: _compare(data) for name, data in _handmade(enc).items()}
    fast = {name for name, how in taken.items() if how == "fast"}
    assert {"private", "trailer", "no pixels", "value across the first read"} <= fast, taken
    if enc != "ivr":  # undefined-length sequences: pydicom's read_sequence, in place
        sequences = {"sequences", "empty charset", "long header", "sequence across the first read"}
        assert sequences <= fast, taken
    errors = {name for name, how in taken.items() if how.startswith("error: DicomFileError")}
    assert {"meta in the dataset", "command in the dataset", "cut pixels"} <= errors, taken


def test_a_huge_value_is_left_to_pydicom() -> None:
    """Past the first read, a value over BIG_VALUE is not joined to the buffer."""
    e = lambda tag, vr, value: _el(tag, vr, value, "evr")  # noqa: E731  (short)
    start = e(0x00080060, b"CS", b"OT") + e(0x00091010, b"LO", b"CREATOR X ")
    for n, how in ((fastread.BIG_VALUE + 2, "fallback"), (fastread.READ_SIZE, "fast")):
        data = _file(ExplicitVRLittleEndian, start + e(0x00091011, b"OB", bytes(n)))
        assert _compare(data) == how


def test_an_encrypted_source_reads_as_pydicom_reads_it(corpus: list[Path], tmp_path: Path) -> None:
    keyring = Keyring([Keyring.generate_key()])
    for i, data in enumerate([corpus[0].read_bytes(), _handmade("evr")["long header"]]):
        path = tmp_path / f"enc{i}"
        path.write_bytes(b"".join(vault_stream.encrypt_stream(keyring, [data])))
        assert _compare(vault_stream.open_source(path, keyring)) == "fast"


@pytest.mark.filterwarnings("ignore:Unknown encoding")  # damaged character sets
def test_cut_and_damaged_headers_fail_or_read_as_pydicom(corpus: list[Path]) -> None:
    """Every truncation of three headers, and bytes of them overwritten."""
    rng = random.Random(11)
    samples = [corpus[0], corpus[7], _handmade("evr")["sequences"], _handmade("ivr")["trailer"]]
    for sample in samples:
        data = sample if isinstance(sample, bytes) else sample.read_bytes()
        end = min(len(data), dicomfile.read_split(io.BytesIO(data)).pixel_start + 16)
        for cut in range(end):
            _compare(data[:cut])
        for _ in range(300):
            damaged = bytearray(data)
            at = rng.randrange(128, end)
            damaged[at : at + rng.choice((1, 2, 4))] = rng.randbytes(4)[: rng.choice((1, 2, 4))]
            _compare(bytes(damaged))


def test_the_comparison_sees_a_wrong_field() -> None:
    """The checks above would see a fast reader that is subtly wrong."""
    data = _handmade("evr")["private"]
    split = dicomfile.read_split(io.BytesIO(data))
    other = dicomfile.read_split(io.BytesIO(data))
    tag = 0x00091011
    other.header._dict[tag] = other.header._dict[tag]._replace(value_tell=1)
    with pytest.raises(AssertionError, match="value_tell"):
        _same(other, split, "split", set())


def test_a_transfer_syntax_of_several_values_is_unreadable(corpus: list[Path]) -> None:
    """A backslash in the meta's Transfer Syntax UID made it a list, and the
    reader raised AttributeError (the indexer's "failed") on both paths."""
    data = corpus[0].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    ts = dicomfile.read_split(io.BytesIO(data)).transfer_syntax.encode()
    at = data.index(ts, 132, meta_end)
    damaged = data[:at] + ts.replace(b".", b"\\", 1) + data[at + len(ts) :]
    with pytest.raises(dicomfile.DicomFileError, match="transfer syntax is not one UID"):
        dicomfile.read_split(io.BytesIO(damaged))
