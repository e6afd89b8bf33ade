// The job form: files uploaded through POST /v1/files, a grader (a preset or pasted JSON, checked
// with POST /v1/fine_tuning/alpha/graders/validate), the model from GET /v1/models and the
// hyperparameters, sent as POST /v1/fine_tuning/jobs. An API error is shown at the field its
// `param` names; the form lands on the new job's page.

import { api, listAll, uploadFile } from "./api.js";
import { errorBox, h, modelOptions, pretty, replace } from "./dom.js";
import { EXACT, PRESETS } from "./graders.js";

// OpenAI's reinforcement hyperparameters; every other key goes in the extras box.
const OPENAI_HP = ["n_epochs", "batch_size", "learning_rate_multiplier", "eval_interval", "eval_samples", "compute_multiplier"];
const EFFORTS = ["default", "low", "medium", "high"];
const HP_PREFIX = "method.reinforcement.hyperparameters";
const uploaded = new WeakMap(); // File -> file id, so a resubmit after an error does not upload twice

// The form field an API error's `param` is about ("form" when it names none of them).
export function fieldFor(param) {
  if (!param) return "form";
  if (["model", "suffix", "seed", "training_file", "validation_file"].includes(param)) return param;
  if (/^(method\.reinforcement\.)?grader\b/.test(param)) return "grader";
  if (param === HP_PREFIX || param === "hyperparameters") return "extras";
  if (param.startsWith(`${HP_PREFIX}.`)) {
    const name = param.slice(HP_PREFIX.length + 1).split(".")[0];
    return OPENAI_HP.includes(name) || name === "reasoning_effort" ? name : "extras";
  }
  return "form";
}

// An "auto"-or-number box: empty is left out (the server's "auto"), numbers are sent as numbers and
// anything else as typed, so the API's 400 says what it accepts.
function hpValue(text) {
  const t = text.trim();
  if (!t) return undefined;
  return /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(t) ? Number(t) : t;
}

// An error the form finds itself, shown at the field `param` names, as the API's would be.
function fail(message, param) {
  return Object.assign(new Error(message), { param });
}

function field(key, label, control, hint, layout = control) {
  const error = h("p", { class: "field-error", id: `${key}-error`, role: "alert", hidden: true });
  const el = h("div", { class: "field", "data-field": key }, h("label", { for: control.id }, label), layout, hint ? h("p", { class: "hint muted" }, hint) : null, error);
  return { key, control, error, el };
}

function fileField(key, label, required) {
  const upload = h("input", { type: "file", id: `${key}-upload`, accept: ".jsonl,.json,.txt" });
  const existing = h("select", { id: `${key}-existing` }, h("option", { value: "" }, required ? "pick an uploaded file…" : "pick an uploaded file (optional)…"));
  upload.addEventListener("change", () => (existing.value = ""));
  existing.addEventListener("change", () => existing.value && (upload.value = ""));
  const layout = h("div", { class: "row tight" }, upload, h("span", { class: "muted" }, "or"), existing);
  return { ...field(key, label, upload, null, layout), existing };
}

// The file id to send: the chosen upload (sent now, once) or the picked existing file.
async function fileId(f, setStatus) {
  const file = f.control.files[0];
  if (!file) return f.existing.value || null;
  if (!uploaded.has(file)) {
    setStatus(`Uploading ${file.name}…`);
    uploaded.set(file, (await uploadFile(file)).id);
  }
  return uploaded.get(file);
}

function hyperparameterFields() {
  const fields = OPENAI_HP.map((k) => field(k, k, h("input", { id: `hp-${k}`, type: "text", inputmode: "decimal", placeholder: "auto", autocomplete: "off" })));
  const effort = h("select", { id: "hp-reasoning_effort" }, EFFORTS.map((e) => h("option", { value: e }, e)));
  fields.push(field("reasoning_effort", "reasoning_effort", effort));
  const extras = h("textarea", { id: "hp-extras", rows: 4, spellcheck: "false", class: "code", placeholder: '{"beta": 0.04, "lora_rank": 8, "max_completion_tokens": 64}' });
  const hint = "Our hyperparameters beyond OpenAI's (beta, kl_limit, lora_rank, temperature, max_completion_tokens, …; see the README), as a JSON object.";
  return { fields, extras: field("extras", "More hyperparameters (JSON)", extras, hint) };
}

// OpenAI's fields as typed (empty ones left out) and the extras box's keys beside them.
function readHyperparameters(hp) {
  const out = {};
  for (const f of hp.fields) {
    const v = f.key === "reasoning_effort" ? (f.control.value === "default" ? undefined : f.control.value) : hpValue(f.control.value);
    if (v !== undefined) out[f.key] = v;
  }
  const text = hp.extras.control.value.trim();
  if (!text) return out;
  let extras;
  try {
    extras = JSON.parse(text);
  } catch (err) {
    throw fail(`Not valid JSON: ${err.message}`, HP_PREFIX);
  }
  if (!extras || typeof extras !== "object" || Array.isArray(extras)) throw fail('Give a JSON object, such as {"beta": 0.02}.', HP_PREFIX);
  const twice = Object.keys(extras).filter((k) => hp.fields.some((f) => f.key === k));
  if (twice.length) throw fail(`Set ${twice.join(", ")} in ${twice.length > 1 ? "their fields" : "its field"} above, not here.`, HP_PREFIX);
  return { ...out, ...extras };
}

export function renderNewJob(root, _params, view) {
  const fields = {};
  const add = (f) => ((fields[f.key] = f), f.el);
  const training = fileField("training_file", "Training file (JSONL)", true);
  const validation = fileField("validation_file", "Validation file (JSONL, optional)", false);
  const preset = h("select", { id: "grader-preset" }, Object.keys(PRESETS).map((k) => h("option", { value: k }, k)), h("option", { value: "" }, "custom: paste a grader's JSON"));
  const graderText = h("textarea", { id: "grader-json", rows: 12, spellcheck: "false", class: "code" }, pretty(EXACT));
  const grader = field("grader", "Grader (JSON)", graderText);
  const graderOk = h("p", { class: "good field-ok", id: "grader-ok", hidden: true }, "The grader is valid.");
  grader.el.append(graderOk);
  const model = field("model", "Base model", h("select", { id: "model" }, h("option", { value: "" }, "Loading models…")));
  const suffix = field("suffix", "Suffix (optional)", h("input", { id: "suffix", type: "text", maxlength: 64, placeholder: "my-run", autocomplete: "off" }));
  const seed = field("seed", "Seed (optional)", h("input", { id: "seed", type: "text", inputmode: "numeric", placeholder: "random", autocomplete: "off" }));
  const hp = hyperparameterFields();
  const status = h("p", { class: "muted", id: "form-status" });
  const formError = h("div", { id: "form-error" });
  fields.form = { error: formError };
  const submit = h("button", { type: "submit", id: "create-job" }, "Create job");

  const clearErrors = () => {
    for (const f of Object.values(fields)) {
      if (f.key) {
        f.error.hidden = true;
        f.control.removeAttribute("aria-invalid");
      } else replace(f.error);
    }
  };
  const showError = (key, message) => {
    const f = fields[key] || fields.form;
    if (!f.key) return replace(f.error, errorBox(message));
    replace(f.error, message);
    f.error.hidden = false;
    f.control.setAttribute("aria-invalid", "true");
    return f.control;
  };

  const parseGrader = () => {
    try {
      return JSON.parse(graderText.value);
    } catch (err) {
      throw fail(`The grader is not valid JSON: ${err.message}`, "grader");
    }
  };
  // The grader alone, through the API; its error is shown at the field and thrown on.
  const validateGrader = async () => {
    graderOk.hidden = true;
    fields.grader.error.hidden = true;
    graderText.removeAttribute("aria-invalid");
    try {
      await api("/fine_tuning/alpha/graders/validate", { method: "POST", body: { grader: parseGrader() } });
      if (view.alive()) graderOk.hidden = false;
    } catch (err) {
      if (view.alive()) showError("grader", err.message);
      throw err;
    }
  };
  let pending = null;
  graderText.addEventListener("input", () => {
    preset.value = "";
    clearTimeout(pending);
    pending = setTimeout(() => validateGrader().catch(() => {}), 700);
  });
  preset.addEventListener("change", () => {
    if (!preset.value) return graderText.focus();
    clearTimeout(pending);
    graderText.value = pretty(PRESETS[preset.value]);
    validateGrader().catch(() => {});
  });

  const body = async () => {
    const grader = parseGrader();
    const job = { model: model.control.value, method: { type: "reinforcement", reinforcement: { grader, hyperparameters: readHyperparameters(hp) } } };
    if (suffix.control.value.trim()) job.suffix = suffix.control.value.trim();
    if (seed.control.value.trim()) job.seed = hpValue(seed.control.value);
    await validateGrader();
    for (const [key, f] of [["training_file", training], ["validation_file", validation]]) {
      try {
        const id = await fileId(f, (text) => replace(status, text));
        if (id) job[key] = id;
      } catch (err) {
        throw Object.assign(err, { param: key });
      }
    }
    if (!job.training_file) throw fail("Choose a training file to upload, or pick one uploaded before.", "training_file");
    return job;
  };

  const onSubmit = async (event) => {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    replace(status, "Checking…");
    try {
      const job = await api("/fine_tuning/jobs", { method: "POST", body: await body() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (!view.alive()) return;
      replace(status);
      const shown = showError(fieldFor(err.param), err.message);
      if (shown) shown.scrollIntoView({ block: "center" });
    } finally {
      submit.disabled = false;
    }
  };

  root.append(
    h("div", { class: "page-head" }, h("div", null, h("a", { href: "#/jobs", class: "back" }, "← Jobs"), h("h1", null, "New fine-tuning job"))),
    h(
      "form",
      { id: "new-job", onsubmit: onSubmit, novalidate: true },
      h("section", { class: "card" }, h("h2", null, "Data"), add(training), add(validation), h("p", { class: "hint muted" }, "One JSON object a line with messages and the fields the grader reads ({{item.answer}}, say). A new file is uploaded through POST /v1/files when you create the job.")),
      h("section", { class: "card" }, h("h2", null, "Grader"), h("div", { class: "toolbar" }, h("label", { for: "grader-preset" }, "Start from"), preset), add(grader)),
      h(
        "section",
        { class: "card" },
        h("h2", null, "Model and hyperparameters"),
        h("div", { class: "form-grid wide" }, add(model), add(suffix), add(seed)),
        h("h3", null, "Hyperparameters (empty: auto)"),
        h("div", { class: "form-grid" }, hp.fields.map(add)),
        add(hp.extras),
      ),
      formError,
      h("div", { class: "row submit-row" }, submit, status),
    ),
  );
  loadChoices(model.control, [training, validation]).catch((err) => view.alive() && showError("form", `Could not load the models or files: ${err.message}`));
}

async function loadChoices(modelSelect, fileFields) {
  const [models, files] = await Promise.all([api("/models"), listAll("/files")]);
  modelOptions(modelSelect, models.data);
  const mine = files.filter((f) => f.purpose === "fine-tune");
  for (const f of fileFields) f.existing.append(...mine.map((file) => h("option", { value: file.id }, `${file.filename} · ${file.id} · ${(file.bytes / 1024).toFixed(1)} KiB`)));
}
