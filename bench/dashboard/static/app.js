// moe-bench dashboard front end: vanilla JS over the JSON API in bench/dashboard/server.py.
// Views follow the URL hash: #runs, #compare/<id>,<id>, #arms/<group>, #run/<id>, #studies, #study/<name>,
// #report.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { runs: [], selected: new Set(), sortKey: "started_at", sortDir: -1, curves: null };
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#7f7f7f", "#bcbd22"];
const X_LABELS = { step: "step", flops: "training FLOPs", tokens: "tokens seen", seconds: "train seconds" };
// Legends sit right of the plot area, so they never cover curves or the x-axis title.
const LEGEND_OUTSIDE = { x: 1.02, xanchor: "left", y: 1, yanchor: "top" };

// -- helpers ----------------------------------------------------------------------------------
async function getJSON(url) {
  const res = await fetch(url);
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText} for ${url}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const isNum = (x) => typeof x === "number" && isFinite(x);
function fmtSci(x) { return isNum(x) ? x.toExponential(2).replace("e+", "e") : (x ?? "-"); }
function fmtNum(x) {
  if (!isNum(x)) return x ?? "-";
  const a = Math.abs(x);
  if (Number.isInteger(x) && a < 1e5) return String(x);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return fmtSci(x);
  return x.toFixed(a < 10 ? 4 : a < 100 ? 2 : a < 1000 ? 1 : 0);
}
function fmtCount(x) {
  if (!isNum(x)) return x ?? "-";
  for (const [u, s] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) if (Math.abs(x) >= s) return (x / s).toPrecision(3) + u;
  return String(Math.round(x));
}
function fmtDur(s) {
  if (!isNum(s)) return s ?? "-";
  if (s < 60) return s.toFixed(1) + "s";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(sec).padStart(2, "0")}s`;
}
const runLink = (id) => el("a", { href: "#run/" + encodeURIComponent(id), text: id });

function showError(where, err) {
  where.replaceChildren(el("div", { class: "error", text: String(err.message || err) }));
}

// -- runs table -------------------------------------------------------------------------------
// key, header, formatter, numeric. The quality columns come early so they stay in view at ~1400 px;
// family, preset and budget are filters and run details, not columns.
const COLUMNS = [
  ["arm", "arm", null, false], ["run_id", "run", null, false], ["status", "status", null, false],
  ["seed", "seed", null, true], ["val_loss", "val loss", fmtNum, true], ["quality", "quality", fmtNum, true],
  ["quality_per_active_param", "quality/active-M", fmtNum, true],
  ["active_params", "active", fmtCount, true], ["total_params", "total", fmtCount, true],
  ["train_flops", "train FLOPs", fmtSci, true], ["steps", "steps", null, true],
  ["wall_seconds", "wall", fmtDur, true], ["group", "group", null, false], ["task", "task", null, false],
  ["started_at", "started", (x) => (x || "-").replace("T", " ").slice(0, 19), false],
];

async function loadRuns() {
  const data = await getJSON("/api/runs");
  state.runs = data.runs;
  for (const sel of document.querySelectorAll("#view-runs select")) {
    const key = sel.dataset.key, keep = sel.value;
    const values = [...new Set(state.runs.map((r) => r[key]).filter((v) => v !== null && v !== ""))].sort();
    const plural = { task: "tasks", family: "families", status: "statuses", group: "groups" }[key];
    sel.replaceChildren(el("option", { value: "", text: `all ${plural}` }),
                        ...values.map((v) => el("option", { value: v, text: v })));
    sel.value = values.includes(keep) ? keep : "";
  }
  renderRuns();
}

function filteredRuns() {
  const text = $("#f-text").value.trim().toLowerCase();
  const exact = [...document.querySelectorAll("#view-runs select")].filter((s) => s.value);
  return state.runs.filter((r) =>
    exact.every((s) => String(r[s.dataset.key]) === s.value) &&
    (!text || Object.values(r).some((v) => v !== null && String(v).toLowerCase().includes(text))));
}

function compareValues(a, b) {
  const na = a === null || a === undefined || a === "", nb = b === null || b === undefined || b === "";
  if (na || nb) return na && nb ? 0 : na ? 1 : -1;  // missing values last either way
  if (isNum(a) && isNum(b)) return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function renderRuns() {
  // The first column (checkbox + arm) stays in place while the table scrolls sideways.
  const head = el("tr", {});
  for (const [key, label] of COLUMNS) {
    const cls = "sortable" + (key === "arm" ? " arm" : "") + (state.sortKey === key ? (state.sortDir > 0 ? " sorted-asc" : " sorted-desc") : "");
    const sort = () => { state.sortDir = state.sortKey === key ? -state.sortDir : 1; state.sortKey = key; renderRuns(); };
    head.append(key !== "arm" ? el("th", { class: cls, "data-key": key, text: label, onclick: sort })
      : el("th", { class: cls, "data-key": key },
           el("input", { type: "checkbox", id: "select-all", title: "select all shown",
             onchange: (e) => { for (const r of filteredRuns()) e.target.checked ? state.selected.add(r.run_id) : state.selected.delete(r.run_id); renderRuns(); } }),
           el("span", { text: " " + label, onclick: sort })));
  }
  $("#runs-table thead").replaceChildren(head);
  const rows = filteredRuns().sort((a, b) => {
    const c = compareValues(a[state.sortKey], b[state.sortKey]);
    const missing = [a[state.sortKey], b[state.sortKey]].some((v) => v === null || v === undefined || v === "");
    return missing ? c : c * state.sortDir;
  });
  $("#runs-table tbody").replaceChildren(...rows.map((r) => {
    const tr = el("tr", { "data-run-id": r.run_id, class: state.selected.has(r.run_id) ? "selected" : null });
    for (const [key, , fmt, numeric] of COLUMNS) {
      const v = r[key];
      const cell = key === "run_id" ? runLink(v) : key === "group" && v ? el("a", { href: "#arms/" + encodeURIComponent(v), text: v, title: "arms of this group over seeds" })
        : fmt ? fmt(v) : (v ?? "-");
      const box = key === "arm" ? el("input", { type: "checkbox", class: "run-select", value: r.run_id, checked: state.selected.has(r.run_id),
        onchange: (e) => { e.target.checked ? state.selected.add(r.run_id) : state.selected.delete(r.run_id); renderRuns(); } }) : null;
      tr.append(el("td", { class: (numeric ? "num " : "") + (key === "status" ? "status-" + v : "") + (key === "arm" ? "arm" : ""),
                           title: key === "status" && r.error ? r.error : null }, box, box ? " " : null, cell));
    }
    return tr;
  }));
  const all = $("#select-all");
  all.checked = rows.length > 0 && rows.every((r) => state.selected.has(r.run_id));
  $("#runs-count").textContent = `${rows.length} of ${state.runs.length} runs`;
  const btn = $("#compare-btn");
  btn.textContent = `Compare selected (${state.selected.size})`;
  btn.disabled = state.selected.size === 0;
}

// -- compare ----------------------------------------------------------------------------------
const DEFAULT_METRICS = ["train/loss", "val/loss"];

async function fetchCurves(ids, metrics) {
  const q = ids.map((id) => "run=" + encodeURIComponent(id)).concat(metrics.map((m) => "metric=" + encodeURIComponent(m)));
  const data = await getJSON("/api/curves?" + q.join("&"));
  data.ids = ids;
  data.loaded = new Set(metrics);
  return data;
}

async function showCompare(ids) {
  if (!ids.length) ids = [...state.selected];
  ids.forEach((id) => state.selected.add(id));
  const notes = $("#compare-notes"), plots = $("#plots");
  state.curves = null;
  plots.replaceChildren();
  $("#metric-boxes").replaceChildren();
  notes.replaceChildren();
  renderCompareTable(ids);
  if (!ids.length) { notes.append(el("li", { text: "select runs in the Runs tab, then press Compare" })); return; }
  notes.append(el("li", { class: "muted", text: "loading curves..." }));
  let data;
  try {
    data = await fetchCurves(ids, DEFAULT_METRICS);
    const available = [...new Set(data.runs.flatMap((r) => r.available))].sort();
    const checked = DEFAULT_METRICS.filter((m) => available.includes(m));
    if (!checked.length && available.length) {  // no loss logged: show the first two metrics instead
      checked.push(...available.slice(0, 2));
      data = await fetchCurves(ids, checked);
    }
    data.available = available;
    data.checked = new Set(checked);
  } catch (err) { showError(notes, err); return; }
  state.curves = data;
  notes.replaceChildren(...data.runs.filter((r) => r.note).map((r) =>
    el("li", { class: "note", "data-run-id": r.run_id }, runLink(r.run_id), ": " + r.note)));

  const axes = [...new Set(data.runs.flatMap((r) => (r.available.length ? r.x_axes : [])))];
  const xSel = $("#x-axis"), keepX = xSel.value;
  xSel.replaceChildren(...(axes.length ? axes : ["step"]).map((a) => el("option", { value: a, text: X_LABELS[a] || a })));
  xSel.value = axes.includes(keepX) ? keepX : "step";

  const box = (m) => el("label", {}, el("input", { type: "checkbox", class: "metric-box", value: m,
                                                  checked: data.checked.has(m), onchange: metricsChanged }), m, " ");
  // Routing metrics fold away: every training step's (moe/) and every evaluation's health (moe_eval/).
  const groups = [["moe/", "MoE routing metrics, training steps"], ["moe_eval/", "MoE routing health, evaluations"]];
  const main = data.available.filter((m) => !groups.some(([p]) => m.startsWith(p)));
  $("#metric-boxes").replaceChildren(...main.map(box), ...groups.map(([p, title]) => {
    const ms = data.available.filter((m) => m.startsWith(p));
    return ms.length ? el("details", { "data-group": p }, el("summary", { text: `${title} (${ms.length})` }), ...ms.map(box)) : "";
  }));
  drawCurves();
}

async function metricsChanged() {
  const data = state.curves;
  const chosen = [...document.querySelectorAll(".metric-box")].filter((b) => b.checked).map((b) => b.value);
  const missing = chosen.filter((m) => !data.loaded.has(m));
  if (missing.length) {  // curves are fetched per metric, so a long run with many metrics stays small
    try {
      const more = await fetchCurves(data.ids, missing);
      more.runs.forEach((r, i) => Object.assign(data.runs[i].metrics, r.metrics));
      missing.forEach((m) => data.loaded.add(m));
    } catch (err) { showError($("#compare-notes"), err); return; }
  }
  drawCurves();
}

function drawCurves() {
  const plots = $("#plots");
  plots.replaceChildren();
  if (!state.curves) return;
  if (!window.Plotly) { showError(plots, new Error("plotly.js did not load: `pip install plotly` and restart the dashboard")); return; }
  const xAxis = $("#x-axis").value || "step";
  const chosen = [...document.querySelectorAll(".metric-box")].filter((b) => b.checked).map((b) => b.value);
  // All plot cells first, then draw: a plot drawn before its neighbours exist would size itself
  // to the whole row and overflow once the grid splits into columns.
  const divs = chosen.map((metric) => el("div", { class: "plot", "data-metric": metric }));
  plots.replaceChildren(...divs);
  chosen.forEach((metric, k) => {
    const div = divs[k];
    const traces = [];
    state.curves.runs.forEach((run, i) => {
      const s = run.metrics[metric];
      if (!s) return;
      const x = xAxis === "step" ? s.step : s.x[xAxis];
      if (!x) return;
      traces.push({ x, y: s.y, name: run.label, type: "scatter", mode: s.y.length > 60 ? "lines" : "lines+markers",
                    line: { color: PALETTE[i % PALETTE.length] }, marker: { size: 4 } });
    });
    Plotly.newPlot(div, traces, {
      title: { text: metric, x: 0.01, xanchor: "left" }, margin: { l: 60, r: 20, t: 50, b: 50 },
      legend: LEGEND_OUTSIDE,
      xaxis: { title: { text: X_LABELS[xAxis] || xAxis }, type: $("#log-x").checked ? "log" : "linear" },
      yaxis: { title: { text: metric }, type: $("#log-y").checked ? "log" : "linear" },
    }, { responsive: true, displaylogo: false });
  });
}

function renderCompareTable(ids) {
  const rows = ids.map((id) => state.runs.find((r) => r.run_id === id)).filter(Boolean);
  $("#compare-table thead").replaceChildren(el("tr", {}, COLUMNS.map(([, label]) => el("th", { text: label }))));
  $("#compare-table tbody").replaceChildren(...rows.map((r) => el("tr", {}, COLUMNS.map(([key, , fmt, numeric]) =>
    el("td", { class: numeric ? "num" : null }, key === "run_id" ? runLink(r[key]) : fmt ? fmt(r[key]) : (r[key] ?? "-"))))));
}

// -- arms over seeds --------------------------------------------------------------------------
// /api/arms: per arm, the mean validation curve over seeds with its 95% t interval, and the
// paired gap to the baseline arm (bench.report.stats computes both on the server).
const fmtCI = (m) => !m ? "-" : m.low === null ? `${fmtNum(m.mean)} (1 seed)` : `${fmtNum(m.mean)} [${fmtNum(m.low)}, ${fmtNum(m.high)}]`;

function bandTraces(name, s, color, width = 3) {
  // A shaded band where the interval is bounded (>= 2 seeds), then the mean line carrying the legend.
  const idx = s.x.map((_, i) => i).filter((i) => s.low[i] !== null && s.high[i] !== null);
  const band = { x: idx.map((i) => s.x[i]).concat(idx.map((i) => s.x[i]).reverse()),
                 y: idx.map((i) => s.high[i]).concat(idx.map((i) => s.low[i]).reverse()),
                 type: "scatter", mode: "lines", fill: "toself", fillcolor: color, opacity: 0.18, line: { width: 0 },
                 hoverinfo: "skip", legendgroup: name, showlegend: false, name: name + " (95% CI)" };
  const line = { x: s.x, y: s.mean, type: "scatter", mode: s.x.length > 60 ? "lines" : "lines+markers", name,
                 legendgroup: name, line: { color, width }, marker: { size: 5 } };
  return idx.length ? [band, line] : [line];
}

function armsLayout(title, xAxis, yTitle, extra = {}) {
  return { title: { text: title, x: 0.01, xanchor: "left" }, margin: { l: 70, r: 20, t: 50, b: 55 },
           legend: LEGEND_OUTSIDE, xaxis: { title: { text: X_LABELS[xAxis] || xAxis }, type: xAxis === "flops" ? "log" : "linear" },
           yaxis: { title: { text: yTitle } }, ...extra };
}

async function showArms(group) {
  const groups = [...new Set(state.runs.map((r) => r.group).filter(Boolean))].sort();
  const gSel = $("#arms-group"), xSel = $("#arms-x"), bSel = $("#arms-baseline");
  gSel.replaceChildren(el("option", { value: "", text: "choose a group" }), ...groups.map((g) => el("option", { value: g, text: g })));
  gSel.value = groups.includes(group) ? group : "";
  const out = $("#arms-out");
  if (!group) { out.replaceChildren(el("p", { class: "muted", text: "pick a group (a reproduction's or a comparison's runs) to see its arms over seeds" })); return; }
  const q = new URLSearchParams({ group, x: xSel.value || "tokens" });
  if (bSel.value && bSel.dataset.group === group) q.set("baseline", bSel.value);
  let data;
  try { data = await getJSON("/api/arms?" + q); } catch (err) { showError(out, err); return; }
  bSel.dataset.group = group;
  bSel.replaceChildren(...data.arms.map((a) => el("option", { value: a.arm, text: a.arm })));
  bSel.value = data.baseline || "";
  if (data.note) { out.replaceChildren(el("p", { class: "muted", text: data.note })); return; }
  const curves = el("div", { class: "plot", id: "arms-curves" }), gap = el("div", { class: "plot", id: "arms-gap" });
  const table = el("table", { class: "data", id: "arms-table" },
    el("thead", {}, el("tr", {}, ["arm", "seeds", "final val loss: mean [95% CI]", "runs"].map((h) => el("th", { text: h })))),
    el("tbody", {}, data.arms.map((a) => el("tr", {}, el("td", { text: a.arm }), el("td", { class: "num", text: a.seeds.join(", ") }),
      el("td", { class: "num", text: fmtCI(a.final_val_loss) }), el("td", {}, a.run_ids.flatMap((id) => [runLink(id), " "]))))));
  out.replaceChildren(el("div", { id: "arms-plots" }, curves, gap), el("div", { class: "scroll" }, table));
  if (!window.Plotly) { showError(curves, new Error("plotly.js did not load")); return; }
  const color = (i) => PALETTE[i % PALETTE.length];
  Plotly.newPlot(curves, data.arms.flatMap((a, i) => bandTraces(a.arm, a.curve, color(i))),
    armsLayout("val loss: mean over seeds (95% band)", data.x, "val loss"), { responsive: true, displaylogo: false });
  const gaps = data.arms.map((a, i) => [a, i]).filter(([a]) => a.gap && a.gap.x.length);
  Plotly.newPlot(gap, gaps.flatMap(([a, i]) => bandTraces(`${a.arm} − ${data.baseline}`, a.gap, color(i))),
    armsLayout(`gap to ${data.baseline}, paired by seed (95% band)`, data.x, `val loss − ${data.baseline} (< 0: better)`,
               { shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 0, y1: 0, line: { dash: "dash", color: "#333" } }] }),
    { responsive: true, displaylogo: false });
}

// -- one run ----------------------------------------------------------------------------------
function kvTable(obj) {
  return el("table", { class: "data kv" }, Object.entries(obj).map(([k, v]) =>
    el("tr", {}, el("td", { text: k }), el("td", { text: typeof v === "object" && v !== null ? JSON.stringify(v) : isNum(v) ? fmtNum(v) : (v ?? "-") }))));
}

async function showRun(id) {
  const view = $("#view-run");
  view.replaceChildren(el("p", { class: "muted", text: "loading..." }));
  let data;
  try { data = await getJSON("/api/run?id=" + encodeURIComponent(id)); } catch (err) { showError(view, err); return; }
  const r = data.record;
  const head = { run_id: r.run_id, name: r.name, arm: data.row.arm, group: r.group, task: r.task, family: r.family, preset: r.preset,
                 seed: r.seed, status: r.status, error: r.error, git_commit: r.git_commit, budget: r.budget,
                 train_flops: fmtSci(r.train_flops), tokens_seen: fmtCount(r.tokens_seen), steps: r.steps,
                 started_at: r.started_at, finished_at: r.finished_at };
  head.budget = data.row.budget;
  const card = (title, obj) => el("div", {}, el("h3", { text: title }), kvTable(obj));
  view.replaceChildren(
    el("h2", {}, "Run ", el("code", { text: r.run_id }), " ",
       el("button", { onclick: () => { location.hash = "#compare/" + encodeURIComponent(r.run_id); } }, "curves")),
    el("div", { class: "cards" }, card("run", head), card("metrics", r.metrics || {}),
       card("parameters and FLOPs", { ...prefix(r.params, "params."), ...prefix(r.flops, "flops.") }),
       card("timings", r.timings || {})),
    el("h3", { text: "routing health per MoE layer" }), healthTable(data.health || []),
    el("h3", { text: "expert load per MoE layer" }), expertStats(r.expert_stats || []),
    el("h3", { text: "config" }), el("pre", { id: "run-config", text: JSON.stringify(r.config, null, 2) }),
    el("h3", { text: "paths" }), kvTable({ ...(r.paths || {}), ...prefix(r.wandb, "wandb.") }),
  );
  view.querySelectorAll(".expert-plot").forEach((div) => drawExperts(div, r.expert_stats[+div.dataset.layer], +div.dataset.layer));
}

function prefix(obj, p) { return Object.fromEntries(Object.entries(obj || {}).map(([k, v]) => [p + k, v])); }

const fmtPct = (x) => (isNum(x) ? (100 * x).toFixed(2) + "%" : "-");
const HEALTH_COLUMNS = [  // [key, header, format, tooltip]
  ["layer", "layer", String, "MoE layer, in model order"],
  ["source", "measured on", String, "evaluation: the whole validation pass at the run's last evaluation"],
  ["experts", "experts", (x) => (isNum(x) ? String(x) : "-"), "routed experts"],
  ["max_violation", "MaxVio", fmtNum, "max load / mean load - 1 (0: perfectly balanced)"],
  ["dead_experts", "dead", (x) => (isNum(x) ? String(x) : "-"), "experts that kept no token"],
  ["fraction_dropped", "dropped", fmtPct, "share of assignments over capacity (not computed)"],
  ["dropped_by_position", "dropped by position", (v) => (Array.isArray(v) ? v.map(fmtPct).join(" / ") : "-"),
   "dropped share per quarter of the sequence, first to last"],
  ["router_entropy", "router entropy", fmtNum, "mean entropy of the routing distribution (nats)"],
  ["topk_margin", "top-k margin", fmtNum, "mean gap between the k-th and (k+1)-th routing probability"],
  ["assignment_stability", "stability", fmtPct, "share of a fixed batch's tokens whose first expert is unchanged since the previous evaluation"],
];

function healthTable(rows) {
  if (!rows.length) return el("p", { class: "muted", id: "routing-health", text: "no routing health recorded (a dense model, or a record from before it existed)" });
  return el("table", { class: "data", id: "routing-health" },
    el("thead", {}, el("tr", {}, HEALTH_COLUMNS.map(([, h, , tip]) => el("th", { text: h, title: tip })))),
    el("tbody", {}, rows.map((row) => el("tr", { "data-layer": row.layer, "data-source": row.source },
      HEALTH_COLUMNS.map(([k, , fmt]) => el("td", { "data-key": k, text: fmt(row[k]) }))))));
}

function expertStats(layers) {
  if (!layers.length) return el("p", { class: "muted", text: "no expert statistics (a dense model, or none recorded)" });
  return el("div", { class: "experts" }, layers.map((layer, i) => el("div", { class: "expert-plot", "data-layer": i })));
}

function expertLoad(layer) {
  for (const key of ["tokens_per_expert", "load"]) if (Array.isArray(layer[key])) return [key, layer[key]];
  return [null, []];
}

function drawExperts(div, layer, i) {
  const [key, load] = expertLoad(layer);
  const dropped = isNum(layer.fraction_dropped) ? `, dropped ${(100 * layer.fraction_dropped).toFixed(2)}%` : "";
  const title = `layer ${i}${dropped}`;
  if (!load.length) { div.replaceChildren(el("p", { class: "muted", text: title + ": no per-expert load recorded" })); return; }
  if (!window.Plotly) {  // plain bars
    const max = Math.max(...load, 1e-12);
    div.replaceChildren(el("div", { text: title }), el("div", { class: "bars" },
      load.map((v, e) => el("div", { title: `expert ${e}: ${v}`, style: `height:${(100 * v) / max}%` }))));
    return;
  }
  Plotly.newPlot(div, [{ type: "bar", x: load.map((_, e) => e), y: load, marker: { color: "#3b7ddd" } }], {
    title: { text: title, font: { size: 13 } }, margin: { l: 50, r: 10, t: 35, b: 35 },
    xaxis: { title: { text: "expert" }, dtick: load.length > 32 ? undefined : 1 }, yaxis: { title: { text: key } },
  }, { displayModeBar: false, responsive: true });
}

// -- studies ----------------------------------------------------------------------------------
function hint(text) {
  return el("div", { class: "hint" }, "Full Optuna UI: ", el("code", { text }), " (pip install optuna-dashboard)");
}

async function showStudies() {
  const view = $("#view-studies");
  let data;
  try { data = await getJSON("/api/studies"); } catch (err) { showError(view, err); return; }
  const children = [el("h2", { text: "Optuna studies" })];
  if (data.note) children.push(el("p", { class: "muted", id: "studies-note", text: data.note }));
  if (data.studies.length) {
    children.push(el("table", { class: "data", id: "studies-table" },
      el("thead", {}, el("tr", {}, ["study", "directions", "trials", "best value", "best run", "started"].map((h) => el("th", { text: h })))),
      el("tbody", {}, data.studies.map((s) => el("tr", {},
        el("td", {}, el("a", { href: "#study/" + encodeURIComponent(s.name), text: s.name })),
        el("td", { text: s.directions.join(", ") }), el("td", { class: "num", text: s.n_trials }),
        el("td", { class: "num", text: fmtNum(s.best_value) }),
        el("td", {}, s.best_run_id ? runLink(s.best_run_id) : "-"), el("td", { text: s.started_at || "-" }))))));
  }
  children.push(hint(data.hint));
  view.replaceChildren(...children);
}

async function showStudy(name) {
  const view = $("#view-study");
  let data;
  try { data = await getJSON("/api/study?name=" + encodeURIComponent(name)); } catch (err) { showError(view, err); return; }
  view.replaceChildren(
    el("h2", {}, "Study ", el("code", { text: data.name }), el("span", { class: "muted", text: "  " + data.directions.join(", ") })),
    el("table", { class: "data", id: "trials-table" },
      el("thead", {}, el("tr", {}, ["#", "state", data.objectives.join(", "), "params", "run", "duration", "started"].map((h) => el("th", { text: h })))),
      el("tbody", {}, data.trials.map((t) => el("tr", {},
        el("td", { class: "num", text: t.number }), el("td", { class: "status-" + t.state, text: t.state }),
        el("td", { class: "num", text: t.values ? t.values.map(fmtNum).join(", ") : "-" }),
        el("td", { text: Object.entries(t.params).map(([k, v]) => `${k}=${isNum(v) ? fmtNum(v) : v}`).join("  ") }),
        el("td", {}, t.run_id ? runLink(t.run_id) : "-"), el("td", { class: "num", text: fmtDur(t.duration_s) }),
        el("td", { text: t.started_at || "-" }))))),
    el("ul", { class: "notes", id: "study-notes" }), el("div", { id: "study-figures" }),
    hint(data.hint));
  await drawStudyFigures(name);
}

async function drawStudyFigures(name) {
  // Optuna's own figures (plotly JSON made by optuna.visualization on the server).
  const box = $("#study-figures");
  let data;
  try { data = await getJSON("/api/study_plots?name=" + encodeURIComponent(name)); } catch (err) { showError(box, err); return; }
  $("#study-notes").replaceChildren(...data.notes.map((n) => el("li", { text: n })));
  if (!window.Plotly) return;
  const divs = data.figures.map((f) => el("div", { class: "plot study-figure", "data-kind": f.kind }));
  box.replaceChildren(...divs);
  data.figures.forEach((f, i) => {
    const layout = { ...f.figure.layout };
    delete layout.width; delete layout.height;  // size to the grid cell
    Plotly.newPlot(divs[i], f.figure.data, layout, { responsive: true, displaylogo: false });
  });
}

// -- report -----------------------------------------------------------------------------------
async function showReport() {
  const view = $("#view-report");
  let data;
  try { data = await getJSON("/api/report"); } catch (err) { showError(view, err); return; }
  const report = el("div", { class: "report", id: "report-body" });
  if (data.html) report.innerHTML = data.html;  // rendered and HTML-escaped by the server
  else report.append(el("p", { class: "muted", text: data.note }));
  const gallery = el("div", { class: "gallery" }, data.plots.map((p) => el("figure", {},
    p.kind === "image" ? el("img", { src: p.url, alt: p.name, loading: "lazy" })
                       : el("iframe", { src: p.url, sandbox: "allow-scripts", loading: "lazy", title: p.name }),
    el("figcaption", {}, el("a", { href: p.url, target: "_blank", text: p.name })))));
  // The server lists only the plots the report does not show itself, so nothing appears twice.
  view.replaceChildren(report, data.plots.length ? el("h3", { text: "other plots" }) : "", gallery);
}

// -- routing ----------------------------------------------------------------------------------
async function route() {
  const hash = decodeURIComponent(location.hash.slice(1)) || "runs";
  const [view, ...rest] = hash.split("/");
  const arg = rest.join("/");
  const name = { run: "run", study: "study" }[view] || (["runs", "compare", "arms", "studies", "report"].includes(view) ? view : "runs");
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "view-" + name;
  for (const a of document.querySelectorAll("header nav a")) {
    const tab = a.dataset.tab;
    a.classList.toggle("active", tab === name || (name === "run" && tab === "runs") || (name === "study" && tab === "studies"));
  }
  if (name === "runs") renderRuns();
  else if (name === "compare") await showCompare(arg ? arg.split(",").filter(Boolean) : []);
  else if (name === "arms") await showArms(arg);
  else if (name === "run") await showRun(arg);
  else if (name === "studies") await showStudies();
  else if (name === "study") await showStudy(arg);
  else if (name === "report") await showReport();
}

async function init() {
  for (const id of ["#f-text", "#f-task", "#f-family", "#f-status", "#f-group"]) $(id).addEventListener("input", renderRuns);
  $("#compare-btn").addEventListener("click", () => {
    const hash = "#compare/" + [...state.selected].map(encodeURIComponent).join(",");
    if (location.hash === hash) route(); else location.hash = hash;
  });
  $("#clear-btn").addEventListener("click", () => { state.selected.clear(); renderRuns(); });
  for (const id of ["#x-axis", "#log-x", "#log-y"]) $(id).addEventListener("change", drawCurves);
  $("#arms-group").addEventListener("change", (e) => { location.hash = "#arms/" + encodeURIComponent(e.target.value); });
  for (const id of ["#arms-x", "#arms-baseline"]) $(id).addEventListener("change", () => showArms($("#arms-group").value));
  window.addEventListener("hashchange", route);
  try {
    const info = await getJSON("/api/info");
    $("#storage").textContent = info.storage;
    if (!window.Plotly) {
      const b = $("#banner");
      b.hidden = false;
      b.textContent = "plotly.js is not available, so there are no plots: `pip install plotly` and restart the dashboard";
    }
    await loadRuns();
  } catch (err) {
    const b = $("#banner");
    b.hidden = false;
    b.textContent = String(err.message || err);
  }
  await route();
  document.body.dataset.ready = "1";
}

init();
