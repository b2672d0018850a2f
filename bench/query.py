"""C-FIND benchmark: the proxy's Q/R SCP against Orthanc, side by side, with
the same DCMTK ``findscu`` client (its process start included: ~30 ms floor).

Four servers in one run:

- ``proxy 10k``: a proxy whose catalog holds 10,000 studies x 1 instance,
  with the profile that keeps dates (``retain_long_modified_dates``) and
  descriptions (``clean_descriptors``);
- ``proxy 1M``: the same with 10,000 studies x ``--per-study`` instances
  (100 by default: 1,000,000 instance rows, in 4 series each);
- ``proxy 10k basic``: 10,000 studies x 1 instance under the default Basic
  Profile: no StudyDate, StudyTime or SeriesDate in the catalog, so the
  date range honestly matches nothing there.
  The catalog rows are made directly (no pixel files: C-FIND never reads them
  for these queries);
- ``Orthanc``: 10,000 studies x 1 instance (tiny instances without pixels,
  sent by ``storescu``), the same patient IDs, names, dates and modalities.

Study ``k`` (0..9999) belongs to patient ``ITH-%04d`` named ``ANON^ITH-%04d``,
dated 2020-01-01 + (k mod 100) days (1% of the studies per day).

Queries (Study Root): STUDY by exact PatientID; STUDY by StudyInstanceUID;
STUDY by a one-day StudyDate range (~1%, 100 studies); SERIES within one
study; PatientName ``ANON^ITH-00*`` (100 studies); PatientName ``ANON*``
(every study).  Each is timed ``--runs`` times per server, the servers taken
in turn within each round; the median wall time is printed, with the ratio
to Orthanc and the per-match cost (match-everything minus exact, divided by
10,000).

C-GET (unless ``--no-get``): the 200-slice 512x512 CT study of
bench/ingest.py, stored in a fresh proxy (by ``storescu``, then indexed) and
in a fresh Orthanc, retrieved whole (STUDY level) by DCMTK ``getscu`` with
TCP_NODELAY=1, ``--runs`` times each after one warm-up; the median wall time
(process start included), MB/s (10^6 bytes of the files getscu wrote) and the
ratio proxy/Orthanc (issue 9 target: >= 0.5x).

Run: ``.venv/bin/python bench/query.py`` (about 12 minutes, most of it
loading Orthanc; ``--per-study 10`` for a quicker 100k run, ``--studies 1000``
for a smaller catalog, ``--no-find`` or ``--no-get`` to skip a part).
Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ingest  # bench/ingest.py (this script's own dir): the 200-slice CT study

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402  # after the sys.path lines above
from pydicom.filewriter import dcmwrite  # noqa: E402  # after the sys.path lines above
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402  # after the sys.path lines above

from ith_proxy.store.catalog import Catalog  # noqa: E402  # after the sys.path lines above

STUDIES = 10_000
SERIES_PER_STUDY = 4
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
BASE = "1.2.826.0.1.3680043.10.7777"
# the profile whose dates and descriptions are kept (shifted, cleaned): what the
# "proxy 10k" and "proxy 1M" catalogs hold; "proxy 10k basic" runs the default
# Basic Profile, whose catalog has no dates (its date range matches nothing)
RETAINED = "[deid]\nretain_long_modified_dates = true\nclean_descriptors = true\n"


def study_uid(k: int) -> str:
    return f"{BASE}.1.{k}"


def series_uid(k: int, s: int) -> str:
    return f"{BASE}.2.{k}.{s}"


def sop_uid(k: int, s: int, i: int) -> str:
    return f"{BASE}.3.{k}.{s}.{i}"


def study_date(k: int) -> str:
    return (datetime.date(2020, 1, 1) + datetime.timedelta(days=k % 100)).strftime("%Y%m%d")


def build_catalog(path: Path, per_study: int, dated: bool = True) -> float:
    """The catalog rows of STUDIES studies x per_study instances; seconds taken.

    ``dated``: as the profile with retain_long_modified_dates stores them
    (dates and times kept, shifted); otherwise as the default Basic Profile
    does (StudyDate, StudyTime and SeriesDate emptied)."""
    started = time.perf_counter()
    day = study_date if dated else (lambda k: "")
    hour = "101530" if dated else ""
    cat = Catalog(path)
    conn = cat.conn
    series_n = min(SERIES_PER_STUDY, per_study)
    with conn:
        conn.executemany(
            "INSERT INTO patients(pseudo_id, pseudo_name, created_at, name_folded)"
            " VALUES (?,?,1,?)",
            ((f"ITH-{k:04d}", f"ANON^ITH-{k:04d}", f"ANON^ITH-{k:04d}") for k in range(STUDIES)),
        )
        conn.executemany(
            "INSERT INTO studies(study_uid, patient_id, state, first_received, last_received,"
            " completed_at, version, json_version, study_date, study_time)"
            " VALUES (?,?,'forwarded',1,1,1,1,1,?,?)",
            ((study_uid(k), f"ITH-{k:04d}", day(k), hour) for k in range(STUDIES)),
        )
        conn.executemany(
            "INSERT INTO series(series_uid, study_uid, modality, series_number, series_date)"
            " VALUES (?,?,'CT',?,?)",
            (
                (series_uid(k, s), study_uid(k), str(s + 1), day(k))
                for k in range(STUDIES)
                for s in range(series_n)
            ),
        )
        conn.executemany(
            "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid,"
            " transfer_syntax, size, received_at, instance_number)"
            " VALUES (?,?,?,?,'1.2.840.10008.1.2.1',1000,1,?)",
            (
                (sop_uid(k, i % series_n, i), series_uid(k, i % series_n), study_uid(k), CT, str(i))
                for k in range(STUDIES)
                for i in range(per_study)
            ),
        )
    conn.execute("ANALYZE")
    cat.close()
    return time.perf_counter() - started


def orthanc_files(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(STUDIES):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SC, sop_uid(k, 0, 0)
        ds.PatientID, ds.PatientName = f"ITH-{k:04d}", f"ANON^ITH-{k:04d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid(k), series_uid(k, 0)
        ds.StudyDate, ds.StudyTime, ds.Modality = study_date(k), "101530", "CT"
        ds.SeriesNumber, ds.InstanceNumber = "1", "1"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SC
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"{k:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files


def queries() -> dict[str, list[str]]:
    one = 4242 % STUDIES  # a study in the middle of the catalog
    return {
        "STUDY exact PatientID": [
            "QueryRetrieveLevel=STUDY",
            f"PatientID=ITH-{one:04d}",
            "StudyInstanceUID",
        ],
        "STUDY StudyInstanceUID": [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study_uid(one)}",
        ],
        "STUDY date range 1%": [
            "QueryRetrieveLevel=STUDY",
            f"StudyDate={study_date(42)}-{study_date(42)}",
            "StudyInstanceUID",
        ],
        "SERIES in one study": [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study_uid(one)}",
            "SeriesInstanceUID",
            "Modality",
        ],
        "PatientName ANON^ITH-00*": [
            "QueryRetrieveLevel=STUDY",
            "PatientName=ANON^ITH-00*",
            "StudyInstanceUID",
        ],
        "PatientName ANON* (all)": [
            "QueryRetrieveLevel=STUDY",
            "PatientName=ANON*",
            "StudyInstanceUID",
        ],
    }


def findscu(port: int, aec: str, keys: list[str]) -> tuple[float, int]:
    args = ["findscu", "-v", "-S", "-aet", "BENCH", "-aec", aec]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(port)]
    started = time.perf_counter()
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "TCP_NODELAY": "1"},
    )
    took = time.perf_counter() - started
    text = done.stdout + done.stderr
    if "Final Find Response (Success)" not in text and done.returncode != 0:
        raise RuntimeError(f"findscu failed on port {port}: {text[-400:]}")
    return took, text.count("(Pending)")


def run_findscu(
    servers: dict[str, tuple[int, str]], keys: list[str], runs: int
) -> dict[str, tuple[float, int]]:
    """One query against every server: a warm-up each, then ``runs`` rounds
    that take the servers in turn (so a burst of load on this machine falls
    on all of them alike); the median wall time and the matches per server."""
    for port, aec in servers.values():
        findscu(port, aec, keys)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in servers}
    matches: dict[str, int] = {}
    for _ in range(runs):
        for name, (port, aec) in servers.items():
            took, matches[name] = findscu(port, aec, keys)
            times[name].append(took)
    return {name: (statistics.median(times[name]), matches[name]) for name in servers}


def getscu(port: int, aec: str, study: str, out: Path) -> tuple[float, int, int]:
    """One whole-study C-GET into a fresh ``out``: seconds, files, bytes."""
    from tools import dcmtk_env, require_tool

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = [require_tool("getscu"), "-S", "-aet", "BENCH", "-aec", aec, "-od", str(out)]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    args += ["127.0.0.1", str(port)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dcmtk_env())
    took = time.perf_counter() - started
    files = [p for p in out.iterdir() if p.is_file()]
    if done.returncode != 0:
        raise RuntimeError(f"getscu failed on port {port}: {(done.stdout + done.stderr)[-400:]}")
    return took, len(files), sum(p.stat().st_size for p in files)


def bench_get(tmp: Path, runs: int) -> None:
    """C-GET of the 200-slice CT study: the proxy and Orthanc, side by side."""
    from pydicom import dcmread

    import orthanc  # tests/orthanc.py
    from qr_retrieve_site import store_study  # tests/: storescu + wait until indexed
    from tools import ProxyProcess, storescu

    data = tmp / "ct"
    nbytes = ingest.make_dataset(data, 200, 512)
    files = sorted(data.iterdir())
    print(f"\nC-GET: 200-slice 512x512 CT, {nbytes / 1e6:.1f} MB", flush=True)
    started: list = []
    try:
        proxy = ProxyProcess(tmp / "proxy-get")
        proxy.start()
        started.append(proxy)
        stored = store_study(proxy, files)
        pacs = orthanc.OrthancProcess(tmp / "orthanc-get", extra={"DicomAlwaysAllowGet": True})
        pacs.start()
        started.append(pacs)
        sent = storescu(pacs.dicom_port, data, aec="ORTHANC")
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr[-400:])
        original = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        servers = {
            "proxy": (proxy.dicom_port, "DICOMRCV", stored.study),
            "Orthanc": (pacs.dicom_port, "ORTHANC", original),
        }
        rate: dict[str, float] = {}
        print(f"C-GET whole study by getscu, median of {runs} (after a warm-up)")
        for name, (port, aec, study) in servers.items():
            out = tmp / f"got-{name}"
            getscu(port, aec, study, out)  # warm-up
            times, sizes = [], []
            for _ in range(runs):
                took, count, size = getscu(port, aec, study, out)
                if count != len(files):
                    raise RuntimeError(f"{name}: getscu received {count} of {len(files)} files")
                times.append(took)
                sizes.append(size)
            took = statistics.median(times)
            rate[name] = statistics.median(sizes) / 1e6 / took
            print(f"  {name:10} {took:7.3f} s {rate[name]:8.1f} MB/s", flush=True)
        ratio = rate["proxy"] / rate["Orthanc"]
        verdict = "PASS" if ratio >= 0.5 else "FAIL"
        print(f"C-GET proxy/Orthanc: {ratio:.2f}x (target >= 0.5x: {verdict})")
    finally:
        for server in started:
            server.stop()


def main() -> int:
    global STUDIES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--studies", type=int, default=STUDIES, help="C-FIND catalog (>= 100)")
    parser.add_argument("--no-find", action="store_true", help="skip the C-FIND part")
    parser.add_argument("--no-get", action="store_true", help="skip the C-GET part")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.studies < 100:
        parser.error("--studies must be >= 100")
    STUDIES = args.studies

    tmp = Path(tempfile.mkdtemp(prefix="ith-bench-query-"))
    try:
        if not args.no_find:
            bench_find(tmp, args.runs, args.per_study)
        if not args.no_get:
            bench_get(tmp, args.runs)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def bench_find(tmp: Path, runs: int, per_study: int) -> None:
    """C-FIND: two proxy catalogs and Orthanc, side by side."""
    import orthanc  # tests/orthanc.py
    from tools import ProxyProcess, storescu

    servers: dict[str, tuple[int, str]] = {}
    started: list = []
    try:
        for name, per, profile in (
            (f"proxy {STUDIES // 1000}k", 1, RETAINED),
            (f"proxy {STUDIES * per_study // 1000}k", per_study, RETAINED),
            (f"proxy {STUDIES // 1000}k basic", 1, ""),
        ):
            proxy = ProxyProcess(tmp / name.replace(" ", "-"), config_text=profile)
            proxy.start()
            proxy.stop()
            took = build_catalog(proxy.spool / "catalog.sqlite3", per, dated=bool(profile))
            print(
                f"{name}: catalog of {STUDIES * per} instance rows built in {took:.1f} s",
                flush=True,
            )
            proxy.start(timeout=120)
            started.append(proxy)
            servers[name] = (proxy.dicom_port, "DICOMRCV")
        pacs = orthanc.OrthancProcess(tmp / "orthanc", extra={"DicomAlwaysAllowFind": True})
        pacs.start()
        started.append(pacs)
        t0 = time.perf_counter()
        files = orthanc_files(tmp / "orthanc-in")
        sent = storescu(pacs.dicom_port, tmp / "orthanc-in", aec="ORTHANC", timeout=3600)
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr[-400:])
        print(
            f"Orthanc: {len(files)} studies loaded in {time.perf_counter() - t0:.1f} s", flush=True
        )
        servers["Orthanc"] = (pacs.dicom_port, "ORTHANC")

        results: dict[tuple[str, str], tuple[float, int]] = {}
        asked = queries()
        for query, keys in asked.items():
            for name, result in run_findscu(servers, keys, runs).items():
                results[(query, name)] = result
        names = list(servers)
        print(f"\nC-FIND wall time, median of {runs} (ms; matches in brackets)")
        print(f"{'query':28}" + "".join(f"{n:>20}" for n in names) + f"{'proxy/Orthanc':>14}")
        for query in asked:
            cells = "".join(
                f"{results[(query, n)][0] * 1000:>13.1f} [{results[(query, n)][1]:>4}]"
                for n in names
            )
            ratio = results[(query, names[0])][0] / results[(query, "Orthanc")][0]
            print(f"{query:28}{cells}{ratio:>12.2f}x")
        every, exact = "PatientName ANON* (all)", "STUDY exact PatientID"
        for n in names:
            per_match = (results[(every, n)][0] - results[(exact, n)][0]) / STUDIES * 1000
            print(f"per-match cost {n}: {per_match:.3f} ms")
        big = names[1]
        drift = results[(exact, big)][0] / results[(exact, names[0])][0] - 1
        print(f"exact PatientID at {big} vs {names[0]}: {drift * 100:+.1f}%")
    finally:
        for server in started:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
