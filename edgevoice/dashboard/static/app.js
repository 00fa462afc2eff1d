// edgevoice dashboard: renders the live feed of /dashboard/feed and runs the "try it" microphone panel.
// Plain browser JavaScript, no build step. The page's own ?token= is passed on to the feed and /asr-multicam.
"use strict";

const params = new URLSearchParams(location.search);
let token = params.get("token") || "";

const MAX_LINES = 40; // final lines kept per stream
const MAX_EVENTS = 200; // keyword/delivery rows kept
const MAX_STOPPED = 30; // stopped streams kept on screen
const STOPPED_TTL_MS = 10 * 60 * 1000;
const HIGH_LAG_S = 2.0;

const $ = (id) => document.getElementById(id);

function withToken(path) {
  if (!token) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

function wsURL(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + withToken(path);
}

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmtSeconds(s) {
  if (s == null || Number.isNaN(Number(s))) return "–";
  s = Number(s);
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function fmtClock(t) {
  if (t == null) return "";
  const m = Math.floor(t / 60);
  const s = Math.floor(t % 60);
  return m + ":" + String(s).padStart(2, "0");
}

// Audio level in dBFS (the hub sends -100 for silence); the meter spans -60..0 dBFS.
function levelPercent(db) {
  if (db == null || Number.isNaN(Number(db))) return 0;
  return Math.max(0, Math.min(100, ((Number(db) + 60) / 60) * 100));
}

// ---------------------------------------------------------------- state

const state = {
  streams: new Map(), // stream_id -> stream record
  events: [], // newest last
  health: null,
  status: "",
  uptime: null,
};

function streamRecord(id) {
  let s = state.streams.get(id);
  if (!s) {
    s = { stream_id: id, session_id: null, customer_id: null, source: null, lag_s: null, level: null, lines: [], partial: null, stopped: false, stoppedAt: 0, missing: 0, started: Date.now() };
    state.streams.set(id, s);
  }
  return s;
}

function absorb(s, msg) {
  for (const key of ["session_id", "customer_id", "source", "lag_s", "level", "language"]) {
    if (msg[key] !== undefined) s[key] = msg[key];
  }
}

function handle(msg) {
  switch (msg.type) {
    case "hello":
      state.streams.clear();
      state.events = [];
      applySnapshot(msg.snapshot);
      for (const m of msg.history || []) handle(m);
      break;
    case "snapshot":
      applySnapshot(msg);
      break;
    case "stream_started": {
      const s = streamRecord(msg.stream_id);
      absorb(s, msg);
      if (s.stopped) { s.lines = []; s.partial = null; }
      s.stopped = false;
      s.missing = 0;
      break;
    }
    case "transcript": {
      const s = streamRecord(msg.stream_id);
      absorb(s, msg);
      const line = { speaker: msg.speaker, text: msg.text, start: msg.start, end: msg.end };
      if (msg.final) {
        s.lines.push(line);
        if (s.lines.length > MAX_LINES) s.lines.splice(0, s.lines.length - MAX_LINES);
        s.partial = null;
      } else {
        s.partial = line;
      }
      break;
    }
    case "keyword":
      keywordFired(msg);
      if (msg.stream_id) absorb(streamRecord(msg.stream_id), msg);
      break;
    case "delivery":
      deliveryUpdate(msg);
      break;
    case "stream_stopped": {
      const s = streamRecord(msg.stream_id);
      absorb(s, msg);
      s.stopped = true;
      s.stoppedAt = Date.now();
      s.partial = null;
      break;
    }
    default:
      break;
  }
  scheduleRender();
}

function applySnapshot(snap) {
  if (!snap) return;
  state.health = snap.health || {};
  state.status = snap.status || "";
  state.uptime = snap.uptime_s;
  if (Array.isArray(snap.streams)) {
    const listed = new Set();
    for (const info of snap.streams) {
      const id = info.stream_id || info.id;
      if (!id) continue;
      listed.add(id);
      const s = streamRecord(id);
      absorb(s, info);
      s.stopped = false;
      s.missing = 0;
    }
    // A stream the daemon no longer lists twice in a row has ended (its stop message may have been missed).
    for (const s of state.streams.values()) {
      if (!s.stopped && !listed.has(s.stream_id) && ++s.missing >= 2) {
        s.stopped = true;
        s.stoppedAt = Date.now();
        s.partial = null;
      }
    }
  }
  scheduleRender();
}

function keywordFired(msg) {
  let row = msg.event_id ? state.events.find((r) => r.event_id === msg.event_id) : null;
  // A delivery update may have arrived first: attach the keyword to it.
  if (!row) row = state.events.find((r) => !r.fired && r.customer_id === msg.customer_id && r.event === msg.event);
  if (!row) {
    row = { event_id: msg.event_id || null, state: "fired", detail: "" };
    state.events.push(row);
  }
  Object.assign(row, {
    fired: true,
    event: msg.event,
    customer_id: msg.customer_id,
    session_id: msg.session_id,
    stream_id: msg.stream_id,
    text: msg.text,
    time: row.time || Date.now(),
  });
  trimEvents();
}

function deliveryUpdate(msg) {
  let row = state.events.find((r) => r.event_id && r.event_id === msg.event_id);
  if (!row) row = [...state.events].reverse().find((r) => !r.event_id && r.customer_id === msg.customer_id && r.event === msg.event);
  if (!row) {
    row = { fired: false, event: msg.event, customer_id: msg.customer_id, time: Date.now() };
    state.events.push(row);
  }
  row.event_id = msg.event_id;
  row.state = msg.state;
  row.detail = msg.detail || "";
  trimEvents();
}

function trimEvents() {
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
}

// ---------------------------------------------------------------- rendering

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  pruneStopped();
  renderStatus();
  renderCards();
  renderStreams();
  renderEvents();
}

function pruneStopped() {
  const now = Date.now();
  const stopped = [...state.streams.values()].filter((s) => s.stopped).sort((a, b) => b.stoppedAt - a.stoppedAt);
  stopped.forEach((s, i) => {
    if (i >= MAX_STOPPED || now - s.stoppedAt > STOPPED_TTL_MS) state.streams.delete(s.stream_id);
  });
}

function renderStatus() {
  const el = $("status");
  el.textContent = state.status;
  el.className = "pill " + (state.status === "healthy" ? "pill-ok" : state.status ? "pill-bad" : "");
  $("uptime").textContent = state.uptime != null ? "up " + fmtSeconds(state.uptime) : "";
}

function dl(pairs) {
  const rows = pairs.filter(([, v]) => v !== undefined && v !== null && v !== "");
  if (!rows.length) return '<p class="muted">no data</p>';
  return "<dl>" + rows.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(typeof v === "object" ? JSON.stringify(v) : v)}</dd>`).join("") + "</dl>";
}

function genericSection(obj) {
  if (obj == null) return '<p class="muted">not running</p>';
  if (typeof obj !== "object") return dl([["value", obj]]);
  return dl(Object.entries(obj));
}

function pick(health, names) {
  for (const n of names) if (health[n] !== undefined) return health[n];
  return undefined;
}

function badge(ok, yes, no) {
  return `<span class="state ${ok ? "state-delivered" : "state-dead"}">${esc(ok ? yes : no)}</span>`;
}

function nonzero(v) {
  return v ? v : undefined;
}

function basename(path) {
  return typeof path === "string" ? path.replace(/\/+$/, "").split("/").pop() : path;
}

function renderCards() {
  const h = state.health || {};
  $("raw-health").textContent = JSON.stringify(h, null, 2);

  // Event spool: the `spool` section of /health (delivery).
  const spool = pick(h, ["spool", "delivery", "event_queue"]);
  $("card-spool").querySelector(".body").innerHTML =
    spool && typeof spool === "object"
      ? dl([
          ["waiting", spool.waiting ?? spool.depth],
          ["dead", spool.dead],
          ["oldest", spool.oldest_age_s != null ? fmtSeconds(spool.oldest_age_s) : spool.waiting === 0 ? "–" : undefined],
          ["in flight", spool.in_flight],
          ["sending", spool.sending === undefined ? undefined : spool.sending ? "yes" : "no (events.url not set)"],
          ["refused", nonzero(spool.refused)],
          ["dropped", nonzero(spool.dropped)],
          ["expired", nonzero(spool.expired)],
          ["writer", spool.writer_alive === false ? "STOPPED" : undefined],
          ["error", spool.error],
        ])
      : genericSection(spool);

  // Model: the `asr` section (recognition).
  const asr = pick(h, ["asr", "recognition"]);
  $("card-model").querySelector(".body").innerHTML =
    asr && typeof asr === "object"
      ? (asr.alive !== undefined ? `<p>${badge(asr.alive, "running", "stalled")}</p>` : "") +
        dl([
          ["model", basename(asr.model)],
          ["device", [asr.device, asr.compute_type].filter(Boolean).join(", ")],
          ["language", asr.multilingual === undefined ? undefined : asr.multilingual ? "multilingual" : "English only"],
          ["speakers", asr.diarization],
          ["streams", asr.streams],
          ["max lag", asr.max_lag_s != null ? Number(asr.max_lag_s).toFixed(2) + " s" : undefined],
          ["batches", asr.batches],
          ["partials skipped", nonzero(asr.partials_skipped)],
          ["errors", nonzero(asr.errors)],
          ["error", asr.error],
        ])
      : genericSection(asr);

  // Devices: the `devices` section (local microphone arrays), a list.
  const devices = pick(h, ["devices", "mic", "microphones"]);
  const devBody = $("card-devices").querySelector(".body");
  const list = Array.isArray(devices) ? devices : devices && Array.isArray(devices.devices) ? devices.devices : null;
  if (list && list.length) {
    devBody.innerHTML =
      "<ul>" +
      list
        .map((d) => {
          const st = d.state ?? (d.up ? "up" : "down");
          const cls = st === "up" || st === "open" ? "state-delivered" : st === "down" ? "state-dead" : "state-waiting";
          const extra = [d.channels ? d.channels + " ch" : "", d.samplerate ? d.samplerate + " Hz" : "", d.overflow_frames ? d.overflow_frames + " frames dropped" : ""].filter(Boolean).join(", ");
          return `<li class="device" data-state="${esc(st)}">${esc(d.name ?? d.match ?? "device")} <span class="state ${cls}">${esc(st)}</span>
            ${extra ? `<div class="muted">${esc(extra)}</div>` : ""}${d.error ? `<div class="muted">${esc(d.error)}</div>` : ""}</li>`;
        })
        .join("") +
      "</ul>";
  } else {
    devBody.innerHTML = devices === undefined || list ? '<p class="muted">no capture device configured</p>' : genericSection(devices);
  }

  // Gemini bridge: the FunVoiceChat sections (`llm_service`, `sessions`, `funvoice`).
  const llm = h.llm_service;
  const sessions = h.sessions;
  const gem = h.funvoice;
  const gemBody = $("card-gemini").querySelector(".body");
  if (llm || gem) {
    const avail = llm ? llm.available : undefined;
    gemBody.innerHTML =
      (avail !== undefined ? `<p>${badge(avail, "available", "unavailable")}</p>` : "") +
      dl([
        ["model", gem?.model],
        ["Live sessions", gem?.live_connections],
        ["conversations", sessions?.active_sessions],
        ["users", sessions?.total_users],
        ["resumptions", nonzero(gem?.resumptions)],
        ["checked", gem?.checked_at ? new Date(gem.checked_at * 1000).toLocaleTimeString() : undefined],
        ["error", gem?.error ?? llm?.error],
      ]);
  } else {
    gemBody.innerHTML = '<p class="muted">bridge off (funvoice.enabled = false)</p>';
  }
}

function renderStreams() {
  const groups = new Map(); // session -> customer -> [streams]
  let active = 0;
  for (const s of state.streams.values()) {
    if (!s.stopped) active++;
    const sk = s.session_id || "";
    const ck = s.customer_id || "";
    if (!groups.has(sk)) groups.set(sk, new Map());
    const g = groups.get(sk);
    if (!g.has(ck)) g.set(ck, []);
    g.get(ck).push(s);
  }
  $("stream-count").textContent = state.streams.size ? `${active} active` : "";
  if (!groups.size) {
    $("sessions").innerHTML = '<p class="empty">No stream open.</p>';
    return;
  }
  const html = [];
  // Sessions and customers by name; streams with no customer bound (idle mic seats) last.
  const byName = ([a], [b]) => (a === "") - (b === "") || a.localeCompare(b);
  for (const [session, customers] of [...groups].sort(byName)) {
    html.push(`<div class="session" data-session="${esc(session)}"><h3><span class="label">session</span> ${session ? esc(session) : '<span class="muted">no session</span>'}</h3>`);
    for (const [customer, streams] of [...customers].sort(byName)) {
      html.push(`<div class="customer" data-customer="${esc(customer)}"><h4>${customer ? "customer " + esc(customer) : '<span class="muted">no customer bound</span>'}</h4>`);
      for (const s of streams.sort((a, b) => a.stream_id.localeCompare(b.stream_id))) html.push(streamHTML(s));
      html.push("</div>");
    }
    html.push("</div>");
  }
  $("sessions").innerHTML = html.join("");
}

function streamHTML(s) {
  const lag = s.lag_s != null ? Number(s.lag_s) : null;
  const lines = s.lines
    .map((l) => `<li class="final"><span class="time">${fmtClock(l.start)}</span><span class="speaker">${esc(l.speaker || "")}</span>${esc(l.text)}</li>`)
    .join("");
  const partial = s.partial ? `<li class="partial"><span class="speaker">${esc(s.partial.speaker || "")}</span>${esc(s.partial.text)}</li>` : "";
  return `<div class="stream${s.stopped ? " stopped" : ""}" data-stream="${esc(s.stream_id)}">
    <div class="stream-head"><span class="id">${esc(s.stream_id)}</span>
      ${s.source ? `<span class="muted">${esc(s.source)}</span>` : ""}
      ${s.stopped ? '<span class="pill">stopped</span>' : ""}
      <span class="lag${lag != null && lag > HIGH_LAG_S ? " high" : ""}" title="recognition lag">lag ${lag != null ? lag.toFixed(1) + " s" : "–"}</span>
      <span class="meter" title="audio level"><div style="width:${s.stopped ? 0 : levelPercent(s.level).toFixed(0)}%"></div></span>
    </div>
    <ul class="lines">${lines}${partial}</ul>
  </div>`;
}

function renderEvents() {
  const ol = $("events");
  if (!state.events.length) {
    ol.innerHTML = '<li class="empty">No event yet.</li>';
    return;
  }
  ol.innerHTML = [...state.events]
    .reverse()
    .map(
      (r) => `<li class="event" data-event="${esc(r.event)}" data-customer="${esc(r.customer_id)}">
      <span class="event-name">${esc(r.event)}</span>
      <span class="state state-${esc(r.state || "fired")}" title="${esc(r.detail || "")}">${esc(r.state || "fired")}</span>
      <span class="event-who">${esc(r.customer_id || "")}${r.session_id ? " · " + esc(r.session_id) : ""}${r.stream_id ? " · " + esc(r.stream_id) : ""} · ${new Date(r.time).toLocaleTimeString()}</span>
      ${r.text ? `<span class="event-text">“${esc(r.text)}”</span>` : ""}
    </li>`,
    )
    .join("");
}

// ---------------------------------------------------------------- the live feed

let feedDelay = 1000;

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = "pill " + cls;
}

async function tokenRejected() {
  try {
    const r = await fetch(withToken("/dashboard/feed"), { cache: "no-store" }); // 401 on a wrong token, else 400 (not an upgrade)
    return r.status === 401;
  } catch {
    return false;
  }
}

function connectFeed() {
  let opened = false;
  const ws = new WebSocket(wsURL("/dashboard/feed"));
  ws.onopen = () => {
    opened = true;
    feedDelay = 1000;
    $("auth").hidden = true;
    setConn("live", "pill-ok");
  };
  ws.onmessage = (e) => {
    const data = JSON.parse(e.data);
    for (const msg of Array.isArray(data) ? data : [data]) handle(msg);
  };
  ws.onclose = async () => {
    setConn("disconnected", "pill-bad");
    if (!opened && (await tokenRejected())) {
      showAuth(token ? "The token was refused." : "This daemon needs an access token.");
      return;
    }
    setTimeout(connectFeed, feedDelay);
    feedDelay = Math.min(feedDelay * 2, 10000);
  };
}

function showAuth(message) {
  $("auth").hidden = false;
  $("auth-msg").textContent = message;
  setConn("locked", "pill-bad");
}

$("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("auth-token").value.trim();
  const url = new URL(location.href);
  url.searchParams.set("token", token);
  history.replaceState(null, "", url);
  $("auth").hidden = true;
  setConn("connecting…", "pill-wait");
  connectFeed();
});

// ---------------------------------------------------------------- try it: browser microphone -> /asr-multicam

const PRESTART_S = 10; // seconds of microphone audio kept while the stream is being opened
const tryIt = { ws: null, ctx: null, media: null, node: null, buf: [], bufLen: 0, started: false, stopping: false, frameSamples: 0, streamId: null, finals: [], partial: "", notes: [] };

function randomId() {
  const a = new Uint8Array(4);
  crypto.getRandomValues(a);
  return [...a].map((b) => b.toString(16).padStart(2, "0")).join("");
}

$("try-customer").value = "browser_" + randomId();

function tryStatus(text) {
  $("try-status").textContent = text;
}

function renderTry() {
  const parts = tryIt.finals.map((t) => `<div>${esc(t)}</div>`);
  if (tryIt.partial) parts.push(`<div class="partial">${esc(tryIt.partial)}</div>`);
  for (const n of tryIt.notes) parts.push(`<div class="${n.cls}">${esc(n.text)}</div>`);
  $("try-transcript").innerHTML = parts.join("");
}

function onSamples(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  $("try-level").style.width = levelPercent(rms > 0 ? 20 * Math.log10(rms) : -100).toFixed(0) + "%";
  const ws = tryIt.ws;
  if (!tryIt.ctx || tryIt.stopping) return;
  tryIt.buf.push(samples);
  tryIt.bufLen += samples.length;
  if (!tryIt.started) {
    // Until the daemon answers stream_started, keep what the microphone hears (the first words), up to
    // PRESTART_S; older blocks go first.
    while (tryIt.bufLen > PRESTART_S * tryIt.ctx.sampleRate && tryIt.buf.length > 1) tryIt.bufLen -= tryIt.buf.shift().length;
    return;
  }
  if (!ws || ws.readyState !== WebSocket.OPEN || tryIt.bufLen < tryIt.frameSamples) return;
  // One binary frame: 1 byte channel, then little-endian float32 samples (pcm_f32le).
  const frame = new ArrayBuffer(1 + 4 * tryIt.bufLen);
  new Uint8Array(frame, 0, 1)[0] = 0;
  const bytes = new Uint8Array(frame, 1);
  let off = 0;
  for (const chunk of tryIt.buf) {
    bytes.set(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength), off);
    off += chunk.byteLength;
  }
  tryIt.buf = [];
  tryIt.bufLen = 0;
  ws.send(frame);
}

async function captureNode(ctx) {
  if (ctx.audioWorklet) {
    await ctx.audioWorklet.addModule("/dashboard/static/worklet.js");
    const node = new AudioWorkletNode(ctx, "edgevoice-capture", { numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit" });
    node.port.onmessage = (e) => onSamples(e.data);
    return node;
  }
  const node = ctx.createScriptProcessor(4096, 1, 1); // fallback for old browsers
  node.onaudioprocess = (e) => onSamples(new Float32Array(e.inputBuffer.getChannelData(0)));
  return node;
}

async function tryStart(e) {
  e.preventDefault();
  if (tryIt.ws) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    tryStatus("This browser gives no microphone here: open the page over https (server.tls_cert) or on localhost.");
    return;
  }
  $("try-start").disabled = true;
  tryIt.finals = [];
  tryIt.partial = "";
  tryIt.notes = [];
  tryIt.started = tryIt.stopping = false;
  renderTry();
  try {
    tryStatus("Asking for the microphone…");
    // The audio graph is ready before the microphone opens, so its first samples are kept.
    const ctx = new AudioContext({ latencyHint: "playback" }); // larger buffers: fewer glitches on a busy machine
    tryIt.ctx = ctx;
    tryIt.frameSamples = Math.round(ctx.sampleRate / 20); // 50 ms frames
    const node = await captureNode(ctx);
    tryIt.node = node;
    tryIt.media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    ctx.createMediaStreamSource(tryIt.media).connect(node).connect(ctx.destination); // the node outputs silence
  } catch (err) {
    tryStatus("Microphone unavailable: " + err.message);
    await tryCleanup();
    return;
  }
  tryIt.streamId = "browser_" + randomId();
  const ws = new WebSocket(wsURL("/asr-multicam"));
  ws.binaryType = "arraybuffer";
  tryIt.ws = ws;
  ws.onopen = () => {
    const start = {
      type: "audio_stream_start",
      session_id: $("try-session").value.trim(),
      customer_id: $("try-customer").value.trim(),
      stream_id: tryIt.streamId,
      channel: 0,
      format: "pcm_f32le",
      sample_rate: tryIt.ctx.sampleRate,
      channels: 1,
    };
    const lang = $("try-language").value.trim();
    if (lang) start.language = lang;
    ws.send(JSON.stringify(start));
    tryStatus(`Connecting stream ${tryIt.streamId} at ${tryIt.ctx.sampleRate} Hz…`);
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") return;
    const msg = JSON.parse(ev.data);
    if (msg.type === "stream_started") {
      tryIt.started = true;
      onSamples(new Float32Array(0)); // what was heard while the stream opened goes now
      $("try-stop").disabled = false;
      tryStatus(`Listening: stream ${tryIt.streamId} (${tryIt.ctx.sampleRate} Hz, pcm_f32le).`);
    } else if (msg.type === "transcript") {
      if (msg.final) {
        tryIt.finals.push(`${msg.speaker ? msg.speaker + ": " : ""}${msg.text}`);
        tryIt.partial = "";
      } else {
        tryIt.partial = msg.text;
      }
    } else if (msg.type === "keyword") {
      tryIt.notes.push({ cls: "kw", text: `event ${msg.event} fired` });
    } else if (msg.type === "error") {
      tryIt.notes.push({ cls: "err", text: `${msg.code}: ${msg.message}` });
      if (msg.fatal || !tryIt.started) tryStop();
    } else if (msg.type === "stream_stopped") {
      tryStatus("Stopped. Full transcript: " + (msg.full_transcript || "(nothing heard)"));
      ws.close();
    }
    renderTry();
  };
  ws.onclose = (ev) => {
    if (tryIt.ws === ws) {
      if (!tryIt.started && ev.code !== 1000) tryStatus("The daemon refused the connection (token, origin or connection limit).");
      tryIt.ws = null;
      tryCleanup();
    }
  };
}

async function tryCleanup() {
  if (tryIt.media) tryIt.media.getTracks().forEach((t) => t.stop());
  if (tryIt.ctx) await tryIt.ctx.close().catch(() => {});
  tryIt.media = tryIt.ctx = tryIt.node = null;
  tryIt.buf = [];
  tryIt.bufLen = 0;
  $("try-level").style.width = "0%";
  $("try-start").disabled = false;
  $("try-stop").disabled = true;
}

function tryStop() {
  const ws = tryIt.ws;
  if (tryIt.media) tryIt.media.getTracks().forEach((t) => t.stop());
  if (ws && ws.readyState === WebSocket.OPEN && tryIt.started) {
    tryIt.stopping = true; // no more audio; the daemon flushes and answers stream_stopped
    ws.send(JSON.stringify({ type: "audio_stream_stop", stream_id: tryIt.streamId }));
    tryStatus("Finishing recognition…");
    $("try-stop").disabled = true;
  } else if (ws) {
    ws.close();
  }
}

$("try-form").addEventListener("submit", tryStart);
$("try-stop").addEventListener("click", tryStop);

connectFeed();
setInterval(scheduleRender, 5000); // expire stopped streams even when nothing happens
