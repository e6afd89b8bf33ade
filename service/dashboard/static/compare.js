// Jobs side by side: one metric against the training step, one line per chosen job. The choice
// lives in the address (#/compare?jobs=a,b&metric=kl), so a comparison can be bookmarked.

import { EventLog, digest, listAll } from "./api.js";
import { PALETTE, lineChart } from "./charts.js";
import { errorBox, h, isActive, num, replace, statusBadge } from "./dom.js";

const POLL_MS = 4000;
// Offered first, in this order; any other number the metrics events carry follows.
const PREFERRED = ["train_reward_mean", "valid_reward_mean", "kl", "valid_kl", "loss", "entropy", "completion_tokens_mean", "tokens_per_second"];
const SKIP = new Set(["step", "total_steps"]);
const UNITS = {
  train_reward_mean: "mean reward",
  valid_reward_mean: "mean reward",
  kl: "nats / token",
  valid_kl: "nats / token",
  entropy: "nats / token",
  completion_tokens_mean: "tokens",
  tokens_per_second: "tokens / s",
};

// `valid_*` come from the evaluations, so validation curves start at the baseline (step 0).
export function pointsOf(d, metric) {
  if (metric === "valid_reward_mean") return d.evaluations.map((e) => [e.step, e.reward]);
  if (metric === "valid_kl") return d.evaluations.filter((e) => e.step > 0).map((e) => [e.step, e.kl]);
  return d.metrics.map((m) => [m.step, m[metric]]);
}

function metricNames(digests) {
  const found = new Set(PREFERRED.slice(0, 4));
  for (const d of digests) for (const m of d.metrics) for (const [k, v] of Object.entries(m)) if (!SKIP.has(k) && Number.isFinite(v)) found.add(k);
  const rest = [...found].filter((k) => !PREFERRED.includes(k)).sort();
  return PREFERRED.filter((k) => found.has(k)).concat(rest);
}

function label(job) {
  return job.user_provided_suffix ? `${job.id} (${job.user_provided_suffix})` : job.id;
}

export function renderCompare(root, [query], view) {
  const params = new URLSearchParams(query || "");
  const state = {
    jobs: [],
    chosen: (params.get("jobs") || "").split(",").filter(Boolean),
    metric: params.get("metric") || "train_reward_mean",
    logs: new Map(), // job id -> EventLog
  };
  const el = {
    picker: h("div", { class: "job-picker", id: "compare-jobs" }, h("p", { class: "muted" }, "Loading jobs…")),
    metric: h("select", { id: "compare-metric" }),
    chart: h("div", { class: "chart-cell", id: "compare-chart" }),
    table: h("div", { class: "table-wrap" }),
    notice: h("div"),
  };
  el.metric.addEventListener("change", () => {
    state.metric = el.metric.value;
    remember();
    draw();
  });

  const remember = () => history.replaceState(null, "", `#/compare?jobs=${state.chosen.map(encodeURIComponent).join(",")}&metric=${encodeURIComponent(state.metric)}`);
  const chosenJobs = () => state.chosen.map((id) => state.jobs.find((j) => j.id === id)).filter(Boolean);
  const digests = () => chosenJobs().map((j) => (state.logs.has(j.id) ? digest(state.logs.get(j.id).events) : { metrics: [], evaluations: [] }));

  const drawPicker = () => {
    if (!state.jobs.length) return replace(el.picker, h("p", { class: "empty" }, "No jobs yet."));
    const toggle = (job, on) => {
      state.chosen = on ? [...state.chosen, job.id] : state.chosen.filter((id) => id !== job.id);
      remember();
      load().then(draw, showError);
      draw();
    };
    replace(
      el.picker,
      state.jobs.map((job) =>
        h(
          "label",
          { class: "job-choice" },
          h("input", { type: "checkbox", "data-job": job.id, checked: state.chosen.includes(job.id), onchange: (ev) => toggle(job, ev.target.checked) }),
          h("span", null, h("span", { class: "mono" }, label(job)), h("span", { class: "job-choice-meta" }, statusBadge(job.status), h("span", { class: "muted" }, job.model))),
        ),
      ),
    );
  };

  const draw = () => {
    const jobs = chosenJobs();
    const ds = digests();
    const names = metricNames(ds);
    if (!names.includes(state.metric)) names.push(state.metric);
    replace(el.metric, names.map((n) => h("option", { value: n }, n)));
    el.metric.value = state.metric;
    const series = jobs.map((job, i) => ({ name: label(job), color: PALETTE[i % PALETTE.length], points: pointsOf(ds[i], state.metric) }));
    const spec = {
      id: "compare",
      title: state.metric,
      unit: UNITS[state.metric] || "",
      height: el.chart.clientWidth < 520 ? null : 320,
      series,
      emptyText: jobs.length ? `No ${state.metric} recorded yet for the chosen jobs.` : "Tick two or more jobs to compare their curves.",
    };
    replace(el.chart, lineChart(spec, el.chart.clientWidth - 24));
    drawTable(jobs, series);
  };

  const drawTable = (jobs, series) => {
    if (!jobs.length) return replace(el.table);
    const head = ["Job", "Status", "Base model", "Points", "Last", "Min", "Max"];
    const rows = jobs.map((job, i) => {
      const ys = series[i].points.map((p) => p[1]).filter(Number.isFinite);
      return h(
        "tr",
        { "data-job": job.id },
        h("td", { "data-label": "Job" }, h("i", { class: "swatch", "data-color": series[i].color }), " ", h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, label(job))),
        h("td", { "data-label": "Status" }, statusBadge(job.status)),
        h("td", { "data-label": "Base model", class: "mono" }, job.model),
        h("td", { "data-label": "Points", class: "num" }, String(ys.length)),
        h("td", { "data-label": "Last", class: "num" }, num(ys[ys.length - 1], 4)),
        h("td", { "data-label": "Min", class: "num" }, ys.length ? num(Math.min(...ys), 4) : "—"),
        h("td", { "data-label": "Max", class: "num" }, ys.length ? num(Math.max(...ys), 4) : "—"),
      );
    });
    replace(el.table, h("table", { class: "responsive", id: "compare-table" }, h("thead", null, h("tr", null, head.map((t) => h("th", { scope: "col" }, t)))), h("tbody", null, rows)));
    for (const sw of el.table.querySelectorAll("[data-color]")) sw.style.setProperty("--c", sw.dataset.color);
  };

  // Events of the chosen jobs: fetched once for finished jobs, refreshed while a job runs.
  const load = async () => {
    let changed = false;
    for (const job of chosenJobs()) {
      const known = state.logs.get(job.id);
      if (known && !isActive(job.status) && known.status === job.status) continue;
      const log = known || new EventLog(job.id);
      state.logs.set(job.id, log);
      changed = (await log.refresh()) || changed;
      log.status = job.status;
    }
    return changed;
  };
  const showError = (err) => view.alive() && replace(el.notice, errorBox(`Could not load the jobs: ${err.message}`));

  root.append(
    h("div", { class: "page-head" }, h("h1", null, "Compare jobs"), h("div", { class: "toolbar" }, h("label", { for: "compare-metric" }, "Metric"), el.metric)),
    el.notice,
    h("div", { class: "compare-layout" }, h("section", { class: "card" }, h("h2", null, "Jobs"), el.picker), h("section", { class: "card compare-main" }, el.chart, el.table)),
  );
  draw();
  view.poll(async () => {
    try {
      state.jobs = await listAll("/fine_tuning/jobs", { limit: 100 });
      if (!view.alive()) return;
      replace(el.notice);
      const signature = state.jobs.map((j) => `${j.id}:${j.status}`).join(",");
      const listChanged = signature !== state.signature;
      state.signature = signature;
      if (listChanged) drawPicker();
      const changed = await load();
      if (view.alive() && (changed || listChanged)) draw();
    } catch (err) {
      if (err.status === 401) throw err;
      showError(err);
    }
  }, POLL_MS);
  view.onResize(draw);
}
