// The Live tab's client (app/ui/live.py runs it as gr.HTML's js_on_load: `element` is the tab's
// root, `props.live_config` its settings as JSON). It speaks the realtime protocol (OpenAI Realtime
// GA event names, docs/protocol.md) over a websocket to the studio's own server (app/live_proxy.py),
// which relays it to the engine with the engine's token added there.
//
// Sent: session.update (audio.input.turn_detection server_vad or null, video window/fps, output modalities),
// input_audio_buffer.append (base64 PCM16 + sample_rate, ~40 ms pieces), input_video_buffer.append
// (base64 JPEG + capture_time, `fps` per second), input_audio_buffer.clear/.commit and
// response.create (push-to-talk), conversation.item.create (input_text) and response.create (a typed turn;
// a call without a microphone is typed), response.cancel and conversation.item.truncate (barge-in).
// Handled: session.created/.updated, input_audio_buffer.speech_started/.speech_stopped/.committed,
// conversation.item.added/.done, response.created, response.queue_position,
// response.output_item.added, response.output_text.delta/.done,
// response.output_audio_transcript.delta/.done, response.output_audio.delta/.done, response.done, error.
// A call whose connection drops once it was up (the engine restarted, a proxy closed an idle socket) reconnects by
// itself with growing waits (cfg.defaults.reconnect_*), saying so in the status line, and gives up after the last
// try saying what to do; Stop ends it at any time. The engine starts a new conversation (it kept none of the old).

const cfg = JSON.parse(props.live_config);
const q = (role) => element.querySelector(`[data-role="${role}"]`);
const ui = {
  preview: q("preview"), meter: q("meter-level"), start: q("start"), stop: q("stop"), mode: q("mode"),
  talk: q("talk"), status: q("status"), error: q("error"), log: q("log"), latency: q("latency"),
  threshold: q("threshold"), silence: q("silence"), prefix: q("prefix"), windowS: q("window"), fps: q("fps"),
  camera: q("camera"), voice: q("voice"), thresholdOut: q("threshold-out"), silenceOut: q("silence-out"),
  prefixOut: q("prefix-out"), windowOut: q("window-out"), typeRow: q("type-row"), text: q("text"), send: q("send"),
};
const CHUNK_MS = 40;                 // audio is sent in pieces of about this length
const MAX_SOCKET_BACKLOG = 1 << 20;  // frames are skipped while the socket has this much unsent
const FRAME_MAX_WIDTH = 640;
const READY_WAIT_MS = cfg.defaults.ready_wait_ms;  // the engine's answer to the call's settings (LiveDefaults)
const FIRST_FRAME_WAIT_MS = 5000;    // a camera that has shown no picture by then is said to send none

let S = null;  // the running session's state; null when stopped

// ------------------------------------------------------------------ page helpers
function setStatus(text) { ui.status.textContent = text; }

// A call goes on while another tab of the studio is open (the microphone still hears, replies still play), and
// nothing there said so: a badge at the foot of the page, outside the tab, says it while the Live tab is out of
// sight, with a button that ends the call.
const callBadge = document.createElement("div");
callBadge.className = "live-call-badge";
callBadge.setAttribute("role", "status");
callBadge.style.cssText = "position: fixed; left: 50%; bottom: 12px; transform: translateX(-50%); z-index: 1000; " +
  "display: none; gap: 10px; align-items: center; max-width: calc(100vw - 24px); padding: 6px 6px 6px 14px; " +
  "border-radius: 999px; background: #991b1b; color: #fff; font-weight: 600; box-shadow: 0 2px 8px rgba(0,0,0,.3);";
const callBadgeText = document.createElement("span");
const endCall = document.createElement("button");
endCall.type = "button";
endCall.textContent = "End call";
endCall.style.cssText = "min-height: 36px; padding: 0 14px; border-radius: 999px; border: 0; background: #fff; " +
  "color: #991b1b; font-weight: 600;";
endCall.addEventListener("click", () => stop());
callBadge.append(callBadgeText, endCall);
document.body.appendChild(callBadge);
function showCallBadge() {
  const away = !!S && !element.offsetParent;  // (a tab out of sight is not displayed)
  callBadgeText.textContent = S && hasMicrophone(S) ? "● Live call on: the microphone is listening"
                                                    : "● Live call on";
  callBadge.style.display = away ? "flex" : "none";
}
new IntersectionObserver(showCallBadge).observe(element);
function showError(text) { ui.error.textContent = text || ""; ui.error.hidden = !text; }
// Said of a call without a microphone while it runs; once it is stopped the box is disabled, and the sentence goes.
const TYPED_CALL = " You can still type your messages below.";
function settings() {
  return {
    mode: ui.mode.value, threshold: Number(ui.threshold.value), silence: Number(ui.silence.value),
    prefix: Number(ui.prefix.value), windowS: Number(ui.windowS.value), fps: Number(ui.fps.value),
    camera: ui.camera.checked, voice: ui.voice ? ui.voice.value : null,
  };
}
function showSettingValues() {
  ui.thresholdOut.textContent = Number(ui.threshold.value).toFixed(2);
  ui.silenceOut.textContent = `${ui.silence.value} ms`;
  ui.prefixOut.textContent = `${ui.prefix.value} ms`;
  ui.windowOut.textContent = `${ui.windowS.value} s`;
}
function bubble(role, id, text) {
  const div = document.createElement("div");
  div.className = `live-turn live-${role}`;
  if (id) div.dataset.item = id;
  div.textContent = text;
  ui.log.appendChild(div);
  while (ui.log.children.length > 60) ui.log.removeChild(ui.log.firstChild);  // the page stays light
  ui.log.scrollTop = ui.log.scrollHeight;
  return div;
}
function clientId() {  // one id per browser, so a second tab of the same browser takes the session over
  try {
    let id = localStorage.getItem("ming-live-client");
    if (!id) { id = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)); localStorage.setItem("ming-live-client", id); }
    return id.replace(/[^A-Za-z0-9_-]/g, "").slice(0, 64);
  } catch (e) { return ""; }
}
function socketUrl() {
  const root = (window.gradio_config && window.gradio_config.root) || window.location.href;
  const url = new URL(cfg.ws_path.replace(/^\//, ""), root.endsWith("/") ? root : root + "/");
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "client=" + encodeURIComponent(clientId());
  return url.toString();
}
function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
function unb64(text) {
  const s = atob(text); const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
function send(event) {
  if (S && S.ws && S.ws.readyState === WebSocket.OPEN) { S.ws.send(JSON.stringify(event)); return true; }
  return false;
}

// ------------------------------------------------------------------ start / stop
// What the engine serves now (speech output, saved voices), asked of the studio when the page loads and at each
// Start (cfg.settings names the studio's function): a page built while the engine was down stayed text-only.
async function refreshSettings() {
  if (!cfg.settings || typeof server === "undefined" || !server[cfg.settings]) return;
  try {
    const now = await server[cfg.settings]();
    cfg.speech_output = !!now.speech_output;
    cfg.voices = Array.isArray(now.voices) ? now.voices : [];
  } catch (e) { return; }  // the page keeps what it had
  q("text-only").hidden = cfg.speech_output;
  const keep = chosenVoice === null ? ui.voice.value : chosenVoice;  // (the voice kept from before a reload)
  ui.voice.replaceChildren();
  for (const [value, label] of cfg.speech_output ? [["", "default voice"], ...cfg.voices.map((v) => [v, v])]
                                                 : [["", "(no speech output)"]]) {
    const option = document.createElement("option");
    option.value = value; option.textContent = label;
    ui.voice.appendChild(option);
  }
  ui.voice.value = cfg.speech_output && cfg.voices.includes(keep) ? keep : "";
  ui.voice.disabled = !cfg.speech_output;
}

async function start() {
  if (S) return;
  const fromStart = document.activeElement === ui.start;  // (a keyboard user: the focus goes on to Stop)
  showError("");
  ui.start.disabled = true;  // while the studio is asked what the engine serves now
  await refreshSettings();
  ui.start.disabled = false;
  const opts = settings();
  ui.start.disabled = true;
  const stream = await openMedia(opts);
  S = {
    stream, opts, ws: null, ctx: null, node: null, frameTimer: null, encoding: false, talking: false,
    userStopped: false, pcm: [], pcmSamples: 0, sentMs: 0, clock: [], turnMs: 0, frames: 0, heardAnything: false,
    play: { next: 0, chunks: [], sources: [], item: null }, responses: {}, current: null, cancelled: new Set(),
    speechEnd: null, firstText: null, firstAudio: null, bubbles: {}, closing: false, everReady: false, reconnects: 0,
  };
  ui.preview.srcObject = stream;
  ui.preview.hidden = stream.getVideoTracks().length === 0;
  showCallBadge();
  for (const track of stream.getVideoTracks()) {
    track.addEventListener("ended", () => {
      if (!S) return;
      clearInterval(S.frameTimer); S.frameTimer = null; ui.preview.hidden = true;
      showError("The camera stopped: going on with sound only.");
    });
  }
  const session = S;
  S.cameraCheck = setTimeout(() => checkCameraPicture(session), FIRST_FRAME_WAIT_MS);
  for (const track of stream.getAudioTracks()) {
    track.addEventListener("ended", () => { if (S) stop("The microphone stopped (unplugged or switched off)."); });
  }
  try {
    await startAudio();
  } catch (e) {
    stop(`Could not start audio processing: ${e.message}`);
    return;
  }
  openSocket();
  if (fromStart && S) ui.stop.focus();
}

// The microphone and camera the user allows: both, either, or neither (then the call is typed, with a message
// saying why: a page that cannot ask, a blocked or missing or busy device). Never null.
async function openMedia(opts) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This page cannot use a camera or microphone: browsers allow them only on https:// or on this " +
              "machine (http://localhost)." + TYPED_CALL);
    return new MediaStream();
  }
  setStatus("Asking for the microphone" + (opts.camera ? " and camera…" : "…"));
  const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 };
  const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } };
  const ask = (constraints) => navigator.mediaDevices.getUserMedia(constraints).then((s) => [s, null], (e) => [null, e]);
  const [stream, error] = await ask({ audio, video: opts.camera ? video : false });
  if (stream) return stream;
  let [micOnly, micError] = [null, error];
  if (opts.camera) {  // the microphone alone may still be there (and allowed)
    [micOnly, micError] = await ask({ audio });
    if (micOnly) {
      showError({
        NotReadableError: "The camera is in use by another application: going on with sound only.",
        NotAllowedError: "The camera is blocked for this site: going on with sound only (allow it from the " +
                         "icon in the address bar to be seen).",
      }[error.name] || "No camera found: going on with sound only.");
      return micOnly;
    }
  }
  const [cameraOnly] = opts.camera ? await ask({ video }) : [null];  // a typed call can still be seen
  showError(({
    NotAllowedError: "The microphone is blocked for this site (allow it from the icon in the address bar to talk).",
    NotFoundError: "No microphone found (plug one in, then press Start again to talk).",
    NotReadableError: "The microphone is in use by another application (or blocked by the system).",
    SecurityError: "The browser blocks media capture on this page (it must be https:// or localhost).",
  }[micError.name] || `Could not open the microphone: ${micError.name}: ${micError.message}.`) + TYPED_CALL);
  return cameraOnly || new MediaStream();
}
// A control disabled while it has the keyboard focus drops it to the page's top (Tab then starts again from the first
// control of the page): the focus moves to the control that goes on (Stop during a call, Start once it ended).
function callControlFocused() { return [ui.start, ui.stop, ui.talk, ui.text, ui.send].includes(document.activeElement); }
function hasMicrophone(s) { return s.stream.getAudioTracks().length > 0; }

function stop(message) {
  const s = S;
  if (!s) return;
  S = null;
  s.userStopped = true;
  const refocus = callControlFocused();
  clearInterval(s.frameTimer);
  clearTimeout(s.silenceCheck);
  clearTimeout(s.cameraCheck);
  clearTimeout(s.readyCheck);
  clearTimeout(s.reconnectTimer);
  stopPlayback(s);
  for (const track of s.stream.getTracks()) track.stop();
  if (s.ctx) s.ctx.close().catch(() => {});
  if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "stopped");
  ui.preview.srcObject = null;
  ui.meter.style.width = "0%";
  ui.start.disabled = false; ui.stop.disabled = true; ui.talk.disabled = true; ui.mode.disabled = false;
  if (refocus) ui.start.focus();
  ui.text.disabled = true; ui.send.disabled = true;
  setStatus("Stopped.");
  showCallBadge();
  if (ui.error.textContent.endsWith(TYPED_CALL)) showError(ui.error.textContent.slice(0, -TYPED_CALL.length));
  if (message) showError(message);
}

// ------------------------------------------------------------------ microphone
const WORKLET = `class Tap extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0] && inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
}
registerProcessor("live-tap", Tap);`;

async function startAudio() {
  const ctx = new AudioContext({ latencyHint: "interactive" });
  S.ctx = ctx;
  if (ctx.state === "suspended") await ctx.resume();
  if (!hasMicrophone(S)) return;  // (the context still plays the replies)
  const source = ctx.createMediaStreamSource(S.stream);
  const sink = ctx.createGain(); sink.gain.value = 0; sink.connect(ctx.destination);  // keeps the graph pulled
  if (ctx.audioWorklet) {
    const url = URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" }));
    await ctx.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    const node = new AudioWorkletNode(ctx, "live-tap");
    node.port.onmessage = (m) => onSamples(m.data);
    source.connect(node); node.connect(sink);
    S.node = node;
  } else {  // old browsers
    const node = ctx.createScriptProcessor(2048, 1, 1);
    node.onaudioprocess = (e) => onSamples(e.inputBuffer.getChannelData(0).slice(0));
    source.connect(node); node.connect(sink);
    S.node = node;
  }
  S.silenceCheck = setTimeout(() => {
    if (S && !S.heardAnything) showError("The microphone sends only silence (muted, or the wrong input selected?).");
  }, 4000);
}

function onSamples(samples) {
  const s = S;
  if (!s) return;
  let sum = 0;
  for (let i = 0; i < samples.length; i++) { sum += samples[i] * samples[i]; if (samples[i] !== 0) s.heardAnything = true; }
  s.level = 0.8 * (s.level || 0) + 0.2 * Math.sqrt(sum / samples.length);
  const db = 20 * Math.log10(s.level + 1e-9);
  ui.meter.style.width = `${Math.max(0, Math.min(100, (db + 60) * 100 / 60)).toFixed(0)}%`;
  const streaming = s.opts.mode === "hands_free" || s.talking;
  if (!streaming || !s.ready) return;
  s.pcm.push(samples); s.pcmSamples += samples.length;
  if (s.pcmSamples * 1000 / s.ctx.sampleRate >= CHUNK_MS) flushAudio();
}

function flushAudio() {
  const s = S;
  if (!s || !s.pcmSamples) return;
  const pcm = new Int16Array(s.pcmSamples);
  let k = 0;
  for (const part of s.pcm) for (let i = 0; i < part.length; i++) {
    const v = Math.max(-1, Math.min(1, part[i]));
    pcm[k++] = v < 0 ? v * 0x8000 : v * 0x7fff;
  }
  s.pcm = []; s.pcmSamples = 0;
  if (send({ type: "input_audio_buffer.append", audio: b64(new Uint8Array(pcm.buffer)), sample_rate: s.ctx.sampleRate })) {
    const ms = 1000 * pcm.length / s.ctx.sampleRate;
    s.sentMs += ms; s.turnMs += ms;
    s.clock.push([s.sentMs, performance.now()]);  // when each piece of the session's audio was heard
    if (s.clock.length > 3000) s.clock.splice(0, 1000);
  }
}

function clockAt(audioMs) {  // the page's time when the session's audio reached audioMs
  const c = S ? S.clock : [];
  for (let i = c.length - 1; i >= 0; i--) {
    if (c[i][0] <= audioMs) return c[i][1] + (i + 1 < c.length ? Math.min(audioMs - c[i][0], c[i + 1][0] - c[i][0]) : 0);
  }
  return c.length ? c[0][1] : performance.now();
}

// ------------------------------------------------------------------ camera
function startFrames() {
  const s = S;
  if (!s || !s.opts.camera || !s.stream.getVideoTracks().length) return;
  const canvas = document.createElement("canvas");
  s.frameTimer = setInterval(() => {
    const track = s.stream.getVideoTracks()[0];
    if (S !== s || s.encoding || !track || track.readyState !== "live" || !ui.preview.videoWidth) return;
    if (!s.ws || s.ws.bufferedAmount > MAX_SOCKET_BACKLOG) return;  // a slow link: skip this frame
    const scale = Math.min(1, FRAME_MAX_WIDTH / ui.preview.videoWidth);
    canvas.width = Math.round(ui.preview.videoWidth * scale);
    canvas.height = Math.round(ui.preview.videoHeight * scale);
    canvas.getContext("2d").drawImage(ui.preview, 0, 0, canvas.width, canvas.height);
    const captured = performance.now() / 1000;
    s.encoding = true;
    canvas.toBlob(async (blob) => {
      s.encoding = false;
      if (!blob || S !== s) return;
      const bytes = new Uint8Array(await blob.arrayBuffer());
      if (send({ type: "input_video_buffer.append", image: b64(bytes), capture_time: captured })) s.frames++;
    }, "image/jpeg", 0.7);
  }, Math.round(1000 / s.opts.fps));
}

function checkCameraPicture(s) {  // a camera that opened but sends no frames: said, and the call goes on without it
  const tracks = s && S === s ? s.stream.getVideoTracks() : [];
  if (!tracks.length || ui.preview.videoWidth) return;
  for (const track of tracks) track.stop();
  clearInterval(s.frameTimer); s.frameTimer = null; ui.preview.hidden = true;
  showError("The camera sends no picture (in use elsewhere, or a broken driver?): going on with sound only.");
}

// ------------------------------------------------------------------ the socket
function sessionUpdate(opts) {  // the GA shape: turn detection under audio.input; `video` is our extension
  const turnDetection = opts.mode === "hands_free" && S && hasMicrophone(S) ? {
    type: "server_vad", threshold: opts.threshold, prefix_padding_ms: opts.prefix,
    silence_duration_ms: opts.silence, create_response: true, interrupt_response: true,
  } : null;
  const session = {
    type: "realtime", output_modalities: cfg.speech_output ? ["audio"] : ["text"],
    audio: { input: { turn_detection: turnDetection } },
    video: { window_seconds: opts.windowS, fps: opts.fps },
  };
  if (cfg.speech_output) {  // replies at this page's own audio rate: not OpenAI's 24 kHz default, no second resampling
    session.audio.output = { format: { type: "audio/pcm", rate: playbackRate() } };
    if (opts.voice) session.audio.output.voice = opts.voice;
  }
  return { type: "session.update", session };
}

const MAX_REPLY_RATE = 48000;  // a faster AudioContext (96 kHz) gets 48 kHz replies: the talker's band fits in them
function playbackRate() {
  return S && S.ctx ? Math.min(Math.round(S.ctx.sampleRate), MAX_REPLY_RATE) : MAX_REPLY_RATE;
}

function openSocket() {
  const s = S;
  setStatus(s.reconnects ? `Reconnecting… ${ordinal(s.reconnects)} try` : "Connecting…");
  ui.stop.disabled = false;  // a connection that hangs can be given up
  s.readyCheck = setTimeout(() => {
    if (S !== s || s.ready) return;
    const why = `the engine did not answer within ${READY_WAIT_MS / 1000} s (busy or hung?)`;
    if (s.everReady) reconnectLater(s, why);
    else stop(`${why.replace(/^t/, "T")}. Press Start to try again.`);
  }, READY_WAIT_MS);
  let ws;
  try { ws = new WebSocket(socketUrl()); } catch (e) { stop(`Cannot open the live connection: ${e.message}`); return; }
  s.ws = ws;
  ws.onopen = () => { if (S === s && s.ws === ws) send(sessionUpdate(s.opts)); };
  ws.onmessage = (m) => {
    if (S !== s || s.ws !== ws) return;  // (a message of a connection given up)
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    try { handle(ev); } catch (e) { console.error("live event", ev.type, e); }
  };
  ws.onclose = (e) => {
    if (S !== s || s.userStopped || s.ws !== ws) return;
    // the engine ended a call in which nothing was said, typed or shown for its idle limit: reconnecting would hold
    // a session of the engine's for a call nobody is in (a tab left open), so the call ends, saying why
    if (s.endedIdle) { stop(IDLE_ENDED); return; }
    if (worthReconnecting(s, e)) { reconnectLater(s, s.lastError || `code ${e.code}`); return; }
    const why = {
      4000: "Live was started in another tab or window; it stopped here.",
      4001: s.lastError || "The engine ended the live session.",
      4003: s.lastError || "Log in to the studio first.",
    }[e.code] || s.lastError || `The connection to the studio was lost (code ${e.code}).`;
    // the engine went away (stopped, restarted, unreachable): said with what to do, as the other tabs say it
    const gone = e.code === 4001 && ["engine_closed", "engine_unreachable"].includes(e.reason);
    stop(gone ? `${why.replace(/\.?$/, ".")} Press Start to call again once the banner at the top shows the model.` : why);
  };
}

const IDLE_ENDED = "The engine ended the call: nothing was said, typed or shown for a long while (its idle limit). " +
  "Press Start to call again.";
// Closes after which a new connection would be refused the same way (another tab took the call over, no login, a
// message the relay could not take): the call ends. Any other drop of a call that was up is reconnected.
const FINAL_CLOSES = new Set([1007, 1008, 1009, 4000, 4003]);
const RECONNECT = {
  tries: cfg.defaults.reconnect_tries, firstWaitMs: cfg.defaults.reconnect_first_wait_ms,
  maxWaitMs: cfg.defaults.reconnect_max_wait_ms,
};
function worthReconnecting(s, e) {
  if (!s.everReady || FINAL_CLOSES.has(e.code)) return false;
  return e.code !== 4001 || ["engine_closed", "engine_unreachable"].includes(e.reason);
}
function ordinal(n) {
  const teen = n % 100 >= 11 && n % 100 <= 13;
  return n + (teen ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"));
}
// The connection is given up (its socket closed, or no answer): the microphone and camera stay open, nothing is sent
// until the next connection is ready, and the text typed in the box stays there.
function dropConnection(s) {
  const ws = s.ws;
  s.ws = null; s.ready = false;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "reconnecting");
  clearInterval(s.frameTimer); s.frameTimer = null;
  clearTimeout(s.readyCheck);
  stopPlayback(s);
  Object.assign(s, { current: null, asked: false, askAfterDone: false, talking: false, pcm: [], pcmSamples: 0,
                     sentMs: 0, clock: [], speechEnd: null, lastError: null });
  ui.talk.classList.remove("live-talking");
  const refocus = callControlFocused();
  ui.talk.disabled = true; ui.text.disabled = true; ui.send.disabled = true;
  if (refocus) ui.stop.focus();
}
function reconnectLater(s, why) {
  dropConnection(s);
  s.reconnects += 1;
  if (s.reconnects > RECONNECT.tries) {
    stop(`The live connection was lost (${why.replace(/\.$/, "")}) and ${RECONNECT.tries} tries to reconnect ` +
         "failed. Press Start to call again once the banner at the top shows the model.");
    return;
  }
  const waitMs = Math.min(RECONNECT.maxWaitMs, RECONNECT.firstWaitMs * 2 ** (s.reconnects - 1));
  setStatus(`Connection lost: reconnecting… ${ordinal(s.reconnects)} try in ${Math.ceil(waitMs / 1000)} s ` +
            `(of ${RECONNECT.tries}; Stop ends the call).`);
  s.reconnectTimer = setTimeout(() => { if (S === s) openSocket(); }, waitMs);
}

function ready(s) {
  if (s.ready) return;
  const reconnected = s.reconnects > 0;
  s.ready = true; s.everReady = true; s.reconnects = 0;
  ui.stop.disabled = false; ui.mode.disabled = true;
  ui.talk.disabled = s.opts.mode !== "ptt" || !hasMicrophone(s);
  ui.text.disabled = false; ui.send.disabled = false;
  startFrames();
  setStatus(idleStatus(s));
  if (reconnected) bubble("note", null, "Reconnected: the engine starts a new conversation (it keeps none of the earlier turns).");
}
function idleStatus(s) {
  if (!hasMicrophone(s)) return "Type a message below and press Enter.";
  return s.opts.mode === "ptt" ? "Hold “Talk” (or the space bar) while you speak." : "Listening… just talk.";
}

// The relay's errors that its close of the connection follows (app/live_proxy.py)
const RELAY_CLOSES = new Set(["engine_closed", "engine_unreachable", "engine_unauthorized", "live_session_replaced",
                              "login_required"]);

function handle(ev) {
  const s = S;
  switch (ev.type) {
    case "session.created":
      break;
    case "session.updated":
      ready(s);
      break;
    case "input_audio_buffer.speech_started":
      setStatus("Hearing you…");
      bargeIn(s, false);
      break;
    case "input_audio_buffer.speech_stopped":
      s.speechEnd = clockAt(ev.audio_end_ms - (s.opts.mode === "hands_free" ? s.opts.silence : 0));
      s.firstText = s.firstAudio = null;
      showLatency(s);
      setStatus("Thinking…");
      break;
    case "conversation.item.added":
    case "conversation.item.done":
      if (ev.item && ev.item.role === "user" && !s.bubbles[ev.item.id]) s.bubbles[ev.item.id] = bubble("user", ev.item.id, describeUser(ev.item));
      break;
    case "response.created":
      s.current = ev.response.id;
      break;
    case "response.queue_position":
      if (ev.position > 0) setStatus(`Waiting for the engine (position ${ev.position})…`);
      break;
    case "response.output_item.added":
      replyBubble(s, ev.item.id);
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta":
      if (s.cancelled.has(ev.response_id)) break;
      if (s.firstText === null && s.speechEnd !== null) { s.firstText = performance.now(); showLatency(s); }
      replyBubble(s, ev.item_id).textContent += ev.delta;
      setStatus("Answering…");
      ui.log.scrollTop = ui.log.scrollHeight;
      break;
    case "response.output_audio.delta":
      if (s.cancelled.has(ev.response_id)) break;  // a stale piece after a barge-in is never played
      if (s.firstAudio === null && s.speechEnd !== null) { s.firstAudio = performance.now(); showLatency(s); }
      playPcm(s, ev.item_id, ev.delta, ev.sample_rate || 24000);
      break;
    case "response.done": {
      const r = ev.response || {};
      if (r.id === s.current) s.current = null;
      s.asked = false;
      if (s.askAfterDone) { s.askAfterDone = false; askReply(s); }
      if (r.status === "failed") showError((r.status_details && r.status_details.error && r.status_details.error.message) || "The reply failed.");
      if (r.status === "cancelled") { const b = s.bubbles[lastReplyId(s)]; if (b) b.classList.add("live-interrupted"); }
      setStatus(idleStatus(s));
      break;
    }
    case "error": {
      const err = ev.error || {};
      if (err.code === "response_cancel_not_active") break;  // the reply had ended already
      if (err.code === "session_idle_timeout") { s.endedIdle = true; break; }  // its close follows: the call ends (onclose)
      if (String(ev.event_id || "").startsWith("event_proxy_") && (!s.ready || RELAY_CLOSES.has(err.code))) {
        // the studio's relay could not open the call (the engine down, full, refusing the token; no login) or lost it:
        // its close follows and says it, with what to do, or reconnects ("The engine refused this call's settings:
        // cannot reach ..."; "reconnecting… 1st try")
        s.lastError = err.message || err.code || "error";
        break;
      }
      if (!s.ready) {  // the call's settings were refused: nothing would ever start (and Stop is not enabled yet)
        stop(`The engine refused this call's settings: ${err.message || err.code || "error"}`);
        break;
      }
      s.lastError = err.message || "error";
      showError(err.message || JSON.stringify(err));
      break;
    }
    default:
      break;
  }
}

function describeUser(item) {
  const parts = [];
  for (const c of item.content || []) {
    if (c.type === "input_audio") parts.push(c.transcript ? `“${c.transcript}”` : `${Number(c.seconds || 0).toFixed(1)} s of speech`);
    else if (c.type === "input_video") parts.push(`${c.frames} camera frame${c.frames === 1 ? "" : "s"}`);
    else if (c.type === "input_text") parts.push(c.text);
  }
  return "You: " + (parts.join(" · ") || "…");
}
function replyBubble(s, id) {
  if (!s.bubbles[id]) { s.bubbles[id] = bubble("assistant", id, ""); s.lastReply = id; }
  return s.bubbles[id];
}
function lastReplyId(s) { return s.lastReply; }
function showLatency(s) {
  const fmt = (t) => (t === null ? "…" : `${Math.max(0, Math.round(t - s.speechEnd))} ms`);
  const audio = cfg.speech_output ? fmt(s.firstAudio) : "— (text replies)";
  ui.latency.textContent = `Latency: speech end → first text ${fmt(s.firstText)} · → first audio ${audio}`;
}

// ------------------------------------------------------------------ speech out and barge-in
function playPcm(s, itemId, data, rate) {
  const bytes = unb64(data);
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  if (!pcm.length || !s.ctx) return;
  const buffer = s.ctx.createBuffer(1, pcm.length, rate);
  const ch = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 0x8000;
  const src = s.ctx.createBufferSource();
  src.buffer = buffer; src.connect(s.ctx.destination);
  const at = Math.max(s.ctx.currentTime + 0.03, s.play.next);
  src.start(at);
  s.play.next = at + buffer.duration;
  if (s.play.item !== itemId) { s.play.item = itemId; s.play.chunks = []; }
  s.play.chunks.push([at, buffer.duration]);
  s.play.sources.push(src);
  src.onended = () => { const i = s.play.sources.indexOf(src); if (i >= 0) s.play.sources.splice(i, 1); };
}
function playedMs(s) {  // how much of the current reply's audio the user has heard
  if (!s.ctx) return 0;
  const now = s.ctx.currentTime;
  return Math.round(1000 * s.play.chunks.reduce((sum, [at, dur]) => sum + Math.max(0, Math.min(dur, now - at)), 0));
}
function isPlaying(s) { return s.play.sources.length > 0; }
function stopPlayback(s) {
  for (const src of s.play.sources) { try { src.stop(); } catch (e) { /* already stopped */ } }
  s.play.sources = []; s.play.next = 0;
}
function bargeIn(s, cancelResponse) {
  // the user spoke over the reply: stop its sound now, and tell the server how much was heard
  const speaking = isPlaying(s);
  if (speaking && s.play.item) {
    const heard = playedMs(s);
    stopPlayback(s);
    send({ type: "conversation.item.truncate", item_id: s.play.item, content_index: 0, audio_end_ms: heard });
  }
  if (s.current) {
    s.cancelled.add(s.current);
    if (cancelResponse) send({ type: "response.cancel", response_id: s.current });
  }
  s.play.chunks = []; s.play.item = null;
}

// ------------------------------------------------------------------ push-to-talk
function talkDown(e) {
  const s = S;
  if (!s || !s.ready || s.opts.mode !== "ptt" || s.talking || !hasMicrophone(s)) return;
  if (e) e.preventDefault();
  bargeIn(s, true);
  s.talking = true; s.turnMs = 0; s.pcm = []; s.pcmSamples = 0;
  send({ type: "input_audio_buffer.clear" });
  ui.talk.classList.add("live-talking");
  setStatus("Listening… release to send.");
}
function talkUp(e) {
  const s = S;
  if (!s || !s.talking) return;
  if (e) e.preventDefault();
  s.talking = false;
  flushAudio();
  ui.talk.classList.remove("live-talking");
  if (s.turnMs < 200) { send({ type: "input_audio_buffer.clear" }); setStatus("Too short: hold “Talk” while you speak."); return; }
  s.speechEnd = performance.now(); s.firstText = s.firstAudio = null; showLatency(s);
  send({ type: "input_audio_buffer.commit" });
  askReply(s);
  setStatus("Thinking…");
}

// ------------------------------------------------------------------ typed turns
function sendText(e) {
  if (e) e.preventDefault();  // (the form would reload the page)
  const s = S;
  const text = ui.text.value.trim();
  if (!s || !s.ready || !text) return;
  const most = Number(ui.text.dataset.maxChars);
  if (text.length > most) {  // (kept in the box, to be shortened)
    setStatus(`This message is ${text.length.toLocaleString("en")} characters long: at most ` +
              `${most.toLocaleString("en")} go in one typed message. Shorten it, then press Enter (nothing was sent).`);
    return;
  }
  const replying = !!(s.current || s.asked);
  bargeIn(s, true);  // typing over a reply interrupts it as speaking over it does
  const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
  if (!send({ type: "conversation.item.create", item })) return;  // (the text is kept)
  if (replying) s.askAfterDone = true;  // the engine takes one response at a time: asked at response.done
  else askReply(s);
  ui.text.value = "";
  s.speechEnd = performance.now(); s.firstText = s.firstAudio = null; showLatency(s);
  setStatus("Thinking…");
}

function askReply(s) {
  s.asked = send({ type: "response.create" });
}

// ------------------------------------------------------------------ wiring
ui.start.addEventListener("click", () => { start(); });
ui.stop.addEventListener("click", () => stop());
ui.typeRow.addEventListener("submit", sendText);
ui.talk.addEventListener("pointerdown", (e) => {
  try { ui.talk.setPointerCapture(e.pointerId); } catch (err) { /* not a real pointer */ }
  talkDown(e);  // the button keeps the pointer: the page moving under a finger does not end the turn
});
for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) ui.talk.addEventListener(name, talkUp);
document.addEventListener("keydown", (e) => {
  if (e.code !== "Space" || e.repeat || !S || S.opts.mode !== "ptt" || !element.offsetParent) return;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement && document.activeElement.tagName)) return;
  talkDown(e);
});
document.addEventListener("keyup", (e) => { if (e.code === "Space" && S && S.talking) talkUp(e); });
for (const input of [ui.threshold, ui.silence, ui.prefix, ui.windowS]) input.addEventListener("input", showSettingValues);
for (const input of [ui.threshold, ui.silence, ui.prefix, ui.windowS, ui.fps]) {
  input.addEventListener("change", () => {  // settings apply to a running session at once
    if (!S) return;
    const opts = settings(); opts.mode = S.opts.mode; opts.camera = S.opts.camera;
    const fpsChanged = opts.fps !== S.opts.fps;
    S.opts = opts;
    send(sessionUpdate(opts));
    if (fpsChanged && S.frameTimer) { clearInterval(S.frameTimer); startFrames(); }
  });
}
// A reload (or leaving the page) ends the call: the page that comes back says so, with the settings the user chose.
// The voice list comes from the studio after the page loads (refreshSettings): the voice chosen waits for it.
let chosenVoice = null;
ui.voice.addEventListener("change", () => { chosenVoice = ui.voice.value; });
const SETTINGS_KEY = "ming-live-settings", ENDED_BY_RELOAD_KEY = "ming-live-ended-by-reload";
const KEPT = { mode: ui.mode, threshold: ui.threshold, silence: ui.silence, prefix: ui.prefix, windowS: ui.windowS,
               fps: ui.fps, camera: ui.camera, voice: ui.voice };
function keepSettings() {
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings())); } catch (e) { /* storage off: not kept */ }
}
function restoreSettings() {
  let kept = null;
  try { kept = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null"); } catch (e) { return; }
  if (!kept || typeof kept !== "object") return;
  if (typeof kept.voice === "string") chosenVoice = kept.voice;
  for (const [name, input] of Object.entries(KEPT)) {
    const value = kept[name];
    if (input.type === "checkbox") { if (typeof value === "boolean") input.checked = value; continue; }
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === String(value))) continue;
    if (typeof value === "number" || typeof value === "string") input.value = String(value);  // (a range clamps it)
  }
}
for (const input of Object.values(KEPT)) input.addEventListener("change", keepSettings);
window.addEventListener("pagehide", () => {
  if (S) { try { sessionStorage.setItem(ENDED_BY_RELOAD_KEY, "1"); } catch (e) { /* not said after the reload */ } }
  stop();
});
restoreSettings();
try {
  if (sessionStorage.getItem(ENDED_BY_RELOAD_KEY)) {
    sessionStorage.removeItem(ENDED_BY_RELOAD_KEY);
    setStatus("The call ended when the page was reloaded. Press Start to call again (your settings are kept).");
  }
} catch (e) { /* storage off */ }
// The studio calls this when the engine changes (another release, parts, back from down: the banner's engine state):
// the note and the voice list follow it without a reload or a Start (a call keeps what it started with).
element.followEngine = () => { if (!S) refreshSettings(); };
element.liveState = () => (S ? { ready: !!S.ready, playing: S.play.sources.length, sentMs: Math.round(S.sentMs),
                                 frames: S.frames, mode: S.opts.mode } : null);  // for tests and debugging
showSettingValues();
if (!cfg.speech_output) q("text-only").hidden = false;
refreshSettings();
