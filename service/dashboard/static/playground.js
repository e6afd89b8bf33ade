// The grader playground: a grader config, a model sample and an item, run through
// POST /v1/fine_tuning/alpha/graders/run; shows the reward, sub-rewards, scores and errors.

import { api, getKey, listAll } from "./api.js";
import { errorBox, h, keyValueTable, num, pretty, replace, rewardClass } from "./dom.js";
import { EXACT, PRESETS } from "./graders.js";

const ITEM = { messages: [{ role: "user", content: "What is 7 + 5? Answer with just the number." }], answer: "12" };

// The first line of a file, read from the start of its content without downloading all of it.
async function firstLine(fileId) {
  const response = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: { Authorization: `Bearer ${getKey()}` } });
  if (!response.ok) throw new Error(`could not read ${fileId} (${response.status})`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (!text.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  reader.cancel().catch(() => {});
  return text.split("\n").find((l) => l.trim()) || "{}";
}

function parseJson(text, what) {
  if (!text.trim()) return { value: null };
  try {
    return { value: JSON.parse(text) };
  } catch (err) {
    return { error: `${what} is not valid JSON: ${err.message}` };
  }
}

function errorsOf(errors) {
  const flags = Object.entries(errors || {}).filter(([k, v]) => v === true || (v && !k.endsWith("_error")));
  return flags;
}

function result(body) {
  const meta = body.metadata || {};
  const flags = errorsOf(meta.errors);
  const subs = Object.entries(body.sub_rewards || {});
  const scores = Object.entries(meta.scores || {});
  return h(
    "div",
    { class: "result", id: "grader-result" },
    h("div", { class: "reward-big" }, h("span", { class: "label" }, "reward"), h("span", { class: `value ${rewardClass(body.reward)}`, id: "reward-value" }, num(body.reward, 4))),
    keyValueTable([
      ["Grader", `${meta.name} (${meta.type})`],
      ["Execution time", `${(meta.execution_time * 1000).toFixed(meta.execution_time < 0.01 ? 3 : 1)} ms`],
      ["Token usage", meta.token_usage ? String(meta.token_usage) : "—"],
    ]),
    subs.length ? h("h3", null, "Sub-rewards") : null,
    subs.length ? keyValueTable(subs.map(([k, v]) => [k, num(v, 4)])) : null,
    scores.length ? h("h3", null, "Scores") : null,
    scores.length ? keyValueTable(scores.map(([k, v]) => [k, typeof v === "number" ? num(v, 4) : JSON.stringify(v)])) : null,
    h("h3", null, "Errors"),
    flags.length
      ? h("ul", { class: "error-list" }, flags.map(([k, v]) => h("li", null, h("span", { class: "chip bad" }, k), v === true ? "" : ` ${v}`)))
      : h("p", { class: "muted", id: "no-errors" }, "None."),
    h("details", null, h("summary", null, "Raw response"), h("pre", { class: "code" }, pretty(body))),
  );
}

export function renderPlayground(root, _params, view) {
  const grader = h("textarea", { id: "grader-json", rows: 14, spellcheck: "false", class: "code" });
  const sample = h("textarea", { id: "model-sample", rows: 4, spellcheck: "false" });
  const item = h("textarea", { id: "item-json", rows: 8, spellcheck: "false", class: "code" });
  const output = h("div", { id: "playground-output" }, h("p", { class: "muted" }, "Run a grader to see its reward here."));
  const preset = h("select", { id: "preset" }, h("option", { value: "" }, "a preset…"), Object.keys(PRESETS).map((k) => h("option", { value: k }, k)));
  const fromJob = h("select", { id: "from-job" }, h("option", { value: "" }, "a job's grader…"));
  let jobs = [];
  grader.value = pretty(EXACT);
  sample.value = "12";
  item.value = pretty(ITEM);

  preset.addEventListener("change", () => {
    if (preset.value) grader.value = pretty(PRESETS[preset.value]);
  });
  fromJob.addEventListener("change", async () => {
    const job = jobs.find((j) => j.id === fromJob.value);
    if (!job) return;
    grader.value = pretty(job.method.reinforcement.grader);
    try {
      item.value = pretty(JSON.parse(await firstLine(job.validation_file || job.training_file)));
    } catch (err) {
      replace(output, errorBox(`Loaded the grader; the item could not be read: ${err.message}`));
    }
  });

  const call = async (endpoint) => {
    const g = parseJson(grader.value, "The grader");
    const it = parseJson(item.value, "The item");
    if (g.error || it.error) return replace(output, errorBox(g.error || it.error));
    const body = endpoint === "run" ? { grader: g.value, model_sample: sample.value, item: it.value || {} } : { grader: g.value };
    replace(output, h("p", { class: "muted" }, endpoint === "run" ? "Grading…" : "Validating…"));
    try {
      const answer = await api(`/fine_tuning/alpha/graders/${endpoint}`, { method: "POST", body });
      if (!view.alive()) return;
      replace(output, endpoint === "run" ? result(answer) : h("p", { class: "good", id: "valid-ok" }, "The grader config is valid."));
    } catch (err) {
      if (view.alive()) replace(output, errorBox(`${err.status || ""} ${err.message}${err.param ? ` (param: ${err.param})` : ""}`));
    }
  };

  root.append(
    h("div", { class: "page-head" }, h("h1", null, "Grader playground")),
    h(
      "div",
      { class: "two-col" },
      h(
        "section",
        { class: "card" },
        h("div", { class: "toolbar" }, h("label", { for: "preset" }, "Start from"), preset, fromJob),
        h("label", { for: "grader-json" }, "Grader config (JSON)"),
        grader,
        h("label", { for: "model-sample" }, "Model sample (the completion to grade, {{sample.output_text}})"),
        sample,
        h("label", { for: "item-json" }, "Item (a data line, {{item.*}})"),
        item,
        h("div", { class: "row" }, h("button", { type: "button", id: "run-grader", onclick: () => call("run") }, "Run grader"), h("button", { type: "button", class: "secondary", onclick: () => call("validate") }, "Validate config")),
      ),
      h("section", { class: "card" }, h("h2", null, "Result"), output),
    ),
  );
  listAll("/fine_tuning/jobs", { limit: 100 })
    .then((list) => {
      jobs = list.filter((j) => j.method && j.method.reinforcement && j.method.reinforcement.grader);
      for (const j of jobs) fromJob.append(h("option", { value: j.id }, `${j.id} · ${j.method.reinforcement.grader.name}`));
    })
    .catch((err) => console.warn("could not list jobs for the grader picker:", err.message));
}
