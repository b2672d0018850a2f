"""De-identified CT, MR and PET instances are no less valid than their inputs.

dicom3tools' ``dciodvfy`` checks each dicomgen sample before and after it
went through the proxy (Basic Profile, and again with every option that can
be combined switched on); the output may have no ``Error -`` line that the
input did not have. Errors are compared as normalized messages: values shown
as `` = <...>`` and repeated whitespace are blanked out, so a
replaced value with the same problem is not a new error.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import canary
import dicomgen
import tools
from helpers import stored_files

ALL_OPTIONS = tuple(o for o in canary.OPTIONS if o != "retain_long_full_dates")


def dciodvfy_errors(path: Path) -> set[str]:
    result = tools.run_tool([tools.require_tool("dciodvfy"), str(path)], timeout=120)
    text = (result.stdout or "") + "\n" + (result.stderr or "")
    errors = set()
    for line in text.splitlines():
        if "Error -" not in line:
            continue
        line = line[line.index("Error -") :]
        line = re.sub(r" = <[^>]*>", " = <>", line)  # values only; Element=<Kw> stays
        errors.add(re.sub(r"\s+", " ", line).strip())
    return errors


@pytest.mark.parametrize("options", [(), ALL_OPTIONS], ids=["basic", "all-options"])
@pytest.mark.parametrize("modality", ["CT", "MR", "PT"])
def test_output_has_no_new_dciodvfy_errors(tmp_path: Path, modality: str, options) -> None:
    tools.require_tool("dciodvfy")
    s = dicomgen.make_instance(tmp_path / "in", modality)
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", s.files, config_text=canary.deid_config(*options)
    )
    assert quarantined == []
    outputs = stored_files(proxy.spool)
    assert len(outputs) == 1
    before, after = dciodvfy_errors(s.files[0]), dciodvfy_errors(outputs[0])
    new = sorted(after - before)
    assert new == [], f"{modality}: dciodvfy errors the input did not have:\n" + "\n".join(new)
