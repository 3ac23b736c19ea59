// The live status view of an MLX cluster (anywidget ES module; no build step).
// Python syncs plain data: `snapshot` (header + one record per rank), `metrics` (one series per
// metric and rank), `topology_svg`. Buttons send {action: ...} to Python and show at once that
// the click was received; Python says {got: action} when its handler starts and
// {ack: action, error: ...} when it is done (both name the view that was clicked).
// A view can outlive its kernel (restart, shut down): it then says so and its buttons go off.

const COLUMNS = ["rank", "host", "state", "busy", "heartbeat", "RSS", "MLX active", "MLX peak", "device"];
// How hard each rank and host works (as views/text.py USAGE_COLUMNS): shown where some rank
// reports the figure (GPU, power and temperature only on a Mac with macmon: absent elsewhere).
const USAGE_COLUMNS = ["CPU", "host CPU", "GPU", "power", "temp", "last minute"];
// Dropped in this order, one at a time, until the table fits its box (a narrow side panel).
const DROP_ORDER = ["device", "MLX peak", "temp", "power", "MLX active", "host CPU", "RSS", "last minute", "host", "GPU", "busy"];
const RANK_COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037"];
const LOG_RATIO = 100;
const DASH = 6; // one rank's dash where lines coincide, as views/charts.py
const PENDING_TEXT = { stop: "stopping…", restart: "restarting…", replay: "restarting…", side: "opening…", clear: "clearing…" };
// Rank states whose figures are live (as snapshot.LIVE_NODE_STATES).
const LIVE_NODE_STATES = ["idle", "busy", "unresponsive", "unreachable"];
// States whose busy time still counts (as views/text.py BUSY_TIMED).
const BUSY_TIMED = ["busy", "unresponsive", "unreachable"];
const ENDED = "this cluster ended with its kernel";
const PREVIOUS_RUN = "from the previous run";

function humanBytes(n) {
  if (n === null || n === undefined) return "-";
  let v = n;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (v < 1024 || unit === "TiB") return unit === "B" ? `${v.toFixed(0)} ${unit}` : `${v.toFixed(1)} ${unit}`;
    v /= 1024;
  }
  return `${n} B`;
}

function humanSeconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${s.toFixed(1)} s`;
  let sec = Math.floor(s);
  const h = Math.floor(sec / 3600);
  const m = Math.floor((sec % 3600) / 60);
  sec = sec % 60;
  const pad = (x) => String(x).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
}

function headerText(s) {
  const uptime = s.state === "running" ? humanSeconds(s.uptime_s) : "-";
  const kept = s.kept ? `, kept ${s.kept}` : ""; // (it outlives the kernel: attach ID)
  return `MLX cluster (${s.state}): backend ${s.backend}, ${s.n} ranks on ${s.hosts} host${s.hosts !== 1 ? "s" : ""}, uptime ${uptime}${kept}`;
}

function brokenText(s) {
  if ((s.state === "stopped" || s.state === "stopping") && s.reason) return s.reason.replace(/[. ]+$/, "");
  if (s.state !== "broken") return null;
  const reason = (s.reason || "the cluster was aborted").replace(/[. ]+$/, "");
  return `broken: ${reason}; ${s.advice || "`%mlx_cluster restart` brings it back"}.`;
}

function endedText(why, kept) {
  // A kept cluster runs on without the kernel: say what brings it back.
  if (kept) return `this view ended with its kernel (${why}); the cluster runs on: \`%mlx_cluster attach ${kept}\` brings it back.`;
  return `${ENDED} (${why}); \`%mlx_cluster start\` starts a new one.`;
}

function heartbeat(node) {
  if (node.state === "unresponsive") {
    const silent = node.silent_s ?? node.last_seen_s;
    return `silent ${humanSeconds(silent)}, process alive`;
  }
  if (node.state === "unreachable") return `since ${Math.round(node.silent_s ?? 0)} s`;
  if (node.last_seen_s === null || node.last_seen_s === undefined || !LIVE_NODE_STATES.includes(node.state)) return "-";
  return `${node.last_seen_s.toFixed(1)} s ago`;
}

// As views/text.py node_cells: a stopped or dead rank shows no live figures.
function cells(node) {
  const live = LIVE_NODE_STATES.includes(node.state);
  return [
    String(node.rank),
    node.host,
    node.state,
    BUSY_TIMED.includes(node.state) ? humanSeconds(node.busy_s) : "-",
    heartbeat(node),
    humanBytes(live ? node.rss_bytes : null),
    humanBytes(live ? node.mlx_active_bytes : null),
    humanBytes(live ? node.mlx_peak_bytes : null),
    node.device || "-",
  ];
}

function percent(v) {
  return v === null || v === undefined ? "-" : `${Math.round(v)} %`;
}

function pair(a, b, unit, digits) {
  if ((a === null || a === undefined) && (b === null || b === undefined)) return "-";
  const f = (v) => (v === null || v === undefined ? "-" : v.toFixed(digits));
  return `${f(a)} / ${f(b)} ${unit}`;
}

// As views/text.py usage_cells: the usage columns' text by name (a stopped rank shows none).
function usageCells(node) {
  const live = LIVE_NODE_STATES.includes(node.state);
  const n = live ? node : {};
  return {
    "CPU": percent(n.cpu_percent),
    "host CPU": percent(n.host_cpu_percent),
    "GPU": percent(n.gpu_percent),
    "power": pair(n.cpu_w, n.gpu_w, "W", 1),
    "temp": pair(n.cpu_temp_c, n.gpu_temp_c, "°C", 0),
  };
}

// The usage columns some rank has figures for (a column nobody can fill is not shown).
function usageColumns(nodes, sparklines) {
  const has = (f) => nodes.some((n) => n[f] !== null && n[f] !== undefined);
  const shown = {
    "CPU": has("cpu_percent"),
    "host CPU": has("host_cpu_percent"),
    "GPU": has("gpu_percent"),
    "power": has("cpu_w") || has("gpu_w"),
    "temp": has("cpu_temp_c") || has("gpu_temp_c"),
    "last minute": (sparklines || []).length > 0,
  };
  return USAGE_COLUMNS.filter((c) => shown[c]);
}

// values 0-100 -> a small SVG line (the host's GPU, else CPU, use over the last minute)
function sparkline(spark, width = 64, height = 16) {
  const v = spark.values;
  const what = spark.field === "gpu_percent" ? "GPU" : "CPU";
  const step = v.length > 1 ? width / (v.length - 1) : 0;
  const y = (x) => (height - 1 - ((height - 2) * Math.max(0, Math.min(100, x))) / 100).toFixed(1);
  const pts = v.map((x, i) => `${(i * step).toFixed(1)},${y(x)}`).join(" ");
  const last = v.length ? Math.round(v[v.length - 1]) : 0;
  return `<svg xmlns="http://www.w3.org/2000/svg" class="mlx-spark" data-host="${esc(spark.host)}" data-field="${esc(spark.field)}" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}"><title>${esc(spark.host)}: ${what} use over the last minute (now ${last} %)</title><rect x="0" y="0" width="${width}" height="${height}" class="mlx-spark-box"/><polyline fill="none" stroke="#1565c0" stroke-width="1.2" points="${pts}"/></svg>`;
}

// A host's use, 0-100: GPU where known, else its CPU.
function hostUse(nodes, host) {
  const n = nodes.find((x) => x.host === host && (x.gpu_percent ?? x.host_cpu_percent) != null);
  return n ? (n.gpu_percent ?? n.host_cpu_percent) : null;
}

// Text whose `quoted` parts are commands: shown as code, not with literal backticks.
function withCode(el, text) {
  const parts = String(text || "").split("`");
  el.replaceChildren(...parts.map((p, i) => (i % 2 ? h("code", { text: p }) : document.createTextNode(p))));
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) if (c) el.append(c);
  return el;
}

// ------------------------------------------------------------------ charts (as views/charts.py)
function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toPrecision(2).replace(/\.?0+e/, "e");
  return String(Number(v.toPrecision(4)));
}

function niceTicks(lo, hi, count = 5) {
  if (!(isFinite(lo) && isFinite(hi))) return [];
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / Math.max(count - 1, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Number(t.toPrecision(12)));
  }
  return ticks;
}

function logTicks(lo, hi) {
  const out = [];
  for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
    const t = Math.pow(10, k);
    if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) out.push(t);
  }
  return out;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// lines: [{rank, xs, ys}] -> SVG markup (numbers and escaped text only)
function lineChart(lines, title, xLabel, width = 320, height = 170) {
  const xs = [], ys = [];
  for (const l of lines) for (let i = 0; i < l.xs.length; i++) {
    if (l.ys[i] !== null && isFinite(l.ys[i]) && isFinite(l.xs[i])) { xs.push(l.xs[i]); ys.push(l.ys[i]); }
  }
  if (!xs.length) return "";
  let yLo = Math.min(...ys), yHi = Math.max(...ys), xLo = Math.min(...xs), xHi = Math.max(...xs);
  const log = yLo > 0 && yHi / yLo >= LOG_RATIO;
  if (yLo === yHi) { if (log) { yLo *= 0.9; yHi *= 1.1; } else { yLo -= 1; yHi += 1; } }
  if (xLo === xHi) { xLo -= 1; xHi += 1; }
  const left = 50, right = 10, top = 20, bottom = 30;
  const pw = width - left - right, ph = height - top - bottom;
  const tx = (x) => left + (pw * (x - xLo)) / (xHi - xLo);
  const ty = (y) => {
    const f = log ? (Math.log10(y) - Math.log10(yLo)) / (Math.log10(yHi) - Math.log10(yLo)) : (y - yLo) / (yHi - yLo);
    return top + ph * (1 - f);
  };
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" class="mlx-chart" data-metric="${esc(title)}" font-size="10">`,
    `<text x="${left}" y="13" font-size="12" font-weight="bold" class="mlx-chart-title">${esc(title)}</text>`,
    `<rect x="${left}" y="${top}" width="${pw}" height="${ph}" fill="none" class="mlx-frame"/>`,
  ];
  for (const t of log ? logTicks(yLo, yHi) : niceTicks(yLo, yHi, 4)) {
    const y = ty(t).toFixed(1);
    parts.push(`<line x1="${left - 3}" x2="${left + pw}" y1="${y}" y2="${y}" class="mlx-grid"/><text x="${left - 5}" y="${Number(y) + 3}" text-anchor="end" class="mlx-tick">${fmt(t)}</text>`);
  }
  for (const t of niceTicks(xLo, xHi, 5)) {
    const x = tx(t).toFixed(1);
    parts.push(`<line x1="${x}" x2="${x}" y1="${top + ph}" y2="${top + ph + 3}" class="mlx-axis"/><text x="${x}" y="${top + ph + 13}" text-anchor="middle" class="mlx-tick">${fmt(t)}</text>`);
  }
  parts.push(`<text x="${left + pw / 2}" y="${height - 3}" text-anchor="middle" class="mlx-x-label">${esc(xLabel)}</text>`);
  const drawn = lines.map((l) => {
    const pts = [];
    for (let i = 0; i < l.xs.length; i++) {
      const y = l.ys[i];
      if (y === null || !isFinite(y) || !isFinite(l.xs[i]) || (log && y <= 0)) continue;
      pts.push([tx(l.xs[i]), ty(y)]);
    }
    return pts;
  });
  // Lines drawn over each other (the same points, to the pixel) are dashed in turn, one dash of
  // each rank's colour, as views/charts.py does; a chart where all coincide says so.
  const keys = drawn.map((pts) => pts.map(([x, y]) => `${Math.round(x)},${Math.round(y)}`).join(" "));
  const groups = new Map();
  keys.forEach((k, i) => { if (!groups.has(k)) groups.set(k, []); groups.get(k).push(i); });
  const identical = lines.length > 1 && groups.size === 1;
  const notes = [identical ? "all ranks identical" : "", log ? "log scale" : ""].filter(Boolean).join(", ");
  if (notes) parts.push(`<text x="${left + pw}" y="13" text-anchor="end" class="mlx-tick${identical ? " mlx-identical" : ""}">${notes}</text>`);
  lines.forEach((l, i) => {
    const group = groups.get(keys[i]);
    const m = group.length, k = group.indexOf(i);
    const dash = m > 1 ? ` stroke-dasharray="${DASH} ${DASH * (m - 1)}" stroke-dashoffset="${-DASH * k}"` : "";
    const pts = drawn[i].map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    const colour = RANK_COLOURS[l.rank % RANK_COLOURS.length];
    parts.push(`<polyline class="mlx-line" data-rank="${l.rank}" fill="none" stroke="${colour}" stroke-width="1.5"${dash} points="${pts}"><title>rank ${l.rank}</title></polyline>`);
  });
  parts.push("</svg>");
  return parts.join("");
}

// metrics: [{name, rank, step: [...], time: [...], value: [...]}] -> {name: {lines, xLabel}}
function chartsByName(metrics) {
  const byName = new Map();
  for (const m of metrics) {
    if (!byName.has(m.name)) byName.set(m.name, []);
    byName.get(m.name).push(m);
  }
  const out = [];
  for (const [name, series] of byName) {
    const byStep = series.every((s) => s.step.every((x) => x !== null));
    let lines, xLabel;
    if (byStep) {
      lines = series.map((s) => ({ rank: s.rank, xs: s.step, ys: s.value }));
      xLabel = "step";
    } else {
      const t0 = Math.min(...series.map((s) => Math.min(...s.time)));
      lines = series.map((s) => ({ rank: s.rank, xs: s.time.map((t) => t - t0), ys: s.value }));
      xLabel = "time (s)";
    }
    out.push({ name, lines, xLabel });
  }
  return out;
}

// ------------------------------------------------------------------ the view
// Jupyter Notebook 7 has neither: its pages mark the body with `data-notebook` (the page's
// kind: notebooks, tree, edit...) and its shell has a right-hand area, `#jp-right-stack`.
function frontendName() {
  if (document.querySelector(".jp-LabShell")) return "jupyterlab";
  if (document.querySelector(".jp-NotebookShell, #notebook-container")) return "notebook";
  if (document.querySelector("body[data-notebook] #jp-right-stack")) return "notebook7";
  return "other";
}

// Where "Side panel" opens the view (sidecar's panel on the right), and what it is called there.
const SIDE_PANEL_HOSTS = { jupyterlab: "JupyterLab", notebook7: "Notebook 7" };

// Every view on this page, by the widget's key (several views of one widget: the notebook's and
// the side panel's), and the widgets whose kernel has gone. Shared by the views of all notebooks.
const VIEWS = (globalThis.__mlxClusterViews ??= new Map());
const ENDED_KEYS = (globalThis.__mlxClusterEnded ??= new Map());

function sideViews(key) {
  return [...(VIEWS.get(key) || [])].filter((v) => v.side);
}

// Side views whose panel was closed: forget them (their own clean-up may not have run).
function pruneViews() {
  for (const set of VIEWS.values()) {
    for (const v of [...set]) if (v.side && !v.el.isConnected) v.forget();
  }
}

// The side bar tab of a side panel (its title and close icon).
function panelTab(panel) {
  return panel && panel.id ? document.querySelector(`.lm-TabBar-tab[data-id="${panel.id}"]`) : null;
}

// Press an element as a pointer would (Lumino's tab bar acts on pointer events, not clicks).
function press(target) {
  const r = target.getBoundingClientRect();
  const at = { bubbles: true, cancelable: true, button: 0, clientX: r.left + r.width / 2, clientY: r.top + r.height / 2, pointerId: 1, isPrimary: true, pointerType: "mouse" };
  target.dispatchEvent(new PointerEvent("pointerdown", { ...at, buttons: 1 }));
  target.dispatchEvent(new PointerEvent("pointerup", { ...at, buttons: 0 }));
}

// One side panel per notebook, across kernel restarts too: a new panel closes the panels of
// the same notebook ("NAME: MLX cluster, N ranks") whose every view has outlived its kernel
// (the "(ended)" cluster's), whatever its size was.
function notebookOfTitle(text) {
  const at = text.indexOf(": MLX cluster");
  return at < 0 ? text : text.slice(0, at);
}

function closeEndedTwins(panel) {
  const tab = panelTab(panel);
  const label = tab && tab.querySelector(".lm-TabBar-tabLabel");
  if (!label) return;
  for (const other of document.querySelectorAll(".jupyterlab-sidecar")) {
    if (other === panel) continue;
    const otherTab = panelTab(other);
    const otherLabel = otherTab && otherTab.querySelector(".lm-TabBar-tabLabel");
    if (!otherLabel || notebookOfTitle(otherLabel.textContent) !== notebookOfTitle(label.textContent)) continue;
    const views = [...other.querySelectorAll(".mlx-cluster-status")];
    if (!views.length || !views.every((v) => v.dataset.state === "ended")) continue;
    const close = otherTab.querySelector(".lm-TabBar-tabCloseIcon");
    if (close) press(close);
  }
}

// The kernel behind the view, where the front end says (JupyterLab's widget manager).
function kernelOf(model) {
  try {
    const mgr = model.widget_manager;
    const ctx = mgr && mgr.context && mgr.context.sessionContext;
    if (ctx) return { ctx, kernel: ctx.session ? ctx.session.kernel : null };
    return { ctx: null, kernel: (mgr && mgr.kernel) || null };
  } catch (e) {
    return { ctx: null, kernel: null };
  }
}

function notebookName(model) {
  try {
    const mgr = model.widget_manager;
    const path = mgr && mgr.context && mgr.context.path;
    return path ? String(path).split("/").pop() : "";
  } catch (e) {
    return "";
  }
}

function render({ model, el }) {
  el.classList.add("mlx-cluster-status", "mlx-live");
  const key = model.get("key") || "";
  const viewId = Math.random().toString(36).slice(2);

  const dot = h("span", { class: "mlx-dot", text: "● " });
  const header = h("span", { class: "mlx-header" });
  const title = h("span", { class: "mlx-title" }, dot, header);
  const stop = h("button", { class: "mlx-button mlx-stop", title: "Stop every rank", text: "Stop" });
  const restart = h("button", { class: "mlx-button mlx-restart", title: "Stop, then start a fresh cluster of the same shape", text: "Restart" });
  const more = h("button", { class: "mlx-button mlx-restart-more", title: "More restart choices", "aria-label": "More restart choices", text: "▾" });
  const replay = h("button", { class: "mlx-button mlx-restart-replay", title: "Restart, then re-run the cells that completed on every rank", text: "Restart and replay" });
  const menu = h("div", { class: "mlx-menu", hidden: "" }, replay);
  const sideHost = SIDE_PANEL_HOSTS[frontendName()] || "JupyterLab";
  const side = h("button", { class: "mlx-button mlx-side", title: `Show this view in a ${sideHost} side panel`, text: "Side panel" });
  const buttons = h("span", { class: "mlx-buttons" }, stop, h("span", { class: "mlx-split" }, restart, more, menu), side);
  const notice = h("div", { class: "mlx-notice", hidden: "" });
  const sideNote = h("div", { class: "mlx-side-note", hidden: "", text: `also shown in the ${sideHost} side panel on the right` });
  const broken = h("div", { class: "mlx-broken", hidden: "" });
  const banner = h("div", { class: "mlx-banner", role: "alert", hidden: "" });
  const tbody = h("tbody");
  const colClass = (c) => `mlx-col-${c.toLowerCase().replace(/\s+/g, "-")}`;
  const thead = h("thead");
  let shownColumns = "";
  const table = h("table", { class: "mlx-cluster-nodes" }, thead, tbody);
  const usageHint = h("div", { class: "mlx-usage-hint", hidden: "" });
  const hiddenCols = h("div", { class: "mlx-hidden-cols", hidden: "" });
  const tabs = h("div", { class: "mlx-tabs", hidden: "" });
  const panes = h("div", { class: "mlx-panes" });
  const tableBox = h("div", { class: "mlx-table-box" }, table);
  el.replaceChildren(h("div", { class: "mlx-head" }, title, buttons), notice, sideNote, broken, banner, tableBox, usageHint, hiddenCols, tabs, panes);

  let pending = null; // {action, timer, received}
  let activeTab = null; // "metrics" | "topology" | null (hidden)
  let chosenTab = false;
  let ended = ENDED_KEYS.get(key) || null; // why this view outlived its kernel
  let clearedHere = false; // Clear pressed after the kernel had gone: nothing to ask Python
  let sideNotice = false; // the notice is the answer to "Side panel"
  // This view in the page's registry; `side` is known once the view is in the page.
  const me = { el, side: false, placed: false, redraw: () => draw(), forget: () => forget() };

  // ---------------------------------------------------------------- where this view lives
  function peers() {
    return [...(VIEWS.get(key) || [])].filter((v) => v !== me);
  }
  function place() {
    if (me.placed || !el.isConnected) return;
    me.placed = true;
    me.side = el.closest(".jupyterlab-sidecar") !== null;
    if (!VIEWS.has(key)) VIEWS.set(key, new Set());
    VIEWS.get(key).add(me);
    if (me.side) {
      tell(true);
      peers().forEach((v) => v.redraw());
      closeEndedTwins(el.closest(".jupyterlab-sidecar"));
    } else {
      followEndedPanel();
    }
    draw();
  }
  // After a kernel restart, this notebook's side panel still shows the cluster that ended with
  // the old kernel: the new kernel's cluster takes its place there (as a click on "Side panel"
  // would), instead of waiting for that click.
  function followEndedPanel() {
    const nb = notebookName(model);
    if (ended || !nb || !model.get("side_button") || frontendName() !== "jupyterlab") return;
    const endedPanel = [...document.querySelectorAll(".jupyterlab-sidecar")].some((panel) => {
      const tab = panelTab(panel);
      const label = tab && tab.querySelector(".lm-TabBar-tabLabel");
      const views = [...panel.querySelectorAll(".mlx-cluster-status")];
      return (
        label && notebookOfTitle(label.textContent) === nb &&
        views.length > 0 && views.every((v) => v.dataset.state === "ended")
      );
    });
    if (endedPanel) setTimeout(() => side.click(), 0);
  }
  let forgotten = false;
  function forget() {
    if (forgotten) return;
    forgotten = true;
    const set = VIEWS.get(key);
    if (set) set.delete(me);
    if (me.side) {
      tell(false);
      peers().forEach((v) => v.redraw());
    }
  }
  function tell(open) {
    if (!ended) model.send({ event: "side_view", open });
  }
  function sideOpen() {
    pruneViews();
    return sideViews(key).length > 0;
  }

  // ---------------------------------------------------------------- the kernel behind it
  function end(why) {
    if (ended) return;
    ended = why;
    ENDED_KEYS.set(key, why);
    clearPending();
    showNotice("", false);
    menu.hidden = true;
    draw();
    drawTabs();
  }
  // ipywidgets marks the views of a model whose kernel restarted (its comm is no longer live).
  const onCommLive = () => setTimeout(() => {
    if (el.classList.contains("jupyter-widgets-disconnected")) end("the kernel restarted");
  }, 0);
  const onStatus = (_sender, status) => {
    if (status === "restarting" || status === "autorestarting") end("the kernel restarted");
    else if (status === "dead" || status === "terminating") end("the kernel was shut down");
  };
  const onKernelChanged = (_sender, change) => {
    end(change && change.newValue ? "the notebook changed kernel" : "the kernel was shut down");
  };
  const watched = kernelOf(model);
  const statusSignal = watched.ctx ? watched.ctx.statusChanged : watched.kernel && watched.kernel.statusChanged;
  const kernelSignal = watched.ctx && watched.ctx.kernelChanged;
  try { if (statusSignal) statusSignal.connect(onStatus); } catch (e) { /* not JupyterLab */ }
  try { if (kernelSignal) kernelSignal.connect(onKernelChanged); } catch (e) { /* not JupyterLab */ }
  const hadKernel = watched.kernel !== null;
  function kernelStatus() {
    const k = kernelOf(model).kernel;
    return k ? k.status : null;
  }
  const ticker = setInterval(() => {
    place();
    // A kernel shut down under a view that missed the signal.
    const k = kernelOf(model).kernel;
    if (hadKernel && (k === null || k.isDisposed)) end("the kernel was shut down");
    if (!me.side && !ended) drawSideNote();
  }, 1000);
  setTimeout(place, 0);
  requestAnimationFrame(place);

  // ---------------------------------------------------------------- clicks
  function setPending(action) {
    clearPending();
    pending = { action, received: false, timer: setTimeout(() => {
      // Say why nothing has happened yet only when it is so: the kernel has not taken the
      // click (its handler says so at once) and the kernel reports itself busy.
      if (!pending || pending.received || ended) return;
      const status = kernelStatus();
      if (status === "busy") showNotice(`${PENDING_TEXT[action]} the kernel is busy; the click runs as soon as it is free`, false);
      else showNotice(`${PENDING_TEXT[action]} waiting for the kernel to take the click`, false);
    }, 3000) };
    draw();
  }
  function clearPending() {
    if (pending) clearTimeout(pending.timer);
    pending = null;
  }
  let noticeTimer = null;
  function showNotice(text, error) {
    clearTimeout(noticeTimer);
    sideNotice = false;
    // A plain answer fades after a while; an error stays until the next click.
    if (text && !error) noticeTimer = setTimeout(() => showNotice("", false), 10000);
    notice.textContent = text || "";
    notice.hidden = !text;
    notice.classList.toggle("mlx-error", !!error);
  }

  function send(action, extra = {}) {
    if (pending || ended) return;
    showNotice("", false);
    setPending(action);
    model.send({ action, view: viewId, ...extra });
  }
  stop.addEventListener("click", () => send("stop"));
  restart.addEventListener("click", () => send("restart", { replay: false }));
  replay.addEventListener("click", () => { menu.hidden = true; send("replay", { replay: true }); });
  more.addEventListener("click", (e) => { e.stopPropagation(); if (!ended) menu.hidden = !menu.hidden; });
  side.addEventListener("click", () => {
    // Which widgets have a side panel open on this page: Python reuses a panel that is.
    pruneViews();
    const open = [...VIEWS.keys()].filter((k) => sideViews(k).length > 0);
    send("side", { side_keys: open });
  });
  const closeMenu = (e) => { if (!menu.contains(e.target)) menu.hidden = true; };
  document.addEventListener("click", closeMenu);

  // Bring this side view's panel on screen (its tab in the side bar), as a click on the tab.
  // Notebook 7's right-hand area has no tabs: the package's front-end extension there shows
  // the panel it is asked for (the area may have been collapsed).
  function reveal() {
    const panel = el.closest(".jupyterlab-sidecar");
    if (!panel || panel.offsetParent !== null) return; // already on screen
    const tab = document.querySelector(`.lm-TabBar-tab[data-id="${panel.id}"]`);
    if (!tab) {
      document.dispatchEvent(new CustomEvent("mlx-cluster-magic:show-panel", { detail: { id: panel.id } }));
      return;
    }
    const r = tab.getBoundingClientRect();
    const at = { bubbles: true, cancelable: true, button: 0, clientX: r.left + r.width / 2, clientY: r.top + r.height / 2, pointerId: 1, isPrimary: true, pointerType: "mouse" };
    tab.dispatchEvent(new PointerEvent("pointerdown", { ...at, buttons: 1 }));
    tab.dispatchEvent(new PointerEvent("pointerup", { ...at, buttons: 0 }));
  }

  function onMessage(msg) {
    if (!msg) return;
    if (msg.reveal) {
      if (me.side) reveal();
      return;
    }
    if (msg.got !== undefined) {
      if (pending && msg.view === viewId) pending.received = true;
      return;
    }
    if (msg.ack === undefined) return;
    if (msg.view && msg.view !== viewId) return; // another view's click
    if (pending && pending.action === msg.ack) clearPending();
    if (msg.ack === "side" && !msg.error && sideOpen()) {
      showNotice("", false); // the side note says where it is
    } else {
      showNotice(msg.error ? `${msg.ack}: ${msg.error}` : (msg.message || ""), !!msg.error);
      sideNotice = msg.ack === "side" && !msg.error;
    }
    draw();
  }

  // ---------------------------------------------------------------- drawing
  function drawSideNote() {
    const shown = !me.side && !ended && sideOpen();
    sideNote.hidden = !shown;
    if (shown && sideNotice) showNotice("", false);
  }

  function fit() {
    // Drop columns (least needed first) until the table fits its box, then let cells wrap.
    const width = tableBox.clientWidth;
    if (!width) return;
    table.classList.remove("mlx-wrap");
    for (const c of DROP_ORDER) table.classList.remove(`mlx-hide-${colClass(c).slice(8)}`);
    const hidden = [];
    const present = shownColumns.split("|");
    for (const c of DROP_ORDER.filter((x) => present.includes(x))) {
      if (table.offsetWidth <= width) break;
      table.classList.add(`mlx-hide-${colClass(c).slice(8)}`);
      hidden.push(c);
    }
    if (table.offsetWidth > width) table.classList.add("mlx-wrap");
    hiddenCols.textContent = hidden.length ? `not shown at this width: ${hidden.join(", ")}` : "";
    hiddenCols.hidden = hidden.length === 0;
  }
  const resize = typeof ResizeObserver === "function" ? new ResizeObserver(() => fit()) : null;
  if (resize) resize.observe(tableBox);

  function draw() {
    const s = model.get("snapshot") || {};
    if (!s.state) { header.textContent = "MLX cluster"; return; }
    const state = ended ? "ended" : s.state;
    el.dataset.state = state;
    dot.className = `mlx-dot mlx-cluster-${state}`;
    header.textContent = headerText({ ...s, state });
    const b = ended ? endedText(ended, s.kept) : brokenText(s);
    withCode(broken, b);
    broken.hidden = !b;
    broken.classList.toggle("mlx-stopped-by", !ended && (s.state === "stopped" || s.state === "stopping"));
    broken.classList.toggle("mlx-ended", !!ended);
    banner.textContent = ended ? "" : s.banner || "";
    banner.hidden = ended || !s.banner;
    const nodes = s.nodes || [];
    const sparks = ended ? [] : s.sparklines || [];
    const usage = usageColumns(ended ? [] : nodes, sparks);
    const columns = [...COLUMNS, ...usage];
    if (columns.join("|") !== shownColumns) {
      shownColumns = columns.join("|");
      thead.replaceChildren(h("tr", {}, ...columns.map((c) => h("th", { class: colClass(c), text: c }))));
    }
    const sparkShown = new Set();
    const rows = nodes.map((given) => {
      // The kernel took the cluster with it: every rank is stopped. A kept cluster runs on
      // without this view: its rows stay as last seen (attach shows them live again).
      const node = ended && !s.kept ? { ...given, state: "stopped" } : given;
      const c = cells(node);
      const u = usageCells(node);
      const tr = h("tr", { class: `mlx-node mlx-${node.state}`, "data-rank": String(node.rank) });
      const why = [node.why, node.waiting].filter(Boolean).join("; ");
      if (why) tr.title = why;
      c.forEach((text, i) => {
        const td = h("td", { class: colClass(COLUMNS[i]) });
        if (i === 2) td.append(h("span", { class: `mlx-state mlx-state-${node.state}`, text: `● ${text}` }));
        else td.textContent = text;
        tr.append(td);
      });
      for (const col of usage) {
        const td = h("td", { class: colClass(col) });
        if (col === "last minute") {
          // one sparkline per host, in its first row
          const spark = sparks.find((x) => x.host === node.host);
          if (spark && !sparkShown.has(node.host) && LIVE_NODE_STATES.includes(node.state)) {
            sparkShown.add(node.host);
            td.innerHTML = sparkline(spark);
          }
        } else td.textContent = u[col];
        tr.append(td);
      }
      return tr;
    });
    tbody.replaceChildren(...rows);
    const hint = ended ? null : (nodes.find((n) => n.usage_hint) || {}).usage_hint;
    usageHint.textContent = hint ? `GPU, power and temperature: ${hint}` : "";
    usageHint.hidden = !hint;
    colourTopology();
    const busy = pending !== null;
    stop.disabled = !!ended || busy || s.state === "stopped" || s.state === "stopping";
    restart.disabled = !!ended || busy;
    more.disabled = !!ended || busy;
    replay.disabled = !!ended || busy;
    side.hidden = !model.get("side_button") || me.side || !(frontendName() in SIDE_PANEL_HOSTS);
    side.disabled = !!ended || busy;
    stop.textContent = pending && pending.action === "stop" ? PENDING_TEXT.stop : "Stop";
    restart.textContent = pending && (pending.action === "restart" || pending.action === "replay") ? PENDING_TEXT[pending.action] : "Restart";
    drawSideNote();
    fit();
  }

  // While a cell runs, each host of the topology picture is coloured by its use (GPU where
  // known, else CPU): white idle, deep blue at 100 %.
  function colourTopology() {
    const s = model.get("snapshot") || {};
    const nodes = s.nodes || [];
    const running = !ended && nodes.some((n) => n.state === "busy");
    for (const g of panes.querySelectorAll(".mlx-topology g.host")) {
      const rect = g.querySelector("rect");
      const label = g.querySelector("text");
      if (!rect || !label) continue;
      const use = running ? hostUse(nodes, label.textContent) : null;
      if (!rect.dataset.fill) rect.dataset.fill = rect.getAttribute("fill") || "";
      const title = g.querySelector("title.mlx-use");
      if (use === null) {  // no cell runs: the picture as drawn
        rect.setAttribute("fill", rect.dataset.fill);
        label.removeAttribute("fill");
        g.removeAttribute("data-use");
        if (title) title.remove();
        continue;
      }
      const f = Math.max(0, Math.min(100, use)) / 100;
      const mix = (a, b) => Math.round(a + (b - a) * f);
      rect.setAttribute("fill", `rgb(${mix(244, 21)}, ${mix(244, 101)}, ${mix(248, 192)})`);
      label.setAttribute("fill", f > 0.5 ? "#fff" : "#222");
      g.dataset.use = String(Math.round(use));
      const tip = title || document.createElementNS("http://www.w3.org/2000/svg", "title");
      tip.setAttribute("class", "mlx-use");
      tip.textContent = `${label.textContent}: ${Math.round(use)} % in use`;
      if (!title) g.prepend(tip);
    }
  }

  let drawnPrevious = null;
  function drawTabs() {
    const s = model.get("snapshot") || {};
    const metrics = clearedHere ? [] : model.get("metrics") || [];
    const previous = !!(ended || s.metrics_previous);
    drawnPrevious = previous;
    const topo = model.get("topology_svg") || "";
    const names = [...new Set(metrics.map((m) => m.name))];
    const available = [];
    if (names.length) available.push(["metrics", `Metrics (${names.length})`]);
    if (topo) available.push(["topology", "Topology"]);
    tabs.hidden = available.length === 0;
    if (!chosenTab && (activeTab === null || !available.some(([k]) => k === activeTab))) {
      activeTab = available.length ? available[0][0] : null;
    }
    tabs.replaceChildren(...available.map(([k, label]) => {
      const t = h("button", { class: `mlx-tab mlx-tab-${k}${k === activeTab ? " mlx-active" : ""}`, text: label });
      t.addEventListener("click", () => { chosenTab = true; activeTab = activeTab === k ? null : k; drawTabs(); });
      return t;
    }));
    if (activeTab === "metrics" && names.length) {
      const ranks = [...new Set(metrics.map((m) => m.rank))].sort((a, b) => a - b);
      const legend = h("div", { class: "mlx-legend" }, ...ranks.map((r) => {
        const item = h("span", { class: "mlx-legend-item", "data-rank": String(r), text: `rank ${r}` });
        item.style.setProperty("--mlx-rank-colour", RANK_COLOURS[r % RANK_COLOURS.length]);
        return item;
      }));
      let note = null;
      if (previous) {
        const clear = h("button", { class: "mlx-button mlx-clear", title: "Clear the charts of the previous run", text: "Clear" });
        clear.addEventListener("click", () => {
          if (ended) { clearedHere = true; drawTabs(); } else send("clear");
        });
        note = h("div", { class: "mlx-previous-note" }, h("span", { text: `metrics ${PREVIOUS_RUN} ` }), clear);
      }
      const grid = h("div", { class: `mlx-charts${previous ? " mlx-previous" : ""}` });
      grid.innerHTML = chartsByName(metrics).map((c) => lineChart(c.lines, c.name, c.xLabel)).join("");
      panes.replaceChildren(h("div", { class: "mlx-pane mlx-metrics" }, note, legend, grid));
    } else if (activeTab === "topology" && topo) {
      const pane = h("div", { class: "mlx-pane mlx-topology" });
      pane.innerHTML = topo;
      panes.replaceChildren(pane);
      colourTopology();
    } else {
      panes.replaceChildren();
    }
  }

  const onSnapshot = () => {
    const s = model.get("snapshot") || {};
    // A stop is done once the cluster says stopped, even before the answer arrives.
    if (pending && pending.action === "stop" && s.state === "stopped") clearPending();
    draw();
    if (!!s.metrics_previous !== drawnPrevious && !ended) drawTabs();
  };
  model.on("change:snapshot", onSnapshot);
  model.on("change:metrics", drawTabs);
  model.on("change:topology_svg", drawTabs);
  model.on("change:side_button", draw);
  model.on("msg:custom", onMessage);
  model.on("comm_live_update", onCommLive);
  if (el.classList.contains("jupyter-widgets-disconnected")) end("the kernel restarted");
  draw();
  drawTabs();
  // Tell Python where this view lives (the side panel opens only where it can) and which
  // notebook shows it (the side panel's title).
  const here = frontendName();
  const nb = notebookName(model);
  let changed = false;
  if ((model.get("frontend") !== here && here !== "other") || !model.get("frontend")) {
    model.set("frontend", here);
    changed = true;
  }
  if (nb && model.get("notebook") !== nb) {
    model.set("notebook", nb);
    changed = true;
  }
  if (changed && !ended) model.save_changes();
  return () => {
    clearPending();
    clearTimeout(noticeTimer);
    clearInterval(ticker);
    if (resize) resize.disconnect();
    forget();
    document.removeEventListener("click", closeMenu);
    try { if (statusSignal) statusSignal.disconnect(onStatus); } catch (e) { /* gone */ }
    try { if (kernelSignal) kernelSignal.disconnect(onKernelChanged); } catch (e) { /* gone */ }
    model.off("change:snapshot", onSnapshot);
    model.off("change:metrics", drawTabs);
    model.off("change:topology_svg", drawTabs);
    model.off("change:side_button", draw);
    model.off("msg:custom", onMessage);
    model.off("comm_live_update", onCommLive);
  };
}

export { headerText, brokenText, endedText, cells, usageCells, usageColumns, sparkline, lineChart, chartsByName, niceTicks };
export default { render };
