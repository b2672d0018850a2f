"""A late instance after a study was forwarded (issue 8): it reaches the same
destinations as a follow-up, under the same anonymized UIDs, and only the
new instances are sent. A real proxy, a real Orthanc by C-STORE and another
by STOW-RS."""

from __future__ import annotations

from pathlib import Path

import dicomgen
import tools
from forward_e2e import (
    attempts_logged,
    config,
    destination,
    dicom_node,
    events,
    proxy_sops,
    running,
    store,
    wait_destination,
    wait_new_study,
    wait_state,
    web_node,
)
from orthanc import OrthancProcess


def test_a_late_instance_follows_the_study_to_every_destination(tmp_path: Path) -> None:
    first = dicomgen.make_small_series(tmp_path / "first", 3, patient_name="LATE^PATIENT")
    late = dicomgen.make_small_series(
        tmp_path / "late", 2, like=first, series_uid=first.series_uid, seed=7
    )
    with (
        running(OrthancProcess(tmp_path / "pacs")) as pacs,
        running(OrthancProcess(tmp_path / "web", dicomweb=True)) as web,
    ):
        ini = config(
            "pacs, web", dicom_node("pacs", pacs.dicom_port), web_node("web", web.dicomweb_url)
        )
        with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
            store(proxy, first.files)
            study = wait_new_study(proxy, set())
            wait_state(proxy, study, ("forwarded",))
            before = proxy_sops(proxy, study)
            held_before = {p: p.sop_instance_uids(study) for p in (pacs, web)}

            store(proxy, late.files)  # after completion and delivery: the study reopens

            def followed_up(dest: dict) -> bool:
                return dest["reason"] == "followup" and dest["state"] == "delivered"

            for node in ("pacs", "web"):
                wait_destination(proxy, study, node, "a delivered follow-up", followed_up)
            data = wait_state(proxy, study, ("forwarded",))
            after = proxy_sops(proxy, study)
            held_after = {p: p.sop_instance_uids(study) for p in (pacs, web)}
            counts = {p: p.instance_count() for p in (pacs, web)}
    assert len(before) == 3 and len(after) == 5 and before < after
    assert study != first.study_uid and after.isdisjoint(first.sop_uids + late.sop_uids)
    # the same anonymized study at each PACS: the first three, then all five, and nothing else
    assert held_before == {pacs: before, web: before}
    assert held_after == {pacs: after, web: after}
    assert counts == {pacs: 5, web: 5}
    # only the new instances were sent the second time
    for node in ("pacs", "web"):
        assert [n for n, _ in attempts_logged(proxy, study, node)] == [3, 2]
    for node in ("pacs", "web"):
        dest = destination(data, node)
        assert (dest["state"], dest["reason"], dest["delivered"], dest["failed"]) == (
            "delivered",
            "followup",
            5,
            0,
        )
    seen = events(data)
    assert "queued pacs (followup)" in seen and "queued web (followup)" in seen
    assert seen.count("complete") == 2  # completed, reopened by the late instance, completed
