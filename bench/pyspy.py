"""py-spy profiles of the proxy's processes under a bench load, as text.

``Recorder`` attaches one ``py-spy record --format raw --nonblocking`` to each
Python process of the proxy's tree (the resource tracker excepted) and stops
them with SIGINT, which makes py-spy write its collapsed stacks
(``frame;frame;... count``).  ``summary`` turns such a file into the top
functions by own time (the sampled leaf) and by total time (anywhere on the
stack), and the commonest stacks.  py-spy samples only threads that are not
idle (a thread woken but waiting for a CPU or the GIL is not idle), so the
shares are of the busy samples; with ``gil`` only the thread holding the GIL
is sampled: where the Python CPU time of a process goes.  py-spy needs ptrace rights
(root).  Used by ``bench/ingest.py --profile DIR``.  See bench/README.md.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import memory

_LINE = re.compile(r":\d+\)$")
_PATH = re.compile(r"\(.*?/(?:site-packages|lib/python3\.\d+|ith_proxy)/")
# frames under every stack of a thread or a process: left out of "total time"
_BOOT = re.compile(r"\((threading\.py|multiprocessing/(spawn|process)\.py|<string>)\)$")


def find_pyspy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frame(raw: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file path below site-packages)``."""
    return _PATH.sub("(", _LINE.sub(")", raw.strip()))


class Recorder:
    def __init__(self, root: int, out: Path, tag: str, gil: bool = False, rate: int = 100) -> None:
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen] = []
        exe = find_pyspy()
        if exe is None:
            raise RuntimeError("py-spy not found (pip install py-spy)")
        out.mkdir(parents=True, exist_ok=True)
        for pid, label in memory.labels(root).items():
            if label == "resource tracker":
                continue
            name = f"{tag}-{label.replace(' ', '_')}.raw"
            self.files[label] = out / name
            cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--nonblocking"]
            cmd += ["--rate", str(rate), "--output", str(out / name), *(["--gil"] if gil else [])]
            self.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

    def stop(self) -> dict[str, Path]:
        """Stop every py-spy (SIGINT: it writes its file); label -> raw file."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return {k: v for k, v in self.files.items() if v.exists()}


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            stacks.append(([_frame(f) for f in head.split(";")], int(count)))
    return stacks


def summary(path: Path, title: str, top: int = 15, n_stacks: int = 5) -> list[str]:
    stacks = read_raw(path)
    total = sum(c for _, c in stacks)
    if not total:
        return [f"{title}: no samples"]
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    whole: collections.Counter[tuple[str, ...]] = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        whole[tuple(frames)] += count
    lines = [f"{title}: {total} samples ({path.name})", "  own time (leaf):"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines.append("  total time (on the stack; thread and process start-up frames left out):")
    busy = [(f, c) for f, c in incl.most_common() if not _BOOT.search(f)][:top]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in busy]
    lines.append("  commonest stacks (innermost 6 frames, outermost first):")
    for frames, c in whole.most_common(n_stacks):
        lines.append(f"    {100 * c / total:5.1f}%  " + " > ".join(frames[-6:]))
    return lines
