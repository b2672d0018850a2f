"""The de-identification walk as it was before issue 11's walk pass: the reference
``tests/test_deid_equal.py`` compares ``deid.engine`` against (output bytes and
recorded originals).  ``Deidentifier`` below is ``deid/engine.py`` at 97f573e,
with what it used of ``deid/raw.py`` (``read_text``, ``replace_text``),
``deid/meta.py`` (``rebuild``) and ``Profile.rule`` copied in; the helpers the
pass did not touch (actions, un, private, pseudo, dates, text) are imported.
Not to be edited but to follow a deliberate change of behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from ith_proxy.deid import un
from ith_proxy.deid.actions import CLEANABLE_VRS, KEEP, REMOVE, Context, replacement
from ith_proxy.deid.dates import shift_days
from ith_proxy.deid.engine import DeidResult
from ith_proxy.deid.meta import KEPT
from ith_proxy.deid.private import SafePrivate
from ith_proxy.deid.profile import METHOD_CODES, Profile, Rule, level_of
from ith_proxy.deid.pseudo import patient_key, patient_pseudonym, remap_uid
from ith_proxy.deid.raw import encode_raw
from ith_proxy.deid.text import identifier_fragments


@dataclass
class _Pass:
    """State of one apply(): the result, and what the actions need (``actions.Context``)."""

    result: DeidResult
    ctx: Context


def _plain(value: object) -> object:
    """A vault-safe copy of an element value (multi-values joined the DICOM way);
    a binary value stays ``bytes`` (not copied), which the vault stores raw."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (MultiValue, list)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, (int, float)) or value is None:
        return value
    return str(value)


def _sequence_plain(seq: Sequence) -> list:
    un.settle_items(seq)  # nested UN sequences are recorded value by value
    return [
        {
            (e.keyword or f"({e.tag.group:04X},{e.tag.element:04X})"): (
                _sequence_plain(e.value) if e.VR == "SQ" else _plain(e.value)
            )
            for e in item
        }
        for item in seq
    ]


def _original(elem: DataElement) -> object:
    return _sequence_plain(elem.value) if elem.VR == "SQ" else _plain(elem.value)


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    """Without decoding the element."""
    raw = ds.get_item(tag)
    if raw is None:
        return False
    if raw.VR is not None:
        return raw.VR == "SQ"
    try:  # implicit VR: ask the dictionary
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _text(ds: Dataset, tag: int) -> str:
    """A top-level text value, read raw when possible (so it stays undecoded)."""
    found = read_text(ds, BaseTag(tag))
    if found is not None:
        return found[2]
    elem = ds.get(tag)
    return "" if elem is None or elem.value is None else str(elem.value)


def _empty(elem: DataElement) -> bool:
    return elem.value in ("", None, b"") or (elem.VR == "SQ" and len(elem.value) == 0)


class Deidentifier:
    def __init__(
        self,
        secret: bytes,
        options: frozenset[str] = frozenset(),
        safe_private: tuple[tuple[int, str, int], ...] = (),
        profile: Profile | None = None,
    ) -> None:
        self.secret = secret
        self.profile = profile or Profile(frozenset(options))
        self.options = self.profile.options
        self.private = SafePrivate(safe_private) if self.profile.retain_private else None
        self._marks: dict[tuple[bool, bool], list] = {}
        # options whose columns clean (C) text: its identifiers are read first
        self._cleans_text = bool(
            self.options
            & {"clean_descriptors", "retain_device_identity", "retain_patient_characteristics"}
        )
        if "retain_long_full_dates" in self.options:
            self.date_mode = "UNMODIFIED"
        elif "retain_long_modified_dates" in self.options:
            self.date_mode = "MODIFIED"
        else:
            self.date_mode = "REMOVED"

    # --- the public entry points ---

    def apply(self, ds: Dataset) -> DeidResult:
        key = patient_key(_text(ds, 0x00100020), _text(ds, 0x00100010), _text(ds, 0x00100030))
        pseudo_id = patient_pseudonym(self.secret, key)
        result = DeidResult(
            patient_id=pseudo_id,
            patient_name=f"ANON^{pseudo_id}",
            study_uid=self._uid(_text(ds, 0x0020000D)),
            series_uid=self._uid(_text(ds, 0x0020000E)),
            sop_uid=self._uid(_text(ds, 0x00080018)),
            dates=self.date_mode,
        )
        result.shift = shift_days(self.secret, key)
        result.identifiers = self._identifiers(ds) if self._cleans_text else []
        self._walk(ds, "", self._pass(result), top=True)
        self._mark(ds)
        if hasattr(ds, "file_meta"):
            self.rewrite_meta(ds.file_meta, result.sop_uid, result)
        return result

    def apply_fragment(self, ds: Dataset, result: DeidResult) -> None:
        """De-identify elements that follow the pixel data, into the same result,
        with the same per-patient date shift and cleaning as ``apply`` used."""
        self._walk(ds, "", self._pass(result), top=True)

    def rewrite_meta(
        self, meta: FileMetaDataset, sop_uid: str, result: DeidResult | None = None
    ) -> None:
        """File meta that matches the de-identified dataset and names us, rebuilt
        from an allow-list (see ``meta.rebuild``); what it drops is recorded."""
        for path, elem in _rebuild(meta, sop_uid):
            if result is not None:
                self._record(result, "instance", path, _original(elem))

    # --- the walk ---

    def _uid(self, uid: str) -> str:
        return uid if "retain_uids" in self.options else remap_uid(self.secret, uid)

    def _pass(self, result: DeidResult) -> _Pass:
        return _Pass(
            result,
            Context(
                self.secret,
                result.patient_id,
                result.patient_name,
                self.date_mode,
                result.shift,
                tuple(result.identifiers),
            ),
        )

    @staticmethod
    def _record(result: DeidResult, level: str, path: str, value: object) -> None:
        result.phi.setdefault(level, {})[path] = value

    def _identifiers(self, ds: Dataset) -> list[str]:
        """Identifying text of this instance, for cleaning text (read before any change)."""
        values = []
        for tag in ds.keys():
            rule = _rule(self.profile, tag)
            if rule is None or rule.action in ("K", "C"):
                continue
            elem = ds[tag]
            if (elem.VR in CLEANABLE_VRS or elem.VR == "DA") and not _empty(elem):
                values.append(str(elem.value))
        return identifier_fragments(values)

    def _walk(self, ds: Dataset, prefix: str, state: _Pass, top: bool) -> None:
        kept_blocks: set[tuple[int, int]] = set()
        creators: list[BaseTag] = []
        for tag in list(ds.keys()):
            group = tag >> 16  # int arithmetic: BaseTag.group is a Python property
            if group == 0x0000 or group == 0x0002:  # command, file meta: no dataset content
                self._remove(ds, tag, prefix, state, top)
                continue
            if not tag & 0xFFFF:
                del ds[tag]  # group lengths would be stale after any change
                continue
            if tag.is_private:
                if 0x0010 <= tag.element <= 0x00FF:
                    creators.append(tag)
                    continue
                listed = self.private.safe_vr(ds, tag) if self.private is not None else None
                if listed is not None and self._keep_private(ds, tag, listed, prefix, state, top):
                    kept_blocks.add((tag.group, tag.element >> 8))
                    continue
                if listed is None and un.needs_settling(ds.get_item(tag), tag):
                    un.settle(ds, tag)  # a sequence is recorded value by value
                self._remove(ds, tag, prefix, state, top)
                continue
            if group & 0xFF00 in (0x5000, 0x6000):  # curves and overlays
                self._remove(ds, tag, prefix, state, top)
                continue
            rule = _rule(self.profile, tag)
            action = rule.action if rule is not None else "K"
            raw = ds.get_item(tag)
            vr = raw.VR if raw.VR is not None else un.dictionary_vr(tag)
            if vr is None or vr == "UN":  # untyped: only these leave the fast path
                kind = un.settle(ds, tag)
                if kind == un.BROKEN or (kind == un.UNTYPED and rule is None):
                    self._remove(ds, tag, prefix, state, top)  # cannot be checked
                    continue
                vr = "SQ" if kind == un.SEQUENCE else vr
            # K keeps; on a sequence, C (clean) and U (X/Z/U*: keep with the UIDs
            # inside replaced) descend so each nested attribute gets its own rule.
            sequence = vr == "SQ"
            if action == "K" or (action in ("C", "U") and sequence):
                if sequence:
                    elem = ds[tag]
                    name = elem.keyword or f"({tag.group:04X},{tag.element:04X})"
                    for i, item in enumerate(elem.value):
                        self._walk(item, f"{prefix}{name}[{i}].", state, top=False)
                continue
            self._act(ds, tag, action, prefix, state, top)
        for tag in creators:  # private creators only for blocks that stay
            if (tag.group, tag.element) not in kept_blocks:
                self._remove(ds, tag, prefix, state, top)

    def _keep_private(
        self, ds: Dataset, tag: BaseTag, listed: str, prefix: str, state: _Pass, top: bool
    ) -> bool:
        """A safe private element stays, but not blindly: a sequence's items get the
        whole walk (standard attributes nested in it get their rules), a UID is
        remapped like the study's own UIDs (kept under Retain UIDs), and an element
        the parser could not type (UN, implicit VR with an unknown creator) that the
        table lists as a sequence or UID, or with no VR, is removed since what it
        holds cannot be checked.  Returns whether it stays."""
        path = f"{prefix}({tag.group:04X},{tag.element:04X})"
        if _is_sequence(ds, tag):
            for i, item in enumerate(ds[tag].value):
                self._walk(item, f"{path}[{i}].", state, top=False)
            return True
        vr = ds.get_item(tag).VR or ds[tag].VR
        if vr == "UI":  # remapped exactly when the UIDs it may name are (Retain UIDs)
            if "retain_uids" not in self.options:
                self._act(ds, tag, "U", prefix, state, top)
            return True
        return not (
            vr == "UN" and (listed in ("SQ", "UI", "") or un.holds_items(ds.get_item(tag).value))
        )

    def _remove(
        self,
        ds: Dataset,
        tag: BaseTag,
        prefix: str,
        state: _Pass,
        top: bool,
        original: object = None,
    ) -> None:
        elem = ds[tag]
        path = prefix + (elem.keyword or f"({tag.group:04X},{tag.element:04X})")
        self._record(
            state.result,
            level_of(elem.keyword) if top else "instance",
            path,
            _original(elem) if original is None else original,
        )
        del ds[tag]

    def _act(
        self, ds: Dataset, tag: BaseTag, action: str, prefix: str, state: _Pass, top: bool
    ) -> None:
        """Apply ``action`` to one element: raw if it is undecoded text (but for
        cleaning, whose text may need the character set), else decoded.  What
        the value becomes is ``actions.replacement``'s on both paths."""
        if action != "C" and self._act_raw(ds, tag, action, prefix, state, top):
            return
        elem = ds[tag]
        original = _original(elem)
        new = replacement(action, elem.VR, elem.keyword, original, state.ctx)
        if new is REMOVE:
            self._remove(ds, tag, prefix, state, top, original)
            return
        if new is KEEP:
            return
        elem.value = new  # pydicom splits backslash-joined values
        if _plain(elem.value) != original:
            path = prefix + (elem.keyword or f"({tag.group:04X},{tag.element:04X})")
            self._record(
                state.result, level_of(elem.keyword) if top else "instance", path, original
            )

    def _act_raw(
        self, ds: Dataset, tag: BaseTag, action: str, prefix: str, state: _Pass, top: bool
    ) -> bool:
        """The fast path for undecoded text elements; False if it does not apply."""
        found = read_text(ds, tag)
        if found is None:
            return False
        raw, vr, text = found
        keyword = keyword_for_tag(tag)
        new = replacement(action, vr, keyword, text, state.ctx)
        if new is KEEP:
            return True
        path = prefix + (keyword or f"({tag.group:04X},{tag.element:04X})")
        level = level_of(keyword) if top else "instance"
        if new is REMOVE:
            self._record(state.result, level, path, text)
            del ds[tag]
            return True
        value = "" if new is None else new
        if not isinstance(value, str) or not value.isascii():
            return False  # not ASCII text (never so today): the general path encodes it
        if value != text:
            self._record(state.result, level, path, text)
            replace_text(ds, raw, vr, value)
        return True

    def _mark(self, ds: Dataset) -> None:
        """PatientIdentityRemoved, DeidentificationMethod(+CodeSequence) and
        LongitudinalTemporalInformationModified: constant per options and
        encoding, so encoded once and added as raw elements."""
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        if ts is None or not ts.is_transfer_syntax:
            for elem in self._marker_elements():
                ds[elem.tag] = elem
            return
        key = (ts.is_implicit_VR, ts.is_little_endian)
        if key not in self._marks:
            self._marks[key] = encode_raw(self._marker_elements(), *key)
        for raw in self._marks[key]:
            ds[raw.tag] = raw

    def _marker_elements(self) -> list[DataElement]:
        active = [o for o in METHOD_CODES if o != "basic" and o in self.options]
        method = (
            f"ith-proxy PS3.15 E.1-1 {self.profile.edition}".strip()
            + (": " + ", ".join(active) if active else ": basic")
        )[:64]
        codes = []
        for key in ["basic", *active]:
            value, meaning = METHOD_CODES[key]
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        marks = Dataset()
        marks.PatientIdentityRemoved = "YES"
        marks.DeidentificationMethod = method
        marks.DeidentificationMethodCodeSequence = Sequence(codes)
        marks.LongitudinalTemporalInformationModified = self.date_mode
        return list(marks)


# --- deid/raw.py (read_text, replace_text) and deid/meta.py (rebuild) at 97f573e ---

_TEXT_VRS = frozenset(
    [
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    ]
)
_CHARSET_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_DELIMITERS = {0x5C, 0x3D, 0x5E}


def _vr_of(raw: RawDataElement, tag: BaseTag) -> str | None:
    if raw.VR is not None:
        return raw.VR
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def read_text(ds: Dataset, tag: BaseTag) -> tuple[RawDataElement, str, str] | None:
    raw = cast("DataElement | RawDataElement | None", ds.get_item(tag))
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.length == 0xFFFFFFFF:
        return None
    vr = _vr_of(raw, tag)
    if vr not in _TEXT_VRS:
        return None
    value = raw.value
    if vr in _CHARSET_VRS and not (value.isascii() and b"\x1b" not in value):
        text = decode_bytes(value, ds._character_set, _DELIMITERS)
    else:
        text = value.decode("ascii", "replace")
    return raw, vr, text.rstrip(" \x00")


def replace_text(ds: Dataset, raw: RawDataElement, vr: str, text: str) -> None:
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    ds[raw.tag] = RawDataElement(
        raw.tag, raw.VR, len(data), data, 0, raw.is_implicit_VR, raw.is_little_endian
    )


def _rule(profile: Profile, tag: BaseTag) -> Rule | None:
    rule = profile.rules.get(int(tag))
    if rule is not None:
        return rule
    for mask, value, pattern_rule in profile.patterns:
        if int(tag) & mask == value:
            return pattern_rule
    return None


_OURS = (
    (BaseTag(0x00020001), "OB", b"\x00\x01"),
    (BaseTag(0x00020012), "UI", IMPLEMENTATION_CLASS_UID),
    (BaseTag(0x00020013), "SH", IMPLEMENTATION_VERSION),
)


def _encoded(vr: str, value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    data = value.encode("ascii")
    return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data


def _same_raw(old: DataElement | RawDataElement | None, vr: str, value: str | bytes) -> bool:
    return (
        type(old) is RawDataElement
        and vr == old.VR
        and not old.is_implicit_VR
        and old.is_little_endian
        and old.value == _encoded(vr, value)
    )


def _path(elem: DataElement) -> str:
    tag = elem.tag
    return "FileMeta." + (elem.keyword or f"({tag.group:04X},{tag.element:04X})")


def _rebuild(meta: FileMetaDataset, sop_uid: str) -> list[tuple[str, DataElement]]:
    gone: list[tuple[str, DataElement]] = []
    for tag in [t for t in meta.keys() if int(t) not in KEPT]:
        if tag & 0xFFFF:
            gone.append((_path(meta[tag]), meta[tag]))
        del meta[tag]
    for tag, vr, value in (*_OURS, (BaseTag(0x00020003), "UI", sop_uid)):
        if _same_raw(meta.get_item(tag, keep_deferred=True), vr, value):
            continue
        old = meta.get(tag)
        if old is not None and old.value == value:
            continue
        if old is not None and old.value not in (None, "", b""):
            gone.append((_path(old), DataElement(tag, old.VR, old.value)))
        meta[tag] = DataElement(tag, vr, value)
    return gone
