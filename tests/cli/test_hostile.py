"""Hostile inputs to every command, each of which once escaped as a traceback, a crash, a hang
or a fork storm (docs/design.md, "Hostile inputs, hunted (session 7)"): now each gets its exit
code and one ``error:`` line on stderr naming the flag, file or key, before any work.

Run in-process through :func:`aurl.cli.main` on a tiny model (dim 32, 2 layers) and files made
in a temporary folder; the cases that load the model share one process's torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from aurl.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHORALE = FIXTURES / "midi" / "bach_bwv269.mid"


def _melody(path: Path, pitch: int, n: int = 8) -> Path:
    import symusic

    score = symusic.Score(480)
    track = symusic.Track("part", 0, False)
    for i in range(n):
        track.notes.append(symusic.Note(i * 480, 480, pitch, 80))
    score.tracks.append(track)
    score.dump_midi(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Every input the cases name, made once: a tiny model and damaged copies of it, a file
    where a folder belongs, a truncated cache index, a fake checkpoint."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.pretrained import save_pretrained

    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    save_pretrained(MusicTransformerVAEGAN(config, VocabConfig()).eval(), d / "tiny")

    def variant(name: str) -> Path:
        shutil.copytree(d / "tiny", d / name)
        return d / name

    def meta_variant(name: str, change) -> None:
        path = variant(name) / "config.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))  # NaN written as the JSON extension NaN

    meta_variant("model_list", lambda m: m.__setitem__("model", [1, 2]))
    meta_variant("vocab_nan", lambda m: m["vocab"].__setitem__("tempo_min", float("nan")))
    (variant("config_latin1") / "config.json").write_bytes(b"\xff\xfe not UTF-8")
    weights = variant("nan_weights") / "model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})

    (d / "afile").write_text("a file, not a folder")
    os.symlink("loop.mid", d / "loop.mid")  # a link to itself
    (d / "cfg.yaml").write_bytes(b"model:\n  d_model: \xe4\xf6\n")  # Latin-1, not UTF-8
    cache = d / "cache"
    cache.mkdir()
    np.savez(cache / "index.npz", meta=np.array("{}"), hash=np.zeros(3))
    index = (cache / "index.npz").read_bytes()
    (cache / "index.npz").write_bytes(index[: len(index) // 2])
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text("[]")
    (d / "corpus").mkdir()
    shutil.copy(CHORALE, d / "corpus" / "a.mid")
    # session 10: a good one-piece cache (no style labels), damaged export and adapter configs
    assert main(["data", "prepare", str(d / "corpus"), "--out", str(d / "good"), "--workers",
                 "1"]) == 0  # fmt: skip
    exports = {
        "onnx_list": [1, 2],
        "onnx_graphs": {"format": "aurl-onnx", "version": 3, "vocab": {}, "model": {},
                        "vocab_size": 774, "graphs": ["decoder.onnx"]},
        "onnx_model": {"format": "aurl-onnx", "version": 3, "vocab": {}, "model": "x"},
    }  # fmt: skip
    for name, meta in exports.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(meta))
    for name, meta in {"adapter_list": [], "adapter_alpha": {"format": "aurl-lora-adapter",
                       "rank": 2, "alpha": -1.0}}.items():  # fmt: skip
        (d / name).mkdir()
        (d / name / "adapter.json").write_text(json.dumps(meta))
        (d / name / "adapter.safetensors").write_bytes(b"")
    # session 16: training runs given as --checkpoint (an exported model, a LoRA adapter,
    # checkpoints only)
    shutil.copytree(d / "tiny", d / "run_full" / "model")
    (d / "run_full" / "checkpoints").mkdir()
    (d / "run_lora" / "adapter").mkdir(parents=True)
    (d / "run_lora" / "adapter" / "adapter.json").write_text("{}")
    (d / "run_lora" / "checkpoints").mkdir()
    (d / "run_ckpt" / "checkpoints").mkdir(parents=True)
    # session 17: --task folders whose manifest.json is not a manifest
    for name, text in {"manifest_list": "[]", "manifest_text": "not JSON"}.items():
        (d / name).mkdir()
        (d / name / "manifest.json").write_text(text)
    import symusic

    edges = symusic.Score(480)  # MIDI pitches 0 and 127, past every model's vocabulary
    track = symusic.Track("edges", 0, False)
    for i in range(8):
        track.notes.append(symusic.Note(i * 480, 480, 0 if i % 2 else 127, 80))
    edges.tracks.append(track)
    edges.dump_midi(str(d / "edges.mid"))
    drums = symusic.Score(480)
    track = symusic.Track("drums", 0, True)
    for i in range(8):
        track.notes.append(symusic.Note(i * 480, 240, 36 + i % 4, 100))
    drums.tracks.append(track)
    drums.dump_midi(str(d / "drums.mid"))
    (d / "empty.mid").write_bytes(b"")
    pieces = {"endless": [(0, 1), (1, 1025)], "stray": [(0, 1), (4098, 1)], "late": [(4098, 1)]}
    for name, notes in pieces.items():
        # a note past 1024 beats; a note after 4097 beats of silence; a first note after 4098
        score = symusic.Score(480)
        track = symusic.Track("Alto", 0, False)
        for beat, beats in notes:
            track.notes.append(symusic.Note(beat * 480, beats * 480, 67, 80))
        score.tracks.append(track)
        score.dump_midi(str(d / f"{name}.mid"))
    return {
        "dir": str(d), "tiny": str(d / "tiny"), "out": str(d / "out"), "afile": str(d / "afile"),
        "chorale": str(CHORALE), "high": str(_melody(d / "high.mid", 127)), "cfg": str(d / "cfg.yaml"),
        "cache": str(cache), "ckpt": str(ckpt), "corpus": str(d / "corpus"), "good": str(d / "good"),
    }  # fmt: skip


GEN = ["generate", "--checkpoint", "{tiny}", "--out", "{out}", "--max-tokens", "8"]
HARM = ["harmonize", "{chorale}", "--checkpoint", "{tiny}", "--out", "{out}"]
EVAL = ["evaluate", "--checkpoint", "{tiny}", "--data", "{cache}", "--out", "{out}"]
TRAIN = ["train", "--preset", "tiny", "--data", "{cache}", "--out", "{out}"]
GOOD = ["train", "--preset", "tiny", "--data", "{good}", "--out", "{out}", "training.max_steps=1"]
# (argv, exit code, what the one line must name); before: the escape each one was
# fmt: off
CASES = {
    # generate: NaN and tiny temperatures reached the sampler (RuntimeError), inf / 1e9
    # seconds and 10**8 samples ran for ever, a 2**76 seed overflowed torch's generator
    "temperature nan": ([*GEN, "--temperature", "nan"], 2, "generation.temperature"),
    "temperature 1e-300": ([*GEN, "--temperature", "1e-300"], 2, "generation.temperature"),
    "repetition penalty 0": ([*GEN, "--repetition-penalty", "0"], 2, "repetition_penalty"),
    "top-p nan": ([*GEN, "--top-p", "nan"], 2, "generation.top_p"),
    "seconds inf": ([*GEN[:-2], "--seconds", "inf"], 2, "generation.seconds"),
    "seconds 1e9": ([*GEN[:-2], "--seconds", "1e9", "--cadence", "off"], 2, "generation.seconds"),
    "seed 10**23": ([*GEN, "--seed", str(10**23)], 2, "generation.seed"),
    "num-samples 10**8": ([*GEN, "--num-samples", str(10**8)], 2, "--num-samples"),
    "primer-seconds nan": ([*GEN, "--primer", "{chorale}", "--primer-seconds", "nan"], 2,
                           "--primer-seconds"),
    # --threads 100000 killed the process (SIGSEGV in OpenMP)
    "threads 100000": ([*GEN, "--threads", "100000"], 2, "--threads"),
    "device tpu": ([*GEN, "--device", "tpu"], 2, "--device"),
    "device cuda:7": ([*GEN, "--device", "cuda:7"], 2, "--device"),
    # the pieces were generated, then writing the first one raised FileExistsError
    "out is a file": ([*GEN[:-4], "--out", "{afile}", "--max-tokens", "8"], 2, "--out"),
    "out holds NUL": ([*GEN[:-4], "--out", "{dir}/a\0b", "--max-tokens", "8"], 2, "--out"),
    "soundfont not sf2": ([*GEN, "--format", "wav", "--soundfont", "{chorale}"], 2,
                          "--soundfont"),
    # checkpoints: TypeError, UnicodeDecodeError, OverflowError at the MIDI write, NaN logits
    "config.json model a list": (["generate", "--checkpoint", "{dir}/model_list", "--out",
                                  "{out}"], 1, "model_list/config.json"),
    "config.json not UTF-8": (["generate", "--checkpoint", "{dir}/config_latin1", "--out",
                               "{out}"], 1, "config_latin1/config.json"),
    "config.json vocab NaN": (["generate", "--checkpoint", "{dir}/vocab_nan", "--out", "{out}"],
                              1, "vocab.tempo_min"),
    "NaN weights": (["generate", "--checkpoint", "{dir}/nan_weights", "--out", "{out}"], 1,
                    "nan_weights/model.safetensors"),
    # composing: NaN temperature ran to "did not end", 10**9 particles a MemoryError, a part
    # at pitch 127 ran to "composing did not end within 2120 tokens"
    "harmonize temperature nan": ([*HARM, "--temperature", "nan"], 2, "--temperature"),
    "harmonize particles 10**9": ([*HARM, "--particles", str(10**9)], 2, "--particles"),
    "harmonize out is a file": ([*HARM[:-2], "--out", "{afile}"], 2, "--out"),
    "accompany out of range": (["accompany", "{high}", "--checkpoint", "{tiny}", "--out",
                                "{out}"], 1, "high.mid"),
    # evaluate: BadZipFile, FileExistsError, torch's device RuntimeError, --limit 0 ran all
    "evaluate truncated index": ([*EVAL, "--samples", "0"], 1, "index.npz"),
    "evaluate device tpu": ([*EVAL, "--device", "tpu"], 2, "--device"),
    "evaluate out is a file": ([*EVAL[:-2], "--out", "{afile}"], 2, "--out"),
    "evaluate task limit 0": (["evaluate", "--checkpoint", "{tiny}", "--task", "harmonize",
                               "--limit", "0", "--out", "{out}"], 2, "--limit"),
    # analyze: ValueError (NaN), IndexError (1e300), MemoryError of 417 GiB (1e-9)
    "analyze bar nan": (["analyze", "{chorale}", "--out", "{out}", "--beats-per-bar", "nan"], 2,
                        "--beats-per-bar"),
    "analyze bar 1e-9": (["analyze", "{chorale}", "--out", "{out}", "--beats-per-bar", "1e-9"],
                         2, "--beats-per-bar"),
    "analyze out is a file": (["analyze", "{chorale}", "--out", "{afile}"], 2, "--out"),
    # data: 100000 workers forked 3,358 processes; --limit -3 converted all but 3 scores
    "prepare workers 10**5": (["data", "prepare", "{corpus}", "--out", "{out}", "--workers",
                               "100000"], 2, "--workers"),
    "prepare out is a file": (["data", "prepare", "{corpus}", "--out", "{afile}"], 2, "--out"),
    "prepare into a damaged cache": (["data", "prepare", "{corpus}", "--out", "{cache}",
                                      "--workers", "1"], 1, "index.npz"),
    "check workers -5": (["data", "check", "{corpus}", "--workers", "-5"], 2, "--workers"),
    "corpus limit -3": (["data", "corpus", "--name", "folk", "--limit", "-3", "--out", "{out}"],
                        2, "--limit"),
    "corpus out is a file": (["data", "corpus", "--out", "{afile}"], 2, "--out"),
    # train: UnicodeDecodeError, FileExistsError, TypeError on a manifest that is a list,
    # a rank-100000 adapter (102M parameters), NaN alpha and NaN weights trained to loss nan
    "train config not UTF-8": (["train", "--config", "{cfg}", "--out", "{out}"], 2, "cfg.yaml"),
    "train out is a file": ([*TRAIN[:-2], "--out", "{afile}"], 2, "--out"),
    "train resume manifest list": ([*TRAIN, "--resume", "{ckpt}"], 1, "manifest.json"),
    "train lora 10**5": ([*TRAIN, "--init-from", "{tiny}", "--lora", "100000"], 2, "--lora"),
    "train lora over width": ([*TRAIN, "--init-from", "{tiny}", "--lora", "64"], 2, "--lora"),
    "train lora alpha nan": ([*TRAIN, "--init-from", "{tiny}", "--lora", "2", "--lora-alpha",
                              "nan"], 2, "--lora-alpha"),
    "train from NaN weights": ([*TRAIN, "--init-from", "{dir}/nan_weights"], 1,
                               "nan_weights/model.safetensors"),
    "export out is a file": (["export", "--format", "onnx", "--checkpoint", "{tiny}", "--out",
                              "{afile}"], 2, "--out"),
    # checkpoint: FileExistsError after averaging; --best 0 said "none with a validation loss"
    "checkpoint average best 0": (["checkpoint", "average", "{dir}", "--best", "0", "--out",
                                   "{out}"], 2, "--best"),
    "checkpoint average out is a file": (["checkpoint", "average", "{dir}", "--out", "{afile}"],
                                         2, "--out"),
    "checkpoint export out is a file": (["checkpoint", "export", "{ckpt}", "--out", "{afile}"],
                                        2, "--out"),
    # -- session 10 (docs/design.md, "Hostile inputs, session 10") --------------------------------
    # train: these stopped in the data checks after config.yaml, train.log, metrics.jsonl and
    # tb/ were written under --out; --init-from '' trained from scratch
    "train pack cannot fill": ([*GOOD, "data.pack=true", "data.batch_size=65536"], 1,
                               "cannot fill"),
    "train styles, cache unlabelled": ([*GOOD, "model.styles=[chorale]"], 1, "no style labels"),
    "train style_repeat unknown": ([*GOOD, "data.style_repeat=[[jazz,3]]"], 2,
                                   "data.style_repeat"),
    "train init-from empty": ([*GOOD, "--init-from", ""], 2, "--init-from"),
    "train lora-alpha without lora": ([*GOOD, "--init-from", "{tiny}", "--lora-alpha", "3"], 2,
                                      "--lora-alpha"),
    # '' ran as if the flag were absent
    "generate style empty": ([*GEN, "--style", ""], 2, "--style"),
    "generate key empty": ([*GEN, "--key", ""], 2, "--key"),
    "harmonize key empty": ([*HARM, "--key", ""], 2, "--key"),
    "evaluate style empty": ([*EVAL, "--style", ""], 2, "--style"),
    # --style without a model takes the shipped `styles`: a name it lacks is its one line
    "generate style unknown, no model": (["generate", "--style", "jazz", "--out", "{out}"], 2,
                                         "--style jazz: unknown style; this model knows chorale"),
    # damaged export / adapter configs: AttributeError, TypeError; alpha -1 ran
    "onnx config a list": (["generate", "--engine", "onnx", "--checkpoint", "{dir}/onnx_list",
                            "--out", "{out}"], 1, "onnx_list/config.json"),
    "onnx graphs a list": (["generate", "--engine", "onnx", "--checkpoint", "{dir}/onnx_graphs",
                            "--out", "{out}"], 1, "onnx_graphs/config.json"),
    "onnx model a string": (["generate", "--engine", "onnx", "--checkpoint", "{dir}/onnx_model",
                             "--out", "{out}"], 1, "onnx_model/config.json"),
    "adapter.json a list": ([*GEN, "--adapter", "{dir}/adapter_list"], 1,
                            "adapter_list/adapter.json"),
    "adapter alpha -1": ([*GEN, "--adapter", "{dir}/adapter_alpha"], 1,
                         "adapter.json is damaged or not an Aurl adapter (alpha is -1"),
    # -- session 16: a folder or a device where a file belongs was called missing -------------
    "infill a folder": (["infill", "{corpus}", "--bars", "1-2", "--checkpoint", "{tiny}",
                         "--out", "{out}"], 1, "corpus is a folder: give a MIDI or MusicXML file"),
    "accompany a device": (["accompany", "/dev/null", "--checkpoint", "{tiny}", "--out", "{out}"],
                           1, "/dev/null is not a regular file (a device, pipe or socket)"),
    "infill a missing file": (["infill", "{dir}/none.mid", "--bars", "1-2", "--checkpoint",
                               "{tiny}", "--out", "{out}"], 1, "none.mid does not exist"),
    "primer a folder": ([*GEN, "--primer", "{corpus}"], 1, "corpus: not a file (a folder)"),
    "soundfont a folder": ([*GEN, "--format", "wav", "--soundfont", "{corpus}"], 2,
                           "--soundfont {corpus} is a folder"),
    "analyze a device": (["analyze", "/dev/null", "--out", "{out}"], 1,
                         "/dev/null is not a regular file"),
    # a training run's folder as --checkpoint: "config.json does not exist", or (evaluate, a
    # LoRA run) "weights do not fit this model"
    "generate a run folder": (["generate", "--checkpoint", "{dir}/run_full", "--out", "{out}"],
                              1, "give --checkpoint {dir}/run_full/model"),
    "harmonize a LoRA run": (["harmonize", "{chorale}", "--checkpoint", "{dir}/run_lora",
                              "--out", "{out}"], 1, "give --adapter {dir}/run_lora/adapter"),
    "generate a run not exported": (["generate", "--checkpoint", "{dir}/run_ckpt", "--out",
                                     "{out}"], 1, "aurl checkpoint export {dir}/run_ckpt"),
    # -- session 17: the commands added since session 7 ------------------------------------------
    # evaluate --task: a manifest that is not one was a TypeError / JSONDecodeError; a missing
    # folder "had no four-track chorales"; '' ran on the bundled chorales
    "task manifest a list": (["evaluate", "--task", "infill", "--checkpoint", "{tiny}", "--data",
                              "{dir}/manifest_list", "--out", "{out}"], 1,
                             "manifest_list/manifest.json is damaged"),
    "task manifest not JSON": (["evaluate", "--task", "accompany", "--checkpoint", "{tiny}",
                                "--data", "{dir}/manifest_text", "--out", "{out}"], 1,
                               "manifest_text/manifest.json is damaged"),
    "task data missing": (["evaluate", "--task", "harmonize", "--checkpoint", "{tiny}", "--data",
                           "{dir}/none", "--out", "{out}"], 1, "--data {dir}/none does not exist"),
    "task data empty": (["evaluate", "--task", "harmonize", "--checkpoint", "{tiny}", "--data", "",
                         "--out", "{out}"], 2, "--data ''"),
    # infill: '' fell through to --span (AttributeError); kept notes the model cannot write
    # ran to RuntimeError "composing did not end within 2120 tokens"; drums only: a line naming
    # no file
    "infill bars empty": (["infill", "{chorale}", "--bars", "", "--checkpoint", "{tiny}", "--out",
                           "{out}"], 2, "--bars ''"),
    "infill pitches past the model": (["infill", "{dir}/edges.mid", "--bars", "1-1",
                                       "--checkpoint", "{tiny}", "--out", "{out}"], 1,
                                      "edges.mid spans MIDI pitches 0..127"),
    "infill drums only": (["infill", "{dir}/drums.mid", "--bars", "1-1", "--checkpoint", "{tiny}",
                           "--out", "{out}"], 1, "drums.mid holds drums only"),
    # generate --voices 17: "generation.voices: 17 is out of range; allowed [0, 16]" (9..16
    # refused too); --ranges without SATB voices leaned nothing, silently; --meter '' ran in 4/4
    "voices 17": ([*GEN, "--voices", "17"], 2, "--voices 17: give 1 to 8"),
    "voices -1": ([*GEN, "--voices", "-1"], 2, "--voices -1: give 1 to 8"),
    "ranges without voices": ([*GEN, "--ranges", "0.5"], 2, "--ranges 0.5"),
    "ranges with 6 voices": ([*GEN, "--ranges", "0.5", "--voices", "6"], 2, "--ranges 0.5"),
    "meter empty": ([*GEN, "--meter", ""], 2, "--meter ''"),
    # harmonize / accompany / infill: the voices were composed under all of a note of 100,000
    # beats or a silence of 8,000 (a two-note file announced ~25 tokens and ran ~1,000,000)
    "harmonize an endless note": (["harmonize", "{dir}/endless.mid", "--checkpoint", "{tiny}",
                                   "--out", "{out}"], 1,
                                  "endless.mid: the note at beat 2 lasts 1025 beats"),
    "accompany a stray note": (["accompany", "{dir}/stray.mid", "--checkpoint", "{tiny}", "--out",
                                "{out}"], 1, "stray.mid: 4097 beats of silence before the note"),
    "infill a stray note": (["infill", "{dir}/stray.mid", "--bars", "1-1", "--checkpoint",
                             "{tiny}", "--out", "{out}"], 1, "stray.mid: 4097 beats of silence"),
    # the silence before the first note (the server refused it; the commands walked it: one
    # note at beat 559,241 ran 218 s on the tiny model); --part '²' (a digit to str.isdigit,
    # not to int: ValueError)
    "harmonize a late first note": (["harmonize", "{dir}/late.mid", "--checkpoint", "{tiny}",
                                     "--out", "{out}"], 1,
                                    "late.mid: 4098 beats of silence before the note at beat 4099"),
    "infill part superscript": (["infill", "{chorale}", "--bars", "1-1", "--part", "\u00b2",
                                 "--checkpoint", "{tiny}", "--out", "{out}"], 2,
                                "--part '\u00b2': no such track"),
    # train: the samples' generation settings stopped the run at its first sample (step 1000 by
    # default), after config.yaml, train.log and tb/ were written, naming "--key"
    "train sample key unknown": ([*GOOD, "training.sample_every=1", "generation.key=Q"], 2,
                                 "generation.key: unknown key 'Q'"),
    "train sample tokens 3": ([*GOOD, "training.sample_every=1", "training.sample_tokens=3"], 2,
                              "training.sample_tokens"),
    "train sample pitches empty": ([*GOOD, "training.sample_every=1", "generation.pitch_low=90",
                                    "generation.pitch_high=60"], 2, "pitch range 90..60 is empty"),
    # analyze FILE unreadable: "skipped FILE: FILE: why" and "error: cannot analyse FILE: FILE:
    # why", two lines
    "analyze an empty file": (["analyze", "{dir}/empty.mid", "--out", "{out}"], 1,
                              "cannot analyse {dir}/empty.mid: empty file"),
    # -- session 19: '' as a path is Path(''), the current folder: it was checked, prepared,
    # analysed or harmonized (file by file), and a cache or a report written into it
    "check path empty": (["data", "check", ""], 2, "PATH '': give a file or folder name"),
    "prepare dir empty": (["data", "prepare", "", "--out", "{out}"], 2, "DIR ''"),
    "prepare out empty": (["data", "prepare", "{corpus}", "--out", ""], 2, "--out ''"),
    "analyze path empty": (["analyze", "", "--out", "{out}"], 2, "FILE_OR_DIR ''"),
    "analyze out empty": (["analyze", "{chorale}", "--out", ""], 2, "--out ''"),
    "harmonize melody empty": (["harmonize", "", "--checkpoint", "{tiny}", "--out", "{out}"], 2,
                               "'' is no file name"),
    "accompany part empty": (["accompany", "", "--checkpoint", "{tiny}", "--out", "{out}"], 2,
                             "'' is no file name"),
    # --out '' was the current folder for every other command (cli.checks.out_dir)
    "generate out empty": ([*GEN[:3], "--out", "", *GEN[5:]], 2, "--out '': give a folder"),
    "harmonize out empty": ([*HARM[:4], "--out", ""], 2, "--out '': give a folder"),
    "evaluate out empty": ([*EVAL[:5], "--out", ""], 2, "--out '': give a folder"),
    "export out empty": (["export", "--format", "onnx", "--checkpoint", "{tiny}", "--out", ""], 2,
                         "--out '': give a folder"),
    "checkpoint export out empty": (["checkpoint", "export", "{ckpt}", "--out", ""], 2,
                                    "--out '': give a folder"),
    # a symbolic link loop was an OSError traceback (fileio.not_a_file)
    "analyze a link loop": (["analyze", "{dir}/loop.mid", "--out", "{out}"], 1,
                            "loop.mid is a loop of symbolic links"),
    "harmonize a link loop": (["harmonize", "{dir}/loop.mid", *HARM[2:]], 1,
                              "loop.mid is a loop of symbolic links"),
}
# fmt: on


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gets_one_line_naming_it(case, files, capsys) -> None:
    argv, code, names = CASES[case]
    argv = [a.format(**files) for a in argv]
    shutil.rmtree(files["out"], ignore_errors=True)
    assert main(argv) == code, capsys.readouterr().err
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names.format(**files) in lines[0], lines[0]
    out = Path(files["out"])
    assert not out.exists() or not any(out.iterdir()), f"wrote {list(out.iterdir())} first"


@pytest.mark.parametrize("style", ["folk", "each"])
def test_evaluate_a_style_the_model_lacks_makes_no_out_folder(style, files, capsys) -> None:
    argv = [a.format(**files) for a in [*EVAL, "--samples", "0", "--style", style]]
    shutil.rmtree(files["out"], ignore_errors=True)
    assert main(argv) == 2
    assert "trained without styles" in capsys.readouterr().err
    assert not Path(files["out"]).exists()  # it was made, empty, before the style was checked


def test_file_names_that_are_not_utf8_are_read_and_reported(files, tmp_path) -> None:
    """A folder holding a file whose name is not UTF-8 (Latin-1 bytes) once stopped
    ``aurl data prepare`` (UnicodeEncodeError in the split's hash) and ``aurl analyze``
    (its UTF-8 report): both now read it; the report shows the bad bytes as U+FFFD."""
    src = tmp_path / "latin1"
    src.mkdir()
    shutil.copy(CHORALE, os.path.join(os.fsencode(src), b"chor\xe4le.mid"))
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "cache"), "--preset",
                 "tiny", "--workers", "1"]) == 0  # fmt: skip
    from aurl.data.cache import TokenCache

    cache = TokenCache(tmp_path / "cache")
    assert len(cache.lengths) == 1 and os.fsencode(cache.relpath(0)) == b"chor\xe4le.mid"
    assert main(["analyze", str(src), "--out", str(tmp_path / "an"), "--no-plots"]) == 0
    report = json.loads((tmp_path / "an" / "chor\udce4le" / "analysis.json").read_text())
    assert report["name"] == "chor\ufffdle.mid"


def _voices(path: Path, pitches: tuple[int, ...], n: int = 16) -> Path:
    """A file of one track per pitch (a voice of ``n`` quarter notes each)."""
    import symusic

    score = symusic.Score(480)
    for k, pitch in enumerate(pitches):
        track = symusic.Track(f"v{k}", 0, False)
        for i in range(n):
            track.notes.append(symusic.Note(i * 480, 480, pitch + i % 3, 80))
        score.tracks.append(track)
    score.dump_midi(str(path))
    return path


@pytest.mark.parametrize("task", ["harmonize", "accompany", "infill"])
def test_evaluate_task_skips_the_files_it_cannot_evaluate(task, files, tmp_path, capsys) -> None:
    """A --task folder holding files that are not four-voice chorales once stopped at the first
    (IndexError for one track, ValueError for none, RuntimeError "did not end" for pitches the
    model lacks, a ConstraintError naming no file): each is now said as ``skipped FILE: why``
    and the chorales are evaluated."""
    folder = tmp_path / "chorales"
    folder.mkdir()
    shutil.copy(CHORALE, folder / "good.mid")
    (folder / "empty.mid").write_bytes(b"")
    _voices(folder / "one.mid", (67,))
    _voices(folder / "high.mid", (120, 67, 60, 48))  # a soprano above the vocabulary
    names = ["good.mid", "empty.mid", "one.mid", "high.mid"]
    (folder / "manifest.json").write_text(json.dumps(
        {"files": [{"file": n, "split": "test", "tracks": 4} for n in names]}
    ))  # fmt: skip
    out = tmp_path / "out"
    argv = ["evaluate", "--task", task, "--checkpoint", files["tiny"], "--data", str(folder),
            "--out", str(out), "--engine", "torch"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3, captured.err
    for name, why in (("empty.mid", "empty file"), ("one.mid", "1 track(s) with notes"),
                      ("high.mid", "spans MIDI pitches")):  # fmt: skip
        assert any(str(folder / name) in line and why in line for line in skipped), skipped
    assert "Traceback" not in captured.err and "Warning" not in captured.err, captured.err
    assert "evaluated 1 of 4 chorales; skipped 3" in captured.out
    assert json.loads((out / f"{task}.json").read_text())["files"] == 1


def test_harmonize_estimate_counts_the_beats_a_melody_holds_or_rests() -> None:
    """A two-note melody over 200 beats was announced as ~25 tokens and decoded 2,046 (the
    voices move under the rest): the estimate counts the beats where they outnumber the notes,
    and a melody of a note a beat keeps its old count."""
    from aurl.cli.eta import harmonize_tokens

    assert harmonize_tokens(2, 4, 200.0) > 1_000
    assert harmonize_tokens(36, 4, 30.0) == harmonize_tokens(36, 4) == 450


def test_voices_of_a_40_track_infill_are_assigned_without_trying_every_subset() -> None:
    """``aurl infill PIECE --bars 2-3`` of a 40-track piece (every voice) spreads the new notes
    over the tracks with :func:`assign_voices`, which tried each subset of the free voices:
    C(40, 20) at an onset where 20 notes start (the command ran past 120 s). Now it finishes
    at once, each new note in its own voice, highest note to the highest voice."""
    import signal

    import numpy as np

    from aurl.data.notes import NOTE_DTYPE
    from aurl.generation.voices import assign_voices

    notes = np.zeros(60, dtype=NOTE_DTYPE)
    notes["onset"] = np.r_[np.zeros(40), np.ones(20)]  # 40 voices, then 20 of them again
    notes["duration"] = 1.0
    notes["pitch"] = np.r_[30 + 2 * np.arange(40), 31 + 4 * np.arange(20)]

    def too_long(*_):
        raise TimeoutError("assign_voices searched for more than 20 s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        voice = assign_voices(notes, 40)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    second = voice[40:]
    assert len(set(second.tolist())) == 20  # one voice each
    by_pitch = np.argsort(-notes["pitch"][40:], kind="stable")
    assert (np.diff(second[by_pitch]) > 0).all()  # highest note, highest voice (index 0)


def test_analyze_a_folder_of_unreadable_files_fails_naming_each(tmp_path, capsys) -> None:
    """A folder whose every MIDI file is unreadable was "analysed 0 of 2 files" with exit 0:
    now each is said as ``skipped FILE: why`` and the command fails naming the folder."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.mid").write_bytes(b"")
    (folder / "text.mid").write_text("<score-partwise/>")
    assert main(["analyze", str(folder), "--out", str(tmp_path / "out"), "--no-plots"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"error: no file in {folder} could be read (2 unreadable"), lines
    assert [line.split(":")[0] for line in lines[:-1]] == [
        f"skipped {folder / 'empty.mid'}",
        f"skipped {folder / 'text.mid'}",
    ]


@pytest.mark.parametrize("meter", [(0, 4), (1, 32)])
def test_analyze_reads_a_time_signature_it_cannot_use_as_4_4(meter, tmp_path, capsys) -> None:
    """A first time signature of 0/4 stopped ``aurl analyze`` (ZeroDivisionError); 1/32 made a
    bar of 0.125 beats, under the shortest --beats-per-bar takes (a 2,000-beat file: 16,000
    bars, 96 s and 7.9 GB). Now 0/4 reads as 4/4 (the data layer's rule) and a bar is at least
    0.25 beats."""
    import symusic

    score = symusic.Score(480)
    score.time_signatures.append(symusic.TimeSignature(0, *meter))
    track = symusic.Track("part", 0, False)
    for i in range(16):
        track.notes.append(symusic.Note(i * 480, 480, 60 + (i * 7) % 12, 80))
    score.tracks.append(track)
    score.dump_midi(str(tmp_path / "meter.mid"))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "meter.mid"), "--out", str(out), "--no-plots"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    bar = json.loads((out / "analysis.json").read_text())["beats_per_bar"]
    assert bar == (4.0 if meter == (0, 4) else 0.25)


def test_structure_of_a_periodic_piece_of_4000_bars_chooses_its_boundaries_at_once() -> None:
    """A periodic piece read in bars of a quarter beat (4,000 bars, 199,199 repeats) made
    800,000 boundary candidates, each checked against every chosen bar: ~36 s here, where the
    rest of the structure takes ~4 s; now one candidate per (bar, gap), the nearest chosen bars
    found by bisection. (A deadline, as a hang has no other test.)"""
    import signal

    import numpy as np

    from aurl.analysis.structure import analyze_structure
    from aurl.data.notes import NOTE_DTYPE

    parts = []
    for base in (72, 67, 60, 48):
        part = np.zeros(1000, dtype=NOTE_DTYPE)
        part["onset"] = np.arange(1000.0)
        part["duration"] = 1.0
        part["pitch"] = base + (np.arange(1000) * 7) % 5
        part["velocity"] = 80
        parts.append(part)
    notes = np.sort(np.concatenate(parts), order=["onset", "pitch"])

    def too_long(*_):
        raise TimeoutError("analyze_structure took more than 20 s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        structure = analyze_structure(notes, beats_per_bar=0.25)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    bounds = structure.boundaries
    # past MAX_BARS the bars are read in pairs (analysis.structure): 2,000 of half a beat
    assert structure.beats_per_bar == 0.5 and len(structure.similarity) == 2000
    assert bounds[0] == 0 and bounds[-1] == 2000 and bounds == sorted(bounds)
    assert min(np.diff(bounds)) >= 2  # min_bars apart


def test_analyze_notes_too_far_apart_for_a_local_key(tmp_path, capsys) -> None:
    """Two notes 32 beats apart (a MIDI file, or a MusicXML ``<forward>`` of 10**9
    divisions) leave every key window one pitch class: no local key segment, and the cadences
    were read in that empty list (IndexError in ``key_at``). Now they are read in the global
    key and the report is written."""
    import symusic

    score = symusic.Score(480)
    track = symusic.Track("part", 0, False)
    for beat, pitch in ((0, 60), (32, 62)):
        track.notes.append(symusic.Note(beat * 480, 240, pitch, 90))
    score.tracks.append(track)
    score.dump_midi(str(tmp_path / "far.mid"))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "far.mid"), "--out", str(out), "--no-plots"]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["key"] and report["key_segments"] == [] and "cadences" in report


def test_prepare_shard_empty_is_no_part(files, tmp_path, capsys) -> None:
    """``aurl data prepare --shard ''`` prepared the whole folder, as if the flag were absent."""
    out = tmp_path / "part"
    assert main(["data", "prepare", files["corpus"], "--out", str(out), "--shard", ""]) == 1
    assert "--shard '': expected i/n" in capsys.readouterr().err
    assert not (out / "index.npz").exists()
