"""The voices a model is written in (its ``config.json``'s ``voices``): the default of
``aurl generate --voices`` (``cli.generate.model_voices``). The shipped chorales say 4, so the
README's command writes Soprano, Alto, Tenor and Bass tracks, decoded as voices; ``--voices 0``
asks for one free track; a value that is not 1-8 is refused in one line naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from aurl.cli import main
from aurl.config import load_config

SAID = "--voices 4: the voices this model is written in"


def _tracks(path) -> list[str]:
    from symusic import Score

    return [t.name for t in Score(str(path)).tracks if len(t.notes)]


def test_the_shipped_chorales_are_written_in_their_four_voices(tmp_path, capsys) -> None:
    args = ["generate", "--num-samples", "1", "--seconds", "8", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    cap = capsys.readouterr()
    assert SAID in cap.err
    assert _tracks(tmp_path / "d" / "sample_seed1_000.mid") == ["Soprano", "Alto", "Tenor", "Bass"]
    assert "parallel 5ths/8ves in" in cap.out  # the piece's line reads its voices
    g = load_config(tmp_path / "d" / "sample_seed1.yaml").generation
    assert (g.voices, g.voice_leading, g.spacing, g.ranges) == (4, True, 0.9, 0.9)

    assert main([*args, "--voices", "0", "--out", str(tmp_path / "free")]) == 0
    cap = capsys.readouterr()
    assert SAID not in cap.err and "parallel" not in cap.out
    assert len(_tracks(tmp_path / "free" / "sample_seed1_000.mid")) == 1
    g = load_config(tmp_path / "free" / "sample_seed1.yaml").generation
    assert (g.voices, g.voice_leading, g.spacing, g.ranges) == (0, False, 0.0, 0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random model saved as a model folder (the ``tiny`` preset)."""
    import torch

    from aurl.config import load_config as load
    from aurl.models import build_model
    from aurl.models.pretrained import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(build_model(load(preset="tiny")).eval(), tmp_path_factory.mktemp("m"))


def _with_voices(tiny_folder, tmp_path, voices):
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["voices"] = voices
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def test_a_model_folder_names_its_voices(tiny_folder, tmp_path, capsys) -> None:
    folder = _with_voices(tiny_folder, tmp_path, 3)
    args = ["generate", "--checkpoint", str(folder), "--engine", "torch", "--max-tokens", "160",
            "--min-tokens", "120", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert "--voices 3: the voices this model" in capsys.readouterr().err
    assert load_config(tmp_path / "o" / "sample_seed0.yaml").generation.voices == 3
    assert set(_tracks(tmp_path / "o" / "sample_seed0_000.mid")) <= {"Soprano", "Alto", "Bass"}
    # a folder without the key (every model trained before it): one free track, as before
    assert main([*args[:2], str(tiny_folder), *args[3:], "--force"]) == 0
    assert "--voices" not in capsys.readouterr().err
    assert load_config(tmp_path / "o" / "sample_seed0.yaml").generation.voices == 0


@pytest.mark.parametrize("bad", [9, -1, 2.5, "4", True, None, [4]])
def test_voices_that_are_no_count_are_refused_naming_the_file(
    tiny_folder, tmp_path, capsys, bad
) -> None:
    folder = _with_voices(tiny_folder, tmp_path, bad)
    out = tmp_path / "o"
    assert main(["generate", "--checkpoint", str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / "config.json") in err[0] and "'voices'" in err[0], err
    assert not out.exists()
    # an explicit --voices does not read it
    assert main(["generate", "--checkpoint", str(folder), "--engine", "torch", "--voices", "2",
                 "--max-tokens", "40", "--out", str(out)]) == 0  # fmt: skip


def test_voices_are_written_without_symusic(tmp_path) -> None:
    """The default command writes its four voices from the decoded table
    (``generation.export.voice_data``): symusic, ~0.1 s of a cold start, is never imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"assert main(['generate', '--max-tokens', '200', '--out', {str(tmp_path)!r}]) == 0\n"
        "print('symusic' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(src)}, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert SAID in r.stderr and r.stdout.strip().splitlines()[-1] == "False"
    assert _tracks(tmp_path / "sample_seed0_000.mid") == ["Soprano", "Alto", "Tenor", "Bass"]


@pytest.mark.parametrize(
    "flags, want",
    [([], 4), (["--voices", "2"], 2), (["--voices", "0"], 0), (["--adapter", "A"], None),
     (["--model", "styles"], 0), (["--model", "chorales"], 4)],
)  # fmt: skip
def test_whose_voices_the_default_is(flags, want) -> None:
    """The model's voices are the default unless ``--voices`` says otherwise; an adapter tuned
    the model to other music (``aurl train --lora`` on folk tunes: one line), so with
    ``--adapter`` the piece stays one free track; the shipped ``styles`` says none."""
    from aurl.cli import build_parser
    from aurl.cli.generate import default_voices, generation_config

    args = build_parser().parse_args(["generate", *flags, "--out", "x"])
    default_voices(args)
    assert args.voices == want
    assert generation_config(args).voices == (want or 0)


def test_the_meter_asked_and_the_key_found_are_in_the_files(tmp_path, capsys) -> None:
    """``--meter 3/4`` pieces carry a 3/4 time signature, and every piece the key its summary
    line names: the MIDI file's signatures and the MusicXML's bars and key (both were 4/4 and
    keyless)."""
    import re

    from music21 import converter
    from symusic import Score

    from aurl.analysis.keys import parse_key

    args = ["generate", "--seconds", "8", "--seed", "2", "--meter", "3/4", "--format",
            "mid,musicxml", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    key = parse_key(re.search(r"key ([A-G][#b]? (?:major|minor))", capsys.readouterr().out)[1])
    score = Score(str(tmp_path / "sample_seed2_000.mid"))
    assert [(t.time, t.numerator, t.denominator) for t in score.time_signatures] == [(0, 3, 4)]
    assert [(k.key, k.tonality) for k in score.key_signatures] == [(key.sharps, key.mode == "minor")]
    xml = converter.parse(str(tmp_path / "sample_seed2_000.musicxml"), forceSource=True)
    for part in xml.parts:
        assert {t.ratioString for t in part.recurse().getElementsByClass("TimeSignature")} == {"3/4"}
        assert {k.sharps for k in part.recurse().getElementsByClass("KeySignature")} == {key.sharps}


def test_checkpoint_export_records_the_voices(tmp_path, capsys) -> None:
    """``aurl checkpoint export --voices 4`` writes ``"voices": 4`` beside the weights, so a
    chorale model of one's own (or the next shipped release, ``benchmarks/gpu_models.py
    --voices 4``) writes four voices by default; without it nothing is recorded; 9 is refused."""
    import json
    import shutil
    from pathlib import Path

    chorale = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / "bach_bwv269.mid"
    (tmp_path / "corpus").mkdir()
    shutil.copy(chorale, tmp_path / "corpus" / "a.mid")
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["data", "prepare", str(tmp_path / "corpus"), "--out", str(cache),
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["train", "--preset", "tiny", "--data", str(cache), "--out", str(run),
                 "training.max_steps=1", "training.sample_every=0", "data.window=64",
                 "data.batch_size=2"]) == 0, capsys.readouterr().err  # fmt: skip
    for voices, want in (("4", 4), ("0", None)):
        out = tmp_path / f"model{voices}"
        assert main(["checkpoint", "export", str(run), "--out", str(out), "--voices", voices]) == 0
        assert json.loads((out / "config.json").read_text()).get("voices") == want
    capsys.readouterr()
    assert main(["checkpoint", "export", str(run), "--out", str(tmp_path / "m9"), "--voices",
                 "9"]) == 2  # fmt: skip
    assert "--voices 9" in capsys.readouterr().err
