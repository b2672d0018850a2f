"""Sustained stream: does the proxy's indexer keep up with its acks?

``--sustained SECONDS`` of ``bench/ingest.py``: a feeder thread writes fresh
copies (``dataset.Refresher``: new UIDs each time) of the small data set, and
``senders`` threads each run ``storescu`` on one copy after another, back to
back, until the time is up (a batch under way is finished).  Sent copies are
kept until the bench ends (about 10 MB per 1000 instances): deleting them
during the stream made the proxy's own file creations slower.  Every ``every``
seconds the files in the spool's ``incoming/`` (acknowledged, not yet
indexed) are counted.  Reported: the ack rate (instances acknowledged / stream
seconds), the largest backlog in files and in seconds of acks (files / ack
rate), and, after the stream's end, the seconds until ``incoming/`` is empty
and until the catalog holds every instance sent.  Issue 11: backlog <= 2 s of
acks, drained within 5 s.  See bench/README.md.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from pathlib import Path

import peers
from dataset import Refresher

BACKLOG_TARGET_S, DRAIN_TARGET_S = 2.0, 5.0


def run_sustained(
    work: Path,
    refresher: Refresher,
    seconds: float,
    senders: int = 1,
    proxy_cmd: list[str] | None = None,
    every: float = 0.2,
) -> dict[str, float]:
    proc, port = peers.launch_proxy(work, proxy_cmd)
    spool, per_batch = work / "spool", len(refresher.files)
    batches: queue.Queue[Path] = queue.Queue(maxsize=2 * senders)
    done, lock = threading.Event(), threading.Lock()
    acked, errors, samples = [0], [], []  # samples: (seconds since start, files)

    def feed() -> None:
        k = 0
        while not done.is_set():
            d = refresher.write(work / "feed" / f"b{k:06d}")[0]
            k += 1
            while not done.is_set():
                try:
                    batches.put(d, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def send() -> None:
        try:
            while time.perf_counter() < deadline and not errors:
                d = batches.get()
                peers.send_parallel(peers.PROXY_AET, port, [d])
                with lock:
                    acked[0] += per_batch
                # no rmtree here: on this machine's journal-less ext4 every file the
                # proxy creates would scan past the inodes freed in the last minutes
                # (docs/performance.md, "The bench's own deletions"); the work dir
                # goes at the end
        except Exception as exc:
            errors.append(exc)

    try:
        cpu0 = peers.cpu_seconds(peers.tree_pids(proc.pid))
        feeder = threading.Thread(target=feed, name="feed", daemon=True)
        feeder.start()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        threads = [threading.Thread(target=send, name=f"send{i}") for i in range(senders)]
        for t in threads:
            t.start()
        window, next_report = 0, t0 + 10
        while any(t.is_alive() for t in threads):
            now = time.perf_counter()
            files = peers.incoming_count(spool)
            samples.append((now - t0, files))
            window = max(window, files)
            if now >= next_report:
                print(
                    f"  sustained {now - t0:6.0f} s  acked {acked[0]:7d}  "
                    f"max incoming/ in the last 10 s: {window}",
                    flush=True,
                )
                window, next_report = 0, next_report + 10
            time.sleep(every)
        t_end = time.perf_counter()
        done.set()
        if errors:
            raise peers.BenchError(f"sustained stream: {errors[0]}")
        drained = indexed = None
        while indexed is None:
            now = time.perf_counter()
            files = peers.incoming_count(spool)
            samples.append((now - t0, files))
            if drained is None and files == 0:
                drained = now - t_end
            if drained is not None and peers.catalog_count(spool / "catalog.sqlite3") >= acked[0]:
                indexed = now - t_end
            elif now - t_end > peers.E2E_TIMEOUT:
                raise peers.BenchError("sustained stream: the backlog did not drain")
            else:
                time.sleep(0.05)
        cpu = peers.cpu_seconds(peers.tree_pids(proc.pid)) - cpu0
    finally:
        done.set()
        peers.stop(proc)
    stream = t_end - t0
    rate = acked[0] / stream
    during = [f for t, f in samples if t <= stream]
    peak = max(during, default=0)
    peak_at = next((t for t, f in samples if f == peak), 0.0)
    (work / "backlog.csv").write_text(
        "seconds,files\n" + "".join(f"{t:.2f},{f}\n" for t, f in samples)
    )
    return {
        "seconds": stream,
        "instances": acked[0],
        "ack rate": rate,
        "max backlog files": peak,
        "max backlog s": peak / rate,
        "max backlog at": peak_at,
        "p95 backlog s": (statistics.quantiles(during, n=20)[-1] if len(during) > 1 else 0) / rate,
        "drain incoming s": drained,
        "drain catalog s": indexed,
        "cpu ms/inst": 1000 * cpu / acked[0],
    }


def report(fig: dict[str, float], senders: int) -> list[str]:
    ok_backlog = fig["max backlog s"] <= BACKLOG_TARGET_S
    ok_drain = fig["drain incoming s"] <= DRAIN_TARGET_S
    return [
        f"SUSTAINED ({fig['seconds']:.0f} s, {senders} looping storescu association(s), "
        "batches of the small set with fresh UIDs)",
        f"  acknowledged      {fig['instances']:8d} instances, {fig['ack rate']:.1f} inst/s",
        f"  max incoming/     {fig['max backlog files']:8d} files = "
        f"{fig['max backlog s']:.2f} s of acks, {fig['max backlog at']:.0f} s into the stream "
        f"(p95 {fig['p95 backlog s']:.2f} s)",
        f"  drain after end   incoming/ empty in {fig['drain incoming s']:.2f} s, "
        f"catalog complete in {fig['drain catalog s']:.2f} s",
        f"  proxy CPU         {fig['cpu ms/inst']:.2f} ms per instance (all its processes)",
        f"target backlog <= {BACKLOG_TARGET_S:.0f} s of acks: "
        f"{'PASS' if ok_backlog else 'FAIL'} ({fig['max backlog s']:.2f} s)",
        f"target drain <= {DRAIN_TARGET_S:.0f} s: "
        f"{'PASS' if ok_drain else 'FAIL'} ({fig['drain incoming s']:.2f} s)",
    ]
