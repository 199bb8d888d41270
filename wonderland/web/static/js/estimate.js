// Train page: the pre-flight memory estimate (POST /api/train/estimate) of the form's settings, under the
// Train button; a warning with what to change when the run will not fit. Refreshed on every change.
import { $, api } from "./util.js";

let timer = null;
let asked = 0;

export function init() {
  const form = $("#train-form");
  form.addEventListener("input", schedule);
  form.addEventListener("change", schedule);
  $("#presets").addEventListener("click", schedule);  // a preset fills the fields without an input event
  schedule();
}

function schedule() { clearTimeout(timer); timer = setTimeout(refresh, 300); }

function formConfig() {
  const config = {};
  for (const input of $("#train-form").querySelectorAll('[name^="cfg."]')) {
    if (input.value !== "") config[input.name.slice(4)] = input.value;  // the server converts "0.001"
  }
  return config;
}

async function refresh() {
  const box = $("#train-estimate");
  const mine = ++asked;
  let answer;
  try { answer = await api("/api/train/estimate", { method: "POST", body: { config: formConfig() } }); }
  catch (err) { if (mine === asked) show(box, "", ""); return; }  // a bad field: the form says so on Train
  if (mine !== asked) return;  // a newer request is on its way
  const est = answer.estimate;
  if (!est) { show(box, answer.reason || "", ""); return; }
  const gb = est.gb;
  const free = est.free_gb === null ? "" : ` of ${est.free_gb} GB ${est.where}`;
  const parts = `weights ${gb.weights}, LoRA + optimizer ${(gb.lora + gb.optimizer).toFixed(2)}, activations ${gb.activations}`;
  show(box, est.warning || `Memory: ~${gb.total.toFixed(2)} GB${free} (${parts})`, est.fits ? "" : "error");
  box.dataset.totalGb = gb.total;
  box.dataset.fits = est.fits ? "1" : "0";
}

function show(box, text, kind) { box.textContent = text; box.className = `msg estimate ${kind}`; }
