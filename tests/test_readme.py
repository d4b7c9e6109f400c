"""The README and the parser agree: every command of the parser has a row in
the README's command table, every flag the table names exists for the
commands it names, and every flag of every command is in its row or in the
table of shared options for it. Every ``shardwise ...`` command line of the
README's and docs' code blocks parses."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from shardwise.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def parser_flags() -> dict[str, set[str]]:
    """Each command's flags and positionals (metavar), as --help lists them."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        out[name] = {s for a in p._actions if a.help is not argparse.SUPPRESS
                     and not isinstance(a, argparse._HelpAction)
                     for s in a.option_strings if s.startswith("--")}
    return out


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``heading``."""
    text = README[README.index(heading):]
    rows = []
    for line in text.splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows[1:]  # without the header


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


COMMANDS = table_after("## Commands")
SHARED = table_after("Options that several commands share")


def documented() -> dict[str, set[str]]:
    """Each command of the table: the flags its row names, and those of the
    shared options that list it."""
    out: dict[str, set[str]] = {}
    for row in COMMANDS:
        for name in re.findall(r"`shardwise ([a-z]+)", row[0]):
            out.setdefault(name, set()).update(flags_in(" ".join(row)))
    for flags, commands, _ in SHARED:
        for name in re.findall(r"[a-z]+", commands):
            assert name in out, f"shared options name {name!r}, which has no row"
            out[name] |= flags_in(flags)
    return out


def test_every_command_of_the_parser_has_a_row_and_every_row_a_command():
    assert set(documented()) == set(parser_flags())


@pytest.mark.parametrize("command", sorted(parser_flags()))
def test_the_readme_names_exactly_the_flags_of_each_command(command):
    readme, parser = documented()[command], parser_flags()[command]
    assert not readme - parser, f"the README names flags {command} does not have"
    assert not parser - readme, f"flags of {command} missing from the README"


def test_the_version_flag_is_named():
    assert "--version" in {s for a in build_parser()._actions for s in a.option_strings}
    assert "shardwise --version" in README


def command_lines():
    """Every line of a code block in the README and docs that runs shardwise."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        block = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                block = not block
                continue
            m = re.match(r"^(?:\$ )?shardwise (.*)", line.strip())
            if block and m:
                words = shlex.split(m.group(1), comments=True)
                if words and words[0] in parser_flags():
                    yield f"{path.name}:{n}", words


LINES = list(command_lines())


def test_the_docs_have_command_lines():
    assert len(LINES) > 20 and {w[0] for _, w in LINES} >= {"verify", "bench", "plan",
                                                             "generate", "partition"}


@pytest.mark.parametrize("where, words", LINES, ids=[w for w, _ in LINES])
def test_every_command_line_of_the_docs_parses(where, words, capsys):
    try:
        build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"{where}: shardwise {shlex.join(words)}: {capsys.readouterr().err}")
