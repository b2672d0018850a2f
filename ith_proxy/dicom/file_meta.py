"""The File Meta Information group of an output file, encoded (PS3.10 7.1).

The indexer writes one per instance (``files.write_joined``).  pydicom's
``write_file_meta_info`` validated and encoded it element by element: ~20% of
the indexer's CPU time per small instance (py-spy, docs/performance.md
"Issue 11: receive and index cost").  ``encode`` packs with struct the meta
that ``deid.meta.rebuild`` leaves (version, SOP class and instance,
transfer syntax, our implementation class and version, each once, single
ASCII values), byte for byte what pydicom writes for it
(tests/test_file_meta.py compares them); any other meta (a missing element,
multiple values, non-ASCII text; an input kept as received) goes through
pydicom as before, with its checks and defaults.

Only the allowed elements are ever written, whatever the meta holds
(``allowed``): the de-identifier's allow-list is enforced here too.
"""

from __future__ import annotations

import io
import struct

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

PREAMBLE = b"\x00" * 128 + b"DICM"  # zeroed (CVE-2019-11687)
# The file meta elements an output may have (PS3.10 7.1); the de-identifier
# sets their values (deid.meta.KEPT), anything else is never written.
ALLOWED = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
_ALLOWED_SET = frozenset(ALLOWED)
# the text elements of an output's meta, by element number, and their VRs
TEXT = ((0x0002, "UI"), (0x0003, "UI"), (0x0010, "UI"), (0x0012, "UI"), (0x0013, "SH"))
_SHORT = struct.Struct("<HH2sH")


def allowed(meta: FileMetaDataset) -> FileMetaDataset:
    """``meta`` itself when it holds allowed elements only, else a copy that does."""
    if all(int(tag) in _ALLOWED_SET for tag in meta.keys()):
        return meta  # the de-identifier rebuilt it already
    out = FileMetaDataset()
    for tag in ALLOWED:
        if tag in meta:
            out[tag] = meta[tag]
    return out


def _packed(meta: FileMetaDataset) -> bytes | None:
    """The group as pydicom writes it for exactly the six allowed elements
    with plain values (a group length element is recomputed); else None."""
    if set(map(int, meta.keys())) - {0x00020000} != _ALLOWED_SET:
        return None
    version = meta[0x00020001]
    if version.VR != "OB" or version.value != b"\x00\x01":
        return None
    texts: dict[int, str] = {}
    for element, vr in TEXT:
        elem = meta[0x00020000 | element]
        if vr != elem.VR or not isinstance(elem.value, str):
            return None
        texts[element] = elem.value
    return pack(texts)


def pack(texts: dict[int, str]) -> bytes | None:
    """The group (its group length first) of version 00 01 and the five text
    elements, given by element number (0002, 0003, 0010, 0012, 0013), as
    pydicom writes them; None unless each is one non-empty ASCII value."""
    body = [struct.pack("<HH2s2xL", 0x0002, 0x0001, b"OB", 2), b"\x00\x01"]
    for element, vr in TEXT:
        value = texts[element]
        if not value or not value.isascii():
            return None
        raw = value.encode("ascii")
        if b"\\" in raw or len(raw) > 0xFFFE:
            return None
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        body += [_SHORT.pack(0x0002, element, vr.encode(), len(raw)), raw]
    group = b"".join(body)
    return _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(group)) + group


def encode(meta: FileMetaDataset) -> bytes:
    """Preamble, 'DICM' and the allowed part of ``meta``, Explicit VR Little Endian."""
    meta = allowed(meta)
    packed = _packed(meta)
    if packed is not None:
        return PREAMBLE + packed
    buf = io.BytesIO()
    head = DicomFileLike(buf)
    head.write(PREAMBLE)
    write_file_meta_info(head, meta, enforce_standard=True)
    return buf.getvalue()
