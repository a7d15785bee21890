"""Every `patchdiff ...` command shown in the README and docs/ is one the CLI accepts.

The commands are parsed, not run (they train for minutes): the subcommand exists, its named options
parse, and a benchmark named by `patchdiff bench NAME` is registered. Catches docs left behind by a
renamed command or option.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from patchdiffusion.benchmarking import BENCHMARKS
from patchdiffusion.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `patchdiff` line inside a fenced code block."""
    found = []
    for path in DOCS:
        inside, pending = False, ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                inside, pending = not inside, ""
                continue
            if not inside:
                continue
            text = re.sub(r"\s#\s.*$", "", line).rstrip()  # a trailing comment
            if pending:
                text = pending + " " + text.strip()
            elif not text.strip().startswith("patchdiff "):
                continue
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            found.append((f"{path.name}:{number}", text.strip()))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30
    assert any(cmd.startswith("patchdiff demo") for _, cmd in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, command, capsys):
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts written as [--flag X]
    argv = shlex.split(command)[1:]
    parser = build_parser()
    try:
        args, _extra = parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` is refused: {capsys.readouterr().err.strip()} (exit {e.code})")
    assert getattr(args, "func", None), f"{where}: `{command}` names no command"
    if args.command == "bench" and args.name:
        assert args.name in BENCHMARKS, f"{where}: unknown benchmark '{args.name}'"
