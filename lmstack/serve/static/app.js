// lmstack web app: Chat, Label and Monitor over the server's /v1 and /api endpoints.
// Plain JS, no dependencies. Model text is always inserted as text (never as HTML).
"use strict";

const KEY_STORE = "lmstack.apiKey";
const NAME_STORE = "lmstack.labeller";
const MODEL_STORE = "lmstack.model";
const $ = (id) => document.getElementById(id);

const MAX_TOOL_ROUNDS = 4; // tool rounds per reply (as `lmstack chat`); a call after that is not run

const state = {
  model: null, // the id the chat talks to: the model, or an assistant served on it (the picker)
  models: [], // [{id, assistant, tools}] from /api/info
  maxModelLen: 0,
  database: true,
  tools: [], // the OpenAI specs of the server's tools (from /api/info), sent with the model's chat requests
  tab: null,
  chat: { id: null, messages: [], rated: new Set(), busy: false, controller: null, saving: null },
  label: { item: null, answers: null, choice: null, busy: false, loaded: false },
};

// --- talking to the server ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  let r;
  try {
    r = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("cannot reach the server (" + e.message + ")", 0, "network");
  }
  if (!r.ok) {
    let message = r.status + " " + r.statusText, code = null;
    try {
      const j = await r.json();
      if (j && j.error) {
        message = j.error.message || message;
        code = j.error.code;
      }
    } catch (_) { /* not JSON */ }
    if (r.status === 401) showKeyDialog(apiKey() ? "The server refused this API key." : "This server needs an API key.");
    throw new ApiError(message, r.status, code);
  }
  return r;
}

async function apiJSON(path, opts) {
  return (await api(path, opts)).json();
}

function showError(el, err) {
  if (!err) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.textContent = typeof err === "string" ? err : err.message;
  el.hidden = false;
}

// --- small DOM helpers ---------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
const THUMB_UP = "M1 21h4V9H1v12zm22-11c0-1.1-.9-2-2-2h-6.31l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L14.17 1 7.59 7.59C7.22 7.95 7 8.45 7 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z";
const THUMB_DOWN = "M15 3H6c-.83 0-1.54.5-1.84 1.22l-3.02 7.05c-.09.23-.14.47-.14.73v2c0 1.1.9 2 2 2h6.31l-.95 4.57-.03.32c0 .41.17.79.44 1.06L9.83 23l6.59-6.59c.36-.36.58-.86.58-1.41V5c0-1.1-.9-2-2-2zm4 0v12h4V3h-4z";

function icon(path) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const p = document.createElementNS(SVG_NS, "path");
  p.setAttribute("d", path);
  svg.append(p);
  return svg;
}

function escapeHTML(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Just enough Markdown for the labelling guide: headings, paragraphs, lists, **bold**, `code`.
function renderMarkdown(md) {
  const out = [];
  let para = [], list = null;
  const inline = (s) => escapeHTML(s)
    .replace(/\*\*(.+?)\*\*/g, "<strong>$1</strong>")
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/(^|\W)\*(\S.*?)\*(?=\W|$)/g, "$1<em>$2</em>");
  const flush = () => {
    if (para.length) out.push("<p>" + inline(para.join(" ")) + "</p>");
    para = [];
    if (list) out.push(`<${list.tag}>` + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + `</${list.tag}>`);
    list = null;
  };
  for (const line of md.split("\n")) {
    let m;
    if (!line.trim()) { flush(); continue; }
    if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      const n = Math.min(6, m[1].length + 2);
      out.push(`<h${n}>${inline(m[2])}</h${n}>`);
    } else if ((m = line.match(/^\s*(\d+\.|[-*])\s+(.*)$/))) {
      const tag = m[1].endsWith(".") ? "ol" : "ul";
      if (para.length || (list && list.tag !== tag)) flush();
      if (!list) list = { tag, items: [] };
      list.items.push(m[2]);
    } else if (list && /^\s/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim();
    } else {
      if (list) flush();
      para.push(line.trim());
    }
  }
  flush();
  return out.join("\n");
}

function roleName(role) {
  return { user: "You", assistant: "Assistant", system: "System", tool: "Tool" }[role] || role;
}

// A tool call's arguments for people: the single value of a one-argument call ("23 + 58"), else the JSON.
function showArgs(args) {
  try {
    const a = JSON.parse(args);
    const keys = a && typeof a === "object" && !Array.isArray(a) ? Object.keys(a) : [];
    if (keys.length === 1) return typeof a[keys[0]] === "string" ? a[keys[0]] : JSON.stringify(a[keys[0]]);
  } catch (_) { /* not JSON: as written */ }
  return String(args);
}

function toolCallLine(call, result) {
  const f = call.function || {};
  return "[" + f.name + "] " + showArgs(f.arguments) + (result === undefined ? "" : " -> " + result);
}

// A tool event the server streams for an assistant ({type: tool_call | tool_result, id, name,
// arguments, content?}), shown as a line in the reply: "running" until its result comes.
function showToolEvent(content, lines, ev) {
  const call = { function: { name: ev.name, arguments: ev.arguments } };
  let line = lines.get(ev.id);
  if (!line) {
    line = h("div", { class: "tool-call running" });
    lines.set(ev.id, line);
    content.append(line);
  }
  if (ev.type === "tool_result") {
    line.textContent = toolCallLine(call, ev.content || "(empty)");
    line.classList.remove("running");
    line.classList.toggle("failed", (ev.content || "").startsWith("error:"));
  } else {
    line.textContent = toolCallLine(call, "\u2026");
  }
}

function currentModel() {
  return state.models.find((m) => m.id === state.model) || { id: state.model, assistant: false, tools: [] };
}

// The picked model: the header, and the tools line (an assistant's tools are run by the server;
// the model's by this page, when the box is ticked).
function applyModel() {
  const m = currentModel();
  const names = state.tools.map((t) => t.function && t.function.name).filter(Boolean);
  $("model-name").textContent = m.id + (m.assistant ? " (assistant)" : "") + " \u00b7 " + state.maxModelLen + " tokens";
  $("tools").disabled = m.assistant || !names.length;
  $("tools-names").textContent = m.assistant ? (m.tools.length ? m.tools.join(", ") : "none")
                                             : (names.length ? names.join(", ") : "none on this server");
  $("tools-hint").textContent = m.assistant
    ? "This assistant's instructions and knowledge are added on the server, which runs its tools and shows each call and result."
    : "The model may call a tool; the server runs it and the model goes on with its result.";
}

function transcript(messages, highlight) {
  return h("div", { class: "transcript" }, ...messages.map((m, i) => {
    const calls = m.tool_calls || [];
    return h("div", { class: "turn " + m.role + (highlight && highlight.has(i) ? " rated" : "") },
      h("div", { class: "who", text: roleName(m.role) }),
      m.content || !calls.length ? h("div", { class: "text", text: m.content }) : null,
      ...calls.map((c) => h("div", { class: "tool-call", text: toolCallLine(c) })));
  }));
}

// --- tabs, key, startup ----------------------------------------------------------------------

function showTab(name) {
  if (!["chat", "label", "monitor"].includes(name)) name = "chat";
  state.tab = name;
  for (const b of document.querySelectorAll(".tab")) {
    b.classList.toggle("active", b.dataset.tab === name);
    b.setAttribute("aria-selected", b.dataset.tab === name);
  }
  for (const v of document.querySelectorAll(".view")) v.hidden = v.dataset.view !== name;
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "label" && !state.label.loaded) loadNextItem();
  if (name === "monitor") refreshMonitor();
  if (name === "chat") $("message").focus();
}

function showKeyDialog(reason) {
  $("key-reason").textContent = reason || "Set the API key this page sends to the server.";
  $("api-key").value = apiKey();
  $("key-dialog").hidden = false;
  $("api-key").focus();
}

function hideKeyDialog() {
  $("key-dialog").hidden = true;
}

async function loadInfo() {
  try {
    const info = await apiJSON("/api/info");
    state.database = info.database;
    state.tools = info.tools || [];
    state.maxModelLen = info.max_model_len;
    state.models = info.models || [{ id: info.model, assistant: false, tools: [] }];
    const ids = state.models.map((m) => m.id);
    const stored = localStorage.getItem(MODEL_STORE);
    if (!ids.includes(state.model)) state.model = ids.includes(stored) ? stored : (info.default || info.model);
    $("model").replaceChildren(...state.models.map((m) =>
      h("option", { value: m.id, text: m.id + (m.assistant ? " (assistant)" : "") })));
    $("model").value = state.model;
    $("model-box").hidden = state.models.length < 2;
    applyModel();
    showError($("banner"), info.database ? null : "No feedback database on this server: the chat works, but feedback, labelling and monitoring are off (start it with --db FILE).");
    for (const id of ["queue-box", "label-reload", "monitor-refresh"]) $(id).hidden = !info.database;
    if (!$("guide").innerHTML) loadGuide();
    return true;
  } catch (e) {
    if (e.status !== 401) showError($("banner"), "Cannot load the server's info: " + e.message);
    return false;
  }
}

async function start() {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  $("key-button").addEventListener("click", () => showKeyDialog());
  $("cancel-key").addEventListener("click", hideKeyDialog);
  $("clear-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); $("api-key").value = ""; });
  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    hideKeyDialog();
    if (await loadInfo()) {
      if (state.tab === "label" && !state.label.item) loadNextItem();
      if (state.tab === "monitor") refreshMonitor();
    }
  });
  setupChat();
  setupLabel();
  $("monitor-refresh").addEventListener("click", refreshMonitor);
  await loadInfo();
  showTab(location.hash.slice(1) || "chat");
}

// --- chat ----------------------------------------------------------------------------------------

function setupChat() {
  const temp = $("temperature");
  const showTemp = () => { $("temperature-value").textContent = Number(temp.value).toFixed(1); };
  temp.addEventListener("input", showTemp);
  showTemp();
  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("message").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  $("regenerate").addEventListener("click", regenerate);
  $("stop").addEventListener("click", () => state.chat.controller && state.chat.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", () => {
    if (state.chat.busy) { $("model").value = state.model; return; }
    state.model = $("model").value;
    localStorage.setItem(MODEL_STORE, state.model);
    applyModel();
    if (state.chat.messages.length) newChat(); // one conversation, one model
  });
}

function setBusy(busy) {
  state.chat.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
  $("model").disabled = busy;
  $("regenerate").disabled = busy || !state.chat.messages.some((m) => m.role === "user");
}

function newChat() {
  const c = state.chat;
  if (c.busy) return;
  c.id = null;
  c.messages = [];
  c.rated = new Set();
  for (const el of [...$("messages").querySelectorAll(".msg")]) el.remove();
  $("chat-empty").hidden = false;
  $("conversation-id").textContent = "";
  showError($("chat-error"), null);
  setBusy(false);
  $("message").focus();
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function addMessage(index, role, content) {
  $("chat-empty").hidden = true;
  const text = h("div", { class: "content" });
  const el = h("div", { class: "msg " + role, id: "msg-" + index, "data-index": index },
    h("div", { class: "role", text: roleName(role) }), text);
  setContent(text, content);
  $("messages").append(el);
  scrollDown();
  return el;
}

function setContent(el, content) {
  el.textContent = content;
  el.classList.toggle("empty", !content);
  if (!content && !el.closest(".streaming")) el.textContent = "(empty reply: the model wrote no text, or only a tool call)";
}

// The messages sent to the model: the system prompt, then the conversation and `extra` (the
// current reply's tool rounds). Empty replies are left out: the chat template refuses empty turns.
function promptMessages(extra = []) {
  const msgs = [];
  const system = $("system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  for (const m of state.chat.messages.concat(extra)) {
    const calls = m.tool_calls && m.tool_calls.length ? m.tool_calls : null;
    if (!(m.content || "").trim() && !calls) continue;
    const out = { role: m.role, content: m.content };
    if (calls) out.tool_calls = calls;
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    msgs.push(out);
  }
  return msgs;
}

async function send() {
  const c = state.chat;
  const text = $("message").value.trim();
  if (!text || c.busy) return;
  if (!state.model && !(await loadInfo())) return;
  showError($("chat-error"), null);
  $("message").value = "";
  c.messages.push({ role: "user", content: text });
  addMessage(c.messages.length - 1, "user", text);
  await reply(true);
}

async function regenerate() {
  const c = state.chat;
  if (c.busy || !c.messages.length) return;
  showError($("chat-error"), null);
  if (c.messages[c.messages.length - 1].role !== "user") {
    // The whole reply goes, its tool rounds too: back to the last user message. Its bubble has
    // the index of its last message.
    const i = c.messages.length - 1;
    c.messages.length = c.messages.map((m) => m.role).lastIndexOf("user") + 1;
    const el = $("msg-" + i);
    if (el) el.remove();
    // A rated reply stays in the saved conversation (its rating points at it): the new reply
    // goes into a new conversation.
    if (c.rated.has(i)) {
      c.id = null;
      c.rated = new Set();
      $("conversation-id").textContent = "";
      for (const b of $("messages").querySelectorAll(".thumb")) {
        b.disabled = true;
        b.classList.remove("selected");
      }
      for (const s of $("messages").querySelectorAll(".feedback-status")) s.textContent = "";
    }
  }
  await reply();
}

// One streamed chat completion. `acc` collects its text, tool calls and finish reason as they
// come (so a stopped stream keeps what arrived); onText(text so far) after each piece of text;
// onTool(event) for each tool event an assistant's reply streams, and acc.messages gets what the
// reply added to the conversation (an assistant's finishing chunk has them).
async function streamCompletion(body, signal, acc, onText, onTool = () => {}) {
  const r = await api("/v1/chat/completions", { method: "POST", body, signal });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const chunk = await reader.read();
    if (chunk.done) return;
    buf += decoder.decode(chunk.value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.message, 500, obj.error.code);
        const ch = obj.choices && obj.choices[0];
        if (!ch) continue;
        const delta = ch.delta || {};
        if (delta.content) {
          acc.text += delta.content;
          onText(acc.text);
        }
        for (const tc of delta.tool_calls || []) { // whole (this server) or in pieces (OpenAI)
          const k = Number.isInteger(tc.index) ? tc.index : acc.calls.length;
          const f = tc.function || {};
          const call = acc.calls[k] || (acc.calls[k] = { id: "", type: "function", function: { name: "", arguments: "" } });
          if (tc.id) call.id = tc.id;
          if (f.name) call.function.name += f.name;
          if (f.arguments) call.function.arguments += f.arguments;
        }
        if (ch.tool_event) onTool(ch.tool_event);
        if (ch.messages) acc.messages = ch.messages;
        if (ch.finish_reason) acc.finish = ch.finish_reason;
      }
    }
  }
}

// Run one tool call on the server; the result text. A call the server cannot take (unknown
// tool, arguments too long) is an "error: ..." result the model reads, like a failing tool.
async function runTool(call) {
  try {
    const r = await apiJSON("/api/tools/" + encodeURIComponent(call.function.name),
                            { method: "POST", body: { arguments: call.function.arguments } });
    return r.content;
  } catch (e) {
    if (e.status >= 400 && e.status < 500 && e.status !== 401) return "error: " + e.message;
    throw e;
  }
}

// The next assistant reply, streamed into one bubble. With tools on, a reply that ends with tool
// calls has them run (each shown as a line: [calculator] 23 + 58 -> 81), their results added
// as tool messages, and the model asked again, at most MAX_TOOL_ROUNDS times. An assistant
// (picked in the model list) does all that on the server: one request, whose tool events
// (its knowledge lookup, each call and result) come as lines, and whose last chunk says what the
// reply added. The conversation gets every message (assistant messages with tool_calls, tool
// messages, the final reply); the bubble, its id and its thumbs belong to the final reply.
// fresh: the last user message was just sent; if a request fails, the whole reply is dropped
// and that message goes back into the message box (to edit or send again).
async function reply(fresh = false) {
  const c = state.chat;
  const start = c.messages.length;
  const el = addMessage(start, "assistant", "");
  el.classList.add("streaming");
  const content = el.querySelector(".content");
  setContent(content, "");
  setBusy(true);
  c.controller = new AbortController();
  const signal = c.controller.signal;
  const assistant = currentModel().assistant;
  const useTools = !assistant && $("tools").checked && state.tools.length > 0;
  const rounds = []; // this reply's tool rounds: assistant messages with tool_calls, tool messages
  let acc = { text: "", calls: [], finish: null }, stopped = false, unrun = false;
  try {
    for (let round = 0; ; round++) {
      let seg = h("span", { class: "seg" });
      content.append(seg);
      acc = { text: "", calls: [], finish: null, messages: null };
      const body = { model: state.model, messages: promptMessages(rounds), stream: true,
                     temperature: Number($("temperature").value) };
      if (useTools) body.tools = state.tools;
      const maxTokens = parseInt($("max-tokens").value, 10);
      if (maxTokens > 0) body.max_tokens = maxTokens;
      const lines = new Map();
      let shown = 0; // how much of acc.text the segments show (an assistant's rounds stream in one go)
      await streamCompletion(body, signal, acc, (text) => {
        seg.textContent += text.slice(shown);
        shown = text.length;
        content.classList.remove("empty");
        scrollDown();
      }, (ev) => {
        showToolEvent(content, lines, ev);
        seg = h("span", { class: "seg" }); // the next round's text goes after the line
        content.append(seg);
        content.classList.remove("empty");
        scrollDown();
      });
      if (assistant) { // the server ran the tool rounds: keep what it says the reply added
        const added = acc.messages || [];
        rounds.push(...added.slice(0, -1));
        const last = added[added.length - 1];
        if (last) acc.text = last.content || "";
        if (acc.finish === "tool_calls") {
          unrun = true;
          acc.calls = (last && last.tool_calls) || [];
          for (const call of acc.calls) content.append(h("div", { class: "tool-call unrun", text: toolCallLine(call, "not run") }));
        }
        break;
      }
      const calls = acc.calls.filter((x) => x && x.function.name)
        .map((x, k) => ({ id: x.id || `call_${start + rounds.length}_${k}`, type: "function",
                          function: { name: x.function.name, arguments: x.function.arguments || "{}" } }));
      if (!calls.length) break;
      content.classList.remove("empty");
      if (round === MAX_TOOL_ROUNDS) { // out of rounds: the calls stay in the reply, not run
        unrun = true;
        acc.calls = calls;
        for (const call of calls) content.append(h("div", { class: "tool-call unrun", text: toolCallLine(call, "not run") }));
        break;
      }
      rounds.push({ role: "assistant", content: acc.text, tool_calls: calls });
      for (const call of calls) {
        const line = h("div", { class: "tool-call running", text: toolCallLine(call, "\u2026") });
        content.append(line);
        scrollDown();
        const result = (await runTool(call)) || "(empty)";
        line.textContent = toolCallLine(call, result);
        line.classList.remove("running");
        line.classList.toggle("failed", result.startsWith("error:"));
        rounds.push({ role: "tool", tool_call_id: call.id, content: result });
      }
      if (signal.aborted) { // Stop while the tools ran: no next round
        stopped = true;
        acc = { text: "", calls: [], finish: null };
        break;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
    } else {
      el.remove();
      let msg = e.message;
      if (e.code === "context_length_exceeded") {
        msg += rounds.length ? "\nThe tool results left no room for the reply: start a new chat, or turn tools off."
                             : "\nStart a new chat, or send a shorter message.";
      }
      if (fresh && !$("message").value) {
        const i = c.messages.length - 1;
        $("message").value = c.messages.pop().content;
        $("msg-" + i).remove();
        $("chat-empty").hidden = c.messages.length > 0;
      }
      showError($("chat-error"), msg);
      c.controller = null;
      setBusy(false);
      return;
    }
  }
  c.controller = null;
  const index = start + rounds.length; // the final reply's message index (what thumbs rate)
  c.messages.push(...rounds);
  const last = { role: "assistant", content: acc.text };
  if (unrun) last.tool_calls = acc.calls;
  c.messages.push(last);
  el.id = "msg-" + index;
  el.dataset.index = index;
  el.classList.remove("streaming");
  el.classList.add("done");
  if (!content.textContent) setContent(content, "");
  else if (rounds.length && !acc.text.trim() && !unrun && !stopped) {
    content.append(h("span", { class: "seg empty", text: "(no text after the tool result)" }));
  }
  if (stopped) el.append(h("div", { class: "note", text: "Stopped." }));
  else if (unrun) el.append(h("div", { class: "note", text: assistant && !currentModel().tools.length ? "Tool calls not run: this assistant has no tools on this server."
                                                                    : `Tool calls not run: at most ${MAX_TOOL_ROUNDS} tool rounds per reply.` }));
  else if (acc.finish === "length") el.append(h("div", { class: "note", text: "Cut off: the reply reached the token limit (or the end of the context)." }));
  el.append(feedbackControls(index));
  setBusy(false);
  scrollDown();
  await saveConversation();
}

async function saveConversation() {
  const c = state.chat;
  if (!state.database) return;
  const body = { messages: c.messages, model: state.model, system: $("system").value.trim() || null };
  if (c.id) body.id = c.id;
  try {
    let r;
    try {
      r = await apiJSON("/api/conversations", { method: "POST", body });
    } catch (e) {
      if (e.status !== 404 || !body.id) throw e;
      delete body.id; // the saved conversation is gone: save a new one
      r = await apiJSON("/api/conversations", { method: "POST", body });
    }
    c.id = r.id;
    $("conversation-id").textContent = "Saved as conversation #" + r.id;
    for (const fb of $("messages").querySelectorAll(".feedback")) {
      if (!c.rated.has(Number(fb.dataset.index))) for (const b of fb.querySelectorAll(".thumb")) b.disabled = false;
    }
  } catch (e) {
    if (e.code === "no_database") state.database = false;
    else showError($("chat-error"), "Could not save the conversation: " + e.message);
  }
}

function feedbackControls(index) {
  const box = h("div", { class: "feedback", "data-index": index });
  if (!state.database) return box;
  const up = h("button", { class: "thumb up", id: "thumbs-up-" + index, type: "button", title: "Good reply",
                           "aria-label": "Thumbs up", disabled: true }, icon(THUMB_UP));
  const down = h("button", { class: "thumb down", id: "thumbs-down-" + index, type: "button", title: "Bad reply",
                             "aria-label": "Thumbs down", disabled: true }, icon(THUMB_DOWN));
  const status = h("span", { class: "feedback-status", id: "feedback-status-" + index });
  const comment = h("textarea", { id: "comment-" + index, rows: 2, maxlength: 2000 });
  const sendBtn = h("button", { class: "primary small", id: "send-feedback-" + index, type: "button", text: "Send feedback" });
  const cancel = h("button", { class: "ghost small", id: "cancel-feedback-" + index, type: "button", text: "Cancel" });
  const form = h("div", { class: "feedback-form", id: "feedback-form-" + index, hidden: true },
    comment, h("div", { class: "row end" }, cancel, sendBtn));
  let rating = 0;
  const open = (r) => {
    rating = r;
    up.classList.toggle("selected", r > 0);
    down.classList.toggle("selected", r < 0);
    comment.placeholder = r > 0 ? "What was good? (optional)" : "What was wrong? What should it have said? (optional)";
    form.hidden = false;
    comment.focus();
  };
  up.addEventListener("click", () => open(1));
  down.addEventListener("click", () => open(-1));
  cancel.addEventListener("click", () => {
    form.hidden = true;
    up.classList.remove("selected");
    down.classList.remove("selected");
  });
  sendBtn.addEventListener("click", async () => {
    const c = state.chat;
    if (!c.id) return;
    sendBtn.disabled = true;
    status.textContent = "Sending\u2026";
    try {
      await apiJSON("/api/feedback", { method: "POST", body: { conversation_id: c.id, message_index: index,
        rating, comment: comment.value.trim() || null } });
      c.rated.add(index);
      form.hidden = true;
      up.disabled = down.disabled = true;
      status.textContent = rating > 0 ? "Thanks! Feedback saved." : "Thanks! Flagged for review and queued for labelling.";
    } catch (e) {
      status.textContent = "Could not send: " + e.message;
      sendBtn.disabled = false;
    }
  });
  box.append(up, down, status, form);
  return box;
}

// --- label ---------------------------------------------------------------------------------------

function setupLabel() {
  for (const b of document.querySelectorAll(".choice")) b.addEventListener("click", () => choose(b.dataset.choice));
  $("label-submit").addEventListener("click", submitLabel);
  $("label-skip").addEventListener("click", () => loadNextItem(state.label.item ? state.label.item.id : null));
  $("label-reload").addEventListener("click", () => loadNextItem());
  $("queue-add").addEventListener("click", addToQueue);
  $("labeller").value = localStorage.getItem(NAME_STORE) || "";
  $("labeller").addEventListener("change", () => localStorage.setItem(NAME_STORE, $("labeller").value.trim()));
  document.addEventListener("keydown", (ev) => {
    if (state.tab !== "label" || !state.label.answers || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (["TEXTAREA", "INPUT"].includes(document.activeElement.tagName)) return;
    const c = { 1: "a", 2: "b", 3: "tie", 4: "both_bad" }[ev.key];
    if (c) choose(c);
  });
}

async function loadGuide() {
  try {
    $("guide").innerHTML = renderMarkdown((await apiJSON("/api/guide")).guide);
  } catch (e) {
    $("guide").textContent = "Cannot load the instructions: " + e.message;
  }
}

function choose(choice) {
  const L = state.label;
  if (!L.answers || L.busy) return;
  L.choice = choice;
  for (const b of document.querySelectorAll(".choice")) {
    b.classList.toggle("selected", b.dataset.choice === choice);
    b.setAttribute("aria-pressed", b.dataset.choice === choice);
  }
  $("answer-a-card").className = "card answer" + (choice === "a" ? " chosen" : choice === "b" || choice === "both_bad" ? " rejected" : "");
  $("answer-b-card").className = "card answer" + (choice === "b" ? " chosen" : choice === "a" || choice === "both_bad" ? " rejected" : "");
  if (choice === "both_bad") $("ideal-box").open = true;
  $("label-submit").disabled = false;
}

function labelView(which) {
  for (const id of ["label-item", "label-empty", "label-loading"]) $(id).hidden = id !== which;
}

async function loadNextItem(after) {
  const L = state.label;
  if (L.busy) return;
  if (!state.database) {
    labelView(null);
    $("label-status").textContent = "";
    showError($("label-error"), "Labelling needs the feedback database, and this server has none.");
    return;
  }
  L.busy = true;
  L.loaded = true;
  showError($("label-error"), null);
  labelView("label-loading");
  $("label-status").textContent = "";
  try {
    const q = after ? "?after=" + encodeURIComponent(after) : "";
    const r = await apiJSON("/api/label/next" + q);
    if (r.guide && !$("guide").innerHTML) $("guide").innerHTML = renderMarkdown(r.guide);
    L.item = r.item;
    L.answers = r.answers || null;
    L.choice = null;
    if (!r.item) {
      labelView("label-empty");
      $("label-status").textContent = "Nothing waiting.";
      return;
    }
    $("label-status").textContent = r.remaining + (r.remaining === 1 ? " prompt" : " prompts") + " waiting to be labelled";
    $("label-item-id").textContent = "#" + r.item.id + (r.item.source ? " \u00b7 " + r.item.source : "");
    $("label-prompt").replaceChildren(transcript(r.item.messages));
    for (const [k, id] of [[0, "label-answer-a"], [1, "label-answer-b"]]) {
      const a = L.answers ? L.answers[k] : "";
      $(id).textContent = a || "(empty answer)";
      $(id).classList.toggle("empty", !a);
    }
    for (const b of document.querySelectorAll(".choice")) {
      b.classList.remove("selected");
      b.disabled = !L.answers;
    }
    $("answer-a-card").className = $("answer-b-card").className = "card answer";
    $("label-ideal").value = "";
    $("label-comment").value = "";
    $("ideal-box").open = false;
    $("label-submit").disabled = true;
    if (r.error) showError($("label-error"), r.error);
    labelView("label-item");
  } catch (e) {
    labelView(null);
    showError($("label-error"), e);
  } finally {
    L.busy = false;
  }
}

async function submitLabel() {
  const L = state.label;
  if (!L.item || !L.answers || !L.choice || L.busy) return;
  L.busy = true;
  $("label-submit").disabled = true;
  showError($("label-error"), null);
  const labeller = $("labeller").value.trim();
  if (labeller) localStorage.setItem(NAME_STORE, labeller);
  try {
    await apiJSON("/api/label", { method: "POST", body: {
      item_id: L.item.id, answer_a: L.answers[0], answer_b: L.answers[1], choice: L.choice,
      ideal: $("label-ideal").value.trim() || null, comment: $("label-comment").value.trim() || null,
      labeller: labeller || null } });
    L.busy = false;
    $("label-status").textContent = "Saved.";
    await loadNextItem();
  } catch (e) {
    L.busy = false;
    $("label-submit").disabled = false;
    showError($("label-error"), e);
  }
}

async function addToQueue() {
  const prompt = $("queue-prompt").value.trim();
  if (!prompt) return;
  $("queue-add").disabled = true;
  try {
    const r = await apiJSON("/api/label/queue", { method: "POST", body: { prompt } });
    $("queue-prompt").value = "";
    $("queue-status").textContent = "Queued as #" + r.id + ".";
    if (!state.label.item) loadNextItem();
  } catch (e) {
    $("queue-status").textContent = "Could not queue it: " + e.message;
  } finally {
    $("queue-add").disabled = false;
  }
}

// --- monitor -------------------------------------------------------------------------------------

const STATS = [
  ["requests", "Requests", (s) => s.requests],
  ["errors", "Errors", (s) => s.errors, (s) => (s.errors ? "bad" : "")],
  ["prompt-tokens", "Prompt tokens", (s) => s.prompt_tokens],
  ["completion-tokens", "Completion tokens", (s) => s.completion_tokens],
  ["latency-p50", "Latency p50", (s) => ms(s.latency_ms && s.latency_ms.p50)],
  ["latency-p99", "Latency p99", (s) => ms(s.latency_ms && s.latency_ms.p99)],
  ["thumbs-up", "Thumbs up", (s) => s.thumbs_up, () => "good"],
  ["thumbs-down", "Thumbs down", (s) => s.thumbs_down, (s) => (s.thumbs_down ? "bad" : "")],
  ["conversations", "Conversations", (s) => s.conversations],
  ["flagged", "Flagged", (s) => s.flagged, (s) => (s.flagged ? "bad" : "")],
  ["to-label", "To label", (s) => s.to_label],
  ["comparisons", "Comparisons", (s) => s.comparisons],
  ["ideal-answers", "Ideal answers", (s) => s.ideal_answers],
  ["load", "Live / waiting / slots", (s) => s.load ? `${s.load.live} / ${s.load.waiting} / ${s.load.slots}` : "\u2013"],
];

function ms(v) {
  if (v === null || v === undefined) return "\u2013";
  return v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v) + " ms";
}

function when(t) {
  return new Date(t * 1000).toLocaleString();
}

async function refreshMonitor() {
  if (!state.database) {
    showError($("monitor-error"), "Monitoring needs the feedback database, and this server has none.");
    return;
  }
  $("monitor-refresh").disabled = true;
  try {
    const s = await apiJSON("/api/monitor");
    showError($("monitor-error"), null);
    $("stats").replaceChildren(...STATS.map(([id, name, value, tone]) =>
      h("div", { class: "stat " + (tone ? tone(s) : ""), id: "stat-" + id },
        h("div", { class: "num", text: String(value(s)) }), h("div", { class: "name", text: name }))));
    const list = s.flagged_conversations || [];
    $("flagged").replaceChildren(...(list.length ? list.map(flaggedCard) :
      [h("div", { class: "card empty-state", text: "No flagged conversations." })]));
    $("monitor-updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (e) {
    showError($("monitor-error"), e);
  } finally {
    $("monitor-refresh").disabled = false;
  }
}

function flaggedCard(conv) {
  const rated = new Set(conv.ratings.filter((r) => r.rating < 0).map((r) => r.message_index));
  const msgs = (conv.system ? [{ role: "system", content: conv.system }] : []).concat(conv.messages);
  const shift = conv.system ? 1 : 0;
  const ratings = conv.ratings.map((r) => h("div", { class: "rating" },
    h("span", { class: "tag " + (r.rating > 0 ? "up" : "down"), text: (r.rating > 0 ? "Thumbs up" : "Thumbs down") + " \u00b7 reply " + r.message_index }),
    h("span", { class: "comment" + (r.comment ? "" : " muted"), text: r.comment || "(no comment)" })));
  return h("div", { class: "card flagged-conv", id: "flagged-" + conv.id },
    h("div", { class: "meta", text: `Conversation #${conv.id} \u00b7 ${when(conv.updated)}` + (conv.model ? ` \u00b7 ${conv.model}` : "") }),
    ...ratings,
    h("details", {}, h("summary", { text: `Conversation (${conv.messages.length} messages)` }),
      transcript(msgs, new Set([...rated].map((i) => i + shift)))));
}

document.addEventListener("DOMContentLoaded", start);
