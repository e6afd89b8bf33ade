// The dashboard's shell: the API key, hash routing, and the polling each view asks for.
// Routes: #/jobs, #/jobs/new, #/jobs/{id}, #/jobs/{id}/rollouts, #/compare?jobs=a,b&metric=m,
// #/chat?model=m, #/playground.

import { ApiError, api, getKey, setKey } from "./api.js";
import { renderChat } from "./chat.js";
import { renderCompare } from "./compare.js";
import { errorBox, h, replace } from "./dom.js";
import { renderJob } from "./job.js";
import { renderJobs } from "./jobs.js";
import { renderNewJob } from "./newjob.js";
import { renderPlayground } from "./playground.js";
import { renderRollouts } from "./rollouts.js";

const ROUTES = [
  [/^#\/jobs\/new$/, renderNewJob, "new"],
  [/^#\/jobs\/([^/]+)\/rollouts$/, renderRollouts, "jobs"],
  [/^#\/jobs\/([^/]+)$/, renderJob, "jobs"],
  [/^#\/jobs$/, renderJobs, "jobs"],
  [/^#\/compare(?:\?|$)(.*)$/, renderCompare, "compare"],
  [/^#\/chat(?:\?|$)(.*)$/, renderChat, "chat"],
  [/^#\/playground$/, renderPlayground, "playground"],
];

let current = null;

// What a view gets: whether it is still on screen, a poller that stops when it is not, and a
// resize hook (charts are drawn at the width they have).
class ViewContext {
  constructor() {
    this.live = true;
    this.timers = new Set();
    this.resizers = [];
    this.stoppers = [];
  }

  alive() {
    return this.live;
  }

  // Runs `fn` now and then every `ms` while `active()` holds; never two runs at once.
  poll(fn, ms, active = () => true) {
    const tick = async () => {
      if (!this.live) return;
      try {
        await fn();
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) return keyRejected();
        console.warn("refresh failed:", err.message);
      }
      if (this.live && active()) this.timers.add(setTimeout(tick, ms));
    };
    tick();
  }

  onResize(fn) {
    this.resizers.push(fn);
  }

  // Work to end when the user leaves the view (a chat answer still streaming, say).
  onStop(fn) {
    this.stoppers.push(fn);
  }

  stop() {
    this.live = false;
    for (const t of this.timers) clearTimeout(t);
    for (const fn of this.stoppers) fn();
  }
}

function route() {
  if (current) current.stop();
  current = new ViewContext();
  const root = document.getElementById("view");
  const hash = location.hash || "#/jobs";
  renderKeyStatus();
  const matched = ROUTES.find(([pattern]) => pattern.test(hash));
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", Boolean(matched) && a.dataset.nav === matched[2]);
  }
  if (!getKey()) return renderKeyForm(root);
  if (!matched) return replace(root, errorBox(`No page at ${hash}.`), h("p", null, h("a", { href: "#/jobs" }, "Back to the jobs")));
  const [pattern, render] = matched;
  const params = hash.match(pattern).slice(1).map(decodeURIComponent);
  replace(root);
  window.scrollTo(0, 0);
  render(root, params, current);
}

function renderKeyStatus() {
  const box = document.getElementById("key-status");
  if (!getKey()) return replace(box, h("span", { class: "muted" }, "No API key"));
  const key = getKey();
  replace(
    box,
    h("span", { class: "muted key-hint", title: "Kept in this browser's localStorage" }, `key …${key.slice(-4)}`),
    h("button", { type: "button", class: "link", onclick: forgetKey }, "Forget key"),
  );
}

function forgetKey() {
  setKey("");
  route();
}

function keyRejected() {
  setKey("");
  route();
  const message = document.getElementById("key-message");
  if (message) replace(message, errorBox("That key was refused (401). Paste a valid key."));
}

function renderKeyForm(root) {
  const input = h("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "rft-…",
    required: true,
  });
  const message = h("div", { id: "key-message" });
  const submit = async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setKey(key);
    try {
      await api("/fine_tuning/jobs?limit=1");
    } catch (err) {
      setKey("");
      replace(message, errorBox(err.status === 401 ? "That key was refused (401). Check it and try again." : err.message));
      return;
    }
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else route();
  };
  replace(
    root,
    h(
      "section",
      { class: "card key-card" },
      h("h1", null, "Connect with an API key"),
      h(
        "p",
        null,
        "This dashboard reads everything through the public /v1 API, exactly like the openai SDK. ",
        "Paste a key once: it stays in this browser (localStorage) and is sent as an Authorization header.",
      ),
      h("p", { class: "muted" }, "rft serve prints one at start; rft keys create --project NAME makes another."),
      h("form", { onsubmit: submit }, h("label", { for: "api-key" }, "API key"), h("div", { class: "row" }, input, h("button", { type: "submit" }, "Connect"))),
      message,
    ),
  );
  input.focus();
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => current && current.resizers.forEach((fn) => fn()), 150);
});
window.addEventListener("hashchange", route);
window.addEventListener("storage", (event) => event.key === "rft.apiKey" && route());
route();
