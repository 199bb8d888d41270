// Loss charts (uPlot, vendored from npm): train loss per step, validation loss per evaluation.

function seriesData(curve) {
  // uPlot wants one x array: merge the step and evaluation x values, null where a series has none.
  const xs = Array.from(new Set([...curve.step, ...curve.val_step])).sort((a, b) => a - b);
  const train = new Map(curve.step.map((s, i) => [s, curve.loss[i]]));
  const val = new Map(curve.val_step.map((s, i) => [s, curve.val_loss[i]]));
  return [xs, xs.map((x) => train.get(x) ?? null), xs.map((x) => val.get(x) ?? null)];
}

export class LossChart {
  constructor(container, { height = 260, compact = false } = {}) {
    this.container = container;
    this.height = height;
    this.curve = { step: [], loss: [], val_step: [], val_loss: [] };
    const opts = {
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
  set(curve) { this.curve = { step: [...curve.step], loss: [...curve.loss], val_step: [...curve.val_step], val_loss: [...curve.val_loss] }; this.redraw(); }
  reset() { this.set({ step: [], loss: [], val_step: [], val_loss: [] }); }
  addStep(step, loss) { this.curve.step.push(step); this.curve.loss.push(loss); this.redraw(); }
  addEval(step, valLoss) { this.curve.val_step.push(step); this.curve.val_loss.push(valLoss); this.redraw(); }
  get points() { return this.curve.step.length + this.curve.val_step.length; }
  redraw() {
    this.plot.setData(seriesData(this.curve));
    this.container.dataset.points = this.points;  // for tests and curious users: how many points are drawn
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
