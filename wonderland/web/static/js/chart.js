// Loss charts (uPlot, vendored from npm): train loss per step, validation loss per evaluation.

function seriesData(curve) {
  // uPlot wants one x array: merge the step and evaluation x values, null where a series has none.
  const xs = Array.from(new Set([...curve.step, ...curve.val_step])).sort((a, b) => a - b);
  const train = new Map(curve.step.map((s, i) => [s, curve.loss[i]]));
  const val = new Map(curve.val_step.map((s, i) => [s, curve.val_loss[i]]));
  return [xs, xs.map((x) => train.get(x) ?? null), xs.map((x) => val.get(x) ?? null)];
}

// The best checkpoint by the rule of wonderland/probe.py best() (keep MAX_DRIFT equal to its
// MAX_DRIFT; a test compares them): among the rows whose retention_drift is at most MAX_DRIFT (or
// unknown), the highest persona_margin; if none qualifies, the least drift; ties to the earlier step.
export const MAX_DRIFT = 0.25;

export function bestStep(rows) {
  const scored = rows.filter((r) => r.persona_margin !== null && r.persona_margin !== undefined);
  if (!scored.length) return null;
  const ok = scored.filter((r) => r.retention_drift === null || r.retention_drift === undefined || r.retention_drift <= MAX_DRIFT);
  const key = ok.length ? (r) => [-r.persona_margin, r.step] : (r) => [r.retention_drift, r.step];
  const pool = ok.length ? ok : scored;
  return pool.reduce((a, b) => { const [ka, kb] = [key(a), key(b)]; return kb[0] < ka[0] || (kb[0] === ka[0] && kb[1] < ka[1]) ? b : a; }).step;
}

// A dashed vertical line at the best step, drawn over the plot (a uPlot draw hook).
function drawBest(u, step) {
  if (step === null || step === undefined) return;
  const x = u.valToPos(step, "x", true);
  if (!Number.isFinite(x) || x < u.bbox.left - 1 || x > u.bbox.left + u.bbox.width + 1) return;
  const ctx = u.ctx, dpr = window.devicePixelRatio || 1;
  ctx.save();
  ctx.strokeStyle = "#2f8f5b"; ctx.fillStyle = "#2f8f5b"; ctx.lineWidth = 2 * dpr; ctx.setLineDash([5 * dpr, 4 * dpr]);
  ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
  ctx.font = `${11 * dpr}px sans-serif`; ctx.textAlign = x > u.bbox.left + u.bbox.width / 2 ? "right" : "left";
  ctx.fillText(`best: step ${step}`, x + (ctx.textAlign === "left" ? 4 : -4) * dpr, u.bbox.top + 12 * dpr);
  ctx.restore();
}

export class LossChart {
  constructor(container, { height = 260, compact = false } = {}) {
    this.container = container;
    this.height = height;
    this.curve = { step: [], loss: [], val_step: [], val_loss: [] };
    this.best = null;     // the best step (marked), from the server's curve.best_step or the scores below
    this.scores = [];     // probe rows of the eval events seen live: {step, persona_margin, retention_drift}
    const opts = {
      hooks: { draw: [(u) => drawBest(u, this.best)] },
      width: Math.max(container.clientWidth, 280), height,
      scales: { x: { time: false } },
      legend: { show: !compact },
      cursor: { drag: { x: true, y: false } },
      axes: [
        { label: compact ? undefined : "step", stroke: "#6c6778", grid: { stroke: "#eee9df" },
          incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000] },  // whole steps only
        { label: compact ? undefined : "loss", stroke: "#6c6778", grid: { stroke: "#eee9df" }, size: 50 },
      ],
      series: [
        { label: "step" },
        { label: "train loss", stroke: "#6a4bc4", width: 2, spanGaps: true, points: { show: false }, value: (u, v) => v == null ? "–" : v.toFixed(3) },
        { label: "val loss", stroke: "#d08a2e", width: 2, dash: [6, 4], spanGaps: true, points: { show: true, size: 7, fill: "#d08a2e" },
          value: (u, v) => v == null ? "–" : v.toFixed(3) },
      ],
    };
    this.plot = new uPlot(opts, seriesData(this.curve), container);
    this.observer = new ResizeObserver(() => {
      const width = Math.max(container.clientWidth, 280);
      if (Math.abs(width - this.plot.width) > 2) this.plot.setSize({ width, height: this.height });
    });
    this.observer.observe(container);
  }
  set(curve) {
    this.curve = { step: [...curve.step], loss: [...curve.loss], val_step: [...curve.val_step], val_loss: [...curve.val_loss] };
    this.scores = [];
    this.best = curve.best_step ?? null;
    this.redraw();
  }
  reset() { this.set({ step: [], loss: [], val_step: [], val_loss: [] }); }
  addStep(step, loss) { this.curve.step.push(step); this.curve.loss.push(loss); this.redraw(); }
  // An eval event: its val loss, and its probe scores (when it has them) move the best step so far.
  addEval(step, valLoss, score = null) {
    this.curve.val_step.push(step); this.curve.val_loss.push(valLoss);
    if (score && score.persona_margin !== null && score.persona_margin !== undefined) {
      this.scores = [...this.scores.filter((r) => r.step !== step), { step, ...score }];  // a resumed run may score a step again
      this.best = bestStep(this.scores);
    }
    this.redraw();
  }
  get points() { return this.curve.step.length + this.curve.val_step.length; }
  redraw() {
    this.plot.setData(seriesData(this.curve));
    this.container.dataset.points = this.points;  // for tests and curious users: how many points are drawn
    this.container.dataset.bestStep = this.best ?? "";
    this.container.title = this.best === null ? "" : `best checkpoint so far: step ${this.best}`;
  }
  destroy() { this.observer.disconnect(); this.plot.destroy(); }
}

// A dependency-free inline SVG sparkline for the runs table.
export function sparkline(curve, width = 120, height = 28) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height); svg.setAttribute("class", "spark");
  const finite = (steps, values) => steps.map((s, i) => [s, values[i]]).filter(([, v]) => Number.isFinite(v));
  const train = finite(curve.step, curve.loss), val = finite(curve.val_step, curve.val_loss);  // a NaN loss is stored as null
  const ys = [...train, ...val].map(([, v]) => v);
  const xs = [...train, ...val].map(([s]) => s);
  if (ys.length < 2) return svg;
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const px = (x) => 2 + ((x - x0) / ((x1 - x0) || 1)) * (width - 4);
  const py = (y) => 2 + (1 - (y - y0) / ((y1 - y0) || 1)) * (height - 4);
  for (const [points, color] of [[train, "#6a4bc4"], [val, "#d08a2e"]]) {
    if (points.length < 2) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.map(([s, v]) => `${px(s).toFixed(1)},${py(v).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "1.5");
    svg.append(line);
  }
  return svg;
}
