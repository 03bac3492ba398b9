"""The web UI: its JSON API over urllib, then the pages in headless Chromium (Playwright).

Data reaches the aggregator the real way, as Arrow batches over gRPC; one test profiles
the bundled native workload with the real agent. Screenshots go to tests/artifacts/web_ui/.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from playwright.sync_api import expect, sync_playwright

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.web import ARROW_STREAM, WebServer
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2
from fleetprof.proto.security import ServerSecurity
from fleetprof.proto.stacks import StackRow, stacks_table
from fleetprof.query.flame_tree import build_tree
from fleetprof.query.render import RenderOptions
from fleetprof.query.render.base import MIN_FRACTION
from fleetprof.query.render.html import HtmlRenderer
from fleetprof.query.render.svg import SvgRenderer
from tests.conftest import require
from tests.unit.test_ingest import send
from tests.unit.test_sql import REFUSED

ARTIFACTS = Path(__file__).parents[1] / "artifacts" / "web_ui"
HOSTILE = "<img src=x onerror=alert(1)>"
BIG_ID = 2**62 + 12345  # beyond JavaScript's exact integers
STACKS = {
    1: StackRow(("main", "run", "compute_alpha"), ("app",) * 3, ("native",) * 3),
    2: StackRow(("main", "run", "compute_beta"), ("app",) * 3, ("native",) * 3),
    3: StackRow(("main", HOSTILE), ("app",) * 2, ("native", "jit")),
    BIG_ID: StackRow(
        ("main", "run", "compute_alpha", "memcpy"), ("app",) * 4, ("native",) * 3 + ("kernel",)
    ),
}
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
MIDDLE = quote((T0 + timedelta(minutes=5)).isoformat())  # for a URL: "+00:00" is no space
# Base (first batch) and comparison (second, 10 minutes later): beta's share grows.
BASE = {1: 60, 2: 30, 3: 5, BIG_ID: 10}
LATER = {1: 30, 2: 60, 3: 5, BIG_ID: 20}
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def message(
    sequence: int,
    weights: dict[int, int],
    ts: datetime,
    stacks: dict[int, StackRow] = STACKS,
    node: str = "node-a",
    pid: int = 100,
    comm: str = "app",
    event: str = "cpu",
    job: str | None = None,
    session: str | None = None,
) -> ingest_pb2.IngestBatch:
    rows = len(weights)
    table = schema.samples_table(
        {
            "ts": [ts] * rows,
            "pid": [pid] * rows,
            "tid": [pid] * rows,
            "comm": [comm] * rows,
            "event": [event] * rows,
            "stack_id": list(weights),
            "weight": list(weights.values()),
            "job": [job] * rows,
            "session_id": [session] * rows,
        }
    )
    return ingest_pb2.IngestBatch(
        agent_id=f"agent-{node}",
        sequence=sequence,
        schema_version=schema.SCHEMA_VERSION,
        node=node,
        samples=schema.encode(table),
        stacks=schema.encode(stacks_table({i: stacks[i] for i in weights})),
    )


@pytest.fixture
def served(aggregator: Aggregator) -> Aggregator:
    """The aggregator with two batches stored: node-a at T0, node-b ten minutes later."""
    send(aggregator, message(1, BASE, T0))
    send(aggregator, message(1, LATER, T0 + timedelta(minutes=10), node="node-b", pid=200))
    return aggregator


def get(aggregator: Aggregator, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(aggregator.web.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post_sql(
    aggregator: Aggregator,
    body: object,
    accept: str = "application/json",
    content_type: str = "application/json",
) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        aggregator.web.url + "api/sql",
        data=data,
        headers={"Content-Type": content_type, "Accept": accept},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def decode_flame(payload: dict) -> dict[tuple[str, ...], int]:
    """Total weight per path of frame names, from the compact flame payload."""
    path: list[str] = []
    totals = {}
    nodes = payload["nodes"]
    for i in range(0, len(nodes), 4):
        frame, depth, total, _ = nodes[i : i + 4]
        del path[depth:]
        path.append(payload["frames"][frame][0])
        totals[tuple(path[1:])] = total
    return totals


# --- JSON API --------------------------------------------------------------------------


def test_meta_lists_what_there_is_to_pick(served: Aggregator) -> None:
    status, meta = get(served, "api/meta")
    assert status == 200
    (cpu,) = meta["events"]
    assert (cpu["event"], cpu["unit"], cpu["weight"]) == ("cpu", "samples", 220)
    assert datetime.fromisoformat(cpu["first"]) == T0
    assert datetime.fromisoformat(cpu["last"]) == T0 + timedelta(minutes=10)
    assert meta["known_events"]["cpu"] == "samples"
    assert [n["node"] for n in meta["nodes"]] == ["node-b", "node-a"]  # heaviest first
    assert meta["comms"] == [{"comm": "app", "weight": 220}]
    assert {p["pid"] for p in meta["pids"]} == {100, 200}


def test_flame_is_the_html_payload_of_the_selection(served: Aggregator) -> None:
    status, payload = get(served, "api/flame?event=cpu")
    assert status == 200
    assert (payload["event"], payload["unit"]) == ("cpu", "samples")
    totals = decode_flame(payload)
    assert totals[()] == 220
    assert totals[("app", "main", "run", "compute_alpha")] == 120
    assert totals[("app", "main", "run", "compute_alpha", "memcpy")] == 30
    assert totals[("app", "main", HOSTILE)] == 10
    assert [HOSTILE, "jit"] in [frame[:2] for frame in payload["frames"]]
    # each filter narrows the selection
    for query, total in [
        ("node=node-a", 105),
        ("node=node-a&node=node-b", 220),
        ("pid=200", 115),
        ("comm=app", 220),
        ("comm=other", 0),
        (f"since={MIDDLE}", 115),
        (f"until={MIDDLE}", 105),
    ]:
        status, payload = get(served, f"api/flame?{query}")
        assert (status, payload["nodes"][2]) == (200, total), query


def test_top_has_self_and_total_in_order(served: Aggregator) -> None:
    status, top = get(served, "api/top?order=total&limit=3")
    assert status == 200
    assert (top["event"], top["unit"], top["total"]) == ("cpu", "samples", 220)
    assert top["functions"] == [
        {"function": "main", "self": 0, "total": 220},
        {"function": "run", "self": 0, "total": 210},
        {"function": "compute_alpha", "self": 90, "total": 120},
    ]
    _, top = get(served, "api/top?node=node-b")  # by self weight by default
    assert [(f["function"], f["self"]) for f in top["functions"][:2]] == [
        ("compute_beta", 60),
        ("compute_alpha", 30),
    ]


@pytest.fixture
def with_jobs(aggregator: Aggregator) -> Aggregator:
    """Job etl-42 on node-a (105 samples) and in session s-1 on node-c (7); job web on
    node-b (115)."""
    send(aggregator, message(1, BASE, T0, job="etl-42"))
    later = T0 + timedelta(minutes=10)
    send(aggregator, message(1, LATER, later, node="node-b", pid=200, job="web"))
    session = T0 + timedelta(minutes=20)
    send(
        aggregator, message(1, {1: 7}, session, node="node-c", pid=300, job="etl-42", session="s-1")
    )
    return aggregator


def test_jobs_and_sessions_are_selectable_in_the_api(with_jobs: Aggregator) -> None:
    _, meta = get(with_jobs, "api/meta")
    assert meta["jobs"] == [{"job": "web", "weight": 115}, {"job": "etl-42", "weight": 112}]
    ((session),) = meta["sessions"]
    assert (session["session"], session["job"], session["weight"]) == ("s-1", "etl-42", 7)
    for query, total in [
        ("job=etl-42", 112),
        ("job=web", 115),
        ("job=etl-42&job=web", 227),
        ("session=s-1", 7),
        ("job=etl-42&node=node-a", 105),
        ("job=nosuchjob", 0),
    ]:
        status, top = get(with_jobs, f"api/top?{query}")
        assert (status, top["total"]) == (200, total), query
        status, flame = get(with_jobs, f"api/flame?{query}")
        assert (status, flame["nodes"][2]) == (200, total), query
    status, diff = get(with_jobs, "api/diff?base_job=web&job=etl-42")
    assert (status, diff["baseTotal"], diff["nodes"][2]) == (200, 115, 112)
    status, error = get(with_jobs, "api/top?session=s-1&session=s-2")
    assert (status, error["error"]) == (400, "session may be given only once")


def test_diff_carries_base_totals_aligned_with_the_comparison(served: Aggregator) -> None:
    status, diff = get(served, f"api/diff?base_until={MIDDLE}&since={MIDDLE}")
    assert status == 200
    assert (diff["baseTotal"], diff["nodes"][2]) == (105, 115)
    nodes = diff["nodes"]
    names = [diff["frames"][nodes[i]][0] for i in range(0, len(nodes), 4)]
    base = dict(zip(names, diff["base"], strict=True))
    assert (base["compute_alpha"], base["compute_beta"], base["memcpy"]) == (70, 30, 10)
    # and the functions whose share changed most, from query/changes.py
    assert [(c["function"], c["base_percent"], c["percent"]) for c in diff["changes"][:2]] == [
        ("compute_beta", 28.57, 52.17),
        ("compute_alpha", 66.67, 43.48),
    ]
    # paths the base lacks have a base total of 0
    status, empty_base = get(served, "api/diff?base_comm=nothing")
    assert status == 200 and set(empty_base["base"]) == {0} and empty_base["baseTotal"] == 0


def test_sql_answers_json_with_exact_big_integers(served: Aggregator) -> None:
    status, body = post_sql(
        served,
        {
            "sql": "SELECT stack_id, sum(weight) AS w, 'nan'::DOUBLE AS odd, "
            "list_value(stack_id) AS ids, NULL AS nothing, 1 AS w "
            "FROM samples GROUP BY stack_id ORDER BY stack_id"
        },
    )
    assert status == 200
    result = json.loads(body)
    assert [c["name"] for c in result["columns"]] == ["stack_id", "w", "odd", "ids", "nothing", "w"]
    assert result["columns"][0]["type"] == "int64"
    assert result["rows"][0] == [1, 90, "nan", [1], None, 1]
    assert result["rows"][-1] == [str(BIG_ID), 30, "nan", [str(BIG_ID)], None, 1]
    assert result["truncated"] is False


def test_sql_json_stops_at_the_row_cap_and_arrow_has_all(served: Aggregator) -> None:
    sql = {"sql": "SELECT range AS n FROM range(12345)"}
    result = json.loads(post_sql(served, sql)[1])
    assert len(result["rows"]) == 10_000 and result["truncated"] is True
    status, body = post_sql(served, sql, accept=ARROW_STREAM)
    assert status == 200
    table = ipc.open_stream(pa.py_buffer(body)).read_all()
    assert table.num_rows == 12345 and table["n"].to_pylist()[-1] == 12344


@pytest.mark.parametrize("sql", REFUSED[:12])
def test_sql_refuses_writes(served: Aggregator, sql: str) -> None:
    status, body = post_sql(served, {"sql": sql})
    assert status == 400
    error = json.loads(body)["error"]
    assert error and "\n" not in error
    assert get(served, "api/meta")[1]["events"][0]["weight"] == 220  # nothing changed


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("api/flame?event=nope", "unknown event 'nope'"),
        ("api/flame?pid=twelve", "bad pid 'twelve'"),
        ("api/flame?since=yesterday", "since: bad time 'yesterday'"),
        ("api/flame?since=1h&until=2h", "since must be before until"),
        ("api/flame?colour=red", "unknown parameter 'colour'"),
        ("api/flame?event=cpu&event=cpu", "event may be given only once"),
        ("api/top?order=random", "order must be one of self, total"),
        ("api/top?limit=0", "limit must be an integer from 1 to 10000"),
        ("api/top?limit=ten", "limit must be an integer"),
        ("api/diff?base_pid=x", "bad pid 'x'"),
        ("api/diff?base_since=2h&base_until=3h", "base_since must be before base_until"),
        ("api/meta?node=a", "unknown parameter 'node'"),
        ("api/top?jobs=a", "unknown parameter 'jobs'"),
    ],
)
def test_bad_parameters_get_400_with_one_line(served: Aggregator, path: str, message: str) -> None:
    status, body = get(served, path)
    assert status == 400
    assert message in body["error"] and "\n" not in body["error"]


def test_bad_requests(served: Aggregator) -> None:
    assert get(served, "nothing/here") == (404, {"error": "no such page: /nothing/here"})
    assert get(served, "api/sql")[0] == 405
    status, body = post_sql(served, {"sql": "SELECT 1"}, content_type="text/plain")
    assert (status, json.loads(body)["error"]) == (
        400,
        "send the query as JSON: Content-Type: application/json",
    )
    assert post_sql(served, b"{not json")[0] == 400
    assert json.loads(post_sql(served, {"query": "SELECT 1"})[1])["error"].startswith("expected")
    for accept in ("application/json", ARROW_STREAM):
        status, body = post_sql(served, {"sql": "SELECT nope FROM samples"}, accept=accept)
        assert status == 400 and "nope" in json.loads(body)["error"]
    request = urllib.request.Request(served.web.url + "api/flame", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert (error.value.code, error.value.headers["Allow"]) == (405, "GET")
    # a page whose DNS name rebinds to 127.0.0.1 is refused
    request = urllib.request.Request(served.web.url + "api/meta", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400


def test_page_and_static_files(served: Aggregator) -> None:
    with urllib.request.urlopen(served.web.url, timeout=10) as response:
        page = response.read().decode()
        csp = response.headers["Content-Security-Policy"]
    assert '<script src="/static/flamegraph.js">' in page
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("flamegraph.js", "flamegraph.css", "webui.js", "webui.css", "favicon.svg"):
        with urllib.request.urlopen(f"{served.web.url}static/{name}", timeout=10) as response:
            assert response.status == 200 and response.read()
    assert get(served, "static/../web.py")[0] == 404


def test_server_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    aggregator = Aggregator(tmp_path / "p.duckdb", "127.0.0.1:0")
    try:
        with pytest.raises(ValueError, match="plaintext"):
            WebServer(aggregator.store, "0.0.0.0:0", ServerSecurity())
        with pytest.raises(ValueError, match="HOST:PORT"):
            WebServer(aggregator.store, "7471", ServerSecurity())
    finally:
        aggregator.stop(grace_s=0)


# --- in the browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nweb UI screenshots: {ARTIFACTS}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=LAUNCH_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page that fails the test on any script error, console error or dialog (an
    injected `alert` would open one)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            message.type == "error"
            # the browser's own note on an API answer of 400, which the page shows
            and not message.text.startswith("Failed to load resource")
            and problems.append(f"console: {message.text}")
        ),
    )
    page.on(
        "dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss())
    )
    yield page
    page.close()
    assert not problems, problems


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def frame_point(page: Any, graph: str, name: str) -> dict[str, float]:
    """Page coordinates of the middle of the first drawn frame called `name`."""
    return page.evaluate(
        """([graph, name]) => {
            const fg = document.querySelector(graph).flameGraph;
            let i = 0;
            while (i < fg.count && fg.data.frames[fg.frameOf[i]][0] !== name) i++;
            if (i === fg.count) throw new Error(`no frame ${name}`);
            const scale = fg.width / fg.total[fg.zoom];
            const box = fg.canvas.getBoundingClientRect();
            return {
                x: box.left + (fg.left[i] - fg.left[fg.zoom] + fg.total[i] / 2) * scale,
                y: box.top + fg.rowTop(fg.depthOf[i]) + 8,
            };
        }""",
        [graph, name],
    )


def pixel(page: Any, graph: str, point: dict[str, float]) -> list[int]:
    return page.evaluate(
        """([graph, point]) => {
            const fg = document.querySelector(graph).flameGraph;
            const box = fg.canvas.getBoundingClientRect();
            const ratio = fg.canvas.width / fg.width;
            const x = Math.round((point.x - box.left) * ratio);
            const y = Math.round((point.y - box.top) * ratio);
            return [...fg.ctx.getImageData(x, y, 1, 1).data.slice(0, 3)];
        }""",
        [graph, point],
    )


def loaded(page: Any, view: str) -> None:
    """Wait until a view has loaded and drawn (its status then tells how long it took)."""
    page.locator(f"#{view}-status[data-load-ms]:not(.busy)").wait_for(timeout=30_000)


def test_browser_main_views(served: Aggregator, page: Any) -> None:
    page.goto(served.web.url)
    loaded(page, "flame")
    summary = page.locator("#flame .fg-summary")
    assert "Total: 220 samples" in summary.inner_text()

    # tooltip: weight and percent; the hostile name is text, not an element
    point = frame_point(page, "#flame", HOSTILE)
    page.mouse.move(point["x"], point["y"])
    tooltip = page.locator(".fg-tooltip:visible")
    assert tooltip.inner_text().splitlines()[:3] == [
        HOSTILE,
        "kind: jit",
        "total: 10 samples (4.55% of all)",
    ]
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    shot(page, "01-flame-tooltip")

    # click to zoom, then search highlights and sums the matches
    point = frame_point(page, "#flame", "compute_alpha")
    page.mouse.click(point["x"], point["y"])
    assert "Zoomed: compute_alpha (54.55%)" in summary.inner_text()
    assert page.locator("#flame .fg-reset").is_enabled()
    page.locator("#flame .fg-search").fill("memcpy")
    assert page.locator("#flame .fg-matched").inner_text() == "Matched: 13.64% (30 samples)"
    memcpy = frame_point(page, "#flame", "memcpy")
    page.mouse.move(0, 0)  # no hover outline over the sampled pixel
    page.wait_for_timeout(100)
    assert pixel(page, "#flame", memcpy) == [0xE6, 0x00, 0xE6]  # the match colour
    shot(page, "02-flame-zoom-search")
    page.keyboard.press("Escape")
    assert "Zoomed" not in summary.inner_text()

    # the top table, sorted by total, then a function found in the flame graph
    page.click("[data-tab=top]")
    loaded(page, "top")
    rows = page.locator("#top-table tbody tr")
    assert rows.nth(0).locator("td").nth(1).inner_text() == "compute_alpha"  # ties by name
    assert HOSTILE in page.locator("#top-table tbody").inner_text()
    page.click("#top-table th[data-order=total]")
    expect(rows.nth(0).locator("td.function")).to_have_text("main")
    assert rows.nth(0).locator("td").all_inner_texts()[2:] == [
        "0 samples",
        "0.00%",
        "220 samples",
        "100.00%",
    ]
    shot(page, "03-top-functions")
    page.get_by_role("button", name="compute_alpha").click()
    assert page.locator("#view-flame").is_visible()
    assert page.locator("#flame .fg-search").input_value() == "compute_alpha"
    assert page.locator("#flame .fg-matched").inner_text().startswith("Matched: 54.55%")

    # node filter through the selection form
    page.fill("#selection input[name=node]", "node-a")
    page.click("#selection button[type=submit]")
    loaded(page, "flame")
    assert "Total: 105 samples" in summary.inner_text()
    assert page.url.endswith("#flame?event=cpu&node=node-a")  # a link to this view

    # diff: by default the first half of the data against the second
    page.click("[data-tab=diff]")
    loaded(page, "diff")
    assert "base 105 samples, comparison 115 samples" in page.locator("#diff-status").inner_text()
    page.mouse.move(0, 0)
    page.wait_for_timeout(100)
    red, _, blue = pixel(page, "#diff", frame_point(page, "#diff", "compute_beta"))
    assert red == 255 and blue < 100  # grew: 30/105 -> 60/115
    red, _, blue = pixel(page, "#diff", frame_point(page, "#diff", "compute_alpha"))
    assert blue == 255 and red < 100  # shrank: 70/105 -> 50/115
    beta = frame_point(page, "#diff", "compute_beta")
    page.mouse.move(beta["x"], beta["y"])
    assert "change: +23.60 points of the total" in page.locator(".fg-tooltip:visible").inner_text()
    first_change = page.locator("#changes-table tbody tr").first.locator("td")
    assert first_change.all_inner_texts() == [
        "compute_beta",
        "28.57%",
        "52.17%",
        "+23.60",
        "+23.60",
    ]
    shot(page, "04-diff")

    # the SQL console: an example query, then a refused write
    page.click("[data-tab=sql]")
    page.click("#sql-form button[type=submit]")
    page.locator("#sql-result tbody tr").first.wait_for()
    assert page.locator("#sql-result thead th").all_inner_texts()[0].startswith("function")
    assert HOSTILE in page.locator("#sql-result tbody").inner_text()
    assert "4 rows" in page.locator("#sql-status").inner_text()
    shot(page, "05-sql-result")
    page.fill("#sql", "DELETE FROM sample_rows")
    page.locator("#sql").press("Control+Enter")
    error = page.locator("#sql-error")
    error.wait_for()
    assert error.inner_text() == (
        "refused: DELETE statements are not allowed; queries are read-only"
    )
    shot(page, "06-sql-refused")
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0


def test_browser_time_event_in_milliseconds(aggregator: Aggregator, page: Any) -> None:
    waits = {1: 3_000_000, 2: 1_500_000, 3: 500_000}  # ns waited on a lock, per stack
    send(aggregator, message(1, waits, T0, event="lock"))
    send(aggregator, message(2, {1: 2_000_000}, T0, event="wait"))
    page.goto(f"{aggregator.web.url}#top?event=lock")
    loaded(page, "top")
    picker = page.locator("#selection select[name=event]")
    assert picker.input_value() == "lock"
    # Every event, with its total in its unit: lock and wait apart, io and block apart.
    choices = picker.locator("option").all_inner_texts()
    assert {"lock (5.00 ms)", "wait (2.00 ms)", "io (no data)", "block (no data)"} <= set(
        choices
    ), choices
    first = page.locator("#top-table tbody tr").first.locator("td").all_inner_texts()
    assert first[1:4] == ["compute_alpha", "3.00 ms", "60.00%"]
    assert "5.00 ms in all" in page.locator("#top-status").inner_text()
    page.click("[data-tab=flame]")
    loaded(page, "flame")
    point = frame_point(page, "#flame", "compute_beta")
    page.mouse.move(point["x"], point["y"])
    tooltip = page.locator(".fg-tooltip:visible").inner_text()
    assert "total: 1.50 ms (30.00% of all)" in tooltip and "sample" not in tooltip


def test_browser_empty_database(aggregator: Aggregator, page: Any) -> None:
    page.goto(aggregator.web.url)
    loaded(page, "flame")
    assert page.locator("#data-range").inner_text() == "No profiles stored yet"
    assert page.locator("#flame .fg-summary").inner_text().endswith("(no data)")
    page.click("[data-tab=top]")
    loaded(page, "top")
    assert page.locator("#top-table tbody").inner_text() == "No samples match this selection."


def test_browser_shows_api_errors(served: Aggregator, page: Any) -> None:
    page.goto(served.web.url + "#top?pid=abc")
    error = page.locator("#error")
    error.wait_for()
    assert error.inner_text() == "bad pid 'abc': expected an integer"


def wide_stacks(count: int) -> dict[int, StackRow]:
    """`count` distinct stacks shaped like a real program's: each extends a random prefix
    of an earlier one by a few frames, from a few thousand function names."""
    rng = random.Random(7)
    names = [f"ns{i % 40}::Module{i % 97}::function_{i}" for i in range(4000)]
    stacks: list[tuple[str, ...]] = [("main",)]
    seen: set[tuple[str, ...]] = set()
    while len(seen) < count:
        parent = rng.choice(stacks)
        stack = parent[: rng.randint(1, len(parent))] + tuple(
            rng.choices(names, k=rng.randint(1, 6))
        )
        if len(stack) <= 64 and stack not in seen:
            seen.add(stack)
            stacks.append(stack)
    return {
        i: StackRow(stack, ("app",) * len(stack), ("native",) * len(stack))
        for i, stack in enumerate(sorted(seen), start=1)
    }


def exact_totals(
    stacks: dict[int, StackRow], weights: dict[int, int], comm: str = "app"
) -> tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]:
    """Brute force: total and self weight per path of names below the root."""
    totals: Counter[tuple[str, ...]] = Counter()
    selfs: Counter[tuple[str, ...]] = Counter()
    for stack_id, weight in weights.items():
        path = (comm, *stacks[stack_id].frames)
        for depth in range(len(path) + 1):
            totals[path[:depth]] += weight
        selfs[path] += weight
    return totals, selfs


def decode_nodes(payload: dict) -> dict[tuple[str, ...], tuple[int, int]]:
    """(total, self) per path of names below the root, from the flame payload."""
    path: list[str] = []
    nodes = payload["nodes"]
    decoded = {}
    for i in range(0, len(nodes), 4):
        frame, depth, total, own = nodes[i : i + 4]
        del path[depth:]
        path.append(payload["frames"][frame][0])
        decoded[tuple(path[1:])] = (total, own)
    return decoded


def test_flame_keeps_drawable_frames_exact_and_zooms_into_narrow_ones(
    aggregator: Aggregator,
) -> None:
    stacks = wide_stacks(5_000)
    rng = random.Random(9)
    weights = {stack_id: rng.randint(1, 40) for stack_id in stacks}
    send(aggregator, message(1, weights, T0, stacks))
    totals, selfs = exact_totals(stacks, weights)
    status, payload = get(aggregator, "api/flame")
    assert status == 200
    shown = decode_nodes(payload)
    # every frame shown has its exact total and self weight, so parents stay exact
    assert {path: totals[path] for path in shown} == {p: t for p, (t, _) in shown.items()}
    assert all(own == selfs[path] for path, (_, own) in shown.items())
    # exactly the frames of at least MIN_FRACTION of the whole are shown
    wide = {path for path, total in totals.items() if total >= MIN_FRACTION * totals[()]}
    assert set(shown) == wide
    assert len(wide) < len(totals)  # some frames were too narrow to draw

    # zooming into a frame fetches its subtree, complete to the same share of the frame
    parent = max(
        (p for p in wide if any(q[:-1] == p and q not in wide for q in totals)),
        key=len,
    )
    status, zoomed = get(aggregator, "api/flame?focus=" + quote(json.dumps(parent)))
    assert status == 200 and zoomed["focus"] == list(parent)
    inside = decode_nodes(zoomed)
    assert {path: totals[path] for path in inside} == {p: t for p, (t, _) in inside.items()}
    below = {
        path
        for path, total in totals.items()
        if path[: len(parent)] == parent and total >= MIN_FRACTION * totals[parent]
    }
    ancestors = {parent[:depth] for depth in range(len(parent))}
    assert set(inside) == below | ancestors
    assert any(path not in wide for path in inside)  # frames the whole graph left out

    # a frame too narrow for the whole graph can be zoomed into directly, too
    narrow = min((p for p in totals if p not in wide), key=lambda p: (totals[p], p))
    status, tiny = get(aggregator, "api/flame?focus=" + quote(json.dumps(narrow)))
    assert status == 200 and decode_nodes(tiny)[narrow][0] == totals[narrow]

    status, error = get(aggregator, "api/flame?focus=" + quote('["app","nowhere"]'))
    assert status == 400 and error["error"].startswith("no frame path ['app', 'nowhere']")
    status, error = get(aggregator, "api/flame?focus=app")
    assert status == 400 and "JSON array" in error["error"]


def test_browser_draws_50k_stacks(aggregator: Aggregator, page: Any) -> None:
    stacks = wide_stacks(50_000)
    rng = random.Random(8)
    weights = {stack_id: rng.randint(1, 40) for stack_id in stacks}
    send(aggregator, message(1, weights, datetime.now(UTC), stacks))
    page.goto(aggregator.web.url)
    loaded(page, "flame")
    for _ in range(2):  # Apply reloads the graph
        page.click("#selection button[type=submit]")
        loaded(page, "flame")
    # User Timing entries of the page: the first from the query's start, and the whole page
    # (navigation start to the first frame of the graph drawn)
    loads = page.evaluate(
        "performance.getEntriesByName('fleetprof flame').map(m => [m.duration, m.startTime])"
    )
    requests = [round(duration) for duration, _ in loads]
    page_load = round(sum(loads[0]))
    frames = page.evaluate("document.querySelector('#flame').flameGraph.count")
    # Reported, not asserted: speed targets are for benchmarks, not for unit tests on a
    # machine whose load the test does not control.
    print(
        f"\nflame graph of 50,000 stacks ({frames:,} frames drawn): whole page {page_load} ms; "
        f"graph request to drawn {requests} ms (target < 1000 ms)"
    )
    shot(page, "07-flame-50k-stacks")
    totals, _ = exact_totals(stacks, weights)
    summary = page.locator("#flame .fg-summary")
    assert f"Total: {totals[()]:,} samples" in summary.inner_text()

    # click the narrowest frame still easy to click whose narrow callees were left out:
    # its subtree is fetched, complete to MIN_FRACTION of the frame
    target = page.evaluate(
        """() => {
            const fg = document.querySelector('#flame').flameGraph;
            let best = -1;
            for (let i = 1; i < fg.count; i++) {
                const clickable = (fg.total[i] / fg.total[0]) * fg.width >= 4;
                const narrower = best < 0 || fg.total[i] < fg.total[best];
                if (fg.elided[i] > 0 && clickable && narrower) best = i;
            }
            const path = [];
            for (let a = best; a > 0; a = fg.parent[a]) {
                path.unshift(fg.data.frames[fg.frameOf[a]][0]);
            }
            const box = fg.canvas.getBoundingClientRect();
            const scale = fg.width / fg.total[0];
            const x = box.left + (fg.left[best] + fg.total[best] / 2) * scale;
            return { path, x, y: box.top + fg.rowTop(fg.depthOf[best]) + 8 };
        }"""
    )
    before = page.evaluate("document.querySelector('#flame').flameGraph.count")
    page.mouse.click(target["x"], target["y"])
    target = target["path"]
    loaded(page, "flame")
    expect(summary).to_contain_text(f"Zoomed: {target[-1]}")
    zoomed = page.evaluate(
        """() => {
            const fg = document.querySelector('#flame').flameGraph;
            const shown = [];
            const path = [];
            for (let i = 0; i < fg.count; i++) {
                path.length = fg.depthOf[i];
                path.push(fg.data.frames[fg.frameOf[i]][0]);
                shown.push([path.slice(1), fg.total[i]]);
            }
            return { focus: fg.data.focus, shown };
        }"""
    )
    assert zoomed["focus"] == target
    assert all(totals[tuple(path)] == total for path, total in zoomed["shown"])
    narrower = [p for p, _ in zoomed["shown"] if totals[tuple(p)] < MIN_FRACTION * totals[()]]
    assert narrower, "the zoomed graph shows the callees the whole graph left out"
    shot(page, "07b-flame-50k-zoomed")
    page.keyboard.press("Escape")
    assert "Zoomed" not in summary.inner_text()
    assert page.evaluate("document.querySelector('#flame').flameGraph.count") == before


def test_browser_standalone_html_uses_the_same_graph(tmp_path: Path, page: Any) -> None:
    rows = [
        (["app", "main", "compute_alpha"], ["process", "native", "native"], 3_000_000),
        (["app", "main", HOSTILE], ["process", "native", "jit"], 1_000_000),
    ]
    out = tmp_path / "lock.html"
    with out.open("wb") as stream:
        HtmlRenderer().render(build_tree(rows), RenderOptions("Locks", "lock", "ns"), stream)
    page.goto(out.as_uri())
    point = frame_point(page, "#flamegraph", HOSTILE)
    page.mouse.move(point["x"], point["y"])
    text = page.locator(".fg-tooltip:visible").inner_text()
    assert text.splitlines()[:3] == [HOSTILE, "kind: jit", "total: 1.00 ms (25.00% of all)"]
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    shot(page, "08-standalone-html")


def test_browser_real_profile(aggregator: Aggregator, running_agent, native_binary, page) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    process = workloads.start_native(native_binary, seconds=3)
    process.wait()
    agent.stop()
    page.goto(f"{aggregator.web.url}#top?pid={process.pid}")
    loaded(page, "top")
    first = page.locator("#top-table tbody tr").first.locator("td").nth(1).inner_text()
    assert first == "compute_alpha"  # 3:1 against compute_beta
    shot(page, "09-real-profile-top")
    page.click("[data-tab=flame]")
    loaded(page, "flame")
    page.locator("#flame .fg-search").fill("compute_")
    matched = page.locator("#flame .fg-matched").inner_text()
    assert float(matched.split()[1].rstrip("%")) > 80
    shot(page, "10-real-profile-flame")


def test_browser_selects_jobs_and_sessions_and_keeps_them_in_the_address(
    with_jobs: Aggregator, page: Any
) -> None:
    page.goto(f"{with_jobs.web.url}#flame?job=etl-42")
    loaded(page, "flame")
    summary = page.locator("#flame .fg-summary")
    assert "Total: 112 samples" in summary.inner_text()
    job = page.locator("#selection input[name=job]")
    assert job.input_value() == "etl-42"
    # the jobs and sessions there are are offered as choices
    assert page.locator("#jobs option").evaluate_all("o => o.map(x => x.value)") == [
        "web",
        "etl-42",
    ]
    assert page.locator("#sessions option").evaluate_all("o => o.map(x => x.value)") == ["s-1"]
    job.fill("web")
    page.click("#selection button[type=submit]")
    loaded(page, "flame")
    assert "Total: 115 samples" in summary.inner_text()
    assert page.url.endswith("#flame?event=cpu&job=web")
    # a session, in the top table, kept in the address too
    job.fill("")
    page.fill("#selection input[name=session]", "s-1")
    page.click("[data-tab=top]")
    page.click("#selection button[type=submit]")
    loaded(page, "top")
    assert "7 samples in all" in page.locator("#top-status").inner_text()
    assert page.url.endswith("#top?event=cpu&session=s-1")
    shot(page, "11-job-and-session")
    # the diff's two selections take jobs as well
    page.goto(f"{with_jobs.web.url}#diff?base_job=web&job=etl-42")
    page.reload()
    loaded(page, "diff")
    status = page.locator("#diff-status").inner_text()
    assert "base 115 samples, comparison 112 samples" in status


def test_browser_address_with_an_unknown_parameter_says_so(served: Aggregator, page: Any) -> None:
    page.goto(served.web.url + "#top?jobs=etl-42")
    error = page.locator("#error")
    error.wait_for()
    assert error.inner_text().startswith("unknown parameter 'jobs'")


# A stack as deep as javac's (one sample) beside the heavy shallow ones: the graph is 90
# rows tall, 1,450 px, more than a first screen.
DEEP = {
    1: StackRow(("main", "run", "compute_alpha"), ("app",) * 3, ("native",) * 3),
    2: StackRow(tuple(f"javac_frame_{i}" for i in range(90)), ("app",) * 90, ("jit",) * 90),
}
FIRST_SCREEN = {"width": 1440, "height": 900}


def screen_pixel(browser: Any, png: bytes, point: dict[str, float]) -> list[int]:
    """The colour at a point of a screenshot (decoded by the browser, on a blank page)."""
    blank = browser.new_page()
    try:
        return blank.evaluate(
            """async ([data, x, y]) => {
                const image = new Image();
                image.src = `data:image/png;base64,${data}`;
                await image.decode();
                const canvas = document.createElement("canvas");
                canvas.width = image.width;
                canvas.height = image.height;
                const ctx = canvas.getContext("2d");
                ctx.drawImage(image, 0, 0);
                return [...ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3)];
            }""",
            [base64.b64encode(png).decode(), point["x"], point["y"]],
        )
    finally:
        blank.close()


def rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def assert_root_in_first_screen(page: Any, browser: Any, root: dict[str, Any], name: str) -> None:
    """The root row lies inside the first viewport, and the screenshot of that viewport,
    as the user sees it, shows the root's colour there (not a blank or a scrolled-away
    box)."""
    assert 0 <= root["y"] < page.viewport_size["height"], root
    png = page.screenshot()  # the viewport only
    (ARTIFACTS / f"{name}.png").write_bytes(png)
    seen = screen_pixel(browser, png, root)
    assert all(abs(a - b) <= 3 for a, b in zip(seen, rgb(root["colour"]), strict=True)), (
        seen,
        root,
    )


def canvas_root(page: Any, graph: str) -> dict[str, Any]:
    """Where the root row of a flamegraph.js graph is on screen: a point near its right
    end (its label is at the left) and its colour."""
    return page.evaluate(
        """(graph) => {
            const fg = document.querySelector(graph).flameGraph;
            const box = fg.canvas.getBoundingClientRect();
            return {
                x: box.left + fg.width - 6,
                y: box.top + fg.rowTop(0) + 4,
                colour: fg.data.frames[fg.frameOf[0]][2],
            };
        }""",
        graph,
    )


def test_browser_graph_opens_with_its_root_in_the_first_screen(
    aggregator: Aggregator, browser: Any
) -> None:
    send(aggregator, message(1, {1: 500, 2: 1}, T0, stacks=DEEP))
    page = browser.new_page(viewport=FIRST_SCREEN)
    try:
        page.goto(aggregator.web.url)
        loaded(page, "flame")
        assert page.evaluate("document.querySelector('#flame').flameGraph.height") > 1400
        page.mouse.move(0, 0)
        assert_root_in_first_screen(page, browser, canvas_root(page, "#flame"), "12-deep-flame")
        page.click("#flame .fg-orientation")  # as an icicle, the root is at the top
        page.wait_for_timeout(100)
        page.mouse.move(0, 0)
        assert_root_in_first_screen(page, browser, canvas_root(page, "#flame"), "13-deep-icicle")
        # the deepest frame is still there, a scroll of the graph away
        page.click("#flame .fg-orientation")
        page.wait_for_timeout(100)
        point = frame_point(page, "#flame", "javac_frame_89")
        assert point["y"] < 0  # above the box's visible part: scrolled out, not cut off
    finally:
        page.close()


def test_browser_exported_graphs_open_with_their_root_in_the_first_screen(
    tmp_path: Path, browser: Any
) -> None:
    rows = [
        (["javac", *DEEP[2].frames], ["process", *DEEP[2].kinds], 1),
        (["app", *DEEP[1].frames], ["process", *DEEP[1].kinds], 500),
    ]
    tree = build_tree(rows)
    options = RenderOptions("Deep", "cpu", "samples")
    html, svg = tmp_path / "deep.html", tmp_path / "deep.svg"
    with html.open("wb") as out:
        HtmlRenderer().render(tree, options, out)
    with svg.open("wb") as out:
        SvgRenderer().render(tree, options, out)
    page = browser.new_page(viewport=FIRST_SCREEN)
    try:
        page.goto(html.as_uri())
        page.mouse.move(0, 0)
        root = canvas_root(page, "#flamegraph")
        assert_root_in_first_screen(page, browser, root, "14-deep-standalone-html")
        page.goto(svg.as_uri())
        root = page.evaluate(
            """() => {
                const rect = document.querySelector("g.frame rect");  // pre-order: the root
                const box = rect.getBoundingClientRect();
                return { x: box.right - 6, y: box.top + 4, colour: rect.getAttribute("fill") };
            }"""
        )
        assert_root_in_first_screen(page, browser, root, "15-deep-svg")
    finally:
        page.close()
