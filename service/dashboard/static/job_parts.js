// Parts of the job page: the final-model card, the checkpoints with downloads, and the event log.

import { download } from "./api.js";
import { dateTime, empty, h, levelBadge, num, pretty, replace, rewardClass } from "./dom.js";

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

// A button that fetches `path` with the key and saves it; the status shows progress or the error.
function downloadButton(label, path, filename) {
  const status = h("span", { class: "dl-status muted" });
  const button = h("button", { type: "button", class: "small secondary" }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    replace(status, "starting…");
    try {
      await download(path, filename, (got, total) => replace(status, total ? `${Math.round((100 * got) / total)}% of ${mib(total)}` : mib(got)));
      replace(status, "saved");
    } catch (err) {
      replace(status, h("span", { class: "bad" }, err.status === 404 ? "not available on this server" : err.message));
    }
    button.disabled = false;
  });
  return h("span", { class: "download" }, button, status);
}

function curl(path, filename) {
  return `curl -fL -H "Authorization: Bearer $RFT_API_KEY" -o ${filename} ${location.origin}/v1${path}`;
}

export function finalModelCard(job, d, checkpoints) {
  const sel = d.selection;
  if (!sel && job.status !== "succeeded") return null;
  const path = `/fine_tuning/jobs/${encodeURIComponent(job.id)}/content`;
  const chosen = checkpoints.find((c) => c.fine_tuned_model_checkpoint === job.fine_tuned_model);
  return h(
    "section",
    { class: `card final-card ${sel && !sel.beat_baseline ? "warn" : ""}`, id: "final-model" },
    h("h2", null, "Final model"),
    job.fine_tuned_model ? h("p", { class: "mono" }, job.fine_tuned_model) : null,
    sel ? h("p", { class: "reason" }, sel.message) : h("p", { class: "muted" }, "No selection event was recorded for this job."),
    sel && sel.excluded_for_kl && sel.excluded_for_kl.length ? h("p", { class: "muted" }, `Excluded for KL: steps ${sel.excluded_for_kl.join(", ")}`) : null,
    chosen ? h("p", null, `Validation reward ${num(chosen.metrics.valid_reward_mean)} at step ${chosen.step_number}`) : null,
    job.status === "succeeded"
      ? h("div", { class: "row" }, downloadButton("Download final model (.tar)", path, `${job.id}-final.tar`))
      : null,
    job.status === "succeeded" ? h("details", null, h("summary", null, "curl"), h("pre", { class: "code" }, curl(path, `${job.id}-final.tar`))) : null,
  );
}

export function checkpointsSection(job, d, checkpoints) {
  const section = h("section", { class: "card", id: "checkpoints" }, h("h2", null, `Checkpoints (${checkpoints.length})`));
  if (!checkpoints.length) {
    section.append(empty("No checkpoints yet: one is written at each evaluation (and on pause)."));
    return section;
  }
  const chosenStep = d.selection ? d.selection.chosen_step : null;
  const lora = (job.hyperparameters || {}).lora_rank > 0;
  const head = ["Step", "Checkpoint", "Train reward", "Valid reward", "Valid KL", "Entropy", "Created", "Download"];
  const rows = checkpoints.map((c) => {
    const m = c.metrics || {};
    const isFinal = c.fine_tuned_model_checkpoint === job.fine_tuned_model || c.step_number === chosenStep;
    const path = `/fine_tuning/jobs/${encodeURIComponent(job.id)}/checkpoints/${encodeURIComponent(c.id)}/content`;
    const name = `${job.id}-step-${c.step_number}`;
    return h(
      "tr",
      { class: isFinal ? "final" : null, "data-step": c.step_number },
      h("td", { "data-label": "Step" }, String(c.step_number), isFinal ? h("span", { class: "badge final-badge", title: d.selection ? d.selection.message : "the job's fine-tuned model" }, "final") : null),
      h("td", { "data-label": "Checkpoint", class: "mono wrap" }, c.fine_tuned_model_checkpoint),
      h("td", { "data-label": "Train reward", class: "num" }, num(m.train_reward_mean)),
      h("td", { "data-label": "Valid reward", class: `num ${rewardClass(m.valid_reward_mean)}` }, num(m.valid_reward_mean)),
      h("td", { "data-label": "Valid KL", class: "num" }, num(m.valid_kl)),
      h("td", { "data-label": "Entropy", class: "num" }, num(m.entropy)),
      h("td", { "data-label": "Created" }, dateTime(c.created_at)),
      h(
        "td",
        { "data-label": "Download" },
        downloadButton(".tar", path, `${name}.tar`),
        lora ? downloadButton("merged .tar", `${path}?merged=true`, `${name}-merged.tar`) : null,
      ),
    );
  });
  const final = checkpoints.find((c) => c.fine_tuned_model_checkpoint === job.fine_tuned_model || c.step_number === chosenStep);
  section.append(
    h("div", { class: "table-wrap" }, h("table", { class: "responsive" }, h("thead", null, h("tr", null, head.map((t) => h("th", { scope: "col" }, t)))), h("tbody", null, rows))),
    h(
      "details",
      null,
      h("summary", null, "Download with curl"),
      h("pre", { class: "code" }, (final ? [final] : checkpoints.slice(0, 1)).map((c) => curl(`/fine_tuning/jobs/${job.id}/checkpoints/${c.id}/content`, `${job.id}-step-${c.step_number}.tar`)).join("\n")),
      h("p", { class: "muted" }, "Export RFT_API_KEY first; the dashboard never puts the key in a URL."),
    ),
  );
  return section;
}

const eventFilters = { info: true, warn: true, error: true, metrics: false, limit: 200 };

export function eventsSection(events) {
  const list = h("ol", { class: "events" });
  const counts = { info: 0, warn: 0, error: 0 };
  for (const e of events) counts[e.level] = (counts[e.level] || 0) + 1;
  const draw = () => {
    const shown = events.filter((e) => eventFilters[e.level] && (eventFilters.metrics || e.type !== "metrics"));
    const items = shown.slice(0, eventFilters.limit).map((e) =>
      h(
        "li",
        { class: `event ev-${e.level}` },
        h("time", { datetime: new Date(e.created_at * 1000).toISOString() }, dateTime(e.created_at)),
        levelBadge(e.level),
        h("span", { class: "message" }, e.message),
        e.data && e.type !== "metrics" ? h("details", null, h("summary", null, "data"), h("pre", { class: "code" }, pretty(e.data))) : null,
      ),
    );
    replace(list, items.length ? items : h("li", { class: "empty" }, "No events match."));
    if (shown.length > eventFilters.limit) {
      list.append(h("li", null, h("button", { type: "button", class: "link", onclick: () => ((eventFilters.limit = Infinity), draw()) }, `Show all ${shown.length}`)));
    }
  };
  const toggle = (name, label) =>
    h(
      "label",
      { class: "check" },
      h("input", { type: "checkbox", checked: eventFilters[name], "data-filter": name, onchange: (ev) => ((eventFilters[name] = ev.target.checked), draw()) }),
      label,
    );
  draw();
  return h(
    "section",
    { class: "card", id: "events" },
    h("h2", null, `Events (${events.length})`),
    h("div", { class: "toolbar" }, toggle("info", `info ${counts.info}`), toggle("warn", `warn ${counts.warn}`), toggle("error", `error ${counts.error}`), toggle("metrics", "per-step metrics")),
    list,
  );
}
