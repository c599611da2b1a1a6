"""Style transfer by constrained decoding (aurl.generation.transfer) with the shipped ``styles``
VAE on held-out fixture pieces: the output starts its notes when the source does, its top line
moves as the source's does, and ``aurl generate --variations --style`` writes a valid MIDI file
or fails with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import aurl
from aurl.analysis.melody import parsons_code, skyline
from aurl.cli import main
from aurl.config import GenerationConfig, load_config
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.generation.generate import generate
from aurl.generation.transfer import source_plan, transfer_masker
from aurl.models import build_model
from aurl.models.vae import Latents

MODEL = Path(aurl.__file__).parent / "pretrained" / "styles-vae"
PIECES = Path(__file__).parents[1] / "fixtures" / "styles"
FOLK = PIECES / "folk" / "airdsAirs_book2_0122.mid"  # 6/8, dotted rhythms, one line
CHORALE = PIECES / "chorale" / "bach_bwv291.mid"  # four voices: covered inner notes
LENGTH = 256  # the source opening (the model's training window)


@pytest.fixture(scope="module")
def model():
    from aurl.models import MusicTransformerVAEGAN

    torch.set_num_threads(1)
    return MusicTransformerVAEGAN.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def tok(model) -> Tokenizer:
    return Tokenizer(model.vocab_config)


def opening(tok: Tokenizer, path: Path) -> np.ndarray:
    return np.asarray(tok.encode_file(path), dtype=np.int64)[:LENGTH]


def transfer(model, tok, source: np.ndarray, style: str, keep: str, rows: int = 2):
    """``rows`` decodings of ``source``'s posterior mean in ``style`` keeping ``keep``; the
    pieces and the masker (for its lapses)."""
    from aurl.evaluation.latent import encode_mean

    z = encode_mean(model, source)
    latents = Latents([level.expand(rows, *level.shape[1:]) for level in z.levels])
    config = GenerationConfig(max_tokens=2 * LENGTH, seed=0, style=style, window=512)
    masker = transfer_masker(model, config, [source] * rows, tok, keep)
    return generate(model, config, num_samples=rows, latents=latents, masker=masker), masker


def onsets(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """Distinct note onsets in beats, from the decoded notes (not from the constraint's own
    bookkeeping)."""
    return np.unique(tok.decode_to_notes(ids)["onset"])


def contour(tok: Tokenizer, ids: np.ndarray) -> str:
    return parsons_code(skyline(tok.decode_to_notes(ids)))


def assert_prefix(got: np.ndarray | str, want: np.ndarray | str, least: float = 0.75) -> None:
    """``got`` is ``want`` or, where the output ran out of tokens first, most of its start."""
    assert len(got) >= least * len(want)
    if isinstance(got, str):
        assert got == want[: len(got)]
    else:
        np.testing.assert_array_equal(got, want[: len(got)])


@pytest.mark.parametrize("path, target", [(FOLK, "palestrina"), (CHORALE, "folk")])
def test_rhythm_keeps_the_source_onsets_and_picks_new_pitches(model, tok, path, target) -> None:
    source = opening(tok, path)
    pieces, masker = transfer(model, tok, source, target, "rhythm")
    grammar = Grammar(tok.vocab)
    src_notes = tok.decode_to_notes(source)
    for piece in pieces:
        assert grammar.count_violations(torch.as_tensor(piece.ids)[None]) == 0
        assert_prefix(onsets(tok, piece.ids), onsets(tok, source))
        notes = tok.decode_to_notes(piece.ids)
        assert len(notes) != len(src_notes) or (notes["pitch"] != src_notes["pitch"]).any()
    assert masker.lapses == 0


@pytest.mark.parametrize("path, target", [(FOLK, "chorale"), (CHORALE, "folk")])
def test_both_keeps_onsets_and_the_skylines_contour(model, tok, path, target) -> None:
    source = opening(tok, path)
    pieces, masker = transfer(model, tok, source, target, "both")
    for piece in pieces:
        assert_prefix(onsets(tok, piece.ids), onsets(tok, source))
        assert_prefix(contour(tok, piece.ids), contour(tok, source))
    assert masker.lapses == 0


def test_contour_alone_follows_the_source_step_by_step(model, tok) -> None:
    """Timing free: the output's skyline goes up, down or repeats as the source's does, for
    as many notes as both have."""
    source = opening(tok, CHORALE)
    pieces, _ = transfer(model, tok, source, "folk", "contour")
    want = contour(tok, source)
    for piece in pieces:
        got = contour(tok, piece.ids)
        m = min(len(got), len(want))
        assert m > 10 and got[:m] == want[:m]


def test_plan_of_a_source_with_an_opening_rest(tok) -> None:
    """Onsets are the grammar's times since START, an opening rest included."""
    v = tok.vocab
    ids = np.array([0, v.tempo + 10, int(v.shift_id(16)), v.instrument, v.velocity + 20,
                    int(v.note_on_id(60)), int(v.shift_id(8)), int(v.note_off_id(60)),
                    int(v.note_on_id(64)), int(v.shift_id(8)), int(v.note_off_id(64)), 1])  # fmt: skip
    plan = source_plan(ids, tok)
    np.testing.assert_array_equal(plan.onsets, [16, 24])
    assert plan.end == 32 and plan.tempo_bin == 10
    np.testing.assert_array_equal(np.flatnonzero(plan.events), [0, 16, 24, 32])  # TEMPO at 0
    np.testing.assert_array_equal(plan.directions, [1])


def test_cli_style_transfer_writes_a_valid_midi(tok, tmp_path, capsys) -> None:
    out = tmp_path / "pieces"
    code = main(["generate", "--model", "styles-vae", "--variations", str(FOLK), "--style",
                 "chorale", "--max-tokens", "300", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = tok.encode_file(out / "sample_seed0_000.mid")
    assert Grammar(tok.vocab).count_violations(torch.as_tensor(written)[None]) == 0
    got, want = onsets(tok, written), onsets(tok, tok.encode_file(FOLK))
    assert len(got) > 20  # the default keeps the rhythm: the source's onsets, as far as it goes
    np.testing.assert_array_equal(got, want[: len(got)])


@pytest.fixture(scope="module")
def plain_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    build_model(load_config(preset="tiny", overrides=["model.mode=vae"])).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "model_args, extra, message",
    [
        (["--model", "styles-vae"], ["--style", "jazz"], "this model knows chorale, classical"),
        (["--model", "chorales"], ["--style", "folk"], "need a VAE model"),  # a transformer
        (["--checkpoint", "VAE"], ["--style", "folk"], "trained without styles"),
    ],
)
def test_transfer_errors_are_one_line(plain_vae, tmp_path, capsys, model_args, extra,
                                      message) -> None:  # fmt: skip
    out = tmp_path / "out"
    model_args = [str(plain_vae) if a == "VAE" else a for a in model_args]
    code = main(["generate", *model_args, "--variations", str(FOLK), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_keep_without_variations_is_refused(tmp_path, capsys) -> None:
    code = main(["generate", "--keep", "rhythm", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --keep rhythm needs --variations FILE (the piece to keep)\n"


FIXTURE_FILES = sorted((Path(__file__).parents[1] / "fixtures").glob("*/*.mid"))


@pytest.mark.parametrize("path", [*FIXTURE_FILES, FOLK], ids=lambda p: p.name)
def test_read_source_gives_what_the_three_reads_gave(tok, path) -> None:
    """One read of the --variations file gives the ids ``encode_file`` gives and the meter
    ``read_meter`` gives, SMPTE and damaged fixtures included (they take the fallback)."""
    from aurl.data.meter import read_meter
    from aurl.errors import MidiReadError
    from aurl.generation.transfer import read_source

    try:
        want = tok.encode_file(path)
    except MidiReadError:
        with pytest.raises(MidiReadError):
            read_source(path, tok)
        return
    got = read_source(path, tok)
    np.testing.assert_array_equal(got.ids, want)
    assert got.meter == read_meter(path)


def test_variations_read_the_file_once(tmp_path, capsys, monkeypatch) -> None:
    """`aurl generate --variations FILE --style NAME` on the shipped styles VAE (a meter model
    keeping the rhythm): the file's bytes are loaded once, for the latents, the kept rhythm and
    the meter together."""
    from aurl.data import midi_io

    loads: list[Path] = []
    real = midi_io._load_bytes

    def counted(path, cfg):
        loads.append(Path(path))
        return real(path, cfg)

    monkeypatch.setattr(midi_io, "_load_bytes", counted)
    code = main(["generate", "--model", "styles-vae", "--variations", str(FOLK), "--style", "folk",
                 "--max-tokens", "48", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert loads.count(FOLK) == 1, loads
