"""The CLI's wiring: every verb carries its own function (``set_defaults``),
and the offline commands take the spool lock through one helper and let it
go when they finish.  In-process on a real site, so a lock left open shows."""

from __future__ import annotations

import argparse
import json
import os

import pytest

import tools
from ith_proxy import cli


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _leaves(sub, (*prefix, name)) or [(*prefix, name)]
    return out


def test_every_verb_names_its_function() -> None:
    parser = cli._parser()
    leaves = _leaves(parser)
    assert ("quarantine", "release") in leaves and ("audit", "rotate-key") in leaves
    for words in leaves:
        positional = {"echo": ["N"], "send": ["1.2", "N"], "requeue": ["1.2"],
                      "retrieve": ["N", "1.2"]}.get(words[0], [])  # fmt: skip
        if words[0] == "quarantine" and words[1] != "list":
            positional = ["NAME"]
        args = parser.parse_args([*words, *positional])
        assert callable(args.func), words
        assert args.func.__name__.startswith("cmd_"), words


@pytest.fixture
def site(rooms, monkeypatch):
    """The rooms' site as the environment of an in-process ``cli.main``."""
    for key in os.environ:
        if key.startswith(tools.PROXY_ENV_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in rooms.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(rooms.root)
    return rooms


@pytest.mark.parametrize("command", [["reindex"], ["audit", "rotate-key"]])
def test_offline_commands_refuse_a_held_lock_and_release_their_own(site, capsys, command) -> None:
    held = site.spool.lock()  # as the running proxy holds it
    assert held is not None
    try:
        assert cli.main(command) == 1
    finally:
        os.close(held)
    assert capsys.readouterr().err == (
        f"ith-proxy: the proxy is running on this spool; stop it before {' '.join(command)}\n"
    )
    assert cli.main(command) == 0
    again = site.spool.lock()  # flock is per open file: a leaked descriptor would hold it
    assert again is not None, "the command left the spool lock taken"
    os.close(again)


def test_reindex_refuses_a_linked_lock_file(site, capsys, tmp_path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (site.spool.root / ".lock").unlink(missing_ok=True)
    (site.spool.root / ".lock").symlink_to(tmp_path / "elsewhere")
    assert cli.main(["reindex"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ith-proxy: cannot take the spool lock {site.spool.root / '.lock'}")
    assert err.count("\n") == 1


def test_status_shows_the_outbox_and_the_dead_letter(site, capsys, tmp_path) -> None:
    """A failed forward is visible in `status` (and its --json) with its reason."""
    from outbox_site import Site

    forwarding = Site(site, tmp_path, destinations=("pacs",))
    study = forwarding.complete()
    entry = forwarding.entry(study, "pacs")
    forwarding.rooms.catalog.close()  # the command opens its own connection
    from ith_proxy.store.catalog import Catalog
    from ith_proxy.store.outbox import Outbox

    catalog = Catalog(site.spool.catalog_file)
    try:
        Outbox(catalog).fail(entry.id, entry.updated_at + 1, "association rejected (permanent)")
    finally:
        catalog.close()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "forwarding:  pending 0, delivered 0, failed 1" in out
    assert f"  failed:    {study} to pacs after 0 attempt(s): association rejected" in out
    assert cli.main(["status", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["outbox"] == {"pending": 0, "delivered": 0, "failed": 1}
    assert info["failed_forwards"][0]["node"] == "pacs"
