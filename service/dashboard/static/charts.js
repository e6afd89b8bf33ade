// A small line chart drawn as inline SVG: axes with nice ticks, unit labels, a legend, optional
// horizontal reference lines (the baseline, the KL limit) and a crosshair that reads values out.

import { h, num } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#1f4fd1", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#e67700", "#495057"];
const MARGIN = { top: 12, right: 14, bottom: 38, left: 56 };

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const child of children) if (child) el.append(child);
  return el;
}

function niceStep(range, count) {
  const raw = range / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / magnitude;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * magnitude;
}

function domain(values, fixed, count) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (fixed) {
    lo = Math.min(lo, fixed[0]);
    hi = Math.max(hi, fixed[1]);
  }
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) > 1e-12 ? Math.abs(hi) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const step = niceStep(hi - lo, count);
  return { lo: Math.floor(lo / step + 1e-9) * step, hi: Math.ceil(hi / step - 1e-9) * step, step };
}

function tickLabel(value, step) {
  if (Math.abs(value) >= 10000) return `${num(value / 1000, 1)}k`;
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  return Math.abs(value) < step / 1e6 ? "0" : value.toFixed(decimals);
}

// A reference line far outside the data (a KL limit of 0.5 over KLs of 0.01) would flatten the
// curves; it is then named in the legend but not drawn.
function offScale(value, drawn, fixed) {
  const ys = drawn.flatMap((sr) => sr.points.map((p) => p[1])).concat(fixed || []);
  const lo = Math.min(...ys);
  const hi = Math.max(...ys);
  const span = Math.max(hi - lo, Math.abs(hi) * 0.1, 1e-9);
  return value < lo - 2 * span || value > hi + 2 * span;
}

function pathOf(points, x, y) {
  return points.map(([px, py], i) => `${i ? "L" : "M"}${x(px).toFixed(1)},${y(py).toFixed(1)}`).join("");
}

function clean(points) {
  return (points || []).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)).sort((a, b) => a[0] - b[0]);
}

/**
 * A `<figure>` with the chart, sized to `width` CSS pixels.
 * spec: {title, unit, series: [{name, points: [[step, y]], color?, dashed?}], hlines?: [{y, label, color?}],
 *        yFixed?: [lo, hi] (always shown), emptyText, height?}
 */
export function lineChart(spec, width) {
  const series = spec.series.map((sr, i) => ({ ...sr, color: sr.color || PALETTE[i % PALETTE.length], points: clean(sr.points) }));
  const drawn = series.filter((sr) => sr.points.length);
  let hlines = (spec.hlines || []).filter((l) => Number.isFinite(l.y));
  const figure = h("figure", { class: "chart", "data-chart": spec.id || spec.title });
  figure.append(h("figcaption", null, spec.title, h("span", { class: "unit" }, spec.unit ? ` (${spec.unit})` : "")));
  if (!drawn.length) {
    figure.append(h("p", { class: "empty chart-empty" }, spec.emptyText || "No data yet."));
    return figure;
  }
  hlines = hlines.map((l) => ({ ...l, offScale: offScale(l.y, drawn, spec.yFixed) }));
  const legendItems = drawn.map((sr) =>
    h("span", { class: "legend-item" }, h("i", { class: `swatch${sr.dashed ? " dashed" : ""}`, "data-color": sr.color }), sr.name),
  );
  for (const l of hlines) {
    const text = `${l.label} ${num(l.y)}${l.offScale ? " (off the scale)" : ""}`;
    legendItems.push(h("span", { class: "legend-item" }, h("i", { class: "swatch ref", "data-color": l.color || "#868e96" }), text));
  }
  hlines = hlines.filter((l) => !l.offScale);
  const legend = h("div", { class: "legend" }, legendItems);
  for (const sw of legend.querySelectorAll("[data-color]")) sw.style.setProperty("--c", sw.dataset.color);
  const readout = h("div", { class: "readout" }, "\u00a0");
  figure.append(legend);

  const W = Math.max(260, Math.floor(width));
  const H = spec.height || (W < 480 ? 190 : 230);
  const plotW = W - MARGIN.left - MARGIN.right;
  const plotH = H - MARGIN.top - MARGIN.bottom;
  const xs = drawn.flatMap((sr) => sr.points.map((p) => p[0]));
  let xLo = Math.min(...xs);
  let xHi = Math.max(...xs);
  if (xHi === xLo) {
    xLo = Math.max(0, xLo - 1);
    xHi = xLo + 2;
  }
  const yVals = drawn.flatMap((sr) => sr.points.map((p) => p[1])).concat(hlines.map((l) => l.y));
  const yd = domain(yVals, spec.yFixed, H < 200 ? 4 : 5);
  const x = (v) => MARGIN.left + ((v - xLo) / (xHi - xLo)) * plotW;
  const y = (v) => MARGIN.top + plotH - ((v - yd.lo) / (yd.hi - yd.lo)) * plotH;

  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title });
  const grid = s("g", { class: "grid" });
  for (let v = yd.lo; v <= yd.hi + yd.step / 2; v += yd.step) {
    grid.append(s("line", { x1: MARGIN.left, x2: W - MARGIN.right, y1: y(v), y2: y(v) }));
    const label = s("text", { x: MARGIN.left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" });
    label.textContent = tickLabel(v, yd.step);
    grid.append(label);
  }
  const xStep = Math.max(1, niceStep(xHi - xLo, Math.max(2, Math.floor(plotW / 70))));
  for (let v = Math.ceil(xLo / xStep) * xStep; v <= xHi + 1e-9; v += xStep) {
    grid.append(s("line", { x1: x(v), x2: x(v), y1: MARGIN.top + plotH, y2: MARGIN.top + plotH + 5, class: "xtick" }));
    const label = s("text", { x: x(v), y: MARGIN.top + plotH + 18, "text-anchor": "middle", class: "tick" });
    label.textContent = tickLabel(v, xStep);
    grid.append(label);
  }
  svg.append(grid);
  svg.append(s("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH }));
  svg.append(s("line", { class: "axis", x1: MARGIN.left, x2: W - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH }));
  const xTitle = s("text", { x: MARGIN.left + plotW / 2, y: H - 4, "text-anchor": "middle", class: "axis-title" });
  xTitle.textContent = "training step";
  const yTitle = s("text", { x: -(MARGIN.top + plotH / 2), y: 13, transform: "rotate(-90)", "text-anchor": "middle", class: "axis-title" });
  yTitle.textContent = spec.unit || "";
  svg.append(xTitle, yTitle);

  for (const l of hlines) {
    svg.append(s("line", { class: "ref-line", x1: MARGIN.left, x2: W - MARGIN.right, y1: y(l.y), y2: y(l.y), stroke: l.color || "#868e96", "data-ref": l.label }));
  }
  for (const sr of drawn) {
    svg.append(s("path", { d: pathOf(sr.points, x, y), class: "series", stroke: sr.color, "stroke-dasharray": sr.dashed ? "5 4" : null, "data-series": sr.name }));
    if (sr.points.length <= 400) {
      const dots = s("g", { fill: sr.color, "data-series": sr.name });
      for (const [px, py] of sr.points) {
        const dot = s("circle", { class: "pt", cx: x(px).toFixed(1), cy: y(py).toFixed(1), r: sr.points.length > 60 ? 1.6 : 2.6 });
        dot.append(s("title", null, document.createTextNode(`${sr.name}, step ${px}: ${num(py, 4)}`)));
        dots.append(dot);
      }
      svg.append(dots);
    }
  }
  svg.append(crosshair(svg, drawn, { x, y, xLo, xHi, plotW, plotH }, readout));
  figure.append(svg, readout);
  return figure;
}

function crosshair(svg, drawn, geo, readout) {
  const group = s("g", { class: "crosshair", visibility: "hidden" });
  const line = s("line", { y1: MARGIN.top, y2: MARGIN.top + geo.plotH });
  group.append(line);
  const steps = [...new Set(drawn.flatMap((sr) => sr.points.map((p) => p[0])))].sort((a, b) => a - b);
  const move = (event) => {
    const box = svg.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * Number(svg.getAttribute("width"));
    const value = geo.xLo + ((px - MARGIN.left) / geo.plotW) * (geo.xHi - geo.xLo);
    let best = steps[0];
    for (const st of steps) if (Math.abs(st - value) < Math.abs(best - value)) best = st;
    line.setAttribute("x1", geo.x(best));
    line.setAttribute("x2", geo.x(best));
    group.setAttribute("visibility", "visible");
    const parts = drawn
      .map((sr) => [sr.name, sr.points.find((p) => p[0] === best)])
      .filter(([, p]) => p)
      .map(([name, p]) => `${name} ${num(p[1], 4)}`);
    readout.textContent = `step ${best}: ${parts.join(" · ")}`;
  };
  svg.addEventListener("pointermove", move);
  svg.addEventListener("pointerleave", () => {
    group.setAttribute("visibility", "hidden");
    readout.textContent = "\u00a0";
  });
  return group;
}
