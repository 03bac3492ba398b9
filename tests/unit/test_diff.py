"""fleetprof diff: differential graphs and the table of changed functions."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fleetprof.cli import main
from fleetprof.query.changes import FEW_SAMPLES, function_changes, function_weights, share_margin
from fleetprof.query.flame_tree import build_tree
from fleetprof.query.render.base import diff_color
from tests.unit.test_exports import frame_rects
from tests.unit.test_sql_views import filled_database

SVG_NS = "{http://www.w3.org/2000/svg}"
# node-a's java before (resize 10, hash 30, gc 5) and after (resize 40, hash 30, write 8,
# recursive 6, gc 2), node-b's java before only
TIME_RANGES = ["--base-since", "10m", "--base-until", "5m", "--since", "5m", "--comm", "java"]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return filled_database(tmp_path_factory)


def diff(database: Path, *args: str) -> int:
    return main(["diff", "--db", str(database), *args])


def test_function_weights_count_recursion_once() -> None:
    tree = build_tree([(["p", "f", "f", "g"], ["process", "jit", "jit", "jit"], 3)])
    assert function_weights(tree) == {"f": [0, 3], "g": [3, 3]}  # no process frame


def test_changes_are_shares_of_each_total() -> None:
    base = build_tree([(["a"], ["jit"], 10), (["b"], ["jit"], 10)])
    # twice as long a comparison: a keeps its share, b's share halves, c is new
    tree = build_tree([(["a"], ["jit"], 20), (["b"], ["jit"], 10), (["c"], ["jit"], 10)])
    rows = {r["function"]: r for r in function_changes(base, tree).to_pylist()}
    assert rows["a"]["change"] == 0
    assert (rows["b"]["base_percent"], rows["b"]["percent"], rows["b"]["change"]) == (50, 25, -25)
    assert rows["c"]["change"] == rows["c"]["self_change"] == 25
    assert [r["function"] for r in function_changes(base, tree).to_pylist()][-1] == "a"


def test_diff_prints_the_biggest_changes(database: Path, capsys) -> None:
    assert diff(database, *TIME_RANGES) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["function", "base_percent", "percent", "change", "self_change"]
    # garbage collection shrank most: 55 of 104 before (both nodes' java), 2 of 86 after
    assert lines[3].split()[0] in ("GCTaskThread::run", "G1ParScanThreadState::trim_queue")
    assert float(lines[3].split()[3]) == pytest.approx(100 * 2 / 86 - 100 * 55 / 104, abs=0.01)
    resize = next(line.split() for line in lines if line.startswith("java.util.HashMap.resize"))
    assert float(resize[3]) == pytest.approx(100 * 40 / 86 - 100 * 15 / 104, abs=0.01)


def test_diff_html_carries_the_base(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "diff.html"
    assert diff(database, *TIME_RANGES, "-o", str(out)) == 0
    text = out.read_text()
    assert '"baseTotal":104' in text and '"base":[104,' in text


def test_diff_svg_colours_growth_red_and_shrink_blue(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "diff.svg"
    assert diff(database, *TIME_RANGES, "-o", str(out)) == 0
    root = ET.fromstring(out.read_bytes())
    fills = {}
    for group in root.iter(f"{SVG_NS}g"):
        title = group.find(f"{SVG_NS}title").text
        fills[title.split(" (")[0]] = (group.find(f"{SVG_NS}rect").get("fill"), title)
    red, title = fills["java.util.HashMap.resize"]
    assert red[1:3] == "ff" and red[3:5] == red[5:7] != "ff" and "points)" in title
    assert fills["GCTaskThread::run"][0] == "#4141ff"  # the largest change: full blue


def test_diff_colours_match_flamegraph_js() -> None:
    assert diff_color(0.0, 0.5) == "#ffffff"
    assert diff_color(0.5, 0.5) == "#ff4141"
    assert diff_color(-0.25, 0.5) == "#a0a0ff"


def test_diff_folded_is_difffolded_normalised(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "diff.folded"
    assert diff(database, "--base-node", "node-b", "--node", "node-a", "-o", str(out)) == 0
    lines = {}
    for line in out.read_text().splitlines():
        stack, before, after = line.rsplit(" ", 2)
        lines[stack] = (int(before), int(after))
    # node-b: java 59 of which gc 50, postgres 20 (79); node-a: 131, scale 131/79
    gc = "java;GCTaskThread::run;G1ParScanThreadState::trim_queue"
    assert lines[gc] == (round(50 * 131 / 79), 7)
    assert lines["postgres;main;PostgresMain;ExecScan"] == (round(20 * 131 / 79), 0)


def test_diff_table_file_and_icicle(database: Path, tmp_path: Path) -> None:
    table = tmp_path / "diff.txt"
    assert diff(database, "--base-pid", "200", "--pid", "100", "-o", str(table)) == 0
    assert re.search(r"^java\.util\.HashMap\.hash\s", table.read_text(), re.M)
    icicle = tmp_path / "icicle.svg"
    assert diff(database, *TIME_RANGES, "--icicle", "-o", str(icicle)) == 0
    rects = frame_rects(icicle.read_bytes())
    assert rects["all"] < rects["java"]


def test_diff_errors_are_one_line(database: Path, tmp_path: Path, capsys) -> None:
    assert diff(database, "--since", "5m") == 2
    assert "say what the base is" in capsys.readouterr().err
    assert diff(database, "--base-node", "nowhere") == 2
    assert "the base has no cpu samples of node nowhere\n" in capsys.readouterr().err
    assert diff(database, "--base-node", "node-b", "-o", str(tmp_path / "d.pb.gz")) == 2
    assert ".html, .svg or .folded" in capsys.readouterr().err


def test_diff_warns_when_a_selection_has_too_few_samples(database: Path, capsys) -> None:
    assert diff(database, *TIME_RANGES) == 0
    err = capsys.readouterr().err.splitlines()
    # 104 samples: a share is known to +-1.96 * 0.5 / sqrt(104) = +-9.6 points (95%)
    assert err == [
        "warning: the base has only 104 samples, so each share in it is known to +-10 "
        "percentage points (95%); changes smaller than that are noise: select more "
        f"({FEW_SAMPLES}+ samples)",
        "warning: the comparison has only 86 samples, so each share in it is known to +-11 "
        "percentage points (95%); changes smaller than that are noise: select more "
        f"({FEW_SAMPLES}+ samples)",
    ]
    assert share_margin(FEW_SAMPLES) < 5 < share_margin(FEW_SAMPLES // 2)
    assert share_margin(2) == pytest.approx(69.3, abs=0.1)  # the 2-sample base
