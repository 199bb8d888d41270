// Train page: a form built from TrainConfig's fields + presets, Train / Stop / Resume, and live
// progress over server-sent events (replayed from the run's metrics.jsonl, then live).
import { $, api, bus, el, fillSelect, fmt, duration, toast } from "./util.js";
import { LossChart } from "./chart.js";

const GROUP_ORDER = ["model", "schedule", "lora", "monitoring", "advanced"];
const OPEN_GROUPS = new Set(["model", "schedule"]);
const MAX_LOG = 400;

let schema = null;
let preset = "default";
let chart = null;
let source = null;      // the EventSource of the run being watched
let watching = null;    // its run name
let job = null;         // last /api/train/status answer
let t0 = null;          // wall time of the run's first event, for elapsed when no step came yet
let priorElapsed = 0;   // training seconds of the run's earlier sessions (before a stop / resume)
let sessionElapsed = 0; // training seconds of the current session, from its last step
let savedSteps = new Set();  // checkpoint steps already logged (a stop on a save step saves it twice)
const NAME_RULE = "run name: letters, digits, '-' and '_', starting with a letter or digit (max 100 characters)";

export async function init() {
  schema = await api("/api/config");
  preset = schema.default_preset;
  buildPresets();
  buildFields();
  applyPreset(preset);
  $("#train-form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  // the browser's own pattern check blocks the submit with no message of ours: say why, drop a stale "Started"
  $("#train-form").elements.name.addEventListener("invalid", () => say(NAME_RULE, "error"));
  $("#stop-btn").addEventListener("click", stop);
  $("#resume-btn").addEventListener("click", () => resume(job && job.run));
  bus.on("datasets", (datasets) => fillSelect($("#train-dataset"), datasets, $("#train-dataset").value, (d) => `${d.name} (${d.character ?? "?"})`));
  bus.on("dataset-selected", (name) => { $("#train-dataset").value = name; });
  bus.on("resume", (name) => { location.hash = "#train"; resume(name); });
  chart = new LossChart($("#loss-chart"), { height: 280 });
  const { datasets } = await api("/api/datasets");
  fillSelect($("#train-dataset"), datasets, null, (d) => `${d.name} (${d.character ?? "?"})`);
  await refreshStatus(true);
}

export function show() { refreshStatus(false); requestAnimationFrame(() => chart.plot.setSize({ width: Math.max($("#loss-chart").clientWidth, 280), height: 280 })); }

function buildPresets() {
  const box = $("#presets");
  const names = [...Object.keys(schema.presets), "custom"];
  box.replaceChildren(...names.map((name) => el("button", { type: "button", dataset: { preset: name }, text: name, onclick: () => applyPreset(name) })));
}

function buildFields() {
  const groups = {};
  for (const f of schema.train) (groups[f.group] ||= []).push(f);
  const parts = GROUP_ORDER.filter((g) => groups[g]).map((g) => el("details", { class: "group", open: OPEN_GROUPS.has(g) },
    el("summary", { text: g === "lora" ? "LoRA" : g }),
    el("div", { class: "fields" }, groups[g].map(fieldInput))));
  $("#config-fields").replaceChildren(...parts);
  $("#config-fields").addEventListener("input", () => markPreset("custom"));
}

function fieldInput(f) {
  const attrs = { name: `cfg.${f.name}`, title: f.help, dataset: { type: f.type } };
  let input;
  if (f.choices) input = el("select", attrs, f.choices.map((c) => el("option", { value: c, text: c })));
  else if (f.type === "int" || f.type === "float") input = el("input", { ...attrs, type: "number", step: f.type === "int" ? "1" : "any" });
  else input = el("input", { ...attrs, type: "text" });
  const wide = ["model", "targets", "sample_prompt"].includes(f.name);
  return el("label", { class: `field${wide ? " wide" : ""}`, title: f.help }, el("span", { text: f.name.replaceAll("_", " ") }), input, wide ? el("small", { text: f.help }) : null);
}

function applyPreset(name) {
  if (name !== "custom") fillForm({ ...Object.fromEntries(schema.train.map((f) => [f.name, f.default])), ...schema.presets[name] });
  markPreset(name);
}

function fillForm(values) {
  for (const [key, value] of Object.entries(values)) {
    const input = $(`[name="cfg.${key}"]`);
    if (input && value !== null && value !== undefined) input.value = value;
  }
}

function markPreset(name) {
  preset = name;
  for (const b of $("#presets").children) b.classList.toggle("on", b.dataset.preset === name);
}

function formConfig() {
  const config = {};
  for (const f of schema.train) {
    const input = $(`[name="cfg.${f.name}"]`);
    if (!input || input.value === "") continue;
    const number = Number(input.value);  // 1e999 is Infinity, which JSON would send as null: send the text
    config[f.name] = (f.type === "int" || f.type === "float") && Number.isFinite(number) ? number : input.value;
  }
  return config;
}

function say(text, kind = "") { const m = $("#train-msg"); m.textContent = text; m.className = `msg ${kind}`; }

async function start() {
  const form = $("#train-form");
  say("");
  if (!$("#train-dataset").value) { say("build a dataset first (Dataset page)", "error"); return; }
  $("#train-btn").disabled = true;
  try {
    const body = { dataset: $("#train-dataset").value, config: formConfig() };
    const name = form.elements.name.value.trim();
    if (name) body.name = name;
    const started = await api("/api/train", { method: "POST", body });
    say(`Started ${started.run}.`, "ok");
    form.elements.name.value = "";
    watch(started.run, true);
    await refreshStatus(false);
  } catch (err) {
    say(err.message, "error");
    $("#train-btn").disabled = false;
  }
}

async function stop() {
  $("#stop-btn").disabled = true;
  try { await api("/api/train/stop", { method: "POST" }); say("Stopping after the current step; the last checkpoint is kept."); }
  catch (err) { say(err.message, "error"); }
}

async function resume(name) {
  if (!name) return;
  try {
    const started = await api("/api/train", { method: "POST", body: { resume: name } });
    say(`Resuming ${started.run}.`, "ok");
    watch(started.run, true);
    await refreshStatus(false);
  } catch (err) { say(err.message, "error"); toast(err.message, "error"); }
}

async function refreshStatus(first) {
  job = await api("/api/train/status");
  const active = !!job.active;
  $("#train-btn").disabled = active;
  $("#stop-btn").disabled = !active || job.stop_requested;
  $("#resume-btn").hidden = active || job.state !== "stopped";
  const pill = $("#job-pill");
  pill.textContent = active ? `training ${job.run}` : job.run ? `${job.state}: ${job.run}` : "idle";
  pill.className = `pill ${active ? "running" : "idle"}`;
  setState(job.run ? job.state : null);
  if (first && active && job.config) { fillForm(job.config); markPreset("custom"); }  // after a reload: the running run's values
  if (job.run && (first || active) && watching !== job.run) watch(job.run, false);
  if (job.error) say(job.error, "error");
}

function setState(state) {
  const badge = $("#run-state");
  badge.textContent = state || "no run yet";
  badge.className = `badge ${state || ""}`;
}

// Watch a run: a new EventSource replays its stored events (the chart rebuilds) and follows live
// ones. On a dropped connection the browser reconnects with Last-Event-ID and gets only what it missed.
function watch(name, fresh) {
  if (source) source.close();
  watching = name;
  t0 = null;
  priorElapsed = 0; sessionElapsed = 0; savedSteps = new Set();
  chart.reset();
  $("#train-log").replaceChildren();
  $("#progress-title").textContent = name;
  for (const id of ["s-step", "s-loss", "s-val", "s-lr", "s-tps", "s-elapsed", "s-eta"]) $(`#${id}`).textContent = "–";
  progress(0, 0);
  if (fresh) setState("starting");
  source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  source.onmessage = (e) => onEvent(JSON.parse(e.data));
  // A dropped connection is retried by the browser (with Last-Event-ID); a refused one (the run
  // failed before it had a folder, say) is final: show what the server knows instead.
  const es = source;
  es.onerror = () => { if (es === source && es.readyState === EventSource.CLOSED) { source = null; refreshStatus(false); } };
  source.addEventListener("log", (e) => { const rec = JSON.parse(e.data); log(rec.message, /error/.test(rec.message) ? "bad" : "", rec.time); });
  source.addEventListener("end", (e) => {
    const summary = JSON.parse(e.data);
    source.close(); source = null;
    setState(summary.state);
    if (summary.state === "finished") say(`${name} finished: talk to it on the Compare page.`, "ok");
    else if (summary.state === "stopped") say(`${name} stopped; its last checkpoint is kept, resume it any time.`);
    refreshStatus(false);
    bus.emit("runs-changed");
  });
}

function progress(step, total) {
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  $("#progress-fill").style.width = `${pct}%`;
  $("#progress-label").textContent = total ? `${step} / ${total} · ${pct.toFixed(0)} %` : "waiting for the first step…";
  $("#progressbar").setAttribute("aria-valuenow", pct.toFixed(0));
}

function onEvent(r) {
  t0 ??= r.time;
  switch (r.event) {
    case "started":
      setState("running");
      log(`started ${r.run}: ${r.backend} on ${r.device}, ${r.train_records} train / ${r.valid_records} valid records, ${fmt(r.trainable_params)} trainable parameters`, "", r.time);
      progress(r.step, r.total_steps);
      break;
    case "resumed":
      priorElapsed += sessionElapsed; sessionElapsed = 0;
      setState("running");
      log(`resumed from ${r.checkpoint.split("/").pop()} at step ${r.step}`, "", r.time);
      progress(r.step, r.total_steps);
      break;
    case "step":
      progress(r.step, r.total_steps);
      $("#s-step").textContent = `${r.step} / ${r.total_steps}`;
      $("#s-loss").textContent = fmt(r.loss);
      $("#s-lr").textContent = fmt(r.learning_rate, 5);
      $("#s-tps").textContent = fmt(r.tokens_per_second, 0);
      sessionElapsed = r.elapsed_s ?? sessionElapsed;
      $("#s-elapsed").textContent = duration(elapsed());
      $("#s-eta").textContent = duration(r.eta_s);
      chart.addStep(r.step, r.loss);
      log(`step ${r.step}/${r.total_steps}  loss ${fmt(r.loss)}  lr ${fmt(r.learning_rate, 5)}  ${fmt(r.tokens_per_second, 0)} tok/s`, "", r.time);
      break;
    case "eval":
      $("#s-val").textContent = fmt(r.val_loss);
      chart.addEval(r.step, r.val_loss, { persona_margin: r.persona_margin ?? null, retention_drift: r.retention_drift ?? null });
      log(`step ${r.step}: validation loss ${fmt(r.val_loss)}` + (r.persona_margin != null ? `, persona margin ${fmt(r.persona_margin)}, retention drift ${fmt(r.retention_drift)}` : "")
        + ` (${fmt(r.val_time_s, 1)} s)` + (chart.best === r.step ? ": best so far" : ""), "eval", r.time);
      break;
    case "checkpoint":
      if (!savedSteps.has(r.step)) log(`checkpoint saved at step ${r.step}`, "", r.time);
      savedSteps.add(r.step);
      break;
    case "sample": log(`sample at step ${r.step}: “${r.prompt}” → ${r.reply}`, "sample", r.time); break;
    case "stopped":
      setState("stopped");
      $("#s-eta").textContent = "–";  // a stopped run has no time left to count down
      log(`stopped at step ${r.step} after ${duration(elapsed())} of training; checkpoint kept, resume any time`, "warn", r.time);
      break;
    case "finished":
      setState("finished");
      progress(r.total_steps, r.total_steps);
      $("#s-eta").textContent = "done";
      log(`finished: loss ${fmt(r.loss)}, val loss ${fmt(r.val_loss)} in ${duration(elapsed())} of training`, "eval", r.time);
      if (r.stopped_early) log(`stopped early at step ${r.step} of ${r.total_steps}: the probe's last checkpoints did not beat step ${r.best_step}, which is served`, "", r.time);
      break;
    case "failed":
      setState("failed");
      $("#s-eta").textContent = "–";
      log(`failed: ${r.error}`, "bad", r.time);
      break;
    default: log(`${r.event}`, "", r.time);
  }
}

// One elapsed time everywhere (stats, log, Runs): training seconds summed over the run's sessions,
// each session's figure being its last step's elapsed_s (the Runs page sums metrics.jsonl the same way).
function elapsed() { return priorElapsed + sessionElapsed; }

function log(text, kind = "", time = null) {
  const list = $("#train-log");
  const stamp = time ? new Date(time * 1000).toLocaleTimeString() + "  " : "";
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 30;
  list.append(el("li", { class: kind, text: stamp + text }));
  while (list.children.length > MAX_LOG) list.firstChild.remove();
  if (nearBottom) list.scrollTop = list.scrollHeight;
}
