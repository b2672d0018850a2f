"""Apply the profile to a pydicom Dataset: pure functions, no I/O.

``Deidentifier.apply(ds)`` changes the dataset in place (header only: the
caller streams pixel data separately) and returns every value it replaced or
removed, keyed by level and by an attribute path such as ``PatientName`` or
``ReferencedSeriesSequence[0].SeriesInstanceUID``, so the vault can give
every original back exactly.  The table applies at every depth of nested
sequences.  Elements that need no action stay raw (undecoded); text that
does is replaced raw too (``raw.py``).  What a value becomes under an action
is decided in one place, ``actions.replacement``, for both paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ith_proxy.deid import meta as file_meta
from ith_proxy.deid import un
from ith_proxy.deid.actions import CLEANABLE_VRS, KEEP, REMOVE, Context, replacement
from ith_proxy.deid.dates import shift_days
from ith_proxy.deid.private import SafePrivate
from ith_proxy.deid.profile import METHOD_CODES, Profile, level_of
from ith_proxy.deid.pseudo import patient_key, patient_pseudonym, remap_uid
from ith_proxy.deid.raw import encode_raw, plain_in_dict, read_text, replace_text, text_of
from ith_proxy.deid.text import identifier_fragments


@dataclass
class DeidResult:
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    phi: dict[str, dict[str, object]] = field(default_factory=dict)  # level -> path -> value
    dates: str = ""  # what happened to dates: REMOVED, MODIFIED or UNMODIFIED
    # the per-instance state apply() used, so elements after the pixel data
    # (apply_fragment) get the same date shift and descriptor cleaning
    shift: int = field(default=0, repr=False)
    identifiers: list[str] = field(default_factory=list, repr=False)


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


def _item(ds: Dataset, tag: BaseTag) -> DataElement | RawDataElement:
    """``ds.get_item(tag)`` for a key of its dict, without the ``Tag()``
    conversion (issue 11); a deferred value is read as ``get_item`` reads it."""
    elem = ds._dict[tag]
    if isinstance(elem, RawDataElement) and elem.value is None:
        return ds.get_item(tag)
    return elem


def _delete(ds: Dataset, tag: BaseTag) -> None:
    """``del ds[tag]``: for a standard tag outside the pixel group, all it does."""
    if plain_in_dict(tag):
        del ds._dict[tag]
    else:
        del ds[tag]


class _Charset:
    """A data set's character sets, looked up when first needed and kept for
    its walk (pydicom recomputes them from the data set on each call; the walk
    never changes (0008,0005) nor the encoding an item inherits)."""

    __slots__ = ("ds", "value")

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.value: str | list[str] | None = None

    def __call__(self) -> str | list[str]:
        if self.value is None:
            self.value = self.ds._character_set
        return self.value


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
        result = self.start(lambda tag: _text(ds, tag))
        result.identifiers = self._identifiers(ds) if self._cleans_text else []
        self._walk(ds, "", self._pass(result), top=True)
        self._mark(ds)
        if hasattr(ds, "file_meta"):
            self.rewrite_meta(ds.file_meta, result.sop_uid, result)
        return result

    def start(self, text: Callable[[int], str]) -> DeidResult:
        """An instance's result before its walk (pseudonyms, its UIDs remapped,
        its date shift), from ``text(tag)``: a top-level text value, "" if absent.
        Both walks begin here (this one and deid/flat.py's)."""
        key = patient_key(text(0x00100020), text(0x00100010), text(0x00100030))
        pseudo_id = patient_pseudonym(self.secret, key)
        result = DeidResult(
            patient_id=pseudo_id,
            patient_name=f"ANON^{pseudo_id}",
            study_uid=self._uid(text(0x0020000D)),
            series_uid=self._uid(text(0x0020000E)),
            sop_uid=self._uid(text(0x00080018)),
            dates=self.date_mode,
        )
        result.shift = shift_days(self.secret, key)
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
        for path, elem in file_meta.rebuild(meta, sop_uid):
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
            rule = self.profile.rule(tag)
            if rule is None or rule.action in ("K", "C"):
                continue
            elem = ds[tag]
            if (elem.VR in CLEANABLE_VRS or elem.VR == "DA") and not _empty(elem):
                values.append(str(elem.value))
        return identifier_fragments(values)

    def _walk(self, ds: Dataset, prefix: str, state: _Pass, top: bool) -> None:
        kept_blocks: set[tuple[int, int]] = set()
        creators: list[BaseTag] = []
        charset = _Charset(ds)
        rule_of = self.profile.rule
        # int arithmetic on the dict's keys: BaseTag's group, element and
        # is_private are Python properties, and get_item converts with Tag()
        for tag in list(ds._dict):
            group = tag >> 16
            if group == 0x0000 or group == 0x0002:  # command, file meta: no dataset content
                self._remove(ds, tag, prefix, state, top)
                continue
            element = tag & 0xFFFF
            if not element:
                _delete(ds, tag)  # group lengths would be stale after any change
                continue
            if group & 1:  # private
                if 0x0010 <= element <= 0x00FF:
                    creators.append(tag)
                    continue
                listed = self.private.safe_vr(ds, tag) if self.private is not None else None
                if listed is not None and self._keep_private(ds, tag, listed, prefix, state, top):
                    kept_blocks.add((group, element >> 8))
                    continue
                if listed is None and un.needs_settling(ds.get_item(tag), tag):
                    un.settle(ds, tag)  # a sequence is recorded value by value
                self._remove(ds, tag, prefix, state, top)
                continue
            if group & 0xFF00 in (0x5000, 0x6000):  # curves and overlays
                self._remove(ds, tag, prefix, state, top)
                continue
            rule = rule_of(tag)
            action = rule.action if rule is not None else "K"
            raw = _item(ds, tag)
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
                    name = elem.keyword or f"({group:04X},{element:04X})"
                    for i, item in enumerate(elem.value):
                        self._walk(item, f"{prefix}{name}[{i}].", state, top=False)
                continue
            self._act(ds, tag, action, prefix, state, top, charset)
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
        keyword = elem.keyword
        path = prefix + (keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        self._record(
            state.result,
            level_of(keyword) if top else "instance",
            path,
            _original(elem) if original is None else original,
        )
        _delete(ds, tag)

    def _act(
        self,
        ds: Dataset,
        tag: BaseTag,
        action: str,
        prefix: str,
        state: _Pass,
        top: bool,
        charset: _Charset | None = None,
    ) -> None:
        """Apply ``action`` to one element: raw if it is undecoded text (but for
        cleaning, whose text may need the character set), else decoded.  What
        the value becomes is ``actions.replacement``'s on both paths.
        ``charset``: the walk's lookup of this data set's character sets."""
        if action != "C" and self._act_raw(
            ds, tag, action, prefix, state, top, charset or _Charset(ds)
        ):
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
        self,
        ds: Dataset,
        tag: BaseTag,
        action: str,
        prefix: str,
        state: _Pass,
        top: bool,
        charset: _Charset,
    ) -> bool:
        """The fast path for undecoded text elements; False if it does not apply."""
        raw = ds._dict.get(tag)  # a deferred value is not raw text: the general path reads it
        found = text_of(raw, tag, charset)
        if found is None:
            return False
        vr, text = found
        keyword = self.profile.keyword(tag)
        new = replacement(action, vr, keyword, text, state.ctx)
        if new is KEEP:
            return True
        path = prefix + (keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        level = level_of(keyword) if top else "instance"
        if new is REMOVE:
            self._record(state.result, level, path, text)
            _delete(ds, tag)
            return True
        value = "" if new is None else new
        if not isinstance(value, str) or not value.isascii():
            return False  # not ASCII text (never so today): the general path encodes it
        if value != text:
            self._record(state.result, level, path, text)
            replace_text(ds, cast("RawDataElement", raw), vr, value)
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
        for raw in self.marks_for(ts.is_implicit_VR, ts.is_little_endian):
            ds[raw.tag] = raw

    def marks_for(self, implicit: bool, little: bool) -> list[RawDataElement]:
        """The marker elements encoded for one encoding, once."""
        key = (implicit, little)
        if key not in self._marks:
            self._marks[key] = encode_raw(self._marker_elements(), *key)
        return self._marks[key]

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
