// Runs page: every run with its config, final losses, duration and loss curve; pick one for
// Compare, resume a stopped or interrupted one, delete (with confirmation).
import { $, api, bus, el, fmt, duration, when, toast } from "./util.js";
import { LossChart, sparkline } from "./chart.js";
import { exportPanel } from "./export.js";
import { checkpointTable } from "./checkpoints.js";

let runs = [];
let selected = null;
let chart = null;

export async function init() {
  $("#refresh-runs").addEventListener("click", refresh);
  bus.on("runs-changed", () => { if (!$("#page-runs").hidden) refresh(); });
}

export function show() { refresh(); }

async function refresh() {
  ({ runs } = await api("/api/runs"));
  $("#runs-empty").hidden = runs.length > 0;
  $("#runs-body").replaceChildren(...runs.map(row));
  if (selected && !runs.some((r) => r.name === selected)) { selected = null; $("#run-detail").hidden = true; }
  if (!selected && runs.length) selected = runs[0].name;
  if (selected) detail(selected);
}

function row(r) {
  const stop = (fn) => (e) => { e.stopPropagation(); fn(); };
  return el("tr", { dataset: { run: r.name }, class: r.name === selected ? "selected" : "", onclick: () => detail(r.name) },
    el("td", {}, el("b", { text: r.name })),
    el("td", {}, el("span", { class: `badge ${r.status}`, text: r.status })),
    el("td", { text: r.character ?? "–" }),
    el("td", { text: when(r.created) }),
    el("td", { text: r.step != null ? `${r.step} / ${r.config.iters}` : "–" }),
    el("td", { text: fmt(r.loss) }),
    el("td", { text: fmt(r.val_loss) }),
    el("td", { text: duration(r.duration_s) }),
    el("td", {}, sparkline(r.curve)),
    el("td", {}, el("div", { class: "row-actions" },
      r.has_adapter ? el("button", { class: "small", text: "Compare", onclick: stop(() => bus.emit("compare-run", r.name)) }) : null,
      (r.status === "stopped" || r.status === "interrupted") && r.resumable ? el("button", { class: "small", text: "Resume", onclick: stop(() => bus.emit("resume", r.name)) }) : null,
      r.has_eval ? el("button", { class: "small", text: "Report", onclick: stop(() => { location.hash = `#eval?run=${encodeURIComponent(r.name)}`; }) }) : null,
      el("button", { class: "small danger", text: "Delete", onclick: stop(() => remove(r.name)) }))));
}

async function remove(name) {
  if (!confirm(`Delete run “${name}” with its adapter, checkpoints and metrics? This cannot be undone.`)) return;
  try {
    await api(`/api/runs/${encodeURIComponent(name)}?confirm=${encodeURIComponent(name)}`, { method: "DELETE" });
    toast(`Deleted ${name}.`);
    bus.emit("runs-changed");
    await refresh();
  } catch (err) { toast(err.message, "error"); }
}

function detail(name) {
  selected = name;
  const r = runs.find((x) => x.name === name);
  if (!r) return;
  for (const tr of $("#runs-body").children) tr.classList.toggle("selected", tr.dataset.run === name);
  $("#run-detail").hidden = false;
  $("#detail-title").textContent = name;
  const badge = $("#detail-status");
  badge.textContent = r.status; badge.className = `badge ${r.status}`;
  if (!chart) chart = new LossChart($("#detail-chart"), { height: 260 });
  chart.set(r.curve);
  $("#detail-checkpoints").replaceChildren(checkpointTable(r));
  exportPanel(name, r.has_adapter);
  // the config says what was asked (backend "auto"); the run says what ran: its values win
  const facts = { ...r.config, model: r.model, backend: r.backend, "train records": r.data.train_records,
    "valid records": r.data.valid_records, error: r.error };
  $("#detail-config").replaceChildren(...Object.entries(facts).filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", { text: k.replaceAll("_", " ") }), el("dd", { text: fmt(v, 6) })]));
}
