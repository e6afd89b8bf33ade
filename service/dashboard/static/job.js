// One job: its live charts, controls, final-model choice, checkpoints, hyperparameters and events.

import { EventLog, api, digest, listAll } from "./api.js";
import { lineChart } from "./charts.js";
import { ago, dateTime, duration, errorBox, eta, h, num, pretty, progressBar, replace, rewardClass, statusBadge } from "./dom.js";
import { checkpointsSection, eventsSection, finalModelCard } from "./job_parts.js";

const POLL_MS = 2500;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const series = (metrics, name, pick, extra = {}) => ({ name, points: metrics.map((m) => [m.step, pick(m)]), ...extra });
const timing = (m, key) => m.timing && m.timing.step && m.timing.step[key];

// The charts of a job: what the loop's metrics events carry (see workers/rl/loop.py).
export function chartSpecs(d, job) {
  const m = d.metrics;
  const hp = job.hyperparameters || {};
  const valid = d.evaluations.map((e) => [e.step, e.reward]);
  const specs = [
    {
      id: "reward",
      title: "Reward",
      unit: "mean reward",
      yFixed: [0, 1],
      series: [series(m, "train", (x) => x.train_reward_mean), { name: "validation", points: valid }],
      hlines: [{ y: d.baselineReward, label: "baseline", color: "#c92a2a" }],
      emptyText: "No reward yet: the first point appears after the baseline evaluation or step 1.",
    },
  ];
  const graders = new Map();
  for (const x of m) for (const g of (x.scores && x.scores.graders) || []) graders.set(g.name, g.type);
  if (graders.size > 1) {
    const pick = (name, key) => (x) => {
      const g = ((x.scores && x.scores.graders) || []).find((gr) => gr.name === name);
      return g ? g[key] : null;
    };
    const perGrader = [];
    let i = 0;
    for (const [name, type] of graders) {
      const color = ["#1f4fd1", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285"][i++ % 6];
      perGrader.push(series(m, `${name} (${type}) train`, pick(name, "train_reward_mean"), { color }));
      perGrader.push(series(m, `${name} valid`, pick(name, "valid_reward_mean"), { color, dashed: true }));
    }
    specs.push({ id: "graders", title: "Reward per grader", unit: "grader score", yFixed: [0, 1], series: perGrader });
  }
  const klMeasured = hp.beta === undefined || hp.beta > 0;
  specs.push(
    {
      id: "kl",
      title: "KL to the initial policy",
      unit: "nats / token",
      series: [series(m, "train", (x) => x.kl), { name: "validation", points: d.evaluations.map((e) => [e.step, e.kl]) }],
      hlines: [{ y: hp.kl_limit, label: "kl_limit", color: "#c92a2a" }],
      emptyText: klMeasured ? "No KL yet." : "KL is not measured when beta = 0.",
    },
    { id: "entropy", title: "Entropy", unit: "nats / token", series: [series(m, "policy entropy", (x) => x.entropy)] },
    { id: "length", title: "Completion length", unit: "tokens (mean)", series: [series(m, "completion tokens", (x) => x.completion_tokens_mean)] },
    {
      id: "time",
      title: "Step time",
      unit: "seconds",
      series: [
        series(m, "whole step", (x) => timing(x, "full_iteration")),
        series(m, "sampling", (x) => timing(x, "sampling")),
        series(m, "update", (x) => timing(x, "training")),
        series(m, "evaluation", (x) => timing(x, "eval") || null),
      ],
    },
  );
  const errorKeys = new Set();
  for (const x of m) for (const [k, v] of Object.entries(x)) if (k.endsWith("_error_mean") && v > 0) errorKeys.add(k);
  if (errorKeys.size) {
    specs.push({
      id: "errors",
      title: "Grader errors",
      unit: "fraction of samples",
      yFixed: [0, 1],
      series: [...errorKeys].map((k) => series(m, k.replace(/_mean$/, ""), (x) => x[k] || 0)),
    });
  }
  return specs;
}

function actions(job, state, act) {
  const can = {
    cancel: !TERMINAL.has(job.status) && !state.cancelRequested,
    pause: ["queued", "running"].includes(job.status) && !state.pauseRequested,
    resume: job.status === "paused",
  };
  const button = (name, label, cls) =>
    h("button", { type: "button", class: cls, "data-action": name, disabled: !can[name] || state.busy, onclick: () => act(name) }, label);
  return h(
    "div",
    { class: "actions" },
    button("pause", "Pause", "secondary"),
    button("resume", "Resume", "secondary"),
    button("cancel", state.confirmCancel ? "Really cancel?" : "Cancel job", "danger"),
  );
}

function stat(label, value, id, wide = false) {
  return h("div", { class: wide ? "stat wide" : "stat", "data-stat": id }, h("span", { class: "k" }, label), h("span", { class: "v" }, value));
}

function summary(job, d) {
  const last = d.metrics[d.metrics.length - 1];
  const valid = d.evaluations.filter((e) => e.step > 0 && Number.isFinite(e.reward));
  const best = valid.length ? Math.max(...valid.map((e) => e.reward)) : null;
  const tiles = [
    stat("Progress", last ? progressBar(last.step, last.total_steps) : h("span", { class: "muted" }, "no step yet"), "progress"),
    stat("ETA", eta(job), "eta"),
    stat("Best valid reward", h("span", { class: rewardClass(best) }, num(best)), "best"),
    stat("Baseline valid reward", num(d.baselineReward), "baseline"),
    stat("Base model", h("span", { class: "mono" }, job.model), "model"),
    stat("Fine-tuned model", job.fine_tuned_model ? h("span", { class: "mono wrap" }, job.fine_tuned_model) : "—", "fine-tuned", true),
    stat("Created", h("span", { title: dateTime(job.created_at) }, ago(job.created_at)), "created"),
    stat("Finished", job.finished_at ? `${dateTime(job.finished_at)} (took ${duration(job.finished_at - job.created_at)})` : "—", "finished"),
    stat("Trained tokens", job.trained_tokens ? job.trained_tokens.toLocaleString() : "—", "tokens"),
    stat("Files", h("span", { class: "mono wrap" }, job.training_file, job.validation_file ? ` · ${job.validation_file}` : ""), "files", true),
    stat("Seed", String(job.seed), "seed"),
  ];
  if (job.metadata && Object.keys(job.metadata).length) {
    tiles.push(stat("Metadata", Object.entries(job.metadata).map(([k, v]) => `${k}=${v}`).join(", "), "metadata", true));
  }
  return h("div", { class: "stats" }, tiles);
}

function hyperparameters(job) {
  const hp = job.hyperparameters || {};
  const grader = (job.method && job.method.reinforcement && job.method.reinforcement.grader) || null;
  const show = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
  const keys = Object.keys(hp).sort();
  return h(
    "section",
    { class: "card", id: "hyperparameters" },
    h("h2", null, "Hyperparameters (as resolved)"),
    keys.length
      ? h("dl", { class: "hp" }, keys.map((k) => h("div", null, h("dt", null, k), h("dd", { class: "mono" }, show(hp[k])))))
      : h("p", { class: "empty" }, "None recorded."),
    grader ? h("details", null, h("summary", null, `Grader: ${grader.name} (${grader.type})`), h("pre", { class: "code" }, pretty(grader))) : null,
  );
}

export function renderJob(root, [jobId], view) {
  const base = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const log = new EventLog(jobId);
  const state = { job: null, checkpoints: [], busy: false, confirmCancel: false, cancelRequested: false, pauseRequested: false };
  const el = {
    head: h("div", { class: "page-head" }),
    notice: h("div"),
    summary: h("section", { class: "card", id: "summary" }),
    final: h("div"),
    charts: h("div", { class: "charts", id: "charts" }),
    checkpoints: h("div"),
    hyper: h("div"),
    events: h("div"),
  };
  root.append(el.head, el.notice, el.summary, el.final, h("h2", { class: "section-title" }, "Training curves"), el.charts, el.checkpoints, el.hyper, el.events);
  let chartKey = "";

  const drawCharts = (force) => {
    const d = digest(log.events);
    const specs = chartSpecs(d, state.job);
    const key = `${log.events.length}:${specs.length}:${el.charts.clientWidth}`;
    if (!force && key === chartKey) return;
    chartKey = key;
    const cells = specs.map(() => h("div", { class: "chart-cell card" }));
    replace(el.charts, cells);
    specs.forEach((spec, i) => cells[i].append(lineChart(spec, cells[i].clientWidth - 24)));
  };

  const act = async (name) => {
    if (name === "cancel" && !state.confirmCancel) {
      state.confirmCancel = true;
      setTimeout(() => {
        state.confirmCancel = false;
        if (view.alive() && state.job) drawHead();
      }, 4000);
      return drawHead();
    }
    state.busy = true;
    state.confirmCancel = false;
    drawHead();
    try {
      state.job = await api(`${base}/${name}`, { method: "POST" });
      if (name === "cancel" && state.job.status === "running") state.cancelRequested = true;
      if (name === "pause" && state.job.status === "running") state.pauseRequested = true;
      if (name === "resume") state.pauseRequested = false;
      replace(el.notice);
    } catch (err) {
      replace(el.notice, errorBox(`${name} failed: ${err.message}`));
    }
    state.busy = false;
    try {
      await refresh();
    } catch (err) {
      replace(el.notice, errorBox(`Refresh failed: ${err.message}`));
    }
    if (state.job && !TERMINAL.has(state.job.status) && !view.polling) startPolling();
  };

  const drawHead = () => {
    const job = state.job;
    const requested = state.cancelRequested ? "cancellation requested: the job stops after its current step" : state.pauseRequested ? "pause requested: a checkpoint is written after the current step" : "";
    replace(
      el.head,
      h("div", null, h("a", { href: "#/jobs", class: "back" }, "← Jobs"), h("h1", null, h("span", { class: "mono" }, job.id), " ", statusBadge(job.status)), requested ? h("p", { class: "muted", id: "requested" }, requested) : null),
      h(
        "div",
        { class: "head-actions" },
        h("a", { class: "button secondary", href: `#/jobs/${encodeURIComponent(job.id)}/rollouts` }, "Rollout browser"),
        h("a", { class: "button secondary", href: `#/compare?jobs=${encodeURIComponent(job.id)}`, id: "compare-link" }, "Compare"),
        job.fine_tuned_model ? h("a", { class: "button secondary", href: `#/chat?model=${encodeURIComponent(job.fine_tuned_model)}`, id: "chat-link" }, "Chat") : null,
        actions(job, state, act),
      ),
    );
  };

  const refresh = async () => {
    const [job, changed] = await Promise.all([api(base), log.refresh()]);
    if (!view.alive()) return;
    if (TERMINAL.has(job.status) || job.status === "paused") state.cancelRequested = state.pauseRequested = false;
    const statusChanged = !state.job || state.job.status !== job.status;
    state.job = job;
    if (changed || statusChanged) state.checkpoints = await listAll(`${base}/checkpoints`, { limit: 100 });
    if (!view.alive()) return;
    const d = digest(log.events);
    drawHead();
    replace(el.summary, job.error ? errorBox(`${job.error.code}: ${job.error.message}${job.error.param ? ` (param: ${job.error.param})` : ""}`) : null, summary(job, d));
    if (statusChanged) replace(el.hyper, hyperparameters(job));
    replace(el.final, finalModelCard(job, d, state.checkpoints));
    if (changed || statusChanged) {
      replace(el.checkpoints, checkpointsSection(job, d, state.checkpoints));
      replace(el.events, eventsSection(log.events));
    }
    drawCharts(false);
  };

  const startPolling = () => {
    view.polling = true;
    view.poll(
      async () => {
        try {
          await refresh();
        } catch (err) {
          if (err.status === 401) throw err;
          if (err.status === 404) state.missing = true;
          if (!state.job) replace(el.head, errorBox(err.status === 404 ? `No job ${jobId} in this project.` : `Could not load the job: ${err.message}`));
          else replace(el.notice, errorBox(`Refresh failed: ${err.message}`));
        }
      },
      POLL_MS,
      () => {
        const going = !state.missing && (!state.job || !TERMINAL.has(state.job.status));
        if (!going) view.polling = false;
        return going;
      },
    );
  };
  startPolling();
  view.onResize(() => state.job && drawCharts(true));
}
