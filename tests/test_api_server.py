"""The API server names where it listens, one socket or several."""

from __future__ import annotations

import http.client
import logging
import re
import threading

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


def test_stop_lets_the_request_in_hand_finish_before_the_trigger_closes(tmp_path) -> None:
    """A request still being served when the server stops is finished (or
    cancelled) before stop() returns: no handler thread outlives it to write
    into a descriptor number that another file has taken since."""
    import bottle

    app = bottle.Bottle()
    entered, release = threading.Event(), threading.Event()

    @app.get("/slow")
    def slow() -> dict:
        entered.set()
        release.wait(10)
        return {"done": True}

    server = ApiServer(ApiConfig("127.0.0.1", 0, "", "", "", ""), app)
    server.start()
    host, port = listening(server.server).rsplit(":", 1)
    answers: list[int] = []

    def ask() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        try:
            conn.request("GET", "/slow")
            answers.append(conn.getresponse().status)
        except OSError:
            answers.append(0)
        finally:
            conn.close()

    client = threading.Thread(target=ask)
    client.start()
    try:
        assert entered.wait(10)
        threading.Timer(0.3, release.set).start()
        server.stop()
        assert release.is_set()  # stop() waited for the handler
        assert server.server.task_dispatcher.threads == set()
    finally:
        release.set()
        client.join(20)
    assert answers and answers[0] in (200, 0)
