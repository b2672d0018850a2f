"""Memory of a receiver's process tree: PSS and peak RSS of every process.

PSS comes from ``/proc/PID/smaps_rollup`` (``idle_memory.pss_kib``), the peak
RSS from ``VmHWM`` in ``/proc/PID/status``.  Each process of the tree gets a
label: ``main`` (the process the bench started), ``resource tracker``
(multiprocessing's), ``indexer`` (the one spawned multiprocessing child), or
its ``comm`` name.  ``Sampler`` keeps the largest PSS seen per process while a
load runs.  Used by ``bench/ingest.py --memory``.  See bench/README.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import peers
from idle_memory import pss_kib


@dataclass
class Proc:
    pid: int
    label: str
    pss: int  # KiB
    hwm: int  # KiB, VmHWM (peak RSS over the process's life)


def hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def labels(root: int) -> dict[int, str]:
    """pid -> label for ``root`` and its descendants."""
    out: dict[int, str] = {}
    spawned = []
    for pid in peers.tree_pids(root):
        cmd, comm = _cmdline(pid), _comm(pid)
        if pid == root:
            out[pid] = "main"
        elif "resource_tracker" in cmd:
            out[pid] = "resource tracker"
        elif "spawn_main" in cmd or "forkserver" in cmd:
            spawned.append(pid)
            out[pid] = f"spawned {pid}"
        else:
            out[pid] = comm
    if len(spawned) == 1:
        out[spawned[0]] = "indexer"
    return out


def snapshot(root: int) -> list[Proc]:
    """Every live process of ``root``'s tree, with its PSS and VmHWM."""
    return [Proc(pid, label, pss_kib(pid), hwm_kib(pid)) for pid, label in labels(root).items()]


def total_mib(procs: list[Proc]) -> float:
    return sum(p.pss for p in procs) / 1024


@dataclass
class Sampler:
    """Sample ``root``'s tree every ``every`` seconds in a thread until
    ``stop``: the largest summed PSS seen and the snapshot it came from."""

    root: int
    every: float = 0.25
    peak: list[Proc] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # the end state counts as a sample

    def _sample(self) -> None:
        snap = snapshot(self.root)
        if total_mib(snap) > total_mib(self.peak):
            self.peak = snap

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)


def table(title: str, phases: dict[str, list[Proc]]) -> list[str]:
    """Lines of a per-process table: PSS in MiB per phase and VmHWM of the
    last phase; a process missing from a phase shows '-'."""
    names = list(phases)
    rows: dict[str, dict[str, Proc]] = {}
    for phase, procs in phases.items():
        for p in procs:
            rows.setdefault(p.label, {})[phase] = p
    head = f"{title:18s}" + "".join(f"{n:>14s}" for n in names) + f"{'VmHWM':>9s}"
    lines = [head]
    for label, by_phase in rows.items():
        cells = "".join(
            f"{by_phase[n].pss / 1024:14.1f}" if n in by_phase else f"{'-':>14s}" for n in names
        )
        last = by_phase[max(by_phase, key=names.index)]
        lines.append(f"  {label:16s}{cells}{last.hwm / 1024:9.1f}")
    totals = "".join(f"{total_mib(phases[n]):14.1f}" for n in names)
    lines.append(f"  {'total PSS':16s}{totals}")
    return lines


MEMORY_TARGETS = {"idle": 80.0, "10 assoc": 120.0, "50 assoc": 200.0}  # MiB, issue 11


def measure(
    root: int, send, wait, settle: float, loads: tuple[int, ...] = (10, 50)
) -> dict[str, list[Proc]]:
    """Phases of one receiver already started as ``root``: ``idle`` after
    ``settle`` s, then per load N: ``N assoc`` (the peak sampled while
    ``send(N)`` runs and until ``wait(N)`` returns) and ``N after`` (after
    ``settle`` s more)."""
    import time

    time.sleep(settle)
    phases = {"idle": snapshot(root)}
    for n in loads:
        with Sampler(root) as s:
            send(n)
            wait(n)
        phases[f"{n} assoc"] = s.peak
        time.sleep(settle)
        phases[f"{n} after"] = snapshot(root)
    return phases


def verdicts(phases: dict[str, list[Proc]]) -> list[str]:
    """One ``target`` line per issue-11 memory target found in ``phases``."""
    out = []
    for phase, limit in MEMORY_TARGETS.items():
        if phase in phases:
            got = total_mib(phases[phase])
            ok = "PASS" if got <= limit else "FAIL"
            out.append(f"target proxy tree PSS {phase} <= {limit:.0f} MiB: {ok} ({got:.1f} MiB)")
    return out
