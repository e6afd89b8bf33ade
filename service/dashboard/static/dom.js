// DOM building and formatting helpers. Text always goes in as text nodes (never innerHTML):
// completions and event messages are untrusted.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function empty(text) {
  return h("p", { class: "empty" }, text);
}

export function errorBox(message) {
  return h("p", { class: "error-box", role: "alert" }, message);
}

const ACTIVE = new Set(["validating_files", "queued", "running"]);
export const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];

export function isActive(status) {
  return ACTIVE.has(status);
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status.replace("_", " "));
}

export function levelBadge(level) {
  return h("span", { class: `badge level-${level}` }, level);
}

export function num(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (value !== 0 && Math.abs(value) < 1e-4) return value.toExponential(1); // learning rates, say
  return Number(value.toFixed(digits)).toString();
}

export function dateTime(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function ago(unix) {
  if (!unix) return "—";
  return `${duration(Date.now() / 1000 - unix)} ago`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function eta(job) {
  if (job.status !== "running" || !job.estimated_finish) return "—";
  const left = job.estimated_finish - Date.now() / 1000;
  return left <= 0 ? "any moment" : `~${duration(left)}`;
}

export function progressBar(step, total) {
  if (!total) return h("span", { class: "muted" }, "—");
  const pct = Math.min(100, Math.round((100 * step) / total));
  return h(
    "span",
    { class: "progress", title: `${pct}%` },
    h("progress", { max: total, value: step }),
    h("span", { class: "progress-text" }, `${step}/${total}`),
  );
}

export function rewardClass(reward) {
  if (reward === null || reward === undefined) return "";
  return reward >= 0.75 ? "good" : reward >= 0.25 ? "mid" : "bad";
}

export function keyValueTable(entries) {
  return h(
    "table",
    { class: "kv" },
    h("tbody", null, entries.map(([k, v]) => h("tr", null, h("th", { scope: "row" }, k), h("td", null, v)))),
  );
}

export function pretty(value) {
  return JSON.stringify(value, null, 2);
}

// GET /v1/models as a <select>'s options: base models, then the project's fine-tuned models and
// checkpoints (`ft:...`).
export function modelOptions(select, models) {
  const base = models.filter((m) => !m.id.startsWith("ft:"));
  const tuned = models.filter((m) => m.id.startsWith("ft:"));
  replace(
    select,
    h("optgroup", { label: "Base models" }, base.map((m) => h("option", { value: m.id }, m.id))),
    tuned.length ? h("optgroup", { label: "Fine-tuned models and checkpoints" }, tuned.map((m) => h("option", { value: m.id }, m.id))) : null,
  );
}
