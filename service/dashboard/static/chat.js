// Chat with a base model, a fine-tuned model or one of its checkpoints (GET /v1/models) through
// POST /v1/chat/completions, streamed as server-sent events or answered whole.

import { api, streamChat } from "./api.js";
import { errorBox, h, modelOptions, replace } from "./dom.js";

function numberOr(input, fallback) {
  const v = input.value.trim();
  return v === "" ? fallback : Number(v);
}

function bubble(role, text) {
  const body = h("div", { class: "text msg-text" }, text);
  const foot = h("div", { class: "msg-foot muted" });
  return { el: h("div", { class: `msg ${role}`, "data-role": role }, h("div", { class: "msg-role" }, role), body, foot), body, foot };
}

function settingsCard(model) {
  const c = {
    model,
    system: h("textarea", { id: "chat-system", rows: 3, placeholder: "You are a helpful assistant." }),
    temperature: h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: "1" }),
    maxTokens: h("input", { id: "chat-max-tokens", type: "number", min: 1, step: 1, value: "128" }),
    seed: h("input", { id: "chat-seed", type: "number", step: 1, placeholder: "random" }),
    stream: h("input", { id: "chat-stream", type: "checkbox", checked: true }),
  };
  c.errors = new Map(); // the API's `param` -> [input, its error line]
  const row = (id, text, input, ...params) => {
    const error = h("p", { class: "field-error", id: `${id}-error`, role: "alert", hidden: true });
    for (const p of params) c.errors.set(p, [input, error]);
    return h("div", { class: "field" }, h("label", { for: id }, text), input, error);
  };
  c.el = h(
    "section",
    { class: "card chat-settings" },
    h("h2", null, "Model"),
    row("chat-model", "Model or checkpoint", model, "model"),
    row("chat-system", "System message (optional)", c.system),
    h(
      "div",
      { class: "form-grid narrow" },
      row("chat-temperature", "Temperature", c.temperature, "temperature"),
      row("chat-max-tokens", "Max tokens", c.maxTokens, "max_completion_tokens", "max_tokens"),
      row("chat-seed", "Seed", c.seed, "seed"),
    ),
    h("label", { class: "check" }, c.stream, "Stream the answer"),
  );
  return c;
}

export function renderChat(root, [query], view) {
  const wanted = new URLSearchParams(query || "").get("model");
  const model = h("select", { id: "chat-model" }, h("option", { value: "" }, "Loading models…"));
  const settings = settingsCard(model);
  const log = h("div", { class: "chat-log", id: "chat-log" }, h("p", { class: "empty", id: "chat-empty" }, "Say something to the model."));
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", class: "secondary", id: "chat-stop", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "link", id: "chat-clear" }, "New conversation");
  const messages = [];
  let controller = null;

  // An error about a setting is shown at it; any other in the conversation.
  const showError = (err) => {
    const at = settings.errors.get(err.param);
    if (!at) return log.append(errorBox(`${err.status || ""} ${err.message}`.trim()));
    replace(at[1], err.message);
    at[1].hidden = false;
    at[0].setAttribute("aria-invalid", "true");
  };
  const clearErrors = () => {
    for (const box of log.querySelectorAll(".error-box")) box.remove();
    for (const [input, error] of settings.errors.values()) {
      error.hidden = true;
      input.removeAttribute("aria-invalid");
    }
  };

  const request = () => {
    const body = { model: model.value, messages: [], temperature: numberOr(settings.temperature, 1), max_completion_tokens: numberOr(settings.maxTokens, 128) };
    if (settings.system.value.trim()) body.messages.push({ role: "system", content: settings.system.value });
    body.messages.push(...messages);
    const seed = numberOr(settings.seed, null);
    if (seed !== null) body.seed = seed;
    return body;
  };

  // One turn: the answer grows in its bubble; on an error the turn is taken back into the input.
  const ask = async (text) => {
    const user = bubble("user", text);
    const reply = bubble("assistant", "");
    document.getElementById("chat-empty")?.remove();
    log.append(user.el, reply.el);
    messages.push({ role: "user", content: text });
    reply.el.classList.add("pending");
    controller = new AbortController();
    let answer = "";
    let finish = null;
    let usage = null;
    try {
      const body = request();
      if (settings.stream.checked) {
        await streamChat({ ...body, stream_options: { include_usage: true } }, (chunk) => {
          for (const c of chunk.choices) {
            answer += (c.delta && c.delta.content) || "";
            finish = c.finish_reason || finish;
          }
          usage = chunk.usage || usage;
          replace(reply.body, answer);
          log.scrollTop = log.scrollHeight;
        }, controller.signal);
      } else {
        const whole = await api("/chat/completions", { method: "POST", body });
        answer = whole.choices[0].message.content || "";
        finish = whole.choices[0].finish_reason;
        usage = whole.usage;
        replace(reply.body, answer);
      }
      messages.push({ role: "assistant", content: answer });
      replace(reply.foot, [finish && `finish: ${finish}`, usage && `${usage.completion_tokens} tokens`, body.model].filter(Boolean).join(" · "));
    } catch (err) {
      if (err.name === "AbortError" && answer) {
        messages.push({ role: "assistant", content: answer });
        replace(reply.foot, "stopped");
      } else {
        messages.pop();
        user.el.remove();
        reply.el.remove();
        input.value = text;
        if (view.alive() && err.name !== "AbortError") showError(err);
      }
    } finally {
      reply.el.classList.remove("pending");
      controller = null;
    }
  };

  const onSubmit = async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || controller || !model.value) return;
    clearErrors();
    input.value = "";
    send.disabled = true;
    stop.disabled = false;
    await ask(text);
    send.disabled = false;
    stop.disabled = true;
    if (view.alive()) input.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) onSubmit(event);
  });
  stop.addEventListener("click", () => controller && controller.abort());
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    messages.length = 0;
    replace(log, h("p", { class: "empty", id: "chat-empty" }, "Say something to the model."));
  });

  root.append(
    h("div", { class: "page-head" }, h("h1", null, "Chat"), clear),
    h(
      "div",
      { class: "chat-layout" },
      settings.el,
      h("section", { class: "card chat-main" }, log, h("form", { id: "chat-form", onsubmit: onSubmit }, input, h("div", { class: "row" }, send, stop))),
    ),
  );
  view.onStop(() => controller && controller.abort());
  loadModels(model, wanted).catch((err) => view.alive() && log.append(errorBox(`Could not list the models: ${err.message}`)));
}

async function loadModels(select, wanted) {
  const models = (await api("/models")).data;
  modelOptions(select, models);
  if (wanted && !models.some((m) => m.id === wanted)) select.append(h("option", { value: wanted }, wanted));
  if (wanted) select.value = wanted;
}
