// The dashboard's only way to data: the public /v1 API with the key the user pasted.

const KEY_NAME = "rft.apiKey";

export function getKey() {
  return localStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, message, error) {
    super(message);
    this.status = status;
    this.param = error && error.param;
    this.code = error && error.code;
  }
}

// The API's answer as JSON, or an ApiError carrying its `{message, param, code}`.
async function answer(response) {
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const error = json && json.error;
    throw new ApiError(response.status, (error && error.message) || text || response.statusText, error);
  }
  return json;
}

async function send(path, init) {
  const key = getKey();
  if (!key) throw new ApiError(401, "No API key: paste one first.");
  try {
    return await fetch(`/v1${path}`, { ...init, headers: { Authorization: `Bearer ${key}`, ...init.headers }, cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `The server did not answer (${err.message}). Is rft still running?`);
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const json = body !== undefined;
  const init = { method, headers: json ? { "Content-Type": "application/json" } : {}, body: json ? JSON.stringify(body) : undefined };
  return answer(await send(path, init));
}

// A file uploaded as the openai SDK does: multipart `file` and `purpose` to POST /v1/files.
export async function uploadFile(file, purpose = "fine-tune") {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return answer(await send("/files", { method: "POST", body: form }));
}

// POST /v1/chat/completions with `stream: true`: calls `onChunk` with each server-sent chunk
// until `[DONE]`; an error before the stream is an ApiError, one inside it (an `error` event) too.
export async function streamChat(body, onChunk, signal) {
  const init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ...body, stream: true }), signal };
  const response = await send("/chat/completions", init);
  if (!response.ok) return answer(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error);
      onChunk(chunk);
    }
  }
}

function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) query.set(k, v);
  return `${path}${path.includes("?") ? "&" : "?"}${query}`;
}

// Every page of a list, following `after` = the last id of each page (newest first).
export async function listAll(path, { limit = 100 } = {}) {
  const items = [];
  let after;
  for (;;) {
    const page = await api(withQuery(path, { limit, after }));
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = page.data[page.data.length - 1].id;
  }
}

// A job's events, fetched incrementally: each refresh pages from the newest event until a page
// holds one it already has. The whole newest page is merged by id, so an event committed a moment
// after a newer one is not missed. Kept newest first, as the API orders them.
export class EventLog {
  constructor(jobId) {
    this.path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`;
    this.events = [];
    this.ids = new Set();
  }

  async refresh() {
    const fetched = [];
    let after;
    for (;;) {
      const page = await api(withQuery(this.path, { limit: fetched.length ? 200 : 50, after }));
      fetched.push(...page.data);
      const metKnown = page.data.some((e) => this.ids.has(e.id));
      if (metKnown || !page.has_more || page.data.length === 0) break;
      after = page.data[page.data.length - 1].id;
    }
    const added = fetched.some((e) => !this.ids.has(e.id));
    const seen = new Set(fetched.map((e) => e.id));
    this.events = fetched.concat(this.events.filter((e) => !seen.has(e.id)));
    this.ids = new Set(this.events.map((e) => e.id));
    return added;
  }
}

// What the dashboard derives from a job's events: per-step metrics, the baseline evaluation,
// every evaluation's sampled completions, and the final-model choice with its reason.
export function digest(events) {
  const byStep = new Map();
  let baseline = null;
  let selection = null;
  for (const e of events) {
    const d = e.data;
    if (!d) continue;
    if (e.type === "metrics" && Number.isFinite(d.step) && !byStep.has(d.step)) byStep.set(d.step, d);
    else if (e.type === "message" && d.step === 0 && "reward" in d && !baseline) baseline = d;
    else if (e.type === "message" && "chosen_step" in d && !selection) selection = { ...d, message: e.message, level: e.level };
  }
  const metrics = [...byStep.values()].sort((a, b) => a.step - b.step);
  const evaluations = [];
  if (baseline) evaluations.push({ step: 0, reward: baseline.reward, kl: baseline.kl, samples: baseline.samples || [] });
  for (const m of metrics) {
    if (m.valid_reward_mean === undefined && !m.valid_samples) continue;
    evaluations.push({ step: m.step, reward: m.valid_reward_mean, kl: m.valid_kl, samples: m.valid_samples || [] });
  }
  const baselineReward = baseline ? baseline.reward : selection ? selection.baseline_valid_reward : null;
  return { metrics, baseline, baselineReward, evaluations, selection };
}

// Downloads need the Authorization header, so the file is fetched with the key and handed to the
// browser through an object URL; the key never appears in a URL.
export async function download(path, filename, onProgress) {
  const response = await fetch(`/v1${path}`, { headers: { Authorization: `Bearer ${getKey()}` } });
  if (!response.ok) {
    let message = response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch {
      /* not a JSON error body */
    }
    throw new ApiError(response.status, message);
  }
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (onProgress) onProgress(received, total);
  }
  const url = URL.createObjectURL(new Blob(chunks, { type: "application/x-tar" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
