// The rollout browser: each evaluation's sampled prompts, completions and rewards (with per-grader
// scores and grader errors where recorded), and one prompt followed across steps, so reward
// hacking is visible in the completions themselves.

import { EventLog, api, digest } from "./api.js";
import { empty, errorBox, h, num, replace, rewardClass, statusBadge } from "./dom.js";

const POLL_MS = 2500;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function promptText(prompt) {
  if (typeof prompt === "string") return prompt;
  return JSON.stringify(prompt);
}

function stepName(step) {
  return step === 0 ? "baseline" : `step ${step}`;
}

function rewardBadge(reward) {
  return h("span", { class: `reward ${rewardClass(reward)}`, title: "reward" }, num(reward));
}

function extras(sample) {
  const parts = [];
  const scores = sample.scores || {};
  if (Object.keys(scores).length) {
    parts.push(h("div", { class: "scores" }, Object.entries(scores).map(([name, v]) => h("span", { class: "chip" }, `${name}: ${num(v)}`))));
  }
  const errors = Array.isArray(sample.errors) ? sample.errors : Object.keys(sample.errors || {});
  if (errors.length) parts.push(h("div", { class: "errors" }, errors.map((e) => h("span", { class: "chip bad" }, e))));
  return parts;
}

function sampleCard(sample, i) {
  return h(
    "article",
    { class: "sample card" },
    h("header", null, h("span", { class: "muted" }, `#${i + 1}`), rewardBadge(sample.reward)),
    h("div", { class: "label" }, "Prompt"),
    h("div", { class: "prompt text" }, promptText(sample.prompt)),
    h("div", { class: "label" }, "Completion"),
    h("pre", { class: "completion text" }, sample.completion || "(empty)"),
    extras(sample),
  );
}

function byEvaluation(evaluations, state, redraw) {
  const current = evaluations.find((e) => e.step === state.step) || evaluations[evaluations.length - 1];
  const pills = h(
    "div",
    { class: "pills", role: "tablist" },
    evaluations.map((e) =>
      h(
        "button",
        { type: "button", role: "tab", class: `pill ${e === current ? "active" : ""}`, "aria-selected": e === current ? "true" : "false", "data-step": e.step, onclick: () => ((state.step = e.step), redraw()) },
        stepName(e.step),
        h("span", { class: `pill-reward ${rewardClass(e.reward)}` }, num(e.reward, 2)),
      ),
    ),
  );
  const samples = current.samples || [];
  return [
    pills,
    h("p", { class: "muted" }, `${stepName(current.step)}: validation reward ${num(current.reward)}${Number.isFinite(current.kl) ? `, KL ${num(current.kl, 4)}` : ""}; ${samples.length} sampled completion(s) kept.`),
    samples.length ? h("div", { class: "samples" }, samples.map(sampleCard)) : empty("This evaluation kept no samples."),
  ];
}

function acrossSteps(evaluations, state, redraw) {
  const prompts = [...new Set(evaluations.flatMap((e) => (e.samples || []).map((s) => promptText(s.prompt))))];
  if (!prompts.length) return [empty("No sampled prompts yet.")];
  if (!prompts.includes(state.prompt)) state.prompt = prompts[0];
  const select = h(
    "select",
    { id: "prompt-select", onchange: (ev) => ((state.prompt = ev.target.value), redraw()) },
    prompts.map((p) => h("option", { value: p }, p.length > 90 ? `${p.slice(0, 90)}…` : p)),
  );
  select.value = state.prompt;
  const rows = [];
  for (const e of evaluations) {
    for (const s of e.samples || []) {
      if (promptText(s.prompt) !== state.prompt) continue;
      rows.push(
        h(
          "tr",
          null,
          h("td", { "data-label": "Step" }, stepName(e.step)),
          h("td", { "data-label": "Reward", class: "num" }, rewardBadge(s.reward)),
          h("td", { "data-label": "Completion" }, h("pre", { class: "completion text" }, s.completion || "(empty)"), extras(s)),
        ),
      );
    }
  }
  return [
    h("div", { class: "toolbar" }, h("label", { for: "prompt-select" }, "Prompt"), select),
    h("div", { class: "prompt text" }, state.prompt),
    h("div", { class: "table-wrap" }, h("table", { class: "responsive compare" }, h("thead", null, h("tr", null, h("th", null, "Step"), h("th", null, "Reward"), h("th", null, "Completion"))), h("tbody", null, rows))),
  ];
}

export function renderRollouts(root, [jobId], view) {
  const base = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const log = new EventLog(jobId);
  const state = { mode: "step", step: null, prompt: null, job: null, missing: false, drawn: false };
  const head = h("div", { class: "page-head" });
  const body = h("section", { class: "card", id: "rollouts" }, h("p", { class: "muted" }, "Loading…"));
  const modes = h("div", { class: "segmented", role: "tablist" });
  root.append(head, modes, body);

  const redraw = () => {
    replace(
      modes,
      h("button", { type: "button", class: state.mode === "step" ? "active" : "", onclick: () => ((state.mode = "step"), redraw()) }, "By evaluation"),
      h("button", { type: "button", "data-mode": "compare", class: state.mode === "compare" ? "active" : "", onclick: () => ((state.mode = "compare"), redraw()) }, "Compare a prompt across steps"),
    );
    const evaluations = digest(log.events).evaluations;
    if (!evaluations.length) {
      replace(body, empty("No evaluations yet: the baseline evaluation of the untouched model runs before step 1, then one every eval_interval steps."));
      return;
    }
    replace(body, state.mode === "step" ? byEvaluation(evaluations, state, redraw) : acrossSteps(evaluations, state, redraw));
  };

  view.poll(
    async () => {
      try {
        const [job, changed] = await Promise.all([api(base), log.refresh()]);
        if (!view.alive()) return;
        state.job = job;
        replace(
          head,
          h("div", null, h("a", { href: `#/jobs/${encodeURIComponent(jobId)}`, class: "back" }, "← Job"), h("h1", null, "Rollouts ", h("span", { class: "mono" }, jobId), " ", statusBadge(job.status))),
        );
        if (changed || !state.drawn) {
          state.drawn = true;
          redraw();
        }
      } catch (err) {
        if (err.status === 401) throw err;
        if (err.status === 404) state.missing = true;
        replace(body, errorBox(err.status === 404 ? `No job ${jobId} in this project.` : `Could not load rollouts: ${err.message}`));
      }
    },
    POLL_MS,
    () => !state.missing && !(state.job && TERMINAL.has(state.job.status)),
  );
}
