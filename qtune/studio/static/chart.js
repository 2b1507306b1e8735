// qtune studio: the loss chart, an SVG of the training and held-out loss built once per container and
// updated in place as a run logs (no flicker while polling); it redraws itself when its box is resized.
"use strict";

(function (studio) {
  const { el, svg, setText, formatNumber } = studio;

  function niceTicks(lo, hi, count, minStep = 0) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo;
    const step0 = span / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(step0));
    const norm = step0 / mag;
    const step = Math.max(minStep, (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag);
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(12));
    return { ticks, step };
  }

  function tickLabel(v, step) {
    if (step >= 1) return String(Math.round(v));
    const digits = Math.min(6, Math.max(0, -Math.floor(Math.log10(step))));
    return v.toFixed(digits);
  }

  class LossChart {
    constructor(box, emptyText) {
      this.box = box;
      this.emptyText = emptyText;
      this.data = { loss: [], eval_loss: [] };
      this.key = null;
      this.svg = svg("svg", { class: "loss-chart", role: "img", "aria-label": "training and held-out loss" });
      this.grid = svg("g", { class: "grid" });
      this.axes = svg("g", { class: "axes" });
      this.train = svg("path", { class: "train-loss", fill: "none" });
      this.evalPath = svg("path", { class: "eval-loss", fill: "none" });
      this.evalDots = svg("g", { class: "eval-dots" });
      this.trainDots = svg("g", { class: "train-dots" });
      this.empty = svg("text", { class: "chart-empty", "text-anchor": "middle" });
      this.legend = el("div", { class: "chart-legend" },
        el("span", { class: "key key-train" }, "training loss"),
        el("span", { class: "key key-eval" }, "held-out loss"));
      this.svg.append(this.grid, this.axes, this.train, this.trainDots, this.empty);
      box.append(this.svg, this.legend);
      this.width = 0;
      new ResizeObserver(() => {
        const w = Math.round(this.box.clientWidth);
        if (w && w !== this.width) this.draw();
      }).observe(box);
    }

    update(loss, evalLoss) {
      loss = Array.isArray(loss) ? loss : [];
      evalLoss = Array.isArray(evalLoss) ? evalLoss : [];
      const key = `${loss.length}:${evalLoss.length}:${loss.length ? loss[loss.length - 1].join() : ""}:` +
        `${evalLoss.length ? evalLoss[evalLoss.length - 1].join() : ""}`;
      this.data = { loss, eval_loss: evalLoss };
      if (key === this.key && this.width === Math.round(this.box.clientWidth)) return;
      this.key = key;
      this.draw();
    }

    draw() {
      const W = Math.max(320, Math.round(this.box.clientWidth) || 640);
      const H = 240;
      this.width = Math.round(this.box.clientWidth);
      const m = { l: 48, r: 14, t: 12, b: 28 };
      this.svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
      this.svg.setAttribute("width", W);
      this.svg.setAttribute("height", H);
      const { loss, eval_loss: ev } = this.data;
      const all = loss.concat(ev).filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]));
      this.grid.replaceChildren();
      this.axes.replaceChildren();
      this.legend.classList.toggle("no-eval", ev.length === 0);
      if (!all.length) {
        this.train.setAttribute("d", "");
        this.trainDots.replaceChildren();
        if (this.evalPath.isConnected) { this.evalPath.remove(); this.evalDots.remove(); }
        this.empty.setAttribute("x", W / 2);
        this.empty.setAttribute("y", H / 2);
        setText(this.empty, this.emptyText);
        this.legend.hidden = true;
        return;
      }
      this.legend.hidden = false;
      setText(this.empty, "");
      let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
      let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
      if (x1 === x0) { x0 = Math.max(0, x0 - 1); x1 = x1 + 1; }
      const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 0.1;
      y0 -= pad; y1 += pad;
      if (y0 < 0 && Math.min(...all.map((p) => p[1])) >= 0) y0 = 0;
      const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
      const Y = (v) => m.t + (1 - (v - y0) / (y1 - y0)) * (H - m.t - m.b);

      const yt = niceTicks(y0, y1, 4);
      for (const v of yt.ticks) {
        if (v < y0 || v > y1) continue;
        const y = Y(v).toFixed(1);
        this.grid.append(svg("line", { x1: m.l, x2: W - m.r, y1: y, y2: y }));
        this.axes.append(svg("text", { x: m.l - 6, y, dy: "0.32em", "text-anchor": "end" }, tickLabel(v, yt.step)));
      }
      const xt = niceTicks(x0, x1, Math.max(2, Math.floor((W - m.l - m.r) / 90)), 1); // steps are whole numbers
      for (const v of xt.ticks) {
        if (v < x0 || v > x1) continue;
        const x = X(v).toFixed(1);
        this.axes.append(svg("line", { class: "tick", x1: x, x2: x, y1: H - m.b, y2: H - m.b + 4 }));
        this.axes.append(svg("text", { x, y: H - m.b + 16, "text-anchor": "middle" }, tickLabel(v, Math.max(1, xt.step))));
      }
      this.axes.append(svg("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
      this.axes.append(svg("text", { class: "axis-title", x: W - m.r, y: H - 2, "text-anchor": "end" }, "step"));

      const line = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      this.train.setAttribute("d", line(loss));
      // a line needs two points: a run with one logged loss shows it as a dot
      this.trainDots.replaceChildren(...(loss.length < 3 ? loss : []).map((p) =>
        svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3 },
          svg("title", null, `step ${p[0]}: training loss ${formatNumber(p[1])}`))));
      if (ev.length) {
        if (!this.evalPath.isConnected) this.svg.append(this.evalPath, this.evalDots);
        this.evalPath.setAttribute("d", line(ev));
        this.evalDots.replaceChildren(...ev.map((p) =>
          svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3.5 },
            svg("title", null, `step ${p[0]}: held-out loss ${formatNumber(p[1])}`))));
      } else if (this.evalPath.isConnected) {
        this.evalPath.remove();
        this.evalDots.remove();
      }
    }
  }

  studio.LossChart = LossChart;
})(window.qtuneStudio);
