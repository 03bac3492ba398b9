"""Exports by file name (pprof, speedscope, Parquet, Arrow), icicle SVGs, sandwich views."""

from __future__ import annotations

import gzip
import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from fleetprof.cli import main
from fleetprof.proto.pprof import profile_pb2
from fleetprof.query.flame_tree import build_tree
from fleetprof.query.render import RenderOptions, renderer_for
from fleetprof.query.render.base import RowRenderer
from fleetprof.query.render.speedscope import SpeedscopeRenderer
from fleetprof.query.sandwich import CALLEES, CALLERS, sandwich
from tests.unit.test_sql_views import STACKS, filled_database

SVG_NS = "{http://www.w3.org/2000/svg}"
TOTAL = 10 + 30 + 5 + 40 + 30 + 8 + 6 + 2 + 5 + 50 + 4 + 20


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return filled_database(tmp_path_factory)


def export(database: Path, out: Path, *options: str) -> None:
    assert main(["flamegraph", "--db", str(database), "-o", str(out), *options]) == 0


def decode_pprof(path: Path) -> profile_pb2.Profile:
    return profile_pb2.Profile.FromString(gzip.decompress(path.read_bytes()))


def pprof_stacks(profile: profile_pb2.Profile, value: int = 0) -> Counter[tuple[str, ...]]:
    """Weight per root-first stack of function names, decoded the way pprof does."""
    strings = profile.string_table
    names = {f.id: strings[f.name] for f in profile.function}
    locations = {loc.id: [names[line.function_id] for line in loc.line] for loc in profile.location}
    stacks: Counter[tuple[str, ...]] = Counter()
    for sample in profile.sample:
        leaf_first = [name for i in sample.location_id for name in locations[i]]
        stacks[tuple(reversed(leaf_first))] += sample.value[value]
    return stacks


def test_pprof_decodes_with_the_official_proto(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "cpu.pb.gz"
    export(database, out, "--frequency", "100")
    profile = decode_pprof(out)
    strings = profile.string_table
    assert strings[0] == ""
    types = [(strings[t.type], strings[t.unit]) for t in profile.sample_type]
    assert types == [("samples", "count"), ("cpu", "nanoseconds")]
    assert (strings[profile.period_type.type], profile.period) == ("cpu", 10_000_000)
    counts = pprof_stacks(profile)
    assert sum(counts.values()) == TOTAL
    assert sum(pprof_stacks(profile, 1).values()) == TOTAL * 10_000_000
    assert counts[STACKS["resize"].frames] == 10 + 40 + 5
    assert counts[STACKS["gc"].frames] == 5 + 2 + 50
    # labels name each sample's node, process and pid
    labels = {
        (strings[s.label[0].str], strings[s.label[1].str], s.label[2].num) for s in profile.sample
    }
    assert ("node-b", "postgres", 300) in labels and ("node-a", "java", 100) in labels
    modules = {strings[m.filename] for m in profile.mapping}
    assert {"[kernel]", "[jit]", "libjvm.so"} <= modules


def test_pprof_without_frequency_counts_samples_only(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "cpu.pb.gz"
    export(database, out, "--node", "node-b")
    profile = decode_pprof(out)
    assert [profile.string_table[t.type] for t in profile.sample_type] == ["samples"]
    assert sum(pprof_stacks(profile).values()) == 5 + 50 + 4 + 20


def test_speedscope_is_a_sampled_profile_of_the_schema(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    export(database, out, "--comm", "postgres")
    document = json.loads(out.read_text())
    assert document["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    (profile,) = document["profiles"]
    # the schema's required fields and types
    assert {"type", "name", "unit", "startValue", "endValue", "samples", "weights"} <= set(profile)
    assert profile["type"] == "sampled" and profile["unit"] == "none"
    assert all("name" in frame for frame in document["shared"]["frames"])
    names = [frame["name"] for frame in document["shared"]["frames"]]
    stacks = [tuple(names[i] for i in sample) for sample in profile["samples"]]
    assert stacks == [("postgres", *STACKS["postgres"].frames)]  # root first
    assert profile["weights"] == [20] and profile["endValue"] == 20


def test_speedscope_time_unit_and_self_weights() -> None:
    tree = build_tree([(["a", "b"], ["jit"] * 2, 5), (["a"], ["jit"], 3)])
    out = io.BytesIO()
    SpeedscopeRenderer().render(tree, RenderOptions("t", "lock", "ns"), out)
    profile = json.loads(out.getvalue())["profiles"][0]
    assert profile["unit"] == "nanoseconds"
    assert sorted(zip(map(tuple, profile["samples"]), profile["weights"], strict=True)) == [
        ((0,), 3),
        ((0, 1), 5),
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_raw_rows_are_samples_joined_with_stacks(
    database: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"rows{suffix}"
    export(database, out, "--node", "node-a")
    table = pq.read_table(out) if suffix == ".parquet" else ipc.open_file(out).read_all()
    assert {"ts", "node", "pid", "comm", "stack_id", "weight", "frames", "kinds"} <= set(
        table.column_names
    )
    assert set(table["node"].to_pylist()) == {"node-a"}
    assert sum(table["weight"].to_pylist()) == 10 + 30 + 5 + 40 + 30 + 8 + 6 + 2
    assert table.num_rows == 8


def test_every_format_is_picked_by_its_name() -> None:
    rows = {".pb.gz", ".parquet", ".arrow"}
    for suffix in (".html", ".svg", ".folded", ".json", ".pb.gz", ".parquet", ".arrow"):
        renderer = renderer_for(f"Out{suffix.upper()}")
        assert isinstance(renderer, RowRenderer) == (suffix in rows), suffix


def test_empty_selection_writes_nothing(database: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "none.parquet"
    status = main(["flamegraph", "--db", str(database), "-o", str(out), "--node", "nowhere"])
    assert status == 2 and not out.exists()
    assert "nothing to draw: no cpu samples of node nowhere\n" in capsys.readouterr().err


def frame_rects(svg: bytes) -> dict[str, float]:
    """y of each frame's rectangle, by its name."""
    root = ET.fromstring(svg)
    found = {}
    for group in root.iter(f"{SVG_NS}g"):
        title = group.find(f"{SVG_NS}title").text
        found[title.split(" (")[0]] = float(group.find(f"{SVG_NS}rect").get("y"))
    return found


def test_svg_icicle_puts_the_root_on_top(database: Path, tmp_path: Path) -> None:
    flame, icicle = tmp_path / "flame.svg", tmp_path / "icicle.svg"
    export(database, flame, "--comm", "postgres")
    export(database, icicle, "--comm", "postgres", "--icicle")
    up, down = frame_rects(flame.read_bytes()), frame_rects(icicle.read_bytes())
    assert up["all"] > up["postgres"] > up["ExecScan"]
    assert down["all"] < down["postgres"] < down["ExecScan"]


def test_sandwich_merges_callers_and_callees() -> None:
    tree = build_tree(
        [
            (["main", "a", "f", "g"], ["native"] * 4, 4),
            (["main", "b", "f"], ["native"] * 3, 2),
            (["main", "f", "f", "h"], ["native"] * 4, 1),  # recursion counts once
            (["main", "x"], ["native"] * 2, 10),
        ]
    )
    view = sandwich(tree, "f")
    callers, callees = view.children[CALLERS], view.children[CALLEES]
    assert callers.total == callees.total == 7
    f_up = callers.children["f"]
    assert {name: n.total for name, n in f_up.children.items()} == {"a": 4, "b": 2, "main": 1}
    assert f_up.children["a"].children["main"].total == 4
    f_down = callees.children["f"]
    assert (f_down.self_weight, f_down.children["g"].total) == (2, 4)
    assert f_down.children["f"].children["h"].total == 1
    assert sandwich(tree, "nope").total == 0


def test_sandwich_command(database: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sandwich.svg"
    export(database, out, "--sandwich", "java.util.HashMap.resize")
    names = frame_rects(out.read_bytes())
    assert {CALLERS, CALLEES, "com.acme.Cache.put", "java"} <= set(names)
    status = main(["flamegraph", "--db", str(database), "-o", str(out), "--sandwich", "nope"])
    assert status == 2 and "no frame named 'nope'" in capsys.readouterr().err
