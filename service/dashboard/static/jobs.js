// The jobs list: status, base model, created, progress, best validation reward and ETA, polled so
// new jobs and progress appear without a reload.

import { api, listAll } from "./api.js";
import { STATUSES, ago, dateTime, empty, errorBox, eta, h, isActive, num, progressBar, replace, rewardClass, statusBadge } from "./dom.js";

const POLL_MS = 3000;
const summaries = new Map(); // job id -> {status, step, total, best}; kept for finished jobs
let filter = "";

// Progress and best validation reward are not on the job object: they come from the newest
// metrics event and the checkpoints' metrics. Finished jobs are summarised once.
async function summarize(job) {
  const cached = summaries.get(job.id);
  if (cached && cached.status === job.status && !isActive(job.status)) return cached;
  const base = `/fine_tuning/jobs/${encodeURIComponent(job.id)}`;
  const [events, checkpoints] = await Promise.all([api(`${base}/events?limit=50`), api(`${base}/checkpoints?limit=100`)]);
  const latest = events.data.find((e) => e.type === "metrics" && e.data);
  const rewards = checkpoints.data.map((c) => c.metrics && c.metrics.valid_reward_mean).filter(Number.isFinite);
  const summary = {
    status: job.status,
    step: latest ? latest.data.step : cached ? cached.step : 0,
    total: latest ? latest.data.total_steps : cached ? cached.total : null,
    best: rewards.length ? Math.max(...rewards) : cached ? cached.best : null,
  };
  summaries.set(job.id, summary);
  return summary;
}

async function summarizeAll(jobs) {
  const queue = [...jobs];
  const worker = async () => {
    while (queue.length) await summarize(queue.shift());
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

function filterBar(onChange) {
  const select = h(
    "select",
    { id: "status-filter", onchange: (e) => onChange(e.target.value) },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))),
  );
  select.value = filter;
  return h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status"), select);
}

function row(job) {
  const sm = summaries.get(job.id) || {};
  const link = `#/jobs/${encodeURIComponent(job.id)}`;
  return h(
    "tr",
    { "data-job": job.id },
    h("td", { "data-label": "Job" }, h("a", { href: link, class: "mono" }, job.id), job.user_provided_suffix ? h("span", { class: "muted" }, ` ${job.user_provided_suffix}`) : null),
    h("td", { "data-label": "Status" }, statusBadge(job.status)),
    h("td", { "data-label": "Base model", class: "mono" }, job.model),
    h("td", { "data-label": "Created", title: dateTime(job.created_at) }, ago(job.created_at)),
    h("td", { "data-label": "Progress" }, progressBar(sm.step || 0, sm.total)),
    h("td", { "data-label": "Best valid reward", class: `num ${rewardClass(sm.best)}` }, num(sm.best)),
    h("td", { "data-label": "ETA" }, eta(job)),
  );
}

export function renderJobs(root, _params, view) {
  const table = h("div", { class: "table-wrap" }, h("p", { class: "muted" }, "Loading jobs…"));
  const status = h("div");
  let jobs = null;
  const draw = () => {
    if (!jobs) return;
    const shown = filter ? jobs.filter((j) => j.status === filter) : jobs;
    if (!shown.length) {
      replace(table, empty(jobs.length ? `No ${filter.replace("_", " ")} jobs.` : "No jobs yet. Create one with New job, or with the openai SDK (see the README); it appears here on its own."));
      return;
    }
    const head = ["Job", "Status", "Base model", "Created", "Progress", "Best valid reward", "ETA"];
    replace(
      table,
      h(
        "table",
        { class: "jobs responsive" },
        h("thead", null, h("tr", null, head.map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", null, shown.map(row)),
      ),
    );
  };
  root.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", null, "Fine-tuning jobs"),
      h("div", { class: "head-actions" }, filterBar((value) => {
        filter = value;
        draw();
      }), h("a", { class: "button", href: "#/jobs/new", id: "new-job-link" }, "New job")),
    ),
    status,
    h("section", { class: "card" }, table),
  );
  view.poll(async () => {
    try {
      const fresh = await listAll("/fine_tuning/jobs", { limit: 100 });
      if (!view.alive()) return;
      jobs = fresh;
      replace(status);
      draw(); // the list at once; progress and rewards fill in below
      await summarizeAll(filter ? fresh.filter((j) => j.status === filter) : fresh);
      if (view.alive()) draw();
    } catch (err) {
      if (err.status === 401) throw err;
      replace(status, errorBox(`Could not load the jobs: ${err.message}`));
    }
  }, POLL_MS);
}
