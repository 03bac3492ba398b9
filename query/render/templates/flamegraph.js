"use strict";
// The one interactive flame graph of fleetprof: inlined by the HTML renderer into
// standalone files and served by the aggregator's web UI as /static/flamegraph.js.
// Frame names come from profiled programs and are untrusted: they only ever reach the
// page as canvas text or textContent, never as markup.

// The payload (query/render/html.py flame_payload) is flat: `frames` lists each distinct
// [name, kind, colour] once, `nodes` is [frame index, depth, total, self] per node in
// pre-order. Frames too narrow to draw may be left out of it, their weight kept in their
// parent's total: the part of a total that is neither self nor a child is "elided".
// A differential payload adds `base`: the base selection's total per node (same order)
// and `baseTotal`; frames are then coloured by the change of their normalised share.
// `focus` (the web UI's zoom into elided frames): the names from the root down to the
// focused frame, which follows its ancestors in `nodes`; its subtree is complete down to
// the same share of its own total.
// The plot is a box that fits the window, scrolled to the root: a graph as deep as its
// deepest stack (one 90-frame sample is enough) would otherwise put the root screens down.
class FlameGraph {
  static ROW = 16;           // px per stack level
  static MIN_ROOM = 240;     // px: the plot box is at least this tall, whatever the window
  static BELOW_PLOT = 40;    // px kept under the box for the hint line
  static MIN_PX = 0.5;       // narrower frames are skipped (with their subtrees)
  static TEXT_PAD = 3;
  static FONT = "12px Verdana, sans-serif";
  static MATCH_COLOR = "#e600e6";

  constructor(root, data) {
    this.root = root;
    root.flameGraph = this;  // reachable from its element, for tests and the console
    root.classList.add("fg");
    root.replaceChildren();
    const element = (tag, className, parent, text) => {
      const el = document.createElement(tag);
      if (className) el.className = className;
      if (text) el.textContent = text;
      parent.append(el);
      return el;
    };
    const toolbar = element("div", "fg-toolbar", root);
    this.summary = element("span", "fg-summary", toolbar);
    this.resetButton = element("button", "fg-reset", toolbar, "Reset zoom");
    this.resetButton.type = "button";
    this.orientationButton = element("button", "fg-orientation", toolbar, "Switch to icicle");
    this.orientationButton.type = "button";
    this.search = element("input", "fg-search", toolbar);
    this.search.type = "search";
    this.search.placeholder = "Search frames (Ctrl+F)";
    this.search.setAttribute("aria-label", "Search frames");
    const regexLabel = element("label", "fg-regex-label", toolbar);
    this.regex = element("input", "fg-regex", regexLabel);
    this.regex.type = "checkbox";
    regexLabel.append(" regex");
    this.matched = element("span", "fg-matched", toolbar);
    this.plot = element("div", "fg-plot", root);
    this.canvas = element("canvas", "fg-chart", this.plot);
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", "Flame graph");
    element("div", "fg-hint", root,
      'Click a frame to zoom into it; click a faded frame, "Reset zoom" or press Esc to ' +
      'zoom out. The search is a case-insensitive substring unless "regex" is ticked.');
    this.tooltip = element("div", "fg-tooltip", document.body);
    this.tooltip.hidden = true;
    this.ctx = this.canvas.getContext("2d");
    this.width = 0;
    this.charWidth = 7;
    this.icicle = false;
    this.drawPending = false;
    this.anchorPending = true;  // scroll the plot box to the root once it can be
    // Set by a page that can fetch a focused payload (the web UI): path => Promise<data>.
    this.fetchFocus = null;
    this.show(data);
    this.bind();
  }

  // Replace the graph with a new payload; zoom and search matches start over.
  show(data) {
    this.data = data;
    if (!data.focus?.length) this.rootData = data;  // where zooming out returns to
    const frames = data.frames;
    const flat = data.nodes;
    const count = flat.length / 4;
    this.count = count;
    this.frameOf = new Int32Array(count);
    this.depthOf = new Int32Array(count);
    this.parent = new Int32Array(count);
    this.end = new Int32Array(count);       // one past the node's last descendant
    this.total = new Float64Array(count);
    this.left = new Float64Array(count);    // weight left of the node
    this.self = new Float64Array(count);
    this.elided = new Float64Array(count);  // weight of children left out of the payload
    this.elidedBelow = new Uint8Array(count);  // 1: the subtree lacks some frames
    const { frameOf, depthOf, parent, end, total, left, self, elided, elidedBelow } = this;
    let maxDepth = 0;
    const open = [];    // open[d]: the current node at depth d
    const cursor = [];  // cursor[d]: where the next child of open[d] starts
    const close = (keep, at) => {
      while (open.length > keep) {
        const i = open.pop();
        end[i] = at;
        elided[i] = total[i] - self[i] - (cursor[depthOf[i]] - left[i]);
        if (elided[i] > 0) elidedBelow[i] = 1;
        if (elidedBelow[i] && i > 0) elidedBelow[parent[i]] = 1;
      }
    };
    for (let i = 0; i < count; i++) {
      const d = flat[4 * i + 1];
      frameOf[i] = flat[4 * i];
      depthOf[i] = d;
      total[i] = flat[4 * i + 2];
      self[i] = flat[4 * i + 3];
      close(d, i);
      if (d === 0) {
        parent[i] = -1;
      } else {
        parent[i] = open[d - 1];
        left[i] = cursor[d - 1];
        cursor[d - 1] += total[i];
      }
      cursor[d] = left[i];
      open.push(i);
      maxDepth = Math.max(maxDepth, d);
    }
    close(0, count);
    this.maxDepth = maxDepth;
    this.height = (maxDepth + 1) * FlameGraph.ROW;
    this.matchFrame = new Uint8Array(frames.length);
    this.change = data.base ? this.changes(data.base, data.baseTotal) : null;
    this.zoom = 0;
    this.hover = -1;
    this.anchorPending = true;
    this.resetButton.disabled = true;
    this.updateSummary();
    this.runSearch();
    this.resize();
  }

  // Per node, the change of its share of the whole from base to comparison, so selections
  // of different lengths compare fairly; `largestChange` scales the colours.
  changes(base, baseTotal) {
    const { total, count } = this;
    const change = new Float64Array(count);
    let largest = 0;
    for (let i = 0; i < count; i++) {
      const after = total[0] > 0 ? total[i] / total[0] : 0;
      const before = baseTotal > 0 ? base[i] / baseTotal : 0;
      change[i] = after - before;
      largest = Math.max(largest, Math.abs(change[i]));
    }
    this.largestChange = largest;
    return change;
  }

  // Gregg's differential colours: red grew, blue shrank, deeper for larger changes; grey
  // unchanged (within rounding).
  diffColor(i) {
    const change = this.change[i];
    if (Math.abs(change) < 1e-9) return "#e6e6e6";
    const fade = Math.round(235 - 170 * (Math.abs(change) / this.largestChange));
    return change > 0 ? `rgb(255,${fade},${fade})` : `rgb(${fade},${fade},255)`;
  }

  // `1,234 samples`, or for time events (unit "ns") a duration in ns, µs, ms or s.
  static formatWeight(v, unit) {
    const fixed2 = (x) =>
      x.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    if (unit === "ns") {
      for (const [scale, suffix] of [[1e9, "s"], [1e6, "ms"], [1e3, "\u00b5s"]]) {
        // the unit that keeps the value >= 1 once rounded, as in Python's format_weight
        if (Math.round((v / scale) * 100) >= 100) return `${fixed2(v / scale)} ${suffix}`;
      }
      return `${Math.round(v).toLocaleString("en-US")} ns`;
    }
    return `${Math.round(v).toLocaleString("en-US")} ${v === 1 ? "sample" : "samples"}`;
  }

  formatWeight(v) {
    return FlameGraph.formatWeight(v, this.data.unit);
  }

  static percent(part, whole) {
    return `${whole > 0 ? ((100 * part) / whole).toFixed(2) : "0.00"}%`;
  }

  rowTop(depth) {
    return (this.icicle ? depth : this.maxDepth - depth) * FlameGraph.ROW;
  }

  label(name, w) {
    const room = w - 2 * FlameGraph.TEXT_PAD;
    let chars = Math.floor(room / this.charWidth);
    if (chars < 3) return "";
    if (name.length <= chars) return name;
    let text = name.slice(0, chars - 2) + "..";
    // the average glyph width is a guess; trim until the text really fits
    while (chars > 3 && this.ctx.measureText(text).width > room) {
      chars -= 1;
      text = name.slice(0, chars - 2) + "..";
    }
    return text;
  }

  drawFrame(i, x, w, faded) {
    const { ctx } = this;
    const ROW = FlameGraph.ROW;
    const frame = this.data.frames[this.frameOf[i]];
    const top = this.rowTop(this.depthOf[i]);
    ctx.globalAlpha = faded ? 0.55 : 1;
    if (this.matchFrame[this.frameOf[i]]) ctx.fillStyle = FlameGraph.MATCH_COLOR;
    else ctx.fillStyle = this.change ? this.diffColor(i) : frame[2];
    ctx.fillRect(x, top, w > 1.5 ? w - 1 : w, ROW - 1);
    if (i === this.hover) {
      ctx.strokeStyle = "#000";
      ctx.strokeRect(x + 0.5, top + 0.5, Math.max(w - 2, 0), ROW - 2);
    }
    const text = this.label(frame[0], w);
    if (text) {
      ctx.fillStyle = "#000";
      ctx.fillText(text, x + FlameGraph.TEXT_PAD, top + ROW / 2);
    }
    ctx.globalAlpha = 1;
  }

  draw() {
    this.drawPending = false;
    const { ctx, total, left, end, parent, zoom, width } = this;
    ctx.clearRect(0, 0, width, this.height);
    if (!(total[0] > 0)) return;
    ctx.font = FlameGraph.FONT;
    ctx.textBaseline = "middle";
    ctx.lineWidth = 1;
    const scale = width / total[zoom];
    // the zoomed frame's ancestors stay, full width and faded, as the way back out
    for (let a = parent[zoom]; a >= 0; a = parent[a]) this.drawFrame(a, 0, width, true);
    for (let i = zoom, stop = end[zoom]; i < stop; ) {
      const w = total[i] * scale;
      if (w < FlameGraph.MIN_PX) {
        i = end[i];  // its children are narrower still
        continue;
      }
      this.drawFrame(i, (left[i] - left[zoom]) * scale, w, false);
      i += 1;
    }
  }

  scheduleDraw() {
    if (!this.drawPending) {
      this.drawPending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  resize() {
    const { canvas, ctx } = this;
    this.width = this.plot.clientWidth;
    // browsers refuse canvases far beyond 32k px a side: very deep graphs trade sharpness
    const ratio = Math.min(window.devicePixelRatio || 1, 32000 / this.height);
    canvas.width = Math.floor(this.width * ratio);
    canvas.height = Math.floor(this.height * ratio);
    canvas.style.width = `${this.width}px`;
    canvas.style.height = `${this.height}px`;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.font = FlameGraph.FONT;
    this.charWidth = ctx.measureText("abcdefghijklmnopqrstuvwxyz_.:").width / 29;
    this.fitToWindow();
    this.draw();
  }

  // The plot box as tall as the window leaves below its top (never under MIN_ROOM), and,
  // after new data or a switch of orientation, scrolled so that the root row shows.
  fitToWindow() {
    const { plot } = this;
    if (!plot.clientWidth) return;  // in a hidden tab: done when it is shown
    const top = plot.getBoundingClientRect().top + window.scrollY;
    const room = window.innerHeight - top - FlameGraph.BELOW_PLOT;
    plot.style.maxHeight = `${Math.max(FlameGraph.MIN_ROOM, Math.floor(room))}px`;
    if (this.anchorPending) {
      this.anchorPending = false;
      plot.scrollTop = this.icicle ? 0 : plot.scrollHeight;
    }
  }

  // The drawn frame under a canvas point, or -1.
  frameAt(px, py) {
    const { total, left, end, depthOf, zoom, maxDepth } = this;
    const row = Math.floor(py / FlameGraph.ROW);
    const depth = this.icicle ? row : maxDepth - row;
    if (depth < 0 || depth > maxDepth || !(total[0] > 0)) return -1;
    const scale = this.width / total[zoom];
    const at = left[zoom] + px / scale;
    let i = 0;
    while (depthOf[i] < depth) {
      let next = -1;
      for (let c = i + 1; c < end[i]; c = end[c]) {
        if (at >= left[c] && at < left[c] + total[c]) {
          next = c;
          break;
        }
      }
      if (next < 0) return -1;
      i = next;
    }
    // ancestors of the zoomed frame are drawn full width, the rest only when wide enough
    if (depthOf[i] >= depthOf[zoom] && total[i] * scale < FlameGraph.MIN_PX) return -1;
    return i;
  }

  showTooltip(i, clientX, clientY) {
    const { total, self, zoom, end, tooltip, data } = this;
    const frame = data.frames[this.frameOf[i]];
    const percent = FlameGraph.percent;
    const lines = [];
    if (this.depthOf[i] > 0) lines.push(`kind: ${frame[1]}`);
    lines.push(`total: ${this.formatWeight(total[i])} (${percent(total[i], total[0])} of all)`);
    if (zoom !== 0 && i > zoom && i < end[zoom]) {
      lines.push(`${percent(total[i], total[zoom])} of the zoomed frame`);
    }
    lines.push(`self: ${this.formatWeight(self[i])} (${percent(self[i], total[0])})`);
    if (this.elided[i] > 0) {
      const narrow = this.elided[i];
      lines.push(`narrower callees: ${this.formatWeight(narrow)} (${percent(narrow, total[0])})` +
        (this.fetchFocus ? ", click to zoom in" : ", not in this file"));
    }
    if (data.base) {
      const before = data.base[i];
      const sign = this.change[i] >= 0 ? "+" : "";
      lines.push(`base: ${this.formatWeight(before)} (${percent(before, data.baseTotal)})`);
      lines.push(`change: ${sign}${(100 * this.change[i]).toFixed(2)} points of the total`);
    }
    const name = document.createElement("div");
    name.className = "fg-name";
    name.textContent = frame[0];  // textContent: frame names are untrusted
    tooltip.replaceChildren(name, ...lines.map((line) => {
      const div = document.createElement("div");
      div.textContent = line;
      return div;
    }));
    tooltip.hidden = false;
    const box = tooltip.getBoundingClientRect();
    let x = clientX + 14;
    let y = clientY + 14;
    if (x + box.width > window.innerWidth) x = Math.max(0, clientX - box.width - 14);
    if (y + box.height > window.innerHeight) y = Math.max(0, clientY - box.height - 14);
    tooltip.style.left = `${x}px`;
    tooltip.style.top = `${y}px`;
  }

  updateSummary() {
    const { total, zoom } = this;
    let text = `Event: ${this.data.event}   Total: ${this.formatWeight(total[0])}`;
    if (!(total[0] > 0)) text += " (no data)";
    if (zoom !== 0) {
      const name = this.data.frames[this.frameOf[zoom]][0];
      text += `   Zoomed: ${name} (${FlameGraph.percent(total[zoom], total[0])})`;
    }
    this.summary.textContent = text;
  }

  // Zoom into node i. With fetchFocus, a frame whose subtree lacks frames (or an
  // ancestor of a focused payload's frame) is fetched again, focused, so every frame
  // can be zoomed into; the root comes back from the unfocused payload.
  async zoomTo(i) {
    const focused = this.data.focus?.length ?? 0;
    if (this.fetchFocus && i === 0 && focused) {
      this.show(this.rootData);
    } else if (this.fetchFocus && i > 0 && (this.elidedBelow[i] || i < focused)) {
      const path = [];
      for (let a = i; a > 0; a = this.parent[a]) path.unshift(this.data.frames[this.frameOf[a]][0]);
      const data = await this.fetchFocus(path);
      if (!data) return;
      this.show(data);
      i = path.length;  // the focused frame follows its ancestors
    }
    this.setZoom(i);
  }

  setZoom(i) {
    this.zoom = i;
    this.resetButton.disabled = i === 0;
    this.updateSummary();
    this.scheduleDraw();
  }

  // Search for `query` as if typed into the search box (the web UI's top table uses it).
  searchFor(query) {
    this.search.value = query;
    this.regex.checked = false;
    this.runSearch();
  }

  runSearch() {
    const { search, regex, matchFrame, total, end, frameOf } = this;
    const query = search.value;
    let test = null;
    search.classList.remove("fg-invalid");
    if (query && regex.checked) {
      try {
        const re = new RegExp(query);
        test = (name) => re.test(name);
      } catch {
        search.classList.add("fg-invalid");
      }
    } else if (query) {
      const needle = query.toLowerCase();
      test = (name) => name.toLowerCase().includes(needle);
    }
    matchFrame.fill(0);
    let matched = 0;
    if (test) {
      this.data.frames.forEach((frame, k) => {
        if (test(frame[0])) matchFrame[k] = 1;
      });
      // a matched frame's subtree counts once, so recursion is not double counted
      for (let i = 0; i < this.count; ) {
        if (matchFrame[frameOf[i]]) {
          matched += total[i];
          i = end[i];
        } else {
          i += 1;
        }
      }
    }
    // frames left out of the payload cannot be searched: say so rather than undercount
    const among = this.elidedBelow[0] ? " among the frames drawn" : "";
    this.matched.textContent = test
      ? `Matched: ${FlameGraph.percent(matched, total[0])} (${this.formatWeight(matched)})${among}`
      : "";
    this.scheduleDraw();
  }

  bind() {
    const { canvas, tooltip } = this;
    canvas.addEventListener("mousemove", (event) => {
      const i = this.frameAt(event.offsetX, event.offsetY);
      if (i !== this.hover) {
        this.hover = i;
        this.scheduleDraw();
      }
      if (i < 0) tooltip.hidden = true;
      else this.showTooltip(i, event.clientX, event.clientY);
    });
    canvas.addEventListener("mouseleave", () => {
      this.hover = -1;
      tooltip.hidden = true;
      this.scheduleDraw();
    });
    canvas.addEventListener("click", (event) => {
      const i = this.frameAt(event.offsetX, event.offsetY);
      if (i >= 0) this.zoomTo(i);
    });
    this.resetButton.addEventListener("click", () => this.zoomTo(0));
    this.orientationButton.addEventListener("click", () => {
      this.icicle = !this.icicle;
      this.orientationButton.textContent = this.icicle ? "Switch to flame" : "Switch to icicle";
      this.anchorPending = true;
      this.fitToWindow();
      this.scheduleDraw();
    });
    this.search.addEventListener("input", () => this.runSearch());
    this.regex.addEventListener("change", () => this.runSearch());
    document.addEventListener("keydown", (event) => {
      // a page may hold several graphs (the web UI's tabs): keys go to the visible one
      if (!this.root.checkVisibility()) return;
      if ((event.ctrlKey || event.metaKey) && event.key === "f") {
        event.preventDefault();
        this.search.focus();
        this.search.select();
      } else if (event.key === "Escape") {
        this.zoomTo(0);
      }
    });
    // also redraws a graph whose hidden tab is shown, as its width changes from 0
    new ResizeObserver(() => {
      if (this.plot.clientWidth !== this.width) this.resize();
    }).observe(this.plot);
    window.addEventListener("resize", () => this.fitToWindow());
  }
}
