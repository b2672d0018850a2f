"""The DICOM status table (dicom/status.py) that the C-STORE SCU and the
STOW-RS client share: each row of the forwarding table, code by code."""

from __future__ import annotations

import pytest

from ith_proxy.dicom.status import DELIVERED, PERMANENT, TRANSIENT, classify, describe

ROWS = [
    # success, and warnings: delivered, the description is the warning to keep
    (0x0000, DELIVERED, "0x0000 Success"),
    (0xB000, DELIVERED, "0xB000 Coercion of data elements"),
    (0xB006, DELIVERED, "0xB006 Elements discarded"),
    (0xB007, DELIVERED, "0xB007 Data set does not match SOP class"),
    (0xB123, DELIVERED, "0xB123 Warning"),
    (0x0107, DELIVERED, "0x0107 Attribute list error"),
    (0x0116, DELIVERED, "0x0116 Attribute value out of range"),
    # out of resources and the like: the peer may recover
    (0xA700, TRANSIENT, "0xA700 Out of resources"),
    (0xA7FF, TRANSIENT, "0xA7FF Out of resources"),
    (0x0213, TRANSIENT, "0x0213 Resource limitation"),
    (0xFE00, TRANSIENT, "0xFE00 Cancel"),
    # refused for what the instance is: resending cannot help
    (0xA900, PERMANENT, "0xA900 Data set does not match SOP class"),
    (0xA9FF, PERMANENT, "0xA9FF Data set does not match SOP class"),
    (0xC000, PERMANENT, "0xC000 Cannot understand"),
    (0xC122, PERMANENT, "0xC122 Transfer syntax not supported"),
    (0xCFFF, PERMANENT, "0xCFFF Cannot understand"),
    (0x0117, PERMANENT, "0x0117 Invalid object instance"),
    (0x0122, PERMANENT, "0x0122 SOP class not supported"),
    (0x0124, PERMANENT, "0x0124 Not authorized"),
    (0x0211, PERMANENT, "0x0211 Unrecognized operation"),
    (0x0212, PERMANENT, "0x0212 Mistyped argument"),
    # unknown failures are retried; the attempt limit makes a lasting one permanent
    (0x0110, TRANSIENT, "0x0110 Processing failure"),
    (0x1234, TRANSIENT, "0x1234"),
]


@pytest.mark.parametrize(("status", "result", "text"), ROWS, ids=[f"{r[0]:04X}" for r in ROWS])
def test_each_status_has_its_result(status: int, result: str, text: str) -> None:
    got, reason = classify(status)
    assert got == result
    assert reason.startswith(text)
    assert describe(status) == text


def test_unknown_failures_say_why_they_are_retried() -> None:
    assert (
        classify(0x0110)[1] == "0x0110 Processing failure (not a known permanent failure: retried)"
    )


@pytest.mark.parametrize("status", [-1, 0x10000, 1 << 40])
def test_a_status_out_of_range_is_transient(status: int) -> None:
    assert classify(status) == (TRANSIENT, f"invalid status {status}")
