// A small Web Audio synth and Web MIDI output shared by the studio and the listening test.
// Plain JavaScript, no libraries: everything here is served by aurl itself.
"use strict";

const AurlSynth = (() => {
  let ctx = null, master = null, midiOut = null, timers = [], endTimer = null;

  function hz(pitch) { return 440 * Math.pow(2, (pitch - 69) / 12); }

  // notes: [{pitch, start, end, velocity}] in seconds. Calls onEnd when done.
  function play(notes, onEnd) {
    stop();
    if (midiOut) return playMidi(notes, onEnd);
    ctx = ctx || new (window.AudioContext || window.webkitAudioContext)();
    if (ctx.state === "suspended") ctx.resume();
    master = ctx.createGain();
    master.gain.value = 0.18;
    master.connect(ctx.destination);
    const t0 = ctx.currentTime + 0.1;
    let last = 0;
    for (const n of notes) {
      const osc = ctx.createOscillator(), env = ctx.createGain();
      osc.type = "triangle";
      osc.frequency.value = hz(n.pitch);
      const a = t0 + n.start, b = t0 + Math.max(n.end, n.start + 0.05);
      const peak = 0.25 + 0.75 * (n.velocity / 127);
      env.gain.setValueAtTime(0, a);
      env.gain.linearRampToValueAtTime(peak, a + 0.01);
      env.gain.setTargetAtTime(peak * 0.6, a + 0.01, 0.3);
      env.gain.setTargetAtTime(0, b, 0.05);
      osc.connect(env).connect(master);
      osc.start(a);
      osc.stop(b + 0.4);
      last = Math.max(last, b);
    }
    endTimer = setTimeout(() => { if (onEnd) onEnd(); }, (last - ctx.currentTime + 0.5) * 1000);
  }

  function playMidi(notes, onEnd) {
    const t0 = performance.now() + 100;
    let last = 0;
    for (const n of notes) {
      midiOut.send([0x90, n.pitch, n.velocity], t0 + n.start * 1000);
      midiOut.send([0x80, n.pitch, 0], t0 + n.end * 1000);
      last = Math.max(last, n.end);
    }
    endTimer = setTimeout(() => { if (onEnd) onEnd(); }, last * 1000 + 200);
  }

  function stop() {
    if (endTimer) clearTimeout(endTimer);
    endTimer = null;
    if (master) { master.disconnect(); master = null; }
    if (midiOut) { midiOut.clear && midiOut.clear(); for (let p = 0; p < 128; p++) midiOut.send([0x80, p, 0]); }
  }

  // Fills a <select> with the MIDI outputs the browser offers (Web MIDI), if any.
  async function listOutputs(select) {
    if (!navigator.requestMIDIAccess) { select.disabled = true; select.title = "Web MIDI is not available in this browser"; return; }
    try {
      const access = await navigator.requestMIDIAccess();
      for (const out of access.outputs.values()) {
        const o = document.createElement("option");
        o.value = out.id; o.textContent = out.name; o.port = out;
        select.appendChild(o);
      }
      select.onchange = () => {
        const opt = select.selectedOptions[0];
        midiOut = opt && opt.port ? opt.port : null;
      };
    } catch (e) { select.disabled = true; select.title = "Web MIDI refused: " + e; }
  }

  return { play, stop, listOutputs };
})();
