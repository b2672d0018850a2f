"""Find the marker segments of encapsulated pixel data that can carry text.

A JPEG codestream may hold COM (FFFE) and APPn (FFE0..FFEF) segments (EXIF,
comments, thumbnails), a JPEG 2000 / HTJ2K codestream COM (FF64) segments;
de-identifying the DICOM header leaves them in place, and the indexer copies
pixel data byte for byte.  ``scan`` lists them so that the instance can be
quarantined instead (deid/risk.py decides; docs/deid.md says why not strip).

Marker segments are read, entropy-coded data is not: for JPEG and JPEG-LS
the header from SOI to the first SOS of each frame (only when that scan does
not hold every component is the coded data searched, by a regular
expression over 64 KB chunks, for the segments before the later scans); for
JPEG 2000 the main header and every tile-part header, reached through the
tile-part lengths.  A frame starts at
a fragment that begins with SOI (or SOC); a header may span fragments.  The
reads are small (4 KB read-ahead within a fragment), through the item
headers: memory is bounded whatever the size of the pixel data.

Findings are fixed phrases (frame number and segment kind), never the
segments' content.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

JPEG = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    }
)
JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
J2K = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
RLE = "1.2.840.10008.1.2.5"  # segments of run-length data only: nothing to find

# The next marker after entropy-coded data: FF (fill FFs) then a code that is
# not a stuffed 00 (JPEG) / a stuffed bit (JPEG-LS: code < 0x80) nor RSTn.
_NEXT_MARKER = {
    "jpeg": re.compile(rb"\xff+[\x01-\xcf\xd8-\xfe]"),
    "jpeg-ls": re.compile(rb"\xff+[\x80-\xcf\xd8-\xfe]"),
}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # + JPEG-LS SOF55
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Structural APPn segments, allowed because every byte is a number, never text:
# APP0 "JFIF" 1.00-1.02 with no thumbnail (IJG libjpeg and DCMTK write it), and
# APP14 "Adobe" of its fixed 12-byte payload (its transform flag changes colour decoding).
_JFIF = re.compile(rb"JFIF\x00\x01[\x00-\x02][\x00-\x02].{4}\x00\x00", re.S)
_ADOBE = re.compile(rb"Adobe.{7}", re.S)
_SCAN_CHUNK = 1 << 16


class _Malformed(Exception):
    """The codestream does not have the structure its transfer syntax says."""


def scan(src: BinaryIO, split) -> list[str]:
    """Findings about the pixel data of ``split`` (a dicomfile.SplitFile: its
    pixel_start, pixel_end and transfer_syntax) read from src; empty when
    nothing in it can carry text outside the pixel values."""
    pixel_start, pixel_end = split.pixel_start, split.pixel_end
    if pixel_end - pixel_start < 12:
        return []
    src.seek(pixel_start)
    head = src.read(12)
    if head[:4] != b"\xe0\x7f\x10\x00":
        return []  # Float / Double Float Pixel Data: native only
    if not (
        (head[4:6] in (b"OB", b"OW") and head[8:12] == b"\xff\xff\xff\xff")
        or head[4:8] == b"\xff\xff\xff\xff"
    ):
        return []  # native pixel data: no codestream (and nothing a decoder would parse)
    transfer_syntax = split.transfer_syntax  # only now: reading it costs as much as the rest
    if (
        transfer_syntax not in JPEG
        and transfer_syntax not in JPEG_LS
        and transfer_syntax not in J2K
    ):
        if transfer_syntax == RLE:
            return []
        return ["encapsulated pixel data in a transfer syntax whose codestream is not checked"]
    stream = _Fragments(
        src, pixel_start + (12 if head[8:12] == b"\xff\xff\xff\xff" else 8), pixel_end
    )
    kind = "j2k" if transfer_syntax in J2K else "jpeg-ls" if transfer_syntax in JPEG_LS else "jpeg"
    frame = 0
    try:
        stream.next_item()  # the Basic Offset Table
        if not stream.next_item():
            return ["encapsulated pixel data has no fragment"]
        while True:
            frame += 1
            found = _j2k_frame(stream) if kind == "j2k" else _jpeg_frame(stream, kind)
            if found:
                return [f"frame {frame}: {found}"]
            if not stream.next_frame(b"\xff\x4f" if kind == "j2k" else b"\xff\xd8"):
                return []
    except _Malformed as exc:
        return [f"frame {frame}: {exc.args[0]}, so its segments cannot be checked"]


class _Fragments:
    """The encapsulated items as one byte stream, read a few bytes at a time;
    ``read`` crosses fragment boundaries, ``next_frame`` skips to a fragment
    that starts a new frame.  Bytes read ahead (``pushback``) always belong to
    the current fragment (the one carried byte of ``find_marker`` aside, which
    is read again at once)."""

    def __init__(self, src: BinaryIO, pos: int, end: int) -> None:
        self.src, self.pos, self.end = src, pos, end  # pos: next item header
        self.left = 0  # bytes of the current fragment not yet read from src
        self.data_at = 0  # file offset of the current fragment's next byte
        self.offset = 0  # bytes consumed in the current frame
        self.pushback = b""

    def next_item(self) -> bool:
        """Move to the next fragment (any unread rest of the current one is skipped)."""
        self.pushback, self.left = b"", 0
        if self.pos + 8 > self.end:
            raise _Malformed("the item sequence is truncated")
        self.src.seek(self.pos)
        group, elem, length = struct.unpack("<HHL", self.src.read(8))
        if (group, elem) == (0xFFFE, 0xE0DD):
            self.pos = self.end
            return False
        if (group, elem) != (0xFFFE, 0xE000) or self.pos + 8 + length > self.end:
            raise _Malformed("an item is malformed")
        self.data_at, self.left, self.pos = self.pos + 8, length, self.pos + 8 + length
        return True

    def _more(self, want: int) -> bool:
        """Fill pushback from the current fragment, or move to the next one."""
        if self.left == 0:
            return self.pos < self.end and self.next_item()
        self.src.seek(self.data_at)
        got = self.src.read(min(max(want, 4096), self.left))
        if not got:
            raise _Malformed("the pixel data is truncated")
        self.data_at += len(got)
        self.left -= len(got)
        self.pushback += got
        return True

    def read(self, n: int, cross: bool = True) -> bytes:
        """Up to n bytes (fewer only at the end of the pixel data, or, with
        cross=False, at the end of the current fragment)."""
        out = b""
        while True:
            take = self.pushback[: n - len(out)]
            self.pushback = self.pushback[len(take) :]
            out += take
            if len(out) == n or (out and not cross) or not self._more(n - len(out)):
                break
        self.offset += len(out)
        return out

    def exact(self, n: int) -> bytes:
        got = self.read(n)
        if len(got) < n:
            raise _Malformed("a marker segment is truncated")
        return got

    def skip(self, n: int) -> None:
        while n > 0:
            if self.pushback:
                n -= len(self.read(min(n, len(self.pushback))))
            elif self.left:
                step = min(n, self.left)
                self.data_at += step
                self.left -= step
                self.offset += step
                n -= step
            elif not (self.pos < self.end and self.next_item()):
                raise _Malformed("a marker segment is truncated")

    def next_frame(self, start: bytes) -> bool:
        """Skip to the next fragment that begins with ``start``; False at the end."""
        while self.pos < self.end and self.next_item():
            if self.left >= len(start):
                self.src.seek(self.data_at)
                if self.src.read(len(start)) == start:
                    self.offset = 0
                    return True
        return False

    def find_marker(self, pattern: re.Pattern) -> None:
        """Skip entropy-coded data up to the next marker, which is left unread."""
        carry = b""
        while True:
            chunk = self.read(_SCAN_CHUNK, cross=False)
            if not chunk:
                raise _Malformed("a scan has no end marker")
            data = carry + chunk
            m = pattern.search(data)
            if m:
                back = data[m.end() - 2 :]
                self.pushback = back + self.pushback
                self.offset -= len(back)
                return
            carry = data[-1:] if data[-1:] == b"\xff" else b""


def _jpeg_frame(s: _Fragments, kind: str) -> str | None:
    """Walk one JPEG / JPEG-LS frame's marker segments; a finding or None."""
    if s.exact(2) != b"\xff\xd8":
        raise _Malformed("it does not start with SOI")
    components, progressive = 0, False
    while True:
        if s.exact(1) != b"\xff":
            raise _Malformed("a marker is missing")
        code = 0xFF
        while code == 0xFF:
            code = s.exact(1)[0]
        if code == 0xD9:
            return None  # EOI
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:
            continue
        length = struct.unpack(">H", s.exact(2))[0]
        if length < 2:
            raise _Malformed("a marker segment length is invalid")
        body = length - 2
        if code == 0xFE:
            return "JPEG COM segment (comment text)"
        if 0xE0 <= code <= 0xEF:
            payload = s.exact(body) if body <= 16 else b""
            if (code == 0xE0 and _JFIF.fullmatch(payload)) or (
                code == 0xEE and _ADOBE.fullmatch(payload)
            ):
                continue
            return f"JPEG APP{code - 0xE0} segment (application data)"
        if code in _SOF or code == 0xDA:
            fields = s.exact(min(body, 6))
            s.skip(body - len(fields))
            if code != 0xDA:
                if len(fields) < 6:
                    raise _Malformed("a frame header is truncated")
                components, progressive = fields[5], code in _PROGRESSIVE
                continue
            if not fields or not components:
                raise _Malformed("a scan header is malformed")
            if fields[0] >= components and not progressive:
                return None  # the one scan of the frame: only entropy data and EOI follow
            s.find_marker(_NEXT_MARKER[kind])  # more scans: look between them
            continue
        if code == 0xDE:  # DHP: hierarchical, scans of several frames follow
            progressive = True
        s.skip(body)


def _j2k_frame(s: _Fragments) -> str | None:
    """Walk one JPEG 2000 codestream's main and tile-part headers."""
    if s.exact(2) != b"\xff\x4f":
        raise _Malformed("it does not start with SOC")
    tile_part_end = None
    while True:
        marker = s.exact(2)
        if marker[0] != 0xFF:
            raise _Malformed("a marker is missing")
        code = marker[1]
        if code == 0xD9:
            return None  # EOC
        if code == 0x93:  # SOD: tile-part data follows, up to Psot
            if tile_part_end is None:
                return None  # Psot 0: the last tile-part runs to EOC
            if tile_part_end < s.offset:
                raise _Malformed("a tile-part length is invalid")
            s.skip(tile_part_end - s.offset)
            tile_part_end = None
            continue
        length = struct.unpack(">H", s.exact(2))[0]
        if length < 2:
            raise _Malformed("a marker segment length is invalid")
        if code == 0x64:
            return "JPEG 2000 COM segment (comment text)"
        if code == 0x90:  # SOT: Isot, Psot (from the SOT marker's first byte), TPsot, TNsot
            start = s.offset - 4
            body = s.exact(length - 2)
            if len(body) < 8:
                raise _Malformed("a tile-part header is truncated")
            psot = struct.unpack(">L", body[2:6])[0]
            tile_part_end = start + psot if psot else None
            if psot and psot < length + 4:
                raise _Malformed("a tile-part length is invalid")
            continue
        s.skip(length - 2)
