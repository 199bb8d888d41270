// Runs page, run detail: the probe's scores of every validation point (wonderland/probe.py) with
// the best step marked: the checkpoint the run serves, unless one is picked (Compare, RUN@STEP).
import { el, fmt } from "./util.js";

export function checkpointTable(r) {
  const rows = r.checkpoints || [];
  if (!rows.length) return el("p", { class: "hint", text: "No scored checkpoints: this run has no validation point with a probe yet." });
  const kept = new Set(r.kept_steps || []);
  return el("div", { class: "table-wrap" },
    el("h3", { text: `Checkpoints (best: step ${r.best_step ?? "–"}, served as the run's adapter)` }),
    el("table", { class: "checkpoints" },
      el("thead", {}, el("tr", {}, ["step", "val loss", "persona margin ↑", "retention drift ↓", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, rows.map((c) => el("tr", { class: c.step === r.best_step ? "best" : "", dataset: { step: c.step } },
        el("td", { text: c.step }), el("td", { text: fmt(c.val_loss) }), el("td", { text: fmt(c.persona_margin) }),
        el("td", { text: fmt(c.retention_drift) }),
        el("td", {}, c.step === r.best_step ? el("span", { class: "tag best", text: "best" }) : null, " ",
          kept.has(c.step) ? el("span", { class: "tag", text: "kept" }) : null))))));
}
