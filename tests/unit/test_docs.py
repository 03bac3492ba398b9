"""Every `fleetprof` command line in README.md and docs/ is one the CLI takes.

The SQL of the same pages' ```sql blocks runs in tests/unit/test_sql_views.py; here each command
of a ```sh block is parsed by the CLI's own parser, so an option renamed or dropped fails a
test instead of a reader, and the SQL of each `query` command runs on a database of the
current schema. `[--option value]` (optional in prose) is parsed as given, `...` left out.
Synopses (```text blocks) are not commands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import build_parser
from fleetprof.query.source import DatabaseSource

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, list[str]]]:
    """(page: first words, argv after `fleetprof`) of every command in the pages' sh blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```sh\n(.*?)```", page.read_text("utf-8"), re.S):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                try:  # a quoted argument (SQL) may span lines
                    words = shlex.split(pending + line, comments=True)
                except ValueError:
                    pending += line + "\n"
                    continue
                pending = ""
                starts = [i for i, word in enumerate(words) if word.endswith("bin/fleetprof")]
                starts += [i for i, word in enumerate(words) if word == "fleetprof"]
                if not starts:
                    continue
                argv = [w.strip("[]") for w in words[min(starts) + 1 :] if w != "..."]
                found.append((f"{page.name}: {' '.join(argv[:3])}", argv))
    return found


def test_the_pages_have_commands() -> None:
    assert len(commands()) >= 15


@pytest.mark.parametrize(("where", "argv"), [pytest.param(w, a, id=w) for w, a in commands()])
def test_docs_command_parses(where: str, argv: list[str]) -> None:
    parser = build_parser()
    try:
        _, unknown = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the CLI refuses {shlex.join(argv)}")
    assert not unknown, f"{where}: unknown options {unknown}"


def test_docs_query_commands_run(tmp_path: Path) -> None:
    """The SQL of every `fleetprof query` command runs (on an empty database: the tour's
    job has no rows here, its columns and functions must still exist)."""
    ProfileStore(tmp_path / "p.duckdb", name="docs").close()
    source = DatabaseSource(tmp_path / "p.duckdb")
    try:
        queries = []
        for _, argv in commands():
            if argv[0] == "query":
                args = build_parser().parse_args(argv)
                queries.append(args.sql)
                with source.stream(args.sql) as reader:
                    reader.read_all()
        assert len(queries) >= 3
    finally:
        source.close()
