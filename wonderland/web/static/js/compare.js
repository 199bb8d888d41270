// Compare page: one prompt, Base / Prompted / Trained (and Ollama) columns. All columns stream
// over ONE fetch response (multiplexed by column), so the page never uses more than one
// connection for them, whatever the number of columns.
import { $, api, bus, el, fillSelect, fmt, readEventStream, toast } from "./util.js";

const TITLES = { base: "Base", prompted: "Prompted", trained: "Trained", ollama: "Ollama" };
let options = null;
let genSchema = [];
let ollama = null;      // /api/ollama's answer, once asked
let history = {};       // column -> [{role, content}] (each column keeps its own conversation)
let columns = [];       // column names shown
let busy = false;
let controller = null;
let pollTimer = null;
let usableRuns = [];    // /api/runs' runs that have an adapter (with their checkpoints)

export async function init() {
  [options, { generation: genSchema }] = await Promise.all([api("/api/compare/options"), api("/api/config")]);
  $("#gen-fields").replaceChildren(...genSchema.map((f) => el("label", { class: "field", title: f.help },
    el("span", { text: f.name.replace("repetition_penalty", "rep. penalty").replace("max_tokens", "max tokens").replace("top_p", "top-p") }),
    el("input", { type: "number", name: `gen.${f.name}`, value: f.default, step: f.type === "int" ? "1" : "0.05", min: "0" }))));
  $("#suggestions").replaceChildren(...options.suggested_prompts.map((p) => el("button", { type: "button", text: p, onclick: () => send(p) })));
  $("#compare-form").addEventListener("submit", (e) => { e.preventDefault(); send($("#prompt").value); });
  $("#prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send($("#prompt").value); } });
  $("#reset-btn").addEventListener("click", reset);
  $("#compare-run").addEventListener("change", () => { fillCheckpoints(); reset(); warm(); });
  $("#compare-checkpoint").addEventListener("change", () => { reset(); warm(); });
  bus.on("compare-run", async (name) => { await refreshRuns(name); location.hash = "#compare"; });
  bus.on("runs-changed", () => refreshRuns());
}

export async function show() {
  ollama = await api("/api/ollama");
  await refreshRuns();
  buildColumns();
}

async function refreshRuns(pick) {
  const { runs } = await api("/api/runs");
  const usable = usableRuns = runs.filter((r) => r.has_adapter);
  const select = $("#compare-run");
  const before = select.value;
  fillSelect(select, usable, pick || before, (r) => `${r.name}${r.character ? ` (${r.character})` : ""}`);
  $("#compare-empty").hidden = usable.length > 0;
  fillCheckpoints();
  if (select.value && select.value !== before) { reset(); warm(); }
}

// The run's kept checkpoints; the first choice (value "") is the best, what the run serves.
function fillCheckpoints() {
  const picker = $("#compare-checkpoint");
  const r = usableRuns.find((x) => x.name === $("#compare-run").value);
  const before = picker.dataset.run === r?.name ? picker.value : "";
  const scores = new Map((r?.checkpoints || []).map((c) => [c.step, c]));
  const label = (s) => { const c = scores.get(s); return `step ${s}` + (c ? ` · margin ${fmt(c.persona_margin)} · drift ${fmt(c.retention_drift)}` : ""); };
  picker.replaceChildren(el("option", { value: "", text: r?.best_step != null ? `best (step ${r.best_step})` : "the run's adapter" }),
    ...(r?.kept_steps || []).map((s) => el("option", { value: String(s), text: label(s) + (s === r.best_step ? " (best)" : "") })));
  picker.value = [...picker.options].some((o) => o.value === before) ? before : "";
  picker.dataset.run = r?.name ?? "";
  picker.closest("label").hidden = !r || !(r.kept_steps || []).length;
}

function checkpoint() {
  const v = $("#compare-checkpoint").value;
  return v === "" ? null : Number(v);
}

function buildColumns() {
  columns = [...options.columns.map((c) => c.name), "ollama"];
  const description = Object.fromEntries(options.columns.map((c) => [c.name, c.description]));
  if (checkpoint() !== null) description.trained += ` (checkpoint step ${checkpoint()})`;
  description.ollama = ollama?.available ? `${ollama.model}, the run's character system prompt` : "optional: a local Ollama server";
  const existing = new Map([...$("#columns").children].map((c) => [c.dataset.column, c]));
  $("#columns").replaceChildren(...columns.map((name) => {
    const col = existing.get(name) || el("div", { class: `column ${name}`, dataset: { column: name } },
      el("header", {}, el("b", { text: TITLES[name] }), el("small", {})), el("div", { class: "thread" }));
    col.querySelector("small").textContent = description[name];
    const thread = col.querySelector(".thread");
    if (name === "ollama") thread.querySelectorAll(".bubble.note").forEach((n) => n.remove());
    if (name === "ollama" && ollama && !ollama.available && !thread.children.length) {
      thread.append(el("div", { class: "bubble note", text: `${ollama.message}. Start one with \`ollama serve\` (OLLAMA_HOST=${ollama.host}) to add this column.` }));
    }
    return col;
  }));
}

function reset() {
  if (controller) controller.abort();
  history = {};
  for (const t of document.querySelectorAll("#columns .thread")) t.replaceChildren();
  buildColumns();
}

async function warm() {
  const run = $("#compare-run").value;
  if (!run) return;
  const step = checkpoint();
  try { const s = await api("/api/model/load", { method: "POST", body: { run, checkpoint: step } }); modelState(s.state); }
  catch (err) { modelState("error"); toast(err.message, "error"); return; }
  clearTimeout(pollTimer);
  const poll = async () => {
    const s = await api(`/api/model?run=${encodeURIComponent(run)}${step === null ? "" : `&checkpoint=${step}`}`);
    modelState(s.state);
    if (s.state === "loading") pollTimer = setTimeout(poll, 1000);
  };
  poll();
}

function modelState(state) {
  const badge = $("#model-state");
  const label = state === "ready" ? "model ready" : state === "loading" ? "loading model…" : state.startsWith("error") ? "model failed to load" : "model not loaded";
  badge.textContent = label;
  badge.title = state;
  badge.className = `badge ${state.split(":")[0]}`;
}

function gen() {
  const out = {};
  for (const f of genSchema) {
    const v = document.querySelector(`[name="gen.${f.name}"]`).value;
    if (v !== "") out[f.name] = Number(v);
  }
  return out;
}

async function send(text) {
  const prompt = (text || "").trim();
  const run = $("#compare-run").value;
  if (!prompt || busy) return;
  if (!run) { toast("train a run first: Compare needs a finished adapter", "error"); return; }
  const active = columns.filter((c) => c !== "ollama" || ollama?.available);
  busy = true;
  $("#send-btn").disabled = true;
  $("#prompt").value = "";
  const bubbles = {};
  for (const name of active) {
    const thread = document.querySelector(`.column.${name} .thread`);
    thread.append(el("div", { class: "bubble user", text: prompt }));
    bubbles[name] = el("div", { class: "bubble assistant pending" });
    thread.append(bubbles[name]);
    thread.scrollTop = thread.scrollHeight;
  }
  const body = { run, checkpoint: checkpoint(), prompt, columns: active, gen: gen(), history };
  controller = new AbortController();
  try {
    const response = await fetch("/api/compare", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error; } catch { /* not JSON */ }
      throw new Error(message);
    }
    await readEventStream(response, (type, data) => onEvent(type, data, bubbles, prompt), controller.signal);
  } catch (err) {
    if (err.name !== "AbortError") {
      toast(err.message, "error");
      for (const b of Object.values(bubbles)) if (b.classList.contains("pending")) { b.classList.remove("pending"); b.classList.add("error"); b.textContent = err.message; }
    }
  } finally {
    busy = false;
    $("#send-btn").disabled = false;
    controller = null;
  }
}

function onEvent(type, data, bubbles, prompt) {
  const bubble = bubbles[data.column];
  if (type === "status") {
    if (data.state === "loading") { bubble.dataset.loading = "1"; bubble.textContent = "loading the model (first time only)…"; modelState("loading"); }
    if (data.state === "ready" && bubble.dataset.loading) { delete bubble.dataset.loading; bubble.textContent = ""; if (data.column !== "ollama") modelState("ready"); }
  } else if (type === "token") {
    if (bubble.dataset.loading) { delete bubble.dataset.loading; bubble.textContent = ""; }
    bubble.append(document.createTextNode(data.text));
    const thread = bubble.parentElement;
    if (thread.scrollHeight - thread.scrollTop - thread.clientHeight < 80) thread.scrollTop = thread.scrollHeight;
  } else if (type === "done") {
    bubble.classList.remove("pending");
    if (!data.text.trim()) bubble.append(el("em", { text: "(empty reply)" }));
    (history[data.column] ||= []).push({ role: "user", content: prompt }, { role: "assistant", content: data.text.trim() });
  } else if (type === "error") {
    bubble.classList.remove("pending");
    bubble.classList.add(data.unavailable ? "note" : "error");
    bubble.textContent = data.message;
  }
}
