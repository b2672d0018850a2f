"""The quarantine folder of the spool: input the indexer could not process.

``quarantine/<reason>/<name>`` holds the raw input as it was received
(encrypted when the spool encrypts raw input), beside ``<name>.json`` saying
why.  Items are moved in from ``incoming/`` and released back to it, never
rewritten in place; names are checked so that nothing outside
``quarantine/`` can be reached and a symbolic link is never an item.  This is
part of the spool room: ``Spool`` inherits it, and it writes only through the
spool's one write primitive (tmp, fsync, rename, fsync the folder).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ith_proxy.fsio import fsync_dir, keeping_times, read_nofollow, real_dir, regular_file

DIR_MODE = 0o700
_REASON_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")


class QuarantineFolder:
    """The quarantine methods of ``Spool`` (which provides what is declared here)."""

    incoming: Path
    quarantine_dir: Path
    _deliver: Callable[..., Path]

    def quarantine(
        self,
        name: str,
        reason: str,
        detail: dict,
        seal: Callable[[Path, BinaryIO], dict] | None = None,
    ) -> Path:
        """Move incoming/<name> to quarantine/<reason>/ with a .json saying why.

        Without ``seal`` the file is renamed as it is (it is already
        encrypted): the .json goes first, then the rename, so a crash leaves
        the file in incoming/ (processed again) or both in place.  With
        ``seal(src, out) -> dict`` an encrypted copy is written through tmp/
        (its result, e.g. size and sha256, goes into the .json), then the
        .json, and only then is the raw file removed.
        """
        if not _REASON_RE.fullmatch(reason):
            raise ValueError(f"bad quarantine reason {reason!r}")
        qdir = self.quarantine_dir / reason
        if not qdir.is_dir():
            qdir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fsync_dir(self.quarantine_dir)
        src, target = self.incoming / name, qdir / name
        info = {
            "name": name,
            "reason": reason,
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **detail,
        }
        if seal is None:
            if not src.exists():
                raise FileNotFoundError(src)
            self._write_json(qdir / f"{name}.json", info)
            os.rename(src, target)
            fsync_dir(qdir)
        else:
            write, result = keeping_times(src, lambda out: seal(src, out))
            self._deliver(target, write)
            info.update(result[0] or {})
            self._write_json(qdir / f"{name}.json", info)
            os.unlink(src)
        fsync_dir(self.incoming)
        return target

    def _write_json(self, path: Path, info: dict) -> None:
        data = json.dumps(info, indent=2, sort_keys=True).encode() + b"\n"
        self._deliver(path, chunks=[data])

    def quarantined(self) -> list[dict]:
        out = []
        for reason in sorted(p for p in self.quarantine_dir.iterdir() if real_dir(p)):
            for meta in sorted(reason.glob("*.json")):
                try:
                    info = json.loads(read_nofollow(meta))
                except (OSError, ValueError):
                    info = {"name": meta.stem, "reason": reason.name, "error": "unreadable"}
                info["present"] = regular_file(reason / meta.stem)
                out.append(info)
        return out

    def quarantined_item(self, name: str) -> tuple[Path, dict]:
        """(data file, .json content) of a quarantined item named NAME or REASON/NAME.

        Raises KeyError when there is no such item (names are checked, so
        nothing outside quarantine/ can be reached, and a symbolic link is
        never an item).
        """
        reason, _, base = name.rpartition("/")
        if (
            base in ("", ".", "..")
            or "\0" in name
            or base.endswith(".json")
            or (reason and not _REASON_RE.fullmatch(reason))
        ):
            raise KeyError(name)
        dirs = (
            [self.quarantine_dir / reason]
            if reason
            else sorted(p for p in self.quarantine_dir.iterdir() if real_dir(p))
        )
        for qdir in dirs:
            data = qdir / base
            if regular_file(data):
                try:
                    info = json.loads(read_nofollow(qdir / f"{base}.json"))
                except (OSError, ValueError):
                    info = {"name": base, "reason": qdir.name}
                return data, info
        raise KeyError(name)

    def release(self, name: str, write: Callable[[Path, BinaryIO], object] | None = None) -> Path:
        """Move a quarantined item back to incoming/ under its name, for another try.

        Without ``write`` it is renamed as it is; with ``write(src, out)`` a
        transformed copy (decrypted or encrypted) is made durable in
        incoming/ first.  The quarantine files are removed last.
        """
        data, _ = self.quarantined_item(name)
        target = self.incoming / data.name
        if target.exists():
            raise FileExistsError(f"incoming/{data.name} already exists")
        if write is None:
            os.rename(data, target)
        else:
            self._deliver(target, keeping_times(data, lambda out: write(data, out))[0])
            os.unlink(data)
        fsync_dir(self.incoming)
        (data.parent / f"{data.name}.json").unlink(missing_ok=True)
        fsync_dir(data.parent)
        return target
