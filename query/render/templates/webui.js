"use strict";
// The aggregator's web UI (webui.html): tabs over the JSON API of aggregator/web.py, with
// the flame graphs drawn by flamegraph.js. Whatever the server sends (frame names above
// all) reaches the page as textContent only, never as markup.
(() => {
  const $ = (id) => document.getElementById(id);
  const TABS = ["flame", "top", "diff", "sql"];
  // Fields that take several values, comma-separated, sent as repeated parameters.
  const LIST_FIELDS = new Set(
    ["node", "pid", "comm", "job"].flatMap((name) => [name, `base_${name}`]));
  const TOP_LIMIT = 200;
  const SQL_EXAMPLES = [
    ["Top functions by self weight",
      "SELECT frames[-1] AS function, sum(weight) AS samples\n" +
      "FROM samples JOIN stacks USING (stack_id)\nWHERE event = 'cpu'\n" +
      "GROUP BY function ORDER BY samples DESC LIMIT 20"],
    ["Inclusive weight per function",
      "SELECT f AS function, sum(weight) AS samples\n" +
      "FROM samples JOIN stacks USING (stack_id), unnest(list_distinct(frames)) AS t(f)\n" +
      "WHERE event = 'cpu'\nGROUP BY f ORDER BY samples DESC LIMIT 20"],
    ["Weight per node and event",
      "SELECT node, event, sum(weight) AS weight, count(DISTINCT pid) AS processes\n" +
      "FROM samples GROUP BY node, event ORDER BY weight DESC"],
    ["Busiest processes",
      "SELECT node, pid, comm, sum(weight) AS weight\nFROM samples WHERE event = 'cpu'\n" +
      "GROUP BY ALL ORDER BY weight DESC LIMIT 20"],
    ["Weight per minute",
      "SELECT time_bucket(INTERVAL 1 MINUTE, ts) AS minute, event, sum(weight) AS weight\n" +
      "FROM samples GROUP BY ALL ORDER BY minute, event"],
  ];

  let meta = {
    events: [], known_events: { cpu: "samples" }, nodes: [], comms: [], pids: [], jobs: [],
    sessions: [],
  };
  const graphs = {};    // per view ("flame", "diff"), its FlameGraph once drawn
  let topOrder = "self";
  let tab = "flame";
  const shown = {};     // per view, the query its content answers (reloaded when it differs)
  const latest = {};    // per view, the newest request: older answers arriving late are dropped
  const extras = {};    // per form id, address parameters it has no field for (fillForm)

  function element(tag, text, className) {
    const el = document.createElement(tag);
    if (text !== undefined && text !== null) el.textContent = String(text);
    if (className) el.className = className;
    return el;
  }

  const integer = (n) => Math.round(n).toLocaleString("en-US");
  const unitOf = (event) => meta.known_events[event] || "samples";
  const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));

  async function api(path, options) {
    const response = await fetch(path, options);
    let body;
    try {
      body = await response.json();
    } catch {
      throw new Error(`${response.status} ${response.statusText}`);
    }
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  function showError(box, error) {
    box.textContent = error ? error.message : "";
    box.hidden = !error;
  }

  // A form's fields as API parameters (empty fields are left out).
  function formParams(form) {
    const params = new URLSearchParams(extras[form.id]);
    for (const [name, value] of new FormData(form)) {
      if (name === "preset") continue;
      for (const part of LIST_FIELDS.has(name) ? value.split(",") : [value]) {
        if (part.trim()) params.append(name, part.trim());
      }
    }
    return params;
  }

  // Fill a form from the address. Parameters it has no field for go to the API as they
  // are, until the form is next applied: the API names what it does not know, rather than
  // a link silently showing something else than its sender saw.
  function fillForm(form, params) {
    const extra = new URLSearchParams();
    for (const [name, value] of params) {
      if (!form.elements[name] || name === "preset") extra.append(name, value);
    }
    extras[form.id] = extra;
    for (const field of form.elements) {
      if (!field.name || field.name === "preset") continue;
      const values = params.getAll(field.name);
      if (values.length) field.value = values.join(", ");
    }
  }

  // Remember the tab and its form in the address, so a reload or a link shows the same.
  function saveLocation() {
    const form = tab === "diff" ? $("diff-form") : tab === "sql" ? null : $("selection");
    const query = form ? formParams(form).toString() : "";
    history.replaceState(null, "", `#${tab}${query ? "?" + query : ""}`);
  }

  async function request(view, run) {
    const token = (latest[view] = (latest[view] || 0) + 1);
    const status = $(`${view}-status`);
    status.textContent = "Loading\u2026";
    status.classList.add("busy");
    delete status.dataset.loadMs;
    const started = performance.now();
    try {
      const describe = await run(() => token !== latest[view]);
      if (token !== latest[view]) return;
      await nextFrame();  // the time includes the first frame drawn
      // also a User Timing entry (devtools' timeline, the browser tests): start and length
      performance.measure(`fleetprof ${view}`, { start: started });
      const ms = Math.round(performance.now() - started);
      status.textContent = `${describe} \u00b7 loaded in ${ms} ms`;
      status.dataset.loadMs = String(ms);
      showError($("error"), null);
    } catch (error) {
      if (token !== latest[view]) return;
      status.textContent = "";
      showError($("error"), error);
    } finally {
      if (token === latest[view]) status.classList.remove("busy");
    }
  }

  // The flame graph and diff views: /api/VIEW for the view's form, drawn in #VIEW.
  function loadGraph(view, describe) {
    const query = currentQuery(view);
    shown[view] = query;
    return request(view, async (stale) => {
      const data = await api(`/api/${view}?${query}`);
      if (stale()) return "";
      if (graphs[view]) graphs[view].show(data);
      else graphs[view] = new FlameGraph($(view), data);
      if (view === "flame") {
        // zooming into a frame whose narrow callees were left out fetches its subtree
        graphs.flame.fetchFocus = async (path) => {
          const focus = encodeURIComponent(JSON.stringify(path));
          let subtree = null;
          await request("flame", async (stale) => {
            const data = await api(`/api/flame?${query}&focus=${focus}`);
            if (stale()) return "";
            subtree = data;
            return `${integer(data.nodes.length / 4)} frames under ${path.at(-1)}`;
          });
          return subtree;
        };
      }
      return describe(data);
    });
  }

  const loadFlame = () => loadGraph("flame", (data) => `${integer(data.nodes.length / 4)} frames`);

  function loadDiff() {
    return loadGraph("diff", (data) => {
      renderChanges(data.changes);
      const weight = (value) => FlameGraph.formatWeight(value, data.unit);
      return `base ${weight(data.baseTotal)}, comparison ${weight(data.nodes[2])}`;
    });
  }

  function loadTop() {
    const params = formParams($("selection"));
    shown.top = `${params}`;
    params.set("order", topOrder);
    params.set("limit", String(TOP_LIMIT));
    return request("top", async (stale) => {
      const data = await api(`/api/top?${params}`);
      if (stale()) return "";
      renderTop(data);
      const heaviest = data.functions.length === TOP_LIMIT ? ` (the ${TOP_LIMIT} heaviest)` : "";
      return `${integer(data.functions.length)} functions${heaviest}, ` +
        `${FlameGraph.formatWeight(data.total, data.unit)} in all`;
    });
  }

  function shareCell(part, whole) {
    const cell = element("td", null, "share");
    const share = whole > 0 ? part / whole : 0;
    const track = element("span", null, "track");
    const bar = element("span", null, "bar");
    bar.style.width = `${(100 * share).toFixed(1)}%`;  // CSSOM: allowed by the CSP
    track.append(bar);
    cell.append(track, `${(100 * share).toFixed(2)}%`);
    return cell;
  }

  function renderTop(data) {
    const rows = data.functions.map((fn, i) => {
      const tr = element("tr");
      const name = element("button", fn.function, "function-link");
      name.type = "button";
      name.title = "Find in the flame graph";
      name.addEventListener("click", () => findInFlame(fn.function));
      const nameCell = element("td", null, "function");
      nameCell.append(name);
      tr.append(
        element("td", i + 1, "num rank"),
        nameCell,
        element("td", FlameGraph.formatWeight(fn.self, data.unit), "num"),
        shareCell(fn.self, data.total),
        element("td", FlameGraph.formatWeight(fn.total, data.unit), "num"),
        shareCell(fn.total, data.total),
      );
      return tr;
    });
    if (!rows.length) {
      const empty = element("td", "No samples match this selection.", "empty");
      empty.colSpan = 6;
      rows.push(element("tr"));
      rows[0].append(empty);
    }
    $("top-table").tBodies[0].replaceChildren(...rows);
    for (const th of document.querySelectorAll("#top-table th.sortable")) {
      th.setAttribute("aria-sort", th.dataset.order === topOrder ? "descending" : "none");
    }
  }

  async function findInFlame(name) {
    await showTab("flame");
    graphs.flame?.searchFor(name);
  }

  function renderChanges(changes) {
    const points = (value, className) => {
      const text = `${value > 0 ? "+" : ""}${value.toFixed(2)}`;
      return element("td", text, `num ${className} ${value > 0 ? "grew" : value < 0 ? "shrank" : ""}`);
    };
    $("changes-table").tBodies[0].replaceChildren(...changes.map((change) => {
      const tr = element("tr");
      tr.append(
        element("td", change.function, "function"),
        element("td", `${change.base_percent.toFixed(2)}%`, "num"),
        element("td", `${change.percent.toFixed(2)}%`, "num"),
        points(change.change, "change"),
        points(change.self_change, "self-change"),
      );
      return tr;
    }));
  }

  function cellText(value) {
    if (value === null) return "NULL";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  async function runSql() {
    const status = $("sql-status");
    status.textContent = "Running\u2026";
    showError($("sql-error"), null);
    try {
      const result = await api("/api/sql", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sql: $("sql").value }),
      });
      const head = element("tr");
      for (const column of result.columns) {
        const th = element("th", column.name);
        th.append(element("span", column.type, "type"));
        head.append(th);
      }
      const body = result.rows.map((row) => {
        const tr = element("tr");
        for (const value of row) {
          const className = value === null ? "null" : typeof value === "number" ? "num" : "";
          tr.append(element("td", cellText(value), className));
        }
        return tr;
      });
      $("sql-result").tHead.replaceChildren(head);
      $("sql-result").tBodies[0].replaceChildren(...body);
      $("sql-card").hidden = false;
      const more = result.truncated ? ` (the first ${integer(result.rows.length)} shown)` : "";
      status.textContent = `${integer(result.rows.length)} rows${more} \u00b7 ` +
        `${result.elapsed_ms} ms`;
    } catch (error) {
      status.textContent = "";
      $("sql-card").hidden = true;
      showError($("sql-error"), error);
    }
  }

  const LOADERS = { flame: loadFlame, top: loadTop, diff: loadDiff };

  function currentQuery(view) {
    return formParams(view === "diff" ? $("diff-form") : $("selection")).toString();
  }

  // Show a tab, loading its content when the selection changed since it was drawn.
  function showTab(name) {
    tab = name;
    for (const button of document.querySelectorAll(".tabs [data-tab]")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === name));
    }
    for (const view of TABS) $(`view-${view}`).hidden = view !== name;
    $("selection").hidden = name !== "flame" && name !== "top";
    saveLocation();
    if (LOADERS[name] && shown[name] !== currentQuery(name)) return LOADERS[name]();
    return Promise.resolve();
  }

  function fmtTime(ms) {
    return `${new Date(ms).toISOString().replace("T", " ").slice(0, 19)} UTC`;
  }

  function fillChoices() {
    const weights = Object.fromEntries(meta.events.map((e) => [e.event, e.weight]));
    for (const select of document.querySelectorAll(".event-select")) {
      const chosen = select.value;
      select.replaceChildren(...Object.keys(meta.known_events).map((event) => {
        const label = event in weights
          ? `${event} (${FlameGraph.formatWeight(weights[event], unitOf(event))})`
          : `${event} (no data)`;
        const option = element("option", label);
        option.value = event;
        return option;
      }));
      select.value = chosen || meta.events[0]?.event || "cpu";
    }
    const options = (id, items, value, label) => $(id).replaceChildren(...items.map((item) => {
      const option = element("option", label(item));
      option.value = value(item);
      return option;
    }));
    options("nodes", meta.nodes, (n) => n.node, (n) => integer(n.weight));
    options("comms", meta.comms, (c) => c.comm, (c) => integer(c.weight));
    options("pids", meta.pids, (p) => p.pid, (p) => `${p.comm} \u00b7 ${integer(p.weight)}`);
    options("jobs", meta.jobs, (j) => j.job, (j) => integer(j.weight));
    options("sessions", meta.sessions, (s) => s.session,
      (s) => `job ${s.job} \u00b7 ${fmtTime(Date.parse(s.first))} \u00b7 ${integer(s.weight)}`);
    const first = Math.min(...meta.events.map((e) => Date.parse(e.first)));
    const last = Math.max(...meta.events.map((e) => Date.parse(e.last)));
    $("data-range").textContent = meta.events.length
      ? `${meta.nodes.length} node${meta.nodes.length === 1 ? "" : "s"} \u00b7 ` +
        `${fmtTime(first)} \u2013 ${fmtTime(last)}`
      : "No profiles stored yet";
  }

  // Until the user picks, the diff compares the first half of the event's data with the
  // second.
  function defaultDiff() {
    const form = $("diff-form");
    const event = form.elements.event.value;
    const range = meta.events.find((e) => e.event === event);
    if (!range || formParams(form).toString() !== `event=${event}`) return;
    const middle = new Date((Date.parse(range.first) + Date.parse(range.last)) / 2);
    const iso = middle.toISOString().replace(/\.\d+Z$/, "Z");  // to the second
    form.elements.base_until.value = iso;
    form.elements.since.value = iso;
  }

  function syncPreset(form) {
    const since = form.elements.since.value.trim();
    const until = form.elements.until.value.trim();
    const preset = form.elements.preset;
    const known = [...preset.options].some((o) => o.value === since && o.value !== "custom");
    preset.value = !since && !until ? "" : known && !until ? since : "custom";
  }

  function placeSelectionFields() {
    for (const slot of document.querySelectorAll("[data-selection-fields]")) {
      const fields = $("selection-fields").content.cloneNode(true);
      for (const input of fields.querySelectorAll("input")) {
        input.name = slot.dataset.selectionFields + input.name;
      }
      slot.replaceWith(fields);
    }
  }

  function bind() {
    placeSelectionFields();
    for (const button of document.querySelectorAll(".tabs [data-tab]")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    const selection = $("selection");
    selection.addEventListener("submit", (event) => {
      event.preventDefault();
      delete extras.selection;
      shown.flame = shown.top = undefined;  // Apply always reloads
      showTab(tab);
    });
    selection.elements.preset.addEventListener("change", () => {
      const preset = selection.elements.preset.value;
      if (preset === "custom") return;
      selection.elements.since.value = preset;
      selection.elements.until.value = "";
      selection.requestSubmit();
    });
    for (const name of ["since", "until"]) {
      selection.elements[name].addEventListener("input", () => syncPreset(selection));
    }
    selection.elements.event.addEventListener("change", () => selection.requestSubmit());
    $("diff-form").addEventListener("submit", (event) => {
      event.preventDefault();
      delete extras["diff-form"];
      shown.diff = undefined;
      showTab("diff");
    });
    for (const th of document.querySelectorAll("#top-table th.sortable")) {
      th.addEventListener("click", () => {
        topOrder = th.dataset.order;
        loadTop();
      });
    }
    $("sql-examples").replaceChildren(...SQL_EXAMPLES.map(([label], i) => {
      const option = element("option", label);
      option.value = String(i);
      return option;
    }));
    $("sql-examples").addEventListener("change", (event) => {
      $("sql").value = SQL_EXAMPLES[Number(event.target.value)][1];
    });
    $("sql").value = SQL_EXAMPLES[0][1];
    $("sql-form").addEventListener("submit", (event) => {
      event.preventDefault();
      runSql();
    });
    $("sql").addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
        event.preventDefault();
        runSql();
      }
    });
  }

  async function start() {
    bind();
    const [name, query] = location.hash.slice(1).split("?");
    const params = new URLSearchParams(query || "");
    const initial = TABS.includes(name) ? name : "flame";
    try {
      meta = await api("/api/meta");
    } catch (error) {
      showError($("error"), error);
    }
    fillChoices();
    if (initial === "diff") fillForm($("diff-form"), params);
    else if (initial !== "sql") fillForm($("selection"), params);
    syncPreset($("selection"));
    defaultDiff();
    await showTab(initial);
  }

  start();
})();
