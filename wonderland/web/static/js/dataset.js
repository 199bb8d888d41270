// Dataset page: build from the default book or an upload, browse records, stats, download.
import { $, $$, api, bus, el, fillSelect, fmt, toast } from "./util.js";

const PER_PAGE = 15;
let current = null;   // dataset name shown
let split = "train";
let page = 1;

export async function init() {
  const form = $("#build-form");
  for (const radio of $$("input[name=book_source]", form)) {
    radio.addEventListener("change", () => { $("#upload-field").hidden = form.elements.book_source.value !== "upload"; });
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); build(form); });
  // Suggest the default book's speakers, fetched on first focus (reading the book takes ~1 s).
  form.elements.character.addEventListener("focus", suggestCharacters, { once: true });
  $("#dataset-select").addEventListener("change", (e) => select(e.target.value));
  for (const b of $$("#records-card .seg button")) {
    b.addEventListener("click", () => {
      split = b.dataset.split; page = 1;
      $$("#records-card .seg button").forEach((x) => x.classList.toggle("on", x === b));
      loadRecords();
    });
  }
  $("#prev-page").addEventListener("click", () => { if (page > 1) { page--; loadRecords(); } });
  $("#next-page").addEventListener("click", () => { page++; loadRecords(); });
  await refresh();
}

export function show() { refresh(); }

export async function refresh(selectName) {
  const { datasets } = await api("/api/datasets");
  const picker = $("#dataset-select");
  fillSelect(picker, datasets, selectName || current, (d) => `${d.name} (${d.character ?? "?"})`);
  bus.emit("datasets", datasets);
  $("#dataset-empty").hidden = datasets.length > 0;
  picker.hidden = datasets.length === 0;
  if (datasets.length) await select(picker.value);
  else { $("#dataset-stats").hidden = true; $("#records-card").hidden = true; }
}

async function build(form) {
  const msg = $("#build-msg"), button = $("#build-btn");
  const data = new FormData();
  for (const key of ["character", "aliases", "name"]) if (form.elements[key].value.trim()) data.append(key, form.elements[key].value.trim());
  if (form.elements.book_source.value === "upload") {
    const file = form.elements.book.files[0];
    if (!file) { msg.textContent = "choose a .txt file to upload"; msg.className = "msg error"; return; }
    data.append("book", file);
  }
  button.disabled = true; msg.className = "msg"; msg.textContent = "Reading the book and finding every line…";
  try {
    const result = await api("/api/datasets", { method: "POST", form: data });
    const s = result.stats;
    msg.className = "msg ok";
    msg.textContent = `Built “${result.name}”: ${s.character_utterances ?? "?"} lines by ${s.character}, ${s.train_records} train / ${s.valid_records} valid records, ${s.scene_records ?? 0} of them scenes.`;
    if (result.warnings.length) toast(result.warnings.join(" · "));
    current = null;
    await refresh(result.name);
  } catch (err) {
    msg.className = "msg error"; msg.textContent = err.message;
  } finally { button.disabled = false; }
}

async function suggestCharacters() {
  try {
    const { characters } = await api("/api/characters");
    $("#character-list").replaceChildren(...characters.map((c) => el("option", { value: c.name, label: `${c.lines} lines` })));
  } catch { /* suggestions are optional: the field still takes any name */ }
}

async function select(name) {
  if (name !== current) page = 1;
  current = name;
  const { stats } = await api(`/api/datasets/${encodeURIComponent(name)}`);
  const grid = $("#stat-grid");
  const cells = [
    [stats.character ?? "–", "character"], [bookTitle(stats.book), "book"],
    [fmt(stats.character_utterances), "lines spoken"], [fmt(stats.train_records), "train records"], [fmt(stats.valid_records), "valid records"],
    [fmt(stats.scene_records ?? 0), "scene records"],
  ];
  grid.replaceChildren(...cells.map(([v, k]) => el("div", { title: String(v), class: k === "book" ? "wide" : "" }, el("b", { text: v }), el("span", { text: k }))));
  // Prefer the character's own lines; fall back to every quoted span in the book.
  const own = stats.character_utterances_by_attribution;
  const spans = own || stats.spans_by_attribution || {};
  $("#attribution-title").textContent = own ? `How ${stats.character}'s lines were attributed` : "How the book's quoted lines were attributed";
  const total = Object.values(spans).reduce((a, b) => a + b, 0) || 1;
  $("#attribution-bars").replaceChildren(...Object.entries(spans).sort((a, b) => b[1] - a[1]).map(([kind, n]) =>
    el("div", { class: "bar" }, el("span", { text: kind }), el("div", { class: "track" }, el("i", { style: `width:${(100 * n / total).toFixed(1)}%` })), el("span", { class: "n", text: n }))));
  $("#system-prompt").textContent = stats.system_prompt || "–";
  $("#dl-train").href = `/api/datasets/${encodeURIComponent(name)}/download/train`;
  $("#dl-valid").href = `/api/datasets/${encodeURIComponent(name)}/download/valid`;
  $("#dataset-stats").hidden = false;
  bus.emit("dataset-selected", name);
  await loadRecords();
}

// A record as the conversation it trains on: every turn after the system prompt, role and text
// (a scene's user turns hold one "Speaker: ..." line per other speaker).
function conversation(rec) {
  const turns = rec.messages || [{ role: "user", content: rec.user }, { role: "assistant", content: rec.reply }];
  return el("ol", { class: "turns" }, turns.map((m) => el("li", { class: `turn ${m.role}` },
    el("span", { class: "role", text: m.role === "assistant" ? "character" : m.role }), el("span", { class: "text", text: m.content }))));
}

function bookTitle(book) {
  if (!book) return "–";
  if (typeof book === "string") return book.split("/").pop();
  return book.title || book.name || (book.path || "").split("/").pop() || "–";
}

async function loadRecords() {
  if (!current) return;
  const r = await api(`/api/datasets/${encodeURIComponent(current)}/records?split=${split}&page=${page}&per_page=${PER_PAGE}`);
  if (page > r.pages) { page = r.pages; return loadRecords(); }
  const offset = (r.page - 1) * r.per_page;
  $("#records-body").replaceChildren(...r.records.map((rec, i) => el("tr", { class: rec.scene ? "scene" : "" },
    el("td", { text: offset + i + 1 }), el("td", {}, conversation(rec)),
    el("td", {}, el("span", { class: "tag", text: rec.scene ? `scene · ${rec.messages.length} turns` : rec.kind ?? "–" }), " ",
      rec.attribution ? el("span", { class: "tag attr", text: rec.attribution }) : null))));
  $("#page-info").textContent = `page ${r.page} of ${r.pages} · ${r.total} records`;
  $("#prev-page").disabled = r.page <= 1;
  $("#next-page").disabled = r.page >= r.pages;
  $("#records-card").hidden = false;
}
