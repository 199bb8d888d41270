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

const ARMS = ["base", "prompted", "trained"];

// eval.json at a glance: the pass/fail checks, then one row per numeric metric with a column per
// arm. Unknown shapes fall back to the top-level numbers.
function summarize(results) {
  const parts = [];
  const checks = results?.target?.checks || [];
  if (checks.length) {
    parts.push(el("ul", { class: "checks" }, checks.map((c) => el("li", { class: c.passed ? "pass" : "fail" },
      el("b", { text: c.passed ? "PASS" : "FAIL" }), ` ${c.description}: `, el("span", { text: c.measured ?? "" })))));
  }
  const arms = ARMS.filter((a) => results && typeof results[a] === "object");
  if (arms.length) {
    const metrics = Object.keys(results[arms[0]]).filter((k) => arms.every((a) => typeof results[a][k] === "number"));
    parts.push(el("table", { class: "metrics" },
      el("thead", {}, el("tr", {}, el("th", { text: "metric" }), arms.map((a) => el("th", { text: a })))),
      el("tbody", {}, metrics.map((m) => el("tr", {}, el("td", { text: m.replaceAll("_", " ") }),
        arms.map((a) => el("td", { class: "num", text: fmt(results[a][m], 4) })))))));
  } else {
    const flat = Object.entries(results || {}).filter(([, v]) => typeof v === "number" || typeof v === "string").slice(0, 30);
    parts.push(el("dl", { class: "kv" }, flat.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmt(v, 4) })])));
  }
  return parts;
}

async function load(name) {
  if (!name) return;
  const ev = await api(`/api/runs/${encodeURIComponent(name)}/eval`);
  if (!ev.exists) { empty(`Run ${name} has no evaluation yet. Run: wonderland eval --run ${name}`); return; }
  $("#eval-empty").hidden = true;
  $("#eval-body").hidden = false;
  $("#eval-summary-card").hidden = !ev.results;
  $("#eval-summary").replaceChildren(...summarize(ev.results));
  $("#eval-report-card").hidden = !ev.report;
  if (ev.report) $("#eval-report").src = ev.report;
  $("#eval-images").replaceChildren(...ev.images.map((src) => el("figure", {}, el("img", { src, alt: src.split("/").pop() }),
    el("figcaption", { text: src.split("/").pop() }))));
}
