// The blind listening test: fetch a trial, play A and B, record which one the listener calls Bach.
"use strict";

const $ = (id) => document.getElementById(id);
let trial = null, answered = 0, right = 0;

function listener() {
  let id = localStorage.getItem("aurl-listener");
  if (!id) { id = Math.random().toString(36).slice(2, 12); localStorage.setItem("aurl-listener", id); }
  return id;
}

function status(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }

// [pitch, onset, duration] in beats -> notes in seconds at the trial's tempo and velocity.
function toNotes(rows) {
  const spb = 60 / trial.bpm;
  return rows.map(([pitch, onset, dur]) => ({ pitch, start: onset * spb, end: (onset + dur) * spb, velocity: trial.velocity }));
}

function enable(on) { for (const id of ["play-a", "play-b", "pick-a", "pick-b"]) $(id).disabled = !on; }

async function newTrial() {
  enable(false);
  AurlSynth.stop();
  status("preparing a trial (the model is composing)...");
  const r = await fetch("/api/listen/trial", { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
  const j = await r.json();
  if (!r.ok) return status(j.error || r.statusText, true);
  trial = j;
  document.body.dataset.trial = j.trial;
  enable(true);
  status(`trial ready: ${j.beats} beats each at ${j.bpm} BPM`);
}

async function pick(side) {
  if (!trial) return;
  enable(false);
  AurlSynth.stop();
  const r = await fetch("/api/listen/answer", {
    method: "POST", headers: { "content-type": "application/json", "x-listener": listener() },
    body: JSON.stringify({ trial: trial.trial, choice: side }),
  });
  const j = await r.json();
  if (!r.ok) return status(j.error || r.statusText, true);
  answered += 1; if (j.correct) right += 1;
  $("answered").textContent = answered; $("right").textContent = right;
  document.body.dataset.answered = String(answered);
  status(j.correct ? `Right: ${j.bach} was Bach.` : `Not this time: ${j.bach} was Bach.`);
  trial = null;
}

$("new").onclick = () => newTrial().catch((e) => status(String(e), true));
$("play-a").onclick = () => trial && AurlSynth.play(toNotes(trial.a));
$("play-b").onclick = () => trial && AurlSynth.play(toNotes(trial.b));
$("stop").onclick = () => AurlSynth.stop();
$("pick-a").onclick = () => pick("A").catch((e) => status(String(e), true));
$("pick-b").onclick = () => pick("B").catch((e) => status(String(e), true));
