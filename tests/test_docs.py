"""Docs move with the code: every CLI command and sub-action is in README.md's
command table, and the table names no command the CLI does not have."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ith_proxy.cli import _parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix}{name} ")
                out |= nested or {f"{prefix}{name}"}
    return out


def test_every_cli_command_is_in_the_readme_and_back() -> None:
    commands = _commands(_parser())
    assert {"run", "status", "reindex", "audit verify", "quarantine export"} <= commands
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for cell in re.findall(r"^\| `([^`]+)`", section, re.M):
        words = [w for w in cell.split() if re.fullmatch(r"[a-z][a-z-]*", w)]
        documented.add(" ".join(words[:2]) if " ".join(words[:2]) in commands else words[0])
    assert commands - documented == set(), "commands missing from README.md"
    assert documented - commands == set(), "README.md names commands the CLI lacks"
