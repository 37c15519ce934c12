// The admin console: plain DOM, no framework, no external requests. Every
// read and action is a call to this server's API with the admin token.
"use strict";

const TOKEN_KEY = "rocket-admin-token";
const PAGES = ["sources", "events", "playground", "learners"];
const $ = (id) => document.getElementById(id);
let sources = [];
let eventsCursor = null;

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function say(text, bad) {
  const s = $("status");
  s.textContent = text || "";
  s.className = bad ? "error" : "";
}

async function api(path, options) {
  const opts = options || {};
  const headers = Object.assign({ Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) }, opts.headers || {});
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  if (resp.status === 401 && !opts.keepSession) {
    logout("The token was refused. Log in again.");
  }
  return { status: resp.status, body };
}

function fail(r) {
  const msg = r.body && r.body.message ? r.body.message : "HTTP " + r.status;
  say(msg, true);
}

function isoOf(localValue) {
  return localValue ? new Date(localValue).toISOString() : "";
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
}

function when(rfc3339) {
  return new Date(rfc3339).toLocaleString();
}

// ------------------------------------------------------------- navigation

function route() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  $("tabs").hidden = !token;
  $("login").hidden = !!token;
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "sources";
  for (const p of PAGES) $(p).hidden = !token || p !== page;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === "#" + page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (token) loadPage(page);
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  say(message || "");
  route();
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  const r = await api("/api/admin/sources", { keepSession: true });
  if (r.status !== 200) {
    sessionStorage.removeItem(TOKEN_KEY);
    fail(r);
    return;
  }
  $("token").value = "";
  say("");
  route();
}

async function loadPage(page) {
  // Read again on every page: a reload of the config shows at once.
  await loadSources();
  if (page === "sources") renderSources();
  if (page === "events" && !$("events-rows").children.length) searchEvents();
}

// ---------------------------------------------------------------- sources

async function loadSources() {
  const r = await api("/api/admin/sources");
  if (r.status !== 200) return fail(r);
  sources = r.body.sources;
  const names = sources.map((s) => s.name);
  const namespaces = [...new Set(sources.map((s) => s.namespace))];
  fillSelect($("events-source"), names, "any");
  fillSelect($("playground-source"), names.filter((n) => !sources.find((s) => s.name === n).dry_run), "detect");
  fillSelect($("learner-namespace"), namespaces, null);
  fillSelect($("board-namespace"), namespaces, "all");
}

function fillSelect(select, values, empty) {
  const chosen = select.value;
  select.replaceChildren(...(empty ? [el("option", { value: "" }, empty)] : []), ...values.map((v) => el("option", { value: v }, v)));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

async function renderSources() {
  const since = new Date(Date.now() - 86400000).toISOString();
  const rows = await Promise.all(sources.map(async (s) => {
    const r = await api("/api/v1/events" + query({ source: s.name, since, limit: 500 }));
    const counts = {};
    const items = r.status === 200 ? r.body.items : [];
    for (const e of items) counts[e.status] = (counts[e.status] || 0) + 1;
    const more = r.status === 200 && r.body.next_cursor ? "+" : "";
    const summary = Object.keys(counts).length
      ? Object.entries(counts).map(([k, v]) => el("span", { class: k }, `${v}${more} ${k} `))
      : "none";
    return el("tr", {},
      el("th", { scope: "row" }, el("div", {}, s.name), el("div", { class: "hint" }, s.description)),
      el("td", { class: s.configured ? "ok" : "error" }, s.configured ? "configured" : "not set"),
      el("td", {}, s.auth.join(", ")),
      el("td", {}, s.content_types.join(", ")),
      el("td", {}, s.rules.join(", ") || "none"),
      el("td", {}, summary));
  }));
  $("sources-rows").replaceChildren(...rows);
}

// ----------------------------------------------------------------- events

function eventFilters() {
  const f = new FormData($("events-form"));
  return {
    source: f.get("source"), status: f.get("status"), event_type: f.get("event_type").trim(),
    user_id: f.get("user_id").trim(), since: isoOf(f.get("since")), until: isoOf(f.get("until")),
  };
}

async function searchEvents(more) {
  const params = Object.assign(eventFilters(), { limit: 50, cursor: more ? eventsCursor : "" });
  const r = await api("/api/v1/events" + query(params));
  if (r.status !== 200) return fail(r);
  const rows = r.body.items.map((e) => el("tr", {
    class: "clickable", tabindex: "0", "data-event": e.event_id,
    onclick: () => showEvent(e.event_id),
    onkeydown: (k) => { if (k.key === "Enter") showEvent(e.event_id); },
  },
    el("td", {}, when(e.received_at)), el("td", {}, e.source), el("td", {}, e.event_type || e.vendor_event_type || "—"),
    el("td", {}, e.user_id || "—"), el("td", { class: e.status }, e.status), el("td", {}, e.points)));
  if (more) $("events-rows").append(...rows);
  else $("events-rows").replaceChildren(...rows);
  eventsCursor = r.body.next_cursor;
  $("events-more").hidden = !eventsCursor;
  if (!more) say(rows.length ? "" : "No event matches.");
}

async function showEvent(id) {
  const r = await api("/api/v1/events/" + encodeURIComponent(id));
  if (r.status !== 200) return fail(r);
  const e = r.body;
  const request = e.request || {};
  const detail = $("event-detail");
  detail.dataset.event = e.event_id;
  detail.replaceChildren(...[
    el("h3", {}, `Event ${e.event_id}`),
    el("p", {}, `${e.source} · `, el("span", { class: e.status }, e.status), ` · ${e.points} points · received ${when(e.received_at)} · attempts ${e.attempts}`),
    e.error ? el("p", { class: "error" }, "Error: " + e.error) : null,
    el("h4", {}, "Canonical event"), el("pre", {}, JSON.stringify(e.canonical, null, 2)),
    el("h4", {}, "Awards"),
    e.awards.length ? el("ul", {}, e.awards.map((a) => el("li", {}, `${a.rule}: ${a.points}${a.reason ? " (" + a.reason + ")" : ""}`))) : el("p", {}, "none"),
    el("h4", {}, "Request"),
    el("pre", {}, JSON.stringify(request.headers || {}, null, 2)),
    el("pre", {}, request.body !== undefined ? request.body : "(base64) " + (request.body_base64 || "")),
    el("button", { type: "button", id: "replay-one", onclick: () => replay({ event_ids: [e.event_id] }) }, "Replay this event"),
  ].filter(Boolean));
  detail.hidden = false;
  detail.scrollIntoView({ block: "nearest" });
}

async function replay(body) {
  const r = await api("/api/admin/events/replay", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (r.status !== 200) return fail(r);
  const b = r.body;
  const first = b.items.find((i) => i.reason);
  await searchEvents();
  if (body.event_ids && body.event_ids.length === 1) await showEvent(body.event_ids[0]);
  say(`Replayed: ${b.processed} processed, ${b.rescored} rescored, ${b.unchanged} unchanged, ${b.failed} failed, ${b.skipped} skipped; ${b.points_delta} points.`
    + (first ? ` (${first.event_id}: ${first.reason})` : "") + (b.next_cursor ? " More match: replay again." : ""));
}

function replayAll() {
  const f = eventFilters();
  replay(Object.assign({}, ...Object.entries(f).filter(([, v]) => v).map(([k, v]) => ({ [k]: v }))));
}

// ------------------------------------------------------------- playground

function commandsFor(name, contentType) {
  const src = sources.find((s) => s.name === name);
  const url = `${location.origin}/api/public/hook/${name}/event`;
  const lines = [`rocket-rewards send --source ${name} --file payload.json`];
  if (src && src.auth.includes("bearer")) {
    lines.push(`curl -X POST ${url} -H "Authorization: Bearer $TOKEN" -H "Content-Type: ${contentType}" --data-binary @payload.json`);
  }
  return lines.join("\n");
}

async function copyCommands() {
  try {
    await navigator.clipboard.writeText($("playground-commands").innerText);
    say("Copied.");
  } catch (_) {
    say("The browser refused the clipboard: select the text instead.", true);
  }
}

async function runPlayground(event) {
  event.preventDefault();
  const f = new FormData($("playground-form"));
  const out = $("playground-result");
  const r = await api("/api/public/hook/test/event" + query({ as: f.get("source") }), {
    method: "POST", headers: { "Content-Type": f.get("content_type") }, body: f.get("payload"),
  });
  if (r.status !== 200) {
    const d = (r.body && r.body.details) || {};
    out.replaceChildren(el("div", { class: "card" },
      el("p", { class: "error" }, (r.body && r.body.message) || "HTTP " + r.status),
      d.missing_fields ? el("p", {}, "Missing: " + d.missing_fields.join(", ")) : null,
      d.invalid_fields ? el("p", {}, "Invalid: " + d.invalid_fields.join(", ")) : null));
    return;
  }
  const b = r.body;
  out.replaceChildren(el("div", { class: "card", id: "playground-outcome" },
    el("p", {}, `Source ${b.source}: `, el("strong", {}, `${b.points_awarded} points`), " (nothing stored)"),
    ...b.events.map((e) => el("div", {},
      el("pre", {}, JSON.stringify(e.event, null, 2)),
      e.rule_error ? el("p", { class: "error" }, "A rule fails: " + e.rule_error) : null,
      el("ul", {}, e.awards.map((a) => el("li", {}, `${a.rule}: ${a.points}`))))),
    el("h4", {}, "Send it"),
    el("pre", { id: "playground-commands" }, commandsFor(b.source, f.get("content_type"))),
    el("button", { type: "button", class: "secondary", onclick: copyCommands }, "Copy")));
}

// --------------------------------------------------------------- learners

async function lookUpLearner(event) {
  event.preventDefault();
  const f = new FormData($("learner-form"));
  const r = await api(`/api/v1/users/${encodeURIComponent(f.get("namespace"))}/${encodeURIComponent(f.get("user_id").trim())}`);
  if (r.status !== 200) return fail(r);
  const u = r.body;
  $("learner-result").replaceChildren(el("div", { class: "card" },
    el("p", {}, el("strong", {}, `${u.user_id}: ${u.total_points} points`), `, level ${u.level}, ${u.next_level_at - u.total_points} to the next level, ${u.event_count} events`),
    el("label", {}, "Progress to the next level",
      el("progress", { max: String(u.next_level_at), value: String(u.total_points) })),
    el("ul", {}, u.recent.map((e) => el("li", {}, `${when(e.occurred_at)} ${e.rule}: ${e.points}${e.course_id ? " (course " + e.course_id + ")" : ""}`)))));
}

async function showBoard(event) {
  if (event) event.preventDefault();
  const f = new FormData($("board-form"));
  const r = await api("/api/v1/leaderboard" + query({
    source: f.get("source"), course_id: f.get("course_id").trim(), since: isoOf(f.get("since")), until: isoOf(f.get("until")), limit: 50,
  }));
  if (r.status !== 200) return fail(r);
  $("board-rows").replaceChildren(...r.body.entries.map((e) =>
    el("tr", {}, el("td", {}, e.rank), el("td", {}, e.source), el("td", {}, e.user_id), el("td", {}, e.points))));
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout("Logged out."));
  $("events-form").addEventListener("submit", (e) => { e.preventDefault(); searchEvents(); });
  $("events-more").addEventListener("click", () => searchEvents(true));
  $("replay-all").addEventListener("click", replayAll);
  $("playground-form").addEventListener("submit", runPlayground);
  $("learner-form").addEventListener("submit", lookUpLearner);
  $("board-form").addEventListener("submit", showBoard);
  window.addEventListener("hashchange", () => { say(""); route(); });
  route();
});
