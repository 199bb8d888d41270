// Evaluation view: what `wonderland eval --run NAME` wrote to RUN/eval/ (eval.json, report.html, *.png).
import { $, api, bus, el, fillSelect, fmt } from "./util.js";

export async function init() {
  $("#eval-run").addEventListener("change", () => load($("#eval-run").value));
  bus.on("runs-changed", () => { if (!$("#page-eval").hidden) show(); });
}

export async function show() {
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("run");
  const { runs } = await api("/api/runs");
  fillSelect($("#eval-run"), runs, wanted || $("#eval-run").value, (r) => `${r.name}${r.has_eval ? " ✓ evaluated" : ""}`);
  if (!runs.length) { empty("No runs yet: train one, then evaluate it with `wonderland eval --run NAME`."); return; }
  await load($("#eval-run").value);
}

function empty(text) {
  $("#eval-body").hidden = true;
  $("#eval-empty").hidden = false;
  $("#eval-empty").textContent = text;
}

// Numbers of eval.json, flattened one level ("perplexity.trained": 11.4) for the summary list.
function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v) && prefix.split(".").length < 2) flatten(v, key, out);
    else if (typeof v === "number" || typeof v === "string" || typeof v === "boolean") out.push([key, v]);
  }
  return out;
}

async function load(name) {
  if (!name) return;
  const ev = await api(`/api/runs/${encodeURIComponent(name)}/eval`);
  if (!ev.exists) { empty(`Run ${name} has no evaluation yet. Run: wonderland eval --run ${name}`); return; }
  $("#eval-empty").hidden = true;
  $("#eval-body").hidden = false;
  const rows = flatten(ev.results).slice(0, 60);
  $("#eval-summary-card").hidden = rows.length === 0;
  $("#eval-summary").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmt(v, 4) })]));
  $("#eval-report-card").hidden = !ev.report;
  if (ev.report) $("#eval-report").src = ev.report;
  $("#eval-images").replaceChildren(...ev.images.map((src) => el("figure", {}, el("img", { src, alt: src.split("/").pop(), loading: "lazy" }),
    el("figcaption", { text: src.split("/").pop() }))));
}
