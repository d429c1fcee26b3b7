// The megalodon-lm chat page: plain JavaScript against this server's own API (nothing loaded from elsewhere).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, session: localStorage.getItem("megalodon.session"), busy: false };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(body !== undefined),
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

function status(text, error) {
  $("status").textContent = text || "";
  $("status").classList.toggle("error", !!error);
}

function kib(n) { return (n / 1024).toFixed(1) + " KiB"; }

function showInfo(s) {
  const info = $("session-info");
  if (!s) { info.textContent = 'No session selected: start one with "+ New session".'; return; }
  info.dataset.tokens = s.tokens;
  info.dataset.stateBytes = s.state_bytes;
  info.textContent = `Session ${s.id} · history ${s.tokens.toLocaleString()} tokens, ${s.messages} messages · ` +
                     `state ${kib(s.state_bytes)} (at most ${kib(s.max_state_bytes)}, whatever the history length)`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function loadSessions() {
  const list = await api("GET", "/v1/sessions");
  const ul = $("session-list");
  ul.textContent = "";
  for (const s of list.data) {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    li.classList.toggle("active", s.id === state.session);
    li.textContent = s.id;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${s.tokens.toLocaleString()} tokens · ${s.messages} messages · ${kib(s.state_bytes)}`;
    li.appendChild(meta);
    li.addEventListener("click", () => openSession(s.id));
    ul.appendChild(li);
  }
  return list.data;
}

async function openSession(id) {
  state.session = id;
  localStorage.setItem("megalodon.session", id);
  $("messages").textContent = "";
  const [info, msgs] = await Promise.all([api("GET", `/v1/sessions/${id}`), api("GET", `/v1/sessions/${id}/messages`)]);
  for (const m of msgs.data) addMessage(m.role, m.content);
  showInfo(info);
  await loadSessions();
}

async function newSession() {
  const s = await api("POST", "/v1/sessions", {});
  await openSession(s.id);
  $("input").focus();
}

// Read server-sent events from a fetch response: calls onData with each parsed `data:` payload.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function send(text) {
  if (!state.session) await newSession();
  state.busy = true;
  $("send").disabled = true;
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  status("generating ...");
  const body = { model: state.model, session_id: state.session, stream: true,
                 messages: [{ role: "user", content: text }],
                 max_tokens: Number($("max-tokens").value) || 200,
                 temperature: Number($("temperature").value) };
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true),
                                                      body: JSON.stringify(body) });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
    }
    let failure = null;
    await readEvents(res, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { failure = chunk.error.message; return; }
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          out.textContent += c.delta.content;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    });
    if (failure) throw new Error(failure);
    showInfo(await api("GET", `/v1/sessions/${state.session}`));
    await loadSessions();
    status("");
  } catch (err) {
    status(err.message, true);
  } finally {
    out.classList.remove("streaming");
    out.classList.add("done");
    state.busy = false;
    $("send").disabled = false;
  }
}

async function start() {
  $("api-key").value = localStorage.getItem("megalodon.key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("megalodon.key", $("api-key").value); init(); });
  $("new-session").addEventListener("click", () => newSession().catch((e) => status(e.message, true)));
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  await init();
}

async function init() {
  try {
    const models = await api("GET", "/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = "model: " + state.model;
    const sessions = await loadSessions();
    if (state.session && sessions.some((s) => s.id === state.session)) await openSession(state.session);
    else { state.session = null; showInfo(null); }
    status("");
  } catch (err) {
    status(err.message + (/API key/.test(err.message) ? " (enter it under Settings)" : ""), true);
  }
}

start();
