"""CPU time of ``dicom.files.read_split`` per call, with ``dicom.fastread``
and with pydicom's ``read_dataset`` only (the fast reader turned off, as for
a file it does not handle), alternating in one process.

Inputs: one 64x64 CT slice of the bench's small data set
(``bench/dataset.make_dataset``, as the indexer reads it from incoming/)
and that slice de-identified and written as the indexer stores it. Each
figure is ``time.process_time`` over ``--count`` fresh inputs, best of
``--runs``, in µs per call; inputs are BytesIO copies (``bytes``) or the
file opened per call (``file``). Issue 11; results in docs/performance.md,
"Issue 11: the header read without pydicom's generator".

    python bench/read_split.py [--runs 5] [--count 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def best(call: Callable[[], object], runs: int, count: int) -> float:
    """Minimum over ``runs`` of process_time per call over ``count`` calls."""
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        for _ in range(count):
            call()
        times.append((time.process_time() - t0) / count * 1e6)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternations fast / pydicom")
    args = ap.parse_args()

    import dataset  # bench/dataset.py
    from ith_proxy.deid.engine import Deidentifier
    from ith_proxy.dicom import fastread
    from ith_proxy.dicom import files as dicomfile
    from ith_proxy.dicom.libsetup import configure_libraries

    configure_libraries()  # as the indexer process does
    work = Path(tempfile.mkdtemp(prefix="read-split-"))
    dataset.make_dataset(work / "in", 1, 64)
    source = next((work / "in").iterdir())
    split = dicomfile.read_split(source)
    Deidentifier(b"s" * 32).apply(split.header)
    deid = work / "deid.dcm"
    with open(deid, "wb") as out:
        dicomfile.write_joined(out, split)

    on = (fastread.meta_elements, fastread.dataset_elements)

    def off(*_args: object) -> None:
        return None

    def from_bytes(data: bytes) -> Callable[[], object]:
        return lambda: dicomfile.read_split(io.BytesIO(data))

    def from_file(path: Path) -> Callable[[], object]:
        def read() -> object:
            with open(path, "rb") as fh:
                return dicomfile.read_split(fh, path)

        return read

    cases = {
        "input, bytes": from_bytes(source.read_bytes()),
        "input, file": from_file(source),
        "de-identified, bytes": from_bytes(deid.read_bytes()),
        "de-identified, file": from_file(deid),
    }
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("fastread", "pydicom"):
            fastread.meta_elements, fastread.dataset_elements = (  # type: ignore[assignment]  # off: pydicom's path
                on if mode == "fastread" else (off, off)
            )
            for name, call in cases.items():
                results.setdefault((name, mode), []).append(best(call, args.runs, args.count))
    fastread.meta_elements, fastread.dataset_elements = on
    print(f"read_split, µs per call (best of {args.runs} x {args.count}, each round)")
    for name in cases:
        for mode in ("pydicom", "fastread"):
            figures = ", ".join(f"{t:.0f}" for t in results[(name, mode)])
            print(f"  {name:22s} {mode:9s} {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
