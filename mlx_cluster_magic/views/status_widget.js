// The live status view of an MLX cluster (anywidget ES module; no build step).
// Python syncs plain data: `snapshot` (header + one record per rank), `metrics` (one series per
// metric and rank), `topology_svg`. Buttons send {action: ...} to Python and show at once that
// the click was received; Python answers {ack: action, error: ...} when it is done.

const COLUMNS = ["rank", "host", "state", "busy", "heartbeat", "RSS", "MLX active", "MLX peak", "device"];
const RANK_COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037"];
const LOG_RATIO = 100;
const DASH = 6; // one rank's dash where lines coincide, as views/charts.py
const PENDING_TEXT = { stop: "stopping…", restart: "restarting…", replay: "restarting…", side: "opening…" };

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
  return `MLX cluster (${s.state}): backend ${s.backend}, ${s.n} ranks on ${s.hosts} host${s.hosts !== 1 ? "s" : ""}, uptime ${uptime}`;
}

function brokenText(s) {
  if (s.state === "stopped" && s.reason) return s.reason.replace(/[. ]+$/, "");
  if (s.state !== "broken") return null;
  const reason = (s.reason || "the cluster was aborted").replace(/[. ]+$/, "");
  return `broken: ${reason}; \`%mlx_cluster restart\` brings it back.`;
}

function heartbeat(node) {
  if (node.state === "unresponsive") {
    const silent = node.silent_s ?? node.last_seen_s;
    return `silent ${humanSeconds(silent)}, process alive`;
  }
  if (node.last_seen_s === null || node.last_seen_s === undefined || node.state === "stopped") return "-";
  return `${node.last_seen_s.toFixed(1)} s ago`;
}

function cells(node) {
  return [
    String(node.rank),
    node.host,
    node.state,
    node.state === "busy" || node.state === "unresponsive" ? humanSeconds(node.busy_s) : "-",
    heartbeat(node),
    humanBytes(node.rss_bytes),
    humanBytes(node.mlx_active_bytes),
    humanBytes(node.mlx_peak_bytes),
    node.device || "-",
  ];
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
function frontendName() {
  if (document.querySelector(".jp-LabShell")) return "jupyterlab";
  if (document.querySelector(".jp-NotebookShell, #notebook-container")) return "notebook";
  return "other";
}

function render({ model, el }) {
  el.classList.add("mlx-cluster-status", "mlx-live");
  const inSidePanel = () => el.closest(".jupyterlab-sidecar") !== null;

  const dot = h("span", { class: "mlx-dot", text: "● " });
  const header = h("span", { class: "mlx-header" });
  const title = h("span", { class: "mlx-title" }, dot, header);
  const stop = h("button", { class: "mlx-button mlx-stop", title: "Stop every rank", text: "Stop" });
  const restart = h("button", { class: "mlx-button mlx-restart", title: "Stop, then start a fresh cluster of the same shape", text: "Restart" });
  const more = h("button", { class: "mlx-button mlx-restart-more", title: "More restart choices", "aria-label": "More restart choices", text: "▾" });
  const replay = h("button", { class: "mlx-button mlx-restart-replay", title: "Restart, then re-run the cells that completed on every rank", text: "Restart and replay" });
  const menu = h("div", { class: "mlx-menu", hidden: "" }, replay);
  const side = h("button", { class: "mlx-button mlx-side", title: "Show this view in a JupyterLab side panel", text: "Side panel" });
  const buttons = h("span", { class: "mlx-buttons" }, stop, h("span", { class: "mlx-split" }, restart, more, menu), side);
  const notice = h("div", { class: "mlx-notice", hidden: "" });
  const broken = h("div", { class: "mlx-broken", hidden: "" });
  const banner = h("div", { class: "mlx-banner", role: "alert", hidden: "" });
  const tbody = h("tbody");
  const colClass = (c) => `mlx-col-${c.toLowerCase().replace(/\s+/g, "-")}`;
  const thead = h("thead", {}, h("tr", {}, ...COLUMNS.map((c) => h("th", { class: colClass(c), text: c }))));
  const table = h("table", { class: "mlx-cluster-nodes" }, thead, tbody);
  const tabs = h("div", { class: "mlx-tabs", hidden: "" });
  const panes = h("div", { class: "mlx-panes" });
  const tableBox = h("div", { class: "mlx-table-box" }, table);
  el.replaceChildren(h("div", { class: "mlx-head" }, title, buttons), notice, broken, banner, tableBox, tabs, panes);

  let pending = null; // {action, timer}
  let activeTab = null; // "metrics" | "topology" | null (hidden)
  let chosenTab = false;

  function setPending(action) {
    clearPending();
    pending = { action, timer: setTimeout(() => {
      if (pending) showNotice(`${PENDING_TEXT[action]} the kernel is busy; the click runs as soon as it is free`, false);
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
    // A plain answer fades after a while; an error stays until the next click.
    if (text && !error) noticeTimer = setTimeout(() => showNotice("", false), 10000);
    notice.textContent = text || "";
    notice.hidden = !text;
    notice.classList.toggle("mlx-error", !!error);
  }

  function send(action, extra = {}) {
    if (pending) return;
    showNotice("", false);
    setPending(action);
    model.send({ action, ...extra });
  }
  stop.addEventListener("click", () => send("stop"));
  restart.addEventListener("click", () => send("restart", { replay: false }));
  replay.addEventListener("click", () => { menu.hidden = true; send("replay", { replay: true }); });
  more.addEventListener("click", (e) => { e.stopPropagation(); menu.hidden = !menu.hidden; });
  side.addEventListener("click", () => send("side"));
  const closeMenu = (e) => { if (!menu.contains(e.target)) menu.hidden = true; };
  document.addEventListener("click", closeMenu);

  function onMessage(msg) {
    if (!msg || msg.ack === undefined) return;
    if (pending && (pending.action === msg.ack)) clearPending();
    showNotice(msg.error ? `${msg.ack}: ${msg.error}` : (msg.message || ""), !!msg.error);
    draw();
  }

  function draw() {
    const s = model.get("snapshot") || {};
    if (!s.state) { header.textContent = "MLX cluster"; return; }
    el.dataset.state = s.state;
    dot.className = `mlx-dot mlx-cluster-${s.state}`;
    header.textContent = headerText(s);
    const b = brokenText(s);
    broken.textContent = b || "";
    broken.hidden = !b;
    broken.classList.toggle("mlx-stopped-by", s.state === "stopped");
    banner.textContent = s.banner || "";
    banner.hidden = !s.banner;
    const rows = (s.nodes || []).map((node) => {
      const c = cells(node);
      const tr = h("tr", { class: `mlx-node mlx-${node.state}`, "data-rank": String(node.rank) });
      if (node.why) tr.title = node.why;
      c.forEach((text, i) => {
        const td = h("td", { class: colClass(COLUMNS[i]) });
        if (i === 2) td.append(h("span", { class: `mlx-state mlx-state-${node.state}`, text: `● ${text}` }));
        else td.textContent = text;
        tr.append(td);
      });
      return tr;
    });
    tbody.replaceChildren(...rows);
    const busy = pending !== null;
    stop.disabled = busy || s.state === "stopped";
    restart.disabled = busy;
    more.disabled = busy;
    replay.disabled = busy;
    side.hidden = !model.get("side_button") || inSidePanel() || frontendName() !== "jupyterlab";
    side.disabled = busy;
    stop.textContent = pending && pending.action === "stop" ? PENDING_TEXT.stop : "Stop";
    restart.textContent = pending && (pending.action === "restart" || pending.action === "replay") ? PENDING_TEXT[pending.action] : "Restart";
  }

  function drawTabs() {
    const metrics = model.get("metrics") || [];
    const topo = model.get("topology_svg") || "";
    const names = [...new Set(metrics.map((m) => m.name))];
    const available = [];
    if (names.length) available.push(["metrics", `Metrics (${names.length})`]);
    if (topo) available.push(["topology", "Topology"]);
    tabs.hidden = available.length === 0;
    if (!chosenTab && (activeTab === null || !available.some(([k]) => k === activeTab))) {
      activeTab = available.length ? available[0][0] : null;
    }
    tabs.replaceChildren(...available.map(([key, label]) => {
      const t = h("button", { class: `mlx-tab mlx-tab-${key}${key === activeTab ? " mlx-active" : ""}`, text: label });
      t.addEventListener("click", () => { chosenTab = true; activeTab = activeTab === key ? null : key; drawTabs(); });
      return t;
    }));
    if (activeTab === "metrics" && names.length) {
      const ranks = [...new Set(metrics.map((m) => m.rank))].sort((a, b) => a - b);
      const legend = h("div", { class: "mlx-legend" }, ...ranks.map((r) => {
        const item = h("span", { class: "mlx-legend-item", "data-rank": String(r), text: `rank ${r}` });
        item.style.setProperty("--mlx-rank-colour", RANK_COLOURS[r % RANK_COLOURS.length]);
        return item;
      }));
      const grid = h("div", { class: "mlx-charts" });
      grid.innerHTML = chartsByName(metrics).map((c) => lineChart(c.lines, c.name, c.xLabel)).join("");
      panes.replaceChildren(h("div", { class: "mlx-pane mlx-metrics" }, legend, grid));
    } else if (activeTab === "topology" && topo) {
      const pane = h("div", { class: "mlx-pane mlx-topology" });
      pane.innerHTML = topo;
      panes.replaceChildren(pane);
    } else {
      panes.replaceChildren();
    }
  }

  const onSnapshot = () => {
    const s = model.get("snapshot") || {};
    // A stop is done once the cluster says stopped, even before the answer arrives.
    if (pending && pending.action === "stop" && s.state === "stopped") clearPending();
    draw();
  };
  model.on("change:snapshot", onSnapshot);
  model.on("change:metrics", drawTabs);
  model.on("change:topology_svg", drawTabs);
  model.on("change:side_button", draw);
  model.on("msg:custom", onMessage);
  draw();
  drawTabs();
  // Tell Python where this view lives, so the side panel opens only where it can.
  const here = frontendName();
  if (model.get("frontend") !== here && here !== "other" || !model.get("frontend")) {
    model.set("frontend", here);
    model.save_changes();
  }
  return () => {
    clearPending();
    clearTimeout(noticeTimer);
    document.removeEventListener("click", closeMenu);
    model.off("change:snapshot", onSnapshot);
    model.off("change:metrics", drawTabs);
    model.off("change:topology_svg", drawTabs);
    model.off("change:side_button", draw);
    model.off("msg:custom", onMessage);
  };
}

export { headerText, brokenText, cells, lineChart, chartsByName, niceTicks };
export default { render };
