"""The API server names where it listens, one socket or several."""

from __future__ import annotations

import logging
import re

import pytest
from waitress.server import create_server

from ith_proxy.config import ApiConfig
from ith_proxy.web.app import ApiServer, listening
from worker_rooms import Rooms

_ADDRESS = r"[^\s,:]+:\d+"  # waitress names the host as getnameinfo gives it


def test_listening_names_each_socket(tmp_path) -> None:
    """A bind address that resolves to several addresses (``localhost`` to
    127.0.0.1 and ::1) makes waitress listen on each, in a MultiSocketServer."""
    app = Rooms(tmp_path).api()
    one = create_server(app, host="127.0.0.1", port=0)
    two = create_server(app, listen="127.0.0.1:0 127.0.0.1:0")
    try:
        assert re.fullmatch(_ADDRESS, listening(one))
        assert re.fullmatch(f"{_ADDRESS}, {_ADDRESS}", listening(two))
    finally:
        one.close()
        two.close()


def test_start_logs_the_address(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    app = Rooms(tmp_path).api()
    server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), app)
    try:
        with caplog.at_level(logging.INFO, logger="ith_proxy.api"):
            server.start()
        assert server.alive()
        assert [r.getMessage() for r in caplog.records if r.name == "ith_proxy.api"] == [
            f"API listening on {listening(server.server)}"
        ]
    finally:
        server.stop()
