// Runs page, run detail: export the run (a background job on the server, one at a time, refused
// while a training runs) and show its progress and the verify table (every artefact vs the live adapter).
import { $, api, el, toast } from "./util.js";

const FORMATS = ["all", "peft", "mlx", "merged", "gguf", "ollama"];
let timer = null;
let current = null;

export function exportPanel(name, hasAdapter) {
  clearTimeout(timer);
  current = name;
  const box = $("#detail-export");
  box.replaceChildren();
  if (!hasAdapter) return;
  const format = el("select", { id: "export-format" }, ...FORMATS.map((f) => el("option", { value: f, text: f })));
  const verify = el("input", { type: "checkbox", id: "export-verify", checked: true });
  box.append(el("div", { class: "card-head" }, el("h3", { text: "Export" }),
    el("div", { class: "row-actions" }, format, el("label", {}, verify, " verify in llama.cpp / PEFT / mlx-lm"),
      el("button", { id: "export-start", text: "Export", onclick: () => start(name, format.value, verify.checked) }))),
    el("div", { id: "export-state", class: "empty" }), el("pre", { id: "export-log", class: "log" }),
    el("div", { id: "export-table", class: "table-wrap" }));
  poll(name);
}

async function start(name, format, verify) {
  try {
    await api(`/api/runs/${encodeURIComponent(name)}/export`, { method: "POST", body: { format, verify, overwrite: true } });
    poll(name);
  } catch (err) { toast(err.message, "error"); }
}

async function poll(name) {
  if (name !== current) return;
  let job;
  try { job = await api(`/api/runs/${encodeURIComponent(name)}/export`); } catch (err) { toast(err.message, "error"); return; }
  if (name !== current) return;
  $("#export-state").textContent = job.state === "none" ? "" : `${job.format ?? ""} export: ${job.state}${job.error ? ` – ${job.error}` : ""}`;
  $("#export-log").textContent = job.log.join("\n");
  $("#export-start").disabled = job.active;
  $("#export-table").replaceChildren(...(job.report ? [table(job.report)] : []));
  if (job.active) timer = setTimeout(() => poll(name), 1000);
}

function table(report) {
  const pct = (x) => `${Math.round(x * 100)} %`;
  const below = new Set(report.below_target.map((b) => b.split(" ")[0]));
  return el("table", { class: "verify" },
    el("thead", {}, el("tr", {}, ...["Artefact", "First token", "Exact match", "Mean |Δ logit|", ""].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...Object.entries(report.artefacts).map(([name, m]) => el("tr", { dataset: { artefact: name } },
      el("td", { text: name }), el("td", { text: pct(m.first_token_agreement) }), el("td", { text: pct(m.exact_match) }),
      el("td", { text: m.mean_abs_logit_diff == null ? "–" : m.mean_abs_logit_diff.toPrecision(3) }),
      el("td", {}, el("span", { class: `badge ${below.has(name) ? "failed" : "finished"}`, text: below.has(name) ? "below target" : "ok" }))))));
}
