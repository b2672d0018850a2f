"""The API of one site served for real: waitress on a free loopback port (the
service's own ApiServer), talked to over HTTP, and the site's audit records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ith_proxy.config import ApiConfig
from ith_proxy.web.app import ApiServer, listening
from tools import http_json


class Served:
    def __init__(self, url: str, spool: Path) -> None:
        self.url = url
        self.spool = spool
        self.control: Any = None  # the Control the app was given, for tests that need it

    def call(self, method: str, path: str, body: Any = None, token: str | None = None):
        return http_json(method, self.url + path, body, token=token)

    def audit(self) -> list[dict[str, Any]]:
        """Every record of the site's audit log, oldest first."""
        path = self.spool / "logs" / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def served(app: Any, spool: Path) -> Iterator[Served]:
    server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), app)
    server.start()
    try:
        yield Served("http://" + listening(server.server), spool)
    finally:
        server.stop()
