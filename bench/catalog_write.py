"""CPU time of ``Catalog.record_instances`` per instance row, for batches
like the indexer's (``[indexer] batch_size``, 64 by default), on a catalog
that already holds N instances.

A template catalog with N existing instances (studies of 100 instances in
2 series, 20 studies per patient, the Q/R main columns filled) is built once
per N and cached in the temporary directory (``--fresh`` rebuilds it); each
run copies it and records ``--batches`` batches into the copy, one
``record_instances`` call (one transaction, ``synchronous=FULL``) per batch.
The figure is the process's CPU time (``getrusage``: user + system) per row;
the wall time includes the commits' fsyncs and is printed for reference.

Scenarios (``--scenario``):

- ``new``: new instances of new studies, one study and 2 series per batch
  (the common case: a modality sends a study);
- ``late``: new instances into existing studies that are complete (each
  batch reopens its study);
- ``resent``: every row already in the catalog (a re-sent study: only the
  quiet timer moves).

Before/after: run it once in this tree and once with ``PYTHONPATH``
pointing at the other tree (the template is shared: its schema is the same).

    python bench/catalog_write.py --existing 10000 1000000 [--runs 5]
    PYTHONPATH=/tmp/base python bench/catalog_write.py --existing 10000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: A/B trees
from ith_proxy.store.catalog import Catalog, InstanceRow

PER_STUDY = 100


def row(study: int, instance: int, ts: float) -> InstanceRow:
    patient = study // 20
    return InstanceRow(
        patient_id=f"PAT{patient:07d}",
        patient_name=f"ANON^{patient:07d}",
        study_uid=f"1.2.826.0.1.3680043.10.1.{study}",
        series_uid=f"1.2.826.0.1.3680043.10.1.{study}.{instance % 2}",
        sop_uid=f"1.2.826.0.1.3680043.10.1.{study}.{instance % 2}.{instance}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=4096 + instance,
        vault_offset=instance * 300,
        received_at=ts,
        main={
            "patient": {"birth_date": "19700101", "sex": "O"},
            "study": {"study_date": "20240101", "study_time": "120000", "accession": "A1"},
            "series": {"series_number": str(instance % 2), "description": "AX"},
            "instance": {"instance_number": str(instance), "number_of_frames": "1"},
        },
    )


def template(n: int, fresh: bool) -> Path:
    path = Path(tempfile.gettempdir()) / f"ith-catalog-bench-{n}.sqlite3"
    if path.exists() and not fresh:
        return path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    cat = Catalog(path)
    studies = n // PER_STUDY
    step = max(1, 10000 // PER_STUDY)
    for first in range(0, studies, step):
        cat.record_instances(
            row(s, i, 1000.0 + s)
            for s in range(first, min(studies, first + step))
            for i in range(PER_STUDY)
        )
    with cat.conn:  # every existing study has been forwarded
        cat.conn.execute("UPDATE studies SET state = 'forwarded', completed_at = 2.0")
    cat.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()
    return path


def batches(scenario: str, n: int, count: int, size: int) -> list[list[InstanceRow]]:
    studies = n // PER_STUDY
    out = []
    for b in range(count):
        ts = 5000.0 + b
        if scenario == "new":
            first = b * size
            out.append([row(studies + b, first + i, ts) for i in range(size)])
        elif scenario == "late":
            study = (b * 7919) % studies
            out.append([row(study, PER_STUDY + b * size + i, ts) for i in range(size)])
        else:  # resent
            study = (b * 7919) % studies
            out.append([row(study, i % PER_STUDY, ts) for i in range(size)])
    return out


def run(n: int, scenario: str, count: int, size: int, fresh: bool) -> tuple[float, float]:
    src = template(n, fresh)
    work = Path(tempfile.mkdtemp(prefix="ith-catalog-bench-"))
    try:
        db = work / "c.sqlite3"
        shutil.copyfile(src, db)
        cat = Catalog(db)
        todo = batches(scenario, n, count, size)
        cat.record_instances(todo[0])  # warm the statement cache and the pages
        before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for batch in todo[1:]:
            cat.record_instances(batch)
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
        cat.close()
        rows = size * (count - 1)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return cpu / rows * 1e6, wall / rows * 1e6
    finally:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--existing", type=int, nargs="+", default=[10000, 1000000])
    ap.add_argument("--scenario", nargs="+", default=["new", "late", "resent"])
    ap.add_argument("--batch", type=int, default=64, help="rows per call (indexer batch_size)")
    ap.add_argument("--batches", type=int, default=101)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached templates")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for n in args.existing:
        template(n, args.fresh)
        for scenario in args.scenario:
            cpu, wall = zip(
                *(run(n, scenario, args.batches, args.batch, False) for _ in range(args.runs)),
                strict=True,
            )
            print(
                f"existing={n:>8} {scenario:>6}: CPU us/row median {statistics.median(cpu):6.1f}"
                f" (min {min(cpu):6.1f}), wall us/row median {statistics.median(wall):7.1f}"
            )


if __name__ == "__main__":
    main()
