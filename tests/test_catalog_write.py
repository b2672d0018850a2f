"""Catalog.record_instances plans a batch and writes it table by table
(issue 11): the resulting catalog -- every row of patients, studies, series,
instances and study_events, rowids included -- and the new-instance counts
must be those of the statements run row by row, as the indexer did before.
``_rowwise`` below is that earlier code, kept here as the reference."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from ith_proxy.store.catalog import _LEVELS, Catalog, InstanceRow


def _rowwise(cat: Catalog, rows: list[InstanceRow]) -> int:
    """record_instances before issue 11: ~7 statements per row."""
    new = 0
    c = cat.conn
    with c:
        for r in rows:
            pm, sm, se, im = (
                [r.main.get(level, {}).get(k, "") for k in cols] for level, cols in _LEVELS
            )
            c.execute(
                "INSERT INTO patients(pseudo_id, pseudo_name, created_at, name_folded,"
                " birth_date, sex) VALUES (?,?,?,upper(?),?,?)"
                " ON CONFLICT(pseudo_id) DO NOTHING",
                (r.patient_id, r.patient_name, r.received_at, r.patient_name, *pm),
            )
            state = c.execute("SELECT state FROM studies WHERE study_uid = ?", (r.study_uid,)).get
            if state is None:
                c.execute(
                    "INSERT INTO studies(study_uid, patient_id, first_received, last_received,"
                    " study_date, study_time, accession, study_id, description, referring)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (r.study_uid, r.patient_id, r.received_at, r.received_at, *sm),
                )
                cat._event(r.study_uid, r.received_at, "first-received")
            c.execute(
                "INSERT INTO series(series_uid, study_uid, modality, series_number,"
                " description, body_part, series_date, series_time) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(series_uid) DO NOTHING",
                (r.series_uid, r.study_uid, r.modality, *se),
            )
            existed = (
                c.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (r.sop_uid,)).get is not None
            )
            c.execute(
                "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid,"
                " transfer_syntax, size, vault_offset, received_at, instance_number,"
                " number_of_frames) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET size = excluded.size,"
                " transfer_syntax = excluded.transfer_syntax,"
                " vault_offset = COALESCE(excluded.vault_offset, vault_offset),"
                " instance_number = excluded.instance_number,"
                " number_of_frames = excluded.number_of_frames",
                (
                    r.sop_uid,
                    r.series_uid,
                    r.study_uid,
                    r.sop_class_uid,
                    r.transfer_syntax,
                    r.size,
                    r.vault_offset,
                    r.received_at,
                    *im,
                ),
            )
            if not existed:
                new += 1
            if state not in (None, "receiving") and not existed:
                c.execute(
                    "UPDATE studies SET state = 'receiving', completed_at = NULL,"
                    " reopened = reopened + 1 WHERE study_uid = ?",
                    (r.study_uid,),
                )
                cat._event(r.study_uid, r.received_at, "reopened")
            c.execute(
                "UPDATE studies SET last_received = max(last_received, ?),"
                " version = version + 1 WHERE study_uid = ?",
                (r.received_at, r.study_uid),
            )
    return new


def _dump(cat: Catalog) -> dict[str, list[tuple]]:
    return {
        table: list(cat.conn.execute(f"SELECT rowid, * FROM {table} ORDER BY rowid"))
        for table in ("patients", "studies", "series", "instances", "study_events")
    }


def _row(
    study: int,
    series: int,
    sop: int,
    ts: float,
    *,
    patient: int = 0,
    size: int = 100,
    offset: int | None = 0,
    name: str = "anon^pat",
    modality: str = "CT",
    number: str = "",
) -> InstanceRow:
    return InstanceRow(
        patient_id=f"P{patient}",
        patient_name=f"{name}{patient}",
        study_uid=f"1.2.{study}",
        series_uid=f"1.2.{study}.{series}",
        sop_uid=f"1.2.{study}.{series}.{sop}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        modality=modality,
        transfer_syntax="1.2.840.10008.1.2.1",
        size=size,
        vault_offset=offset,
        received_at=ts,
        main={
            "patient": {"birth_date": f"19{patient:02d}0101", "sex": "O"},
            "study": {"study_date": f"2024010{study % 9 + 1}", "accession": f"A{study}"},
            "series": {"series_number": str(series), "description": f"s{series}"},
            "instance": {"instance_number": number or str(sop), "number_of_frames": "1"},
        },
    )


# (batch, then what happens to the studies before the next one)
_SCENARIO: list[tuple[list[InstanceRow], list[tuple[str, int, str | None]]]] = [
    # two studies of one patient interleaved, the same series repeated, a study
    # whose timestamps go backwards, an instance twice in the batch
    (
        [
            *(_row(1, 1, i, 10.0 + i) for i in range(5)),
            _row(2, 1, 1, 20.0),
            _row(1, 2, 1, 9.0),
            _row(2, 1, 2, 19.0),
            _row(1, 1, 3, 30.0, size=7, offset=None, number="33"),
            _row(3, 1, 1, 5.0, patient=1),
        ],
        [
            ("1.2.1", 40, "complete"),
            ("1.2.2", 40, "complete"),
            ("1.2.2", 41, "forwarded"),
            ("1.2.3", 40, "complete"),
            ("1.2.3", 42, None),
        ],
    ),
    # a re-sent instance into the complete study (no reopen, only the timer), then
    # a late one (reopen once), a late one into the forwarded study after a re-sent
    # one, a new patient whose first row carries another name spelling
    (
        [
            _row(1, 1, 0, 50.0, offset=None),
            _row(1, 1, 9, 51.0),
            _row(1, 3, 1, 52.0),
            _row(2, 1, 1, 53.0, size=1),
            _row(2, 2, 5, 54.0, modality="MR"),
            _row(4, 1, 1, 55.0, patient=2, name="Émile^x"),
            _row(4, 1, 2, 56.0, patient=2),
            _row(1, 1, 9, 57.0, offset=99),
        ],
        [
            ("1.2.4", 60, "complete"),
            ("1.2.4", 61, "failed"),
            ("1.2.1", 60, "complete"),
            ("1.2.1", 62, "forwarded"),
        ],
    ),
    # only re-sent instances: counts stay, the quiet timers and versions move
    ([_row(4, 1, 1, 70.0), _row(4, 1, 2, 69.0), _row(3, 1, 1, 71.0, patient=1)], []),
    # a late instance into each of two studies no longer receiving, interleaved
    ([_row(4, 1, 3, 80.0, patient=2), _row(1, 1, 20, 81.0), _row(4, 1, 4, 79.0, patient=2)], []),
    ([], []),
]


def _apply(cat: Catalog, record) -> list[int]:
    counts = []
    for rows, after in _SCENARIO:
        counts.append(record(list(rows)))
        for study, ts, state in after:
            if state == "complete":
                assert cat.complete_study(study, ts, 1.0)
            else:
                cat.study_changed(study, ts, state, ["forwarded"] if state else [])
    return counts


def test_batch_plan_matches_the_row_by_row_statements(tmp_path: Path) -> None:
    old, new = Catalog(tmp_path / "old.sqlite3"), Catalog(tmp_path / "new.sqlite3")
    old_counts = _apply(old, lambda rows: _rowwise(old, rows))
    new_counts = _apply(new, new.record_instances)
    assert new_counts == old_counts == [9, 5, 0, 3, 0]
    before, after = _dump(old), _dump(new)
    assert after == before
    events = [(r[2], r[4]) for r in after["study_events"]]
    assert events.count(("1.2.1", "reopened")) == 2  # once per batch, not per late row
    assert ("1.2.2", "reopened") in events and ("1.2.4", "reopened") in events
    assert [new.study(s)["state"] for s in ("1.2.1", "1.2.2", "1.2.3", "1.2.4")] == [
        "receiving",
        "receiving",
        "complete",
        "receiving",
    ]
    assert old.study("1.2.1") == new.study("1.2.1")


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_generator_input_and_batch_sizes(tmp_path: Path, batch: int) -> None:
    rows = [_row(s, s % 2, i, 100.0 + i, patient=s % 3) for s in range(5) for i in range(20)]
    rows += rows[::7]  # re-sent in later batches
    old, new = Catalog(tmp_path / "old.sqlite3"), Catalog(tmp_path / "new.sqlite3")
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    assert [_rowwise(old, c) for c in chunks] == [new.record_instances(iter(c)) for c in chunks]
    assert _dump(new) == _dump(old)
    assert new.counts()["instances"] == 100


def test_a_commit_by_another_connection_mid_batch_is_waited_for(tmp_path: Path) -> None:
    """The batch's first statement is a write, as row by row: it holds the
    write lock before the lookups, so another connection's commit cannot slip
    in between and turn the batch's first write into an unretried BusyError
    (a stale WAL snapshot) -- the indexer saw it next to the scheduler."""
    cat, other = Catalog(tmp_path / "c.sqlite3"), Catalog(tmp_path / "c.sqlite3")
    cat.record_instances([_row(1, 1, 0, 1.0)])
    other.conn.setbusytimeout(0)
    other_wrote = []

    def meanwhile(cursor, sql: str, bindings) -> bool:
        if sql.startswith("SELECT sop_uid"):  # the second lookup: a snapshot is open
            try:
                other.summary_written("1.2.1", 7)  # the main process's writes
                other_wrote.append(True)
            except apsw.BusyError:
                other_wrote.append(False)  # it waits for us (its busy handler)
        return True

    cat.conn.exec_trace = meanwhile
    assert cat.record_instances([_row(1, 1, 1, 2.0), _row(2, 1, 1, 3.0)]) == 2
    cat.conn.exec_trace = None
    assert other_wrote == [False]
    assert cat.counts()["instances"] == 3
