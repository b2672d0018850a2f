"""A/B of proxy source trees: the same ingest, runs alternating, medians.

Sends a data set of ``bench/ingest.py`` (``--set small``, the default: 1000
x 64x64 CT; ``--set large``: 200 x 512x512) with DCMTK storescu over
``--parallel N`` associations to the proxy started from each
tree in turn (``PYTHONPATH=TREE``, this Python), the order reversed from
run to run, and prints for each tree: the ack and end-to-end rates, the CPU
of the proxy's processes per instance (user and system), and how long the
indexer's threads waited for a CPU (run-queue time, from
``/proc/PID/task/TID/schedstat``).  Nothing is deleted until the end and the
page cache is written back before each run (see ``ingest.py``).

A tree that holds an ``ab.ini`` runs with it after ``--ini`` (so two
worktrees of one commit compare settings: ``printf '[scp]\\nworkers = 2\\n' >
/tmp/w2/ab.ini``).

It is how a change is measured against what it changes: the issue 11
figures against Orthanc are ``ingest.py``'s.  Usage::

    git worktree add /tmp/before HEAD~1
    TCP_NODELAY=1 .venv/bin/python bench/ab.py /tmp/before . --parallel 4 --runs 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dataset
import peers
from peers import BenchError, find_tool, stop


def _indexer_wait(pids: list[int]) -> float:
    """Seconds the indexer's live threads have waited on the run queue."""
    total = 0
    for pid in pids:
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("ith-indexer"):
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
        except OSError:
            continue
    return total / 1e9


def run_tree(tree: Path, work: Path, shares: list[Path], n: int, ini: str) -> dict[str, float]:
    dicom_port, api_port = peers.free_port(), peers.free_port()
    env = peers.proxy_env(work, dicom_port, api_port)
    env["PYTHONPATH"] = str(tree)
    if (tree / "ab.ini").is_file():  # this tree's own settings, after --ini's
        ini += "\n" + (tree / "ab.ini").read_text()
    if ini.strip():
        (work / "ab.ini").write_text(ini)
        env["ITH_PROXY_CONFIG"] = str(work / "ab.ini")
    proc = peers.start_proxy(work, env, api_port, [sys.executable, "-m", "ith_proxy.cli", "run"])
    try:
        pids = peers.tree_pids(proc.pid)
        cpu0, wait0 = {p: peers.cpu_times(p) for p in pids}, _indexer_wait(pids)
        t0 = time.perf_counter()
        ack = peers.send_parallel(peers.PROXY_AET, dicom_port, shares)
        e2e = peers.wait_indexed(work / "spool", n, t0)
        pids = peers.tree_pids(proc.pid)  # a helper indexer started by the backlog, too
        cpu1, wait1 = {p: peers.cpu_times(p) for p in pids}, _indexer_wait(pids)
    finally:
        stop(proc)
    user = sum(b[0] - cpu0.get(p, (0.0, 0.0))[0] for p, b in cpu1.items())
    system = sum(b[1] - cpu0.get(p, (0.0, 0.0))[1] for p, b in cpu1.items())
    return {
        "ack inst/s": n / ack,
        "e2e inst/s": n / e2e,
        "user ms/inst": 1000 * user / n,
        "sys ms/inst": 1000 * system / n,
        "indexer runq s": wait1 - wait0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", type=Path, help="source trees (each holds ith_proxy/)")
    ap.add_argument("--set", choices=["small", "large"], default="small", help="data set")
    ap.add_argument("--parallel", type=int, default=1, help="storescu associations at once")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree (median reported)")
    ap.add_argument("--ini", default="", help="INI text for every proxy ('\\n' for newlines)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    if args.runs < 1 or args.parallel < 1:
        ap.error("--runs and --parallel must be >= 1")
    if len({t.name for t in trees}) != len(trees):
        ap.error("the trees need distinct directory names (they label the rows)")
    for tree in trees:
        if not (tree / "ith_proxy" / "__init__.py").is_file():
            ap.error(f"{tree} holds no ith_proxy/")
    for tool in ("storescu", "echoscu"):
        if (path := find_tool(tool)) is None:
            print(f"bench: required tool DCMTK {tool} not found on PATH", file=sys.stderr)
            return 1
        peers.TOOLS[tool] = path
    os.environ["TCP_NODELAY"] = "1"
    root = Path(tempfile.mkdtemp(prefix="ith-bench-ab-"))
    results: dict[str, list[dict[str, float]]] = {t.name: [] for t in trees}
    try:
        count, px, _ = dataset.DATASETS[args.set]
        dataset.make_dataset(root / "data", count, px)
        shares = [root / "data"]
        if args.parallel > 1:
            shares = dataset.split_shares(root / "data", args.parallel, root / "shares")
        for run in range(args.runs):
            for tree in trees if run % 2 == 0 else trees[::-1]:
                work = root / f"run{run}-{tree.name}"
                work.mkdir()
                os.sync()  # no run pays for an earlier one's writeback
                fig = run_tree(tree, work, shares, count, args.ini.replace("\\n", "\n"))
                results[tree.name].append(fig)
                print(
                    f"  run {run + 1}/{args.runs} {tree.name:>16s}  "
                    + "  ".join(f"{k} {v:.2f}" for k, v in fig.items()),
                    flush=True,
                )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nMEDIANS ({args.runs} runs, {args.parallel} association(s), {count} {args.set})")
    keys = list(next(iter(results.values()))[0])
    print(f"{'tree':>16s}  " + "  ".join(f"{k:>14s}" for k in keys))
    for name, figs in results.items():
        print(
            f"{name:>16s}  "
            + "  ".join(f"{statistics.median(f[k] for f in figs):14.2f}" for k in keys)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
