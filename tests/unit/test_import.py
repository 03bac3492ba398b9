"""fleetprof import: folded stacks and pprof files become samples through the ingest path."""

from __future__ import annotations

import gzip
from pathlib import Path

import duckdb

from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.proto.pprof import profile_pb2
from tests.unit.test_sql_views import fill

FOLDED = b"""\
java;start_thread;Thread.run;Cache.put;HashMap.resize 30
java;start_thread;Thread.run;Log.write;ksys_write_[k];ext4_write_[k] 12
java;start_thread;Thread.run;Cache.put;HashMap.resize 8

java;GC Thread#0;G1ParScan 5
"""


def rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_folded_into_a_database_once(tmp_path: Path, capsys) -> None:
    source = tmp_path / "before.folded"
    source.write_bytes(FOLDED)
    db = tmp_path / "p.duckdb"
    assert main(["import", str(source), "--db", str(db), "--node", "laptop"]) == 0
    assert "3 sample rows, 55 samples" in capsys.readouterr().out
    assert main(["import", str(source), "--db", str(db), "--node", "laptop"]) == 0
    assert "imported before: nothing added" in capsys.readouterr().out
    assert rows(db, "SELECT node, comm, event, sum(weight) FROM samples GROUP BY ALL") == [
        ("laptop", "before", "cpu", 55)
    ]
    (kinds,) = rows(db, "SELECT kinds FROM stacks WHERE list_contains(frames, 'ksys_write')")
    assert kinds[0][-2:] == ["kernel", "kernel"]
    top = rows(db, "SELECT function, self FROM top_functions('cpu') LIMIT 1")
    assert top == [("HashMap.resize", 38)]


def test_pprof_round_trips_through_an_aggregator(tmp_path: Path, capsys) -> None:
    original = tmp_path / "original.duckdb"
    store = ProfileStore(original)
    fill(store)
    store.close()
    exported = tmp_path / "fleet.pb.gz"
    assert main(["flamegraph", "--db", str(original), "-o", str(exported), "--node", "node-a"]) == 0

    aggregator = Aggregator(tmp_path / "live.duckdb", "127.0.0.1:0")
    aggregator.start()
    try:
        args = ["import", str(exported), "--aggregator", aggregator.address, "--node", "again"]
        assert main(args) == 0
        reader = aggregator.store.reader()
        imported = reader.execute(
            "SELECT comm, pid, stack_id, sum(weight) FROM samples GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        nodes = reader.execute("SELECT DISTINCT node FROM samples").fetchall()
    finally:
        aggregator.stop(grace_s=0)
    expected = rows(
        original,
        "SELECT comm, pid, stack_id, sum(weight) FROM samples WHERE node = 'node-a' "
        "GROUP BY ALL ORDER BY ALL",
    )
    # same processes, same weights and the same stack ids: frames, modules and kinds survive
    assert imported == expected
    assert nodes == [("again",)]
    assert "imported" in capsys.readouterr().out


def pprof_file(path: Path, sample_types: list[tuple[str, str]], values: list[int]) -> None:
    """A two-frame Go-style profile: main.main → main.work (inlined into main.main)."""
    strings = ["", "/usr/bin/server", "main.main", "main.work"]
    profile = profile_pb2.Profile(string_table=strings)
    for type_name, unit in sample_types:
        strings.append(type_name)
        strings.append(unit)
        profile.sample_type.add(type=len(strings) - 2, unit=len(strings) - 1)
    del profile.string_table[:]
    profile.string_table.extend(strings)
    profile.mapping.add(id=1, filename=1)
    profile.function.add(id=1, name=2)
    profile.function.add(id=2, name=3)
    location = profile.location.add(id=1, mapping_id=1, address=0x1234)
    location.line.add(function_id=2)  # the inlined callee first
    location.line.add(function_id=1)
    profile.sample.add(location_id=[1], value=values)
    path.write_bytes(gzip.compress(profile.SerializeToString()))


def test_pprof_of_another_tool_uses_the_count_sample_type(tmp_path: Path) -> None:
    source = tmp_path / "server.pb.gz"
    pprof_file(source, [("samples", "count"), ("cpu", "nanoseconds")], [7, 70_000_000])
    db = tmp_path / "p.duckdb"
    assert main(["import", str(source), "--db", str(db)]) == 0
    assert rows(db, "SELECT comm, weight FROM samples") == [("server", 7)]
    assert rows(db, "SELECT frames, modules, kinds FROM stacks") == [
        (["main.main", "main.work"], ["server", "server"], ["native", "inlined"])
    ]


def test_import_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.folded"
    bad.write_bytes(b"a;b 1\nno count here\n")
    assert main(["import", str(bad), "--db", str(tmp_path / "p.duckdb")]) == 2
    assert "line 2" in capsys.readouterr().err
    heap = tmp_path / "heap.pb.gz"
    pprof_file(heap, [("space", "bytes")], [4096])
    assert main(["import", str(heap), "--db", str(tmp_path / "p.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "no sample type in count" in err and "space/bytes" in err and err.count("\n") == 1


def test_deep_stacks_are_truncated_at_the_root(tmp_path: Path) -> None:
    depth = 5000
    source = tmp_path / "deep.folded"
    source.write_text(";".join(f"f{i}" for i in range(depth)) + " 3\n")
    db = tmp_path / "p.duckdb"
    assert main(["import", str(source), "--db", str(db)]) == 0
    ((frames,),) = rows(db, "SELECT frames FROM stacks")
    assert frames[0] == "[truncated]" and frames[-1] == f"f{depth - 1}"
    assert len(frames) == 1024


def test_our_folded_export_round_trips(tmp_path: Path) -> None:
    original = tmp_path / "original.duckdb"
    store = ProfileStore(original)
    fill(store)
    store.close()
    exported = tmp_path / "fleet.folded"
    assert main(["flamegraph", "--db", str(original), "-o", str(exported)]) == 0
    again = tmp_path / "again.duckdb"
    assert main(["import", str(exported), "--db", str(again)]) == 0
    by_process = (
        "SELECT comm, sum(weight) FROM samples WHERE event = 'cpu' GROUP BY comm ORDER BY comm"
    )
    # the process name stays the process, not a root frame under the file's name
    assert rows(again, by_process) == rows(original, by_process)
    paths = (
        "SELECT comm, frames, sum(weight) FROM samples JOIN stacks USING (stack_id) "
        "WHERE event = 'cpu' "
        "GROUP BY ALL ORDER BY ALL"
    )
    assert rows(again, paths) == rows(original, paths)
    # and exported again, the file is the same
    second = tmp_path / "second.folded"
    assert main(["flamegraph", "--db", str(again), "-o", str(second)]) == 0
    assert second.read_bytes() == exported.read_bytes()


def test_empty_frames_are_refused(tmp_path: Path, capsys) -> None:
    db = tmp_path / "p.duckdb"
    for text in (b"a;;b 1\n", b";a 2\n", b"a; ;b 3\n", b"a;b; 4\n"):
        bad = tmp_path / "bad.folded"
        bad.write_bytes(b"main;ok 5\n" + text)
        assert main(["import", str(bad), "--db", str(db)]) == 2
        assert "line 2: an empty frame name" in capsys.readouterr().err
    assert not db.exists()  # nothing half-imported
