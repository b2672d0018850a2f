"""What /proc says about a process tree: the tests of the process model and
of the SCP workers read a running proxy's children through these."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's children file)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # a thread that ended since the listing
    return out


def comm(pid: int) -> str:
    """The process's name (what ``prctl``/``/proc/self/comm`` set)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped (no init in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
