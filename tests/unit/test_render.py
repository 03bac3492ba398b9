"""The flame tree and its folded, SVG and HTML renderers."""

from __future__ import annotations

import io
import json
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetprof.query.flame_tree import FlameNode, build_tree
from fleetprof.query.render import RenderOptions, renderer_for
from fleetprof.query.render.base import Renderer, format_weight, frame_color
from fleetprof.query.render.folded import FoldedRenderer
from fleetprof.query.render.html import HtmlRenderer
from fleetprof.query.render.svg import SvgRenderer

SVG_NS = "{http://www.w3.org/2000/svg}"
HOSTILE = "</script><script>alert(1)</script>"
CPU = RenderOptions(title="CPU", event="cpu", unit="samples")


def row(frames: str, weight: int, kind: str = "native") -> tuple[list[str], list[str], int]:
    names = frames.split(";")
    return names, [kind] * len(names), weight


def small_tree() -> FlameNode:
    return build_tree([row("main;a;b", 5), row("main;a", 2), row("main;c", 3, "interpreted")])


def render(renderer: Renderer, tree: FlameNode, options: RenderOptions = CPU) -> str:
    out = io.BytesIO()
    renderer.render(tree, options, out)
    return out.getvalue().decode("utf-8")


def shape(tree: FlameNode) -> list[tuple[int, int, str, str, int, int]]:
    return [(d, o, n.name, n.kind, n.total, n.self_weight) for d, o, n in tree.walk()]


def prefix_weights(
    rows: list[tuple[list[str], list[str], int]],
) -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
    """Brute force: totals and self weights per path, straight from the definition."""
    totals: Counter[tuple[str, ...]] = Counter({(): 0})  # the root exists even with no rows
    selfs: Counter[tuple[str, ...]] = Counter()
    for frames, _, weight in rows:
        for depth in range(len(frames) + 1):
            totals[tuple(frames[:depth])] += weight
        selfs[tuple(frames)] += weight
    return totals, selfs


def assert_matches_brute_force(tree: FlameNode, rows: list) -> None:
    totals, selfs = prefix_weights(rows)
    seen = 0
    pending: list[tuple[tuple[str, ...], FlameNode]] = [((), tree)]
    while pending:
        path, node = pending.pop()
        seen += 1
        assert node.total == totals[path], path
        assert node.self_weight == selfs[path], path
        pending.extend(((*path, name), child) for name, child in node.children.items())
    assert seen == len(totals)


# --- tree ---------------------------------------------------------------------------


def test_tree_totals_self_weights_and_merged_prefixes() -> None:
    tree = small_tree()
    assert (tree.name, tree.total, tree.self_weight) == ("all", 10, 0)
    assert list(tree.children) == ["main"]  # the three stacks share one "main"
    main = tree.children["main"]
    assert (main.total, main.self_weight) == (10, 0)
    a, c = main.children["a"], main.children["c"]
    assert (a.total, a.self_weight) == (7, 2)
    assert (a.children["b"].total, a.children["b"].self_weight) == (5, 5)
    assert (c.total, c.self_weight, c.kind) == (3, 3, "interpreted")


def test_tree_is_the_same_in_any_row_order() -> None:
    rows = [
        row("a;b;c", 1),
        row("a;b", 2),
        row("x", 4),
        row("a;b;d", 8),
        row("a", 16),
        row("a;b;c;e", 32),
        row("a;b;c", 64),  # a repeat still merges
    ]
    expected = shape(build_tree(sorted(rows)))
    shuffler = random.Random(7)
    for _ in range(20):
        shuffler.shuffle(rows)
        assert shape(build_tree(rows)) == expected
    assert_matches_brute_force(build_tree(rows), rows)


def test_empty_stack_and_weights() -> None:
    tree = build_tree([([], [], 3), row("a", 0), row("b", 2)])
    assert (tree.total, tree.self_weight) == (5, 3)
    assert list(tree.children) == ["b"]  # zero weight adds nothing
    with pytest.raises(ValueError, match="negative"):
        build_tree([row("a", -1)])


def test_rows_may_reuse_one_list() -> None:
    def rows() -> Iterator[tuple[list[str], list[str], int]]:
        frames = ["main", "a"]
        yield frames, ["native", "native"], 1
        frames[1] = "b"  # a streaming source refilling its buffer
        yield frames, ["native", "native"], 1

    assert sorted(build_tree(rows()).children["main"].children) == ["a", "b"]


@given(
    st.lists(
        st.tuples(st.lists(st.sampled_from("abc"), max_size=5), st.integers(1, 9)),
        max_size=30,
    )
)
def test_tree_matches_brute_force(stacks: list[tuple[list[str], int]]) -> None:
    rows = [(frames, ["jit"] * len(frames), weight) for frames, weight in stacks]
    assert_matches_brute_force(build_tree(rows), rows)


def test_tree_of_20k_random_stacks() -> None:
    rng = random.Random(42)
    names = [f"mod{i % 7}.fn{i}" for i in range(300)]
    stacks = {tuple(rng.choices(names, k=rng.randint(1, 40))) for _ in range(20_000)}
    rows = [(list(s), ["native"] * len(s), rng.randint(1, 1000)) for s in stacks]
    tree = build_tree(rows)
    assert tree.total == sum(weight for _, _, weight in rows)
    assert sum(node.self_weight for _, _, node in tree.walk()) == tree.total
    assert render(FoldedRenderer(), tree).count("\n") == len(rows)


# --- folded -------------------------------------------------------------------------


def test_folded_exact_text() -> None:
    assert render(FoldedRenderer(), small_tree()) == "main;a 2\nmain;a;b 5\nmain;c 3\n"


def test_folded_sanitizes_separators() -> None:
    tree = build_tree([(["main", "std::map<a;b>", "two\nlines"], ["native"] * 3, 4)])
    text = render(FoldedRenderer(), tree)
    assert text == "main;std::map<a:b>;two lines 4\n"


# --- SVG ----------------------------------------------------------------------------


def svg_titles(text: str) -> list[str]:
    root = ET.fromstring(text.encode("utf-8"))
    return [el.text or "" for el in root.iter(f"{SVG_NS}title")]


def test_svg_parses_with_percent_titles() -> None:
    titles = svg_titles(render(SvgRenderer(), small_tree()))
    assert titles[0] == "all (10 samples, 100.00%)"
    assert "main;a" not in titles
    assert set(titles) == {
        "all (10 samples, 100.00%)",
        "main (10 samples, 100.00%)",
        "a (7 samples, 70.00%)",
        "b (5 samples, 50.00%)",
        "c (3 samples, 30.00%)",
    }


def test_svg_escapes_hostile_names() -> None:
    names = [HOSTILE, "a&b \"quoted\" 'single'", "ctrl\x00\x1bchar"]
    tree = build_tree([([name], ["jit"], 1) for name in names])
    text = render(SvgRenderer(), tree)
    assert "<script" not in text
    assert "&lt;/script&gt;" in text
    titles = svg_titles(text)  # parses despite the control characters
    assert f"{HOSTILE} (1 sample, 33.33%)" in titles
    assert "a&b \"quoted\" 'single' (1 sample, 33.33%)" in titles
    assert "ctrl\ufffd\ufffdchar (1 sample, 33.33%)" in titles


def test_svg_time_unit_shows_milliseconds() -> None:
    tree = build_tree([row("main;lock_wait", 5_000_000), row("main", 15_000_000)])
    text = render(SvgRenderer(), tree, RenderOptions("Locks", "lock", "ns"))
    titles = svg_titles(text)
    assert "lock_wait (5.00 ms, 25.00%)" in titles
    assert "all (20.00 ms, 100.00%)" in titles
    assert "sample" not in text


def test_svg_omits_subpixel_frames_and_truncates_labels() -> None:
    long_name = "x" * 500
    tree = build_tree([row("wide", 1_000_000), row(f"wide;{long_name}", 500_000), row("tiny", 1)])
    text = render(SvgRenderer(), tree)
    titles = svg_titles(text)
    assert not any(t.startswith("tiny") for t in titles)
    labels = [el.text for el in ET.fromstring(text).iter(f"{SVG_NS}text")]
    cut = next(label for label in labels if label and label.startswith("xxx"))
    assert cut.endswith("..") and len(cut) < 100


def test_empty_tree_renders_everywhere() -> None:
    tree = build_tree([])
    assert render(FoldedRenderer(), tree) == ""
    ET.fromstring(render(SvgRenderer(), tree))
    assert '"nodes":[0,0,0,0]' in render(HtmlRenderer(), tree)


# --- HTML ---------------------------------------------------------------------------


def html_payload(text: str) -> dict:
    found = re.search(r'<script id="fg-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "payload script element missing"
    return json.loads(found.group(1))


def test_html_payload_round_trips_hostile_names() -> None:
    names = [HOSTILE, "<!--", "line\u2028sep\u2029para", 'naïve & "q"']
    tree = build_tree([(["main", name], ["native", "jit"], 2) for name in names])
    text = render(HtmlRenderer(), tree, RenderOptions(HOSTILE, "cpu", "samples", HOSTILE))
    assert "<script>alert" not in text
    assert "<!--" not in text.split('id="fg-data"', 1)[1]
    assert "\u2028" not in text and "\u2029" not in text
    # only the template's two script elements close
    assert text.count("</script>") == 2
    data = html_payload(text)
    assert {name for name, _, _ in data["frames"]} >= set(names)
    assert data["title"] == HOSTILE and data["subtitle"] == HOSTILE


def test_html_payload_is_the_tree_in_pre_order() -> None:
    tree = small_tree()
    data = html_payload(render(HtmlRenderer(), tree))
    nodes = [data["nodes"][i : i + 4] for i in range(0, len(data["nodes"]), 4)]
    decoded = [(data["frames"][f][0], depth, total, own) for f, depth, total, own in nodes]
    assert decoded == [
        ("all", 0, 10, 0),
        ("main", 1, 10, 0),
        ("a", 2, 7, 2),
        ("b", 3, 5, 5),
        ("c", 2, 3, 3),
    ]
    assert data["unit"] == "samples" and data["event"] == "cpu"
    main_kind, main_color = data["frames"][nodes[1][0]][1:]
    assert main_kind == "native" and main_color == frame_color("main", "native")


def test_html_is_self_contained() -> None:
    text = render(HtmlRenderer(), small_tree())
    assert "__FLEETPROF_PAYLOAD__" not in text
    assert not re.search(r"https?://|\bsrc=|<link", text)
    # the shared drawing code is inlined, whole (it has no "</script" of its own)
    assert "class FlameGraph" in text and "new FlameGraph(" in text


# --- registry and shared helpers ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "renderer"),
    [
        ("out.folded", FoldedRenderer),
        ("out.collapsed", FoldedRenderer),
        ("dir.v2/OUT.SVG", SvgRenderer),
        (Path("flame.html"), HtmlRenderer),
        ("flame.htm", HtmlRenderer),
    ],
)
def test_renderer_for_picks_by_suffix(path: str | Path, renderer: type) -> None:
    assert isinstance(renderer_for(path), renderer)


def test_renderer_for_rejects_unknown_suffix() -> None:
    with pytest.raises(ValueError) as excinfo:
        renderer_for("/tmp/Flame.XYZ")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'Flame.XYZ'" in message
    for suffix in (".collapsed", ".folded", ".htm", ".html", ".svg"):
        assert suffix in message


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (1, "samples", "1 sample"),
        (1234, "samples", "1,234 samples"),
        (950, "ns", "950 ns"),
        (1_500, "ns", "1.50 µs"),
        (2_345_678, "ns", "2.35 ms"),
        (999_999, "ns", "1.00 ms"),
        (61_000_000_000, "ns", "61.00 s"),
    ],
)
def test_format_weight(value: int, unit: str, text: str) -> None:
    assert format_weight(value, unit) == text  # type: ignore[arg-type]


def test_options_reject_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unit"):
        RenderOptions("t", "cpu", "bytes")  # type: ignore[arg-type]


def rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def test_colors_follow_kind_and_are_stable() -> None:
    assert frame_color("foo", "jit") == frame_color("foo", "jit")
    for name in ("foo", "bar", "java/lang/Thread.run"):
        r, g, b = rgb(frame_color(name, "jit"))
        assert g > r and g > b  # green
        r, g, b = rgb(frame_color(name, "kernel"))
        assert r > g > b == 0  # orange
        r, g, b = rgb(frame_color(name, "lost"))
        assert r == g == b  # grey
        r, g, b = rgb(frame_color(f"ns::{name}", "native"))
        assert r == g > b  # yellow for C++
        r, g, b = rgb(frame_color(name, "native"))
        assert r >= 205 and b <= 55  # red for C
