"""De-identification benchmark: the indexer's anonymization path vs. plain pydicom.

For the two data sets of bench/ingest.py (200-slice 512x512 CT, 1000 small
64x64 CT instances) it times, side by side in the same run and on the same
files (page cache warm):

* **anonymize**: what the indexer does per instance, minus the spool and
  catalog bookkeeping: ``dicom.files.read_split`` -> ``Deidentifier.apply``
  (+ ``apply_fragment`` for elements after the pixels) -> ``write_joined``
  into a file. The Deidentifier is taken from a real ``Indexer`` built from
  the default configuration, so it is constructed exactly as in the service.
  ``--with-vault`` adds the vault record (JSON + AES-GCM, v2) per instance.
* **plain**: ``pydicom.dcmread`` + ``pydicom.dcmwrite`` of the same files.

It prints instances/s and MB/s for both, the ratio anonymize/plain (time),
and PASS/FAIL for "anonymization adds at most 30% over plain read+write".
With ``--ingest-rate`` (instances/s measured by bench/ingest.py, proxy e2e or
ack) it also says whether the indexer path keeps up with the network.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_RATIO = 1.30


def build_indexer(work: Path):
    """An Indexer on a fresh spool under ``work``, built as the service builds it
    (default configuration); returns (indexer, vault, catalog)."""
    from ith_proxy import config
    from ith_proxy.dicom.libsetup import configure_libraries
    from ith_proxy.store.catalog import Catalog
    from ith_proxy.store.spool import Spool
    from ith_proxy.vault.keyfiles import init_secrets, load_site_secret
    from ith_proxy.vault.records import Vault
    from ith_proxy.workers.indexer import Indexer

    configure_libraries()  # as the indexer process does
    cfg = config.load(env={"DICOM_STORAGE_DIR": str(work / "spool")}, cwd=work)
    spool = Spool(cfg.spool.dir)
    spool.ensure()
    init_secrets(cfg.vault.key_file)
    catalog = Catalog(cfg.spool.dir / "catalog.sqlite3")
    vault = Vault(cfg.spool.dir / "vault.phi", cfg.vault.key_file)
    indexer = Indexer(cfg, spool, catalog, vault, load_site_secret(cfg.vault.secret_file))
    return indexer, vault, catalog


def build_deidentifier(work: Path):
    """The Deidentifier exactly as the indexer builds it (default config)."""
    indexer, vault, catalog = build_indexer(work)
    return indexer.deid, vault, catalog


def risk_check() -> Callable:
    """The indexer's phi-risk check (header and, where it exists, codestream scan)."""
    try:
        from ith_proxy.deid.risk import phi_risk
        from ith_proxy.dicom import codestream
    except ImportError:  # before deid/risk.py: header only
        from ith_proxy.workers.indexer import _phi_risk

        return lambda split, src: _phi_risk(split.header)
    return lambda split, src: phi_risk(split.header, codestream.scan(src, split))


def make_anonymizer(deid, vault, with_vault: bool) -> Callable[[Path, Path], None]:
    """One instance through the indexer's path (its _process, without the spool)."""
    from ith_proxy.dicom import files as dicomfile

    at_risk = risk_check()

    read_params = len(inspect.signature(dicomfile.read_split).parameters)
    write_params = len(inspect.signature(dicomfile.write_joined).parameters)

    def anonymize(src_path: Path, out_path: Path) -> None:
        with open(src_path, "rb") as src:
            split = (
                dicomfile.read_split(src, src_path)
                if read_params >= 2
                else dicomfile.read_split(src_path)
            )
            if at_risk(split, src):
                raise RuntimeError("bench data is a phi-risk")
            result = deid.apply(split.header)
            if split.trailer is not None:
                deid.apply_fragment(split.trailer, result)
            if with_vault:
                vault.put(
                    {
                        "v": 1,
                        "study": result.study_uid,
                        "series": result.series_uid,
                        "sop": result.sop_uid,
                        "patient": result.patient_id,
                        "phi": result.phi,
                    }
                )
            with open(out_path, "wb") as out:
                if write_params >= 3:
                    dicomfile.write_joined(out, split, src)
                else:
                    dicomfile.write_joined(out, split)

    return anonymize


def plain(src_path: Path, out_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(src_path)
    pydicom.dcmwrite(out_path, ds)


def timed_pass(fn: Callable[[Path, Path], None], files: list[Path], out_dir: Path) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        fn(f, out_dir / f.name)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out_dir)  # outside the timing
    return elapsed


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass


def parse_rates(values: list[str]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for v in values:
        if "=" in v:
            name, _, rate = v.partition("=")
            rates[name.strip()] = float(rate)
        else:
            rates["large"] = rates["small"] = float(v)
    return rates


def main() -> int:
    from ingest import DATASETS, make_dataset  # the same data as bench/ingest.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per method; medians")
    ap.add_argument("--only", choices=sorted(DATASETS), help="run one data set")
    ap.add_argument(
        "--with-vault",
        action="store_true",
        help="include the vault record (JSON + Fernet) in the anonymize path",
    )
    ap.add_argument(
        "--ingest-rate",
        action="append",
        default=[],
        metavar="[large=|small=]R",
        help="network ingest rate in instances/s from bench/ingest.py "
        "(a bare number applies to both data sets)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    rates = parse_rates(args.ingest_rate)

    tmp = Path(tempfile.mkdtemp(prefix="ith-bench-deid-"))
    results: dict[str, dict] = {}
    try:
        deid, vault, catalog = build_deidentifier(tmp / "rooms")
        anonymize = make_anonymizer(deid, vault, args.with_vault)
        names = [args.only] if args.only else list(DATASETS)
        for name in names:
            count, size, label = DATASETS[name]
            data = tmp / "data" / name
            t0 = time.perf_counter()
            nbytes = make_dataset(data, count, size)
            files = sorted(data.iterdir())
            print(
                f"{name}: {label}: {count} files, {nbytes / 1e6:.1f} MB "
                f"(generated in {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            warm(files)
            timed_pass(anonymize, files[:5], tmp / "out-warmup")  # imports, caches
            timed_pass(plain, files[:5], tmp / "out-warmup")
            times: dict[str, list[float]] = {"anonymize": [], "plain": []}
            for run in range(args.runs):
                order = [("plain", plain), ("anonymize", anonymize)]
                if run % 2:
                    order.reverse()
                for method, fn in order:
                    secs = timed_pass(fn, files, tmp / f"out-{method}")
                    times[method].append(secs)
                    print(
                        f"  run {run + 1} {method:9} {secs:7.2f} s  {count / secs:8.1f} inst/s",
                        flush=True,
                    )
            results[name] = {
                "count": count,
                "bytes": nbytes,
                **{m: statistics.median(v) for m, v in times.items()},
                **{f"{m}_best": min(v) for m, v in times.items()},
            }
            shutil.rmtree(data)
        vault.close()
        catalog.close()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    what = "read_split -> apply -> write_joined" + (" + vault.put" if args.with_vault else "")
    print(f"\nRESULTS (median of {args.runs}; anonymize = {what})")
    print(f"{'data set':10} {'method':10} {'seconds':>8} {'inst/s':>9} {'MB/s':>8} {'best s':>8}")
    for name, r in results.items():
        for method in ("anonymize", "plain"):
            secs = r[method]
            print(
                f"{name:10} {method:10} {secs:8.2f} {r['count'] / secs:9.1f} "
                f"{r['bytes'] / 1e6 / secs:8.1f} {r[method + '_best']:8.2f}"
            )
    print("\nRATIOS (anonymize time / plain read+write time)")
    ok = True
    for name, r in results.items():
        ratio = r["anonymize"] / r["plain"]
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        ok &= verdict == "PASS"
        best = r["anonymize_best"] / r["plain_best"]
        print(
            f"target {name} anonymize <= {TARGET_RATIO:.2f}x plain: {verdict} ({ratio:.2f}x; "
            f"best-of-runs ratio {best:.2f}x)"
        )
    for name, r in results.items():
        if name in rates:
            rate = r["count"] / r["anonymize"]
            faster = rate > rates[name]
            print(
                f"{name}: indexer path {rate:.1f} inst/s "
                f"vs network ingest {rates[name]:.1f} inst/s: "
                f"{'faster (keeps up)' if faster else 'SLOWER (falls behind)'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
