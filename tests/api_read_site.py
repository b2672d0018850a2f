"""A site with its API served for real: worker_rooms.Rooms (spool, catalog,
vault, indexer) and the real app (web.app.make_app) in a real waitress
ApiServer on a loopback port, called over a real socket with minted tokens.
Studies are made fast in-process: dicomgen instances dropped into incoming/
at a chosen receive time and indexed by the real indexer."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import dicomgen
import tokens
import tools
from ith_proxy.web.app import ApiServer
from worker_rooms import Rooms


class ApiSite:
    def __init__(self, root: Path, ini: str = "", **api: Any) -> None:
        self.rooms = Rooms(root, ini=ini, env=tokens.ENV)
        self.inputs = Path(tempfile.mkdtemp(prefix="inputs-", dir=root))
        cfg = dataclasses.replace(self.rooms.cfg.api, bind_address="127.0.0.1", port=0)
        self.server = ApiServer(cfg, self.rooms.api(**api))
        self.server.start()
        host, port = self.server.server.getsockname()
        self.url = f"http://{host}:{port}"
        self.token = tokens.mint()
        self._n = 0

    def close(self) -> None:
        self.server.stop()
        self.rooms.close()

    def call(self, method: str, path: str, body: Any = None, token: str | None = "") -> tuple:
        """(status, JSON or text); the site's token unless ``token`` is given (None: none)."""
        return tools.http_json(
            method, self.url + path, body, token=self.token if token == "" else token
        )

    def studies(self, count: int, at: float, modality: str = "CT") -> list[str]:
        """``count`` new one-instance studies received at ``at``, indexed; their
        anonymized UIDs (in no particular order)."""
        before = set(self.rooms.catalog.study_uids())
        for _ in range(count):
            self._n += 1
            series = dicomgen.make_series(
                self.inputs / f"s{self._n}", 1, rows=8, cols=8, modality=modality
            )
            name = self.rooms.spool.deliver_incoming(series.files[0].read_bytes())
            os.utime(self.rooms.spool.incoming_path(name), (at, at))
        while self.rooms.indexer.run_once():
            pass
        made = set(self.rooms.catalog.study_uids()) - before
        assert len(made) == count
        return sorted(made)

    def walk(self, query: str = "", limit: int = 50, between=None) -> list[dict]:
        """Every page of the list, following next_cursor; ``between(page_no)``
        runs before each next page is asked for."""
        seen: list[dict] = []
        cursor = None
        pages = 0
        while True:
            q = f"limit={limit}" + (f"&{query}" if query else "")
            if cursor is not None:
                q += f"&cursor={cursor}"
            status, body = self.call("GET", f"/api/studies/?{q}")
            assert status == 200, body
            assert len(body["studies"]) <= limit
            seen += body["studies"]
            cursor = body["next_cursor"]
            pages += 1
            if cursor is None:
                return seen
            if between is not None:
                between(pages)
