// The studio: generate with the streaming socket, draw the piano roll as notes arrive, play,
// upload a primer or a melody, select a span to infill, download the MIDI or MusicXML.
"use strict";

const $ = (id) => document.getElementById(id);
const LOW = 21, HIGH = 108, ROW = 5, PPS = 60;  // pitch range, px per semitone, px per second
let notes = [], midiBlob = null, selection = null, socket = null, primerB64 = null, drawQueued = false;
let faults = [];  // the piece's part-writing faults (Check voices), drawn on the roll

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function setNotes(list) { notes = list; faults = []; redraw(); }

const FAULT_MARK = { "parallel fifths": ["P5", "#d32f2f"], "parallel octaves": ["P8", "#d32f2f"],
  "crossing": ["X", "#ef6c00"], "spacing": ["S", "#ef6c00"], "out of range": ["R", "#6a1b9a"] };

function redraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    const c = $("roll"), g = c.getContext("2d");
    const end = notes.reduce((m, n) => Math.max(m, n.end), 0);
    const width = Math.max(1100, Math.ceil(end * PPS) + 40);
    if (c.width !== width) c.width = width;
    g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
    g.strokeStyle = "#eee";
    for (let p = LOW; p <= HIGH; p++) if (p % 12 === 0) { const y = (HIGH - p) * ROW; g.beginPath(); g.moveTo(0, y); g.lineTo(c.width, y); g.stroke(); }
    for (let s = 0; s * PPS < c.width; s += 1) { g.strokeStyle = s % 4 ? "#f3f3f3" : "#ddd"; g.beginPath(); g.moveTo(s * PPS, 0); g.lineTo(s * PPS, c.height); g.stroke(); }
    if (selection) { g.fillStyle = "rgba(255, 193, 7, 0.25)"; g.fillRect(selection[0] * PPS, 0, (selection[1] - selection[0]) * PPS, c.height); }
    for (const n of notes) {
      g.fillStyle = `hsl(${210 - n.velocity}, 70%, 45%)`;
      g.fillRect(n.start * PPS, (HIGH - n.pitch) * ROW, Math.max(2, (n.end - n.start) * PPS - 1), ROW - 1);
    }
    g.font = "11px sans-serif";
    for (const f of faults) {
      const [mark, color] = FAULT_MARK[f.rule] || ["?", "#000"];
      const x = f.second * PPS;
      g.strokeStyle = g.fillStyle = color;
      g.beginPath(); g.moveTo(x, 12); g.lineTo(x, c.height); g.stroke();
      g.fillText(mark, x + 2, 10);
    }
    c.dataset.faults = String(faults.length);
    c.dataset.notes = String(notes.length);
    $("note-count").textContent = String(notes.length);
  });
}

function b64ToBlob(b64) {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type: "audio/midi" });
}

function fileToB64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function errorText(resp) {
  try { const j = await resp.json(); return j.error || JSON.stringify(j); } catch (e) { return resp.statusText; }
}

// A MIDI blob -> its notes through the server (parsed in an isolated process).
async function showMidi(blob, name) {
  const form = new FormData();
  form.append("file", blob, name || "piece.mid");
  const r = await fetch("/api/notes", { method: "POST", body: form });
  if (!r.ok) throw new Error(await errorText(r));
  const j = await r.json();
  setParts(j.tracks || []);
  midiBlob = blob;
  setDownloads(true);
  setNotes(j.notes.map(([pitch, start, end, velocity]) => ({ pitch, start, end, velocity })));
}

// The piece's tracks in the Part menu (Infill writes the chosen one again; "all": every one).
function setParts(names) {
  const menu = $("part");
  const keep = menu.value;
  menu.replaceChildren(new Option("all", ""), ...names.map((n, i) => new Option(n, String(i))));
  menu.value = names.map((_, i) => String(i)).includes(keep) ? keep : "";
}

function options() {
  const o = { temperature: +$("temperature").value, top_k: +$("top_k").value, top_p: +$("top_p").value, seed: +$("seed").value };
  if ($("model").value) o.model = $("model").value;
  if ($("seconds").value) o.seconds = +$("seconds").value;
  if ($("key").value.trim()) o.key = $("key").value.trim();
  if ($("style").value) o.style = $("style").value;
  if ($("tempo").value) o.tempo = +$("tempo").value;
  if ($("voices").value) {  // `aurl generate --voices N`: its voice leading and leans too
    Object.assign(o, { voices: +$("voices").value, voice_leading: true, spacing: 0.9, ranges: 0.9 });
  }
  if (primerB64) o.primer = primerB64;
  return o;
}

function generate() {
  if (socket) socket.close();
  AurlSynth.stop();
  setNotes([]);
  setParts([]);  // until the piece is done: then one part, or its voices
  midiBlob = null; setDownloads(false);
  const t0 = performance.now();
  let first = null;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/api/generate/stream`);
  socket = ws;
  status("composing...");
  ws.onopen = () => ws.send(JSON.stringify(options()));
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "note") {
      if (first === null) { first = performance.now() - t0; $("roll").dataset.firstNoteMs = String(Math.round(first)); }
      notes.push(m); redraw();
    } else if (m.type === "done") {
      midiBlob = b64ToBlob(m.midi);
      setDownloads(true);
      const said = `${m.notes} notes, ${m.tokens} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s (first note after ${first === null ? "-" : Math.round(first)} ms)`;
      status(said);
      // in voices: their tracks in the Part menu, for Infill of one voice
      if ($("voices").value) showMidi(midiBlob, "generated.mid").then(() => status(said), (e) => status(String(e), true));
    } else if (m.type === "error") {
      status(m.error, true);
    }
  };
  ws.onerror = () => status("the connection to the server failed", true);
}

// Harmonize or accompany the chosen file: `verb` is the endpoint ("harmonize"), `what` the
// file it wants, `doing` / `done` the status words.
async function composeAround(verb, what, doing, done) {
  const f = $("melody").files[0];
  if (!f) return status(`choose a ${what} file first`, true);
  const form = new FormData();
  form.append("file", f);
  form.append("seed", $("seed").value || "0");
  if ($("model").value) form.append("model", $("model").value);
  status(`${doing}...`);
  const r = await fetch(`/api/${verb}`, { method: "POST", body: form });
  if (!r.ok) return status(await errorText(r), true);
  await showMidi(await r.blob(), `${done}.mid`);
  status(done);
}

const harmonize = () => composeAround("harmonize", "melody", "harmonizing", "harmonized");
const accompany = () => composeAround("accompany", "part", "accompanying", "accompanied");

async function infill() {
  if (!midiBlob) return status("generate or load a piece first", true);
  if (!selection) return status("drag on the roll to select the part to fill in", true);
  const form = new FormData();
  form.append("file", midiBlob, "piece.mid");
  form.append("span", `${selection[0].toFixed(2)}-${selection[1].toFixed(2)}`);
  if ($("part").value) form.append("part", $("part").value);
  form.append("seed", $("seed").value || "0");
  if ($("model").value) form.append("model", $("model").value);
  status("filling in...");
  const r = await fetch("/api/infill", { method: "POST", body: form });
  if (!r.ok) return status(await errorText(r), true);
  await showMidi(await r.blob(), "infilled.mid");
  status("filled in");
}

// Check voices: the piece's tracks read as voices (POST /api/analyze), each fault marked.
async function checkVoices() {
  if (!midiBlob) return status("generate or load a piece first", true);
  const form = new FormData();
  form.append("file", midiBlob, "piece.mid");
  status("checking the voices...");
  const r = await fetch("/api/analyze", { method: "POST", body: form });
  if (!r.ok) return status(await errorText(r), true);
  const v = (await r.json()).voice_leading;
  if (!v) return status("its tracks are not voices: generate with Voices SATB, or load a file with one voice per track", true);
  faults = v.faults; redraw();
  const c = v.counts;
  status(`${v.voices.join(", ")}: ${c["parallel fifths"]} parallel fifths, ${c["parallel octaves"]} parallel octaves in ${c.moves} moves; ${c.crossing} crossings, ${c.spacing} wide spacings, ${c["out of range"]} out of range (marked P5, P8, X, S, R)`);
}

function setDownloads(on) { $("download").disabled = $("download-xml").disabled = !on; }

function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
}

function download() {
  if (midiBlob) save(midiBlob, `aurl_seed${$("seed").value || 0}.mid`);
}

// The piece on the roll as MusicXML: the server writes it from the MIDI (POST /api/musicxml).
async function downloadXml() {
  if (!midiBlob) return;
  const form = new FormData();
  form.append("file", midiBlob, "piece.mid");
  status("writing MusicXML...");
  const r = await fetch("/api/musicxml", { method: "POST", body: form });
  if (!r.ok) return status(await errorText(r), true);
  save(await r.blob(), `aurl_seed${$("seed").value || 0}.musicxml`);
  status("MusicXML written");
}

function setupSelection() {
  const c = $("roll");
  let from = null;
  const at = (ev) => Math.max(0, (ev.clientX - c.getBoundingClientRect().left) / PPS);
  c.onmousedown = (ev) => { from = at(ev); selection = null; redraw(); };
  c.onmousemove = (ev) => { if (from !== null) { const t = at(ev); selection = [Math.min(from, t), Math.max(from, t)]; redraw(); } };
  c.onmouseup = () => { from = null; if (selection && selection[1] - selection[0] < 0.05) selection = null; redraw(); };
}

async function init() {
  try {
    const h = await (await fetch("/api/health")).json();
    for (const name of h.models) { const o = document.createElement("option"); o.value = o.textContent = name; $("model").appendChild(o); }
    // the Style menu lists the chosen model's styles (none for a model trained without them);
    // the Voices menu starts at the voices the model is written in (`aurl generate`'s default)
    const styles = () => {
      const d = h.details.find((m) => m.name === $("model").value) || { styles: [] };
      $("style").replaceChildren(...["", ...(d.styles || [])].map((s) => { const o = document.createElement("option"); o.value = s; o.textContent = s || "none"; return o; }));
      const v = String(d.voices || "");
      $("voices").value = [...$("voices").options].some((o) => o.value === v) ? v : "";
    };
    $("model").onchange = styles;
    styles();
  } catch (e) { status("cannot reach the server: " + e, true); }
  $("generate").onclick = generate;
  $("harmonize").onclick = () => harmonize().catch((e) => status(String(e), true));
  $("accompany").onclick = () => accompany().catch((e) => status(String(e), true));
  $("infill").onclick = () => infill().catch((e) => status(String(e), true));
  $("download").onclick = download;
  $("download-xml").onclick = () => downloadXml().catch((e) => status(String(e), true));
  $("check").onclick = () => checkVoices().catch((e) => status(String(e), true));
  $("play").onclick = () => AurlSynth.play(notes, () => {});
  $("stop").onclick = () => AurlSynth.stop();
  $("primer").onchange = async () => {
    const f = $("primer").files[0];
    primerB64 = f ? await fileToB64(f) : null;
    if (f) showMidi(f, f.name).then(() => status(`primer ${f.name} loaded: Generate continues it`)).catch((e) => status(String(e), true));
  };
  AurlSynth.listOutputs($("midi-out"));
  setupSelection();
  redraw();
}

init();
