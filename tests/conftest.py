"""Shared fixtures. Data fixtures live in tests/fixtures/ and are found relative to this file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: N workers share the cores
    _per_worker = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _per_worker)))  # before torch loads


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def assert_playable_notes(notes, *, polyphony_cap: int, ids=None) -> None:
    """Check generated notes by their times alone, without the grammar or the tokenizer's rules:
    every note has a positive length, no two notes of one pitch overlap within an instrument
    family, at most ``polyphony_cap`` notes sound at once (all families together). Given the
    ``ids`` they were decoded from: END closed every note (each NOTE_ON became a note that ends
    by END's time, or one step after it for a note struck at END's step)."""
    import numpy as np

    assert len(notes) > 0
    onset, end = notes["onset"], notes["onset"] + notes["duration"]
    assert (notes["duration"] > 0).all() and (notes["duration_s"] > 0).all()
    family = np.where(notes["program"] == 128, 16, notes["program"] // 8)  # GM family; drums
    key = family.astype(np.int64) * 128 + notes["pitch"]
    order = np.lexsort((onset, key))
    same = key[order][1:] == key[order][:-1]
    assert (onset[order][1:][same] >= end[order][:-1][same]).all(), "same-pitch notes overlap"
    times = np.concatenate([onset, end])
    delta = np.concatenate([np.ones(len(notes)), -np.ones(len(notes))])
    sweep = np.lexsort((delta, times))  # at one time, notes end before others start
    assert np.cumsum(delta[sweep]).max() <= polyphony_cap, "polyphony above the cap"
    if ids is not None:
        from aurl.data.vocab import END, Kind, Vocab

        vocab, ids = Vocab(), np.asarray(ids)  # the default vocabulary: time in beats
        assert ids[-1] == END
        assert int((vocab.kind[ids] == Kind.NOTE_ON).sum()) == len(notes), "a note was lost"
        shifts = vocab.value[ids[vocab.kind[ids] == Kind.TIME_SHIFT]]
        step = 1 / vocab.config.steps_per_beat
        end_beat = shifts.sum() * step  # END's time, in beats
        # END closes every note; one struck at END's own step keeps the minimum length, a step
        late = end > end_beat + 1e-9
        assert np.allclose(onset[late], end_beat) and np.allclose(end[late], end_beat + step), (
            "a note sounds past END"
        )


@pytest.fixture(scope="session")
def playable():
    """:func:`assert_playable_notes`, for tests in any folder."""
    return assert_playable_notes


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random model (the ``tiny`` preset, seed 0, eval mode), built once per session for
    every folder's tests: do not train or modify it in place."""
    import torch

    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(0)
    return build_model(load_config(preset="tiny")).eval()


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tmp_path_factory) -> Path:
    """:func:`tiny_model`'s ONNX export folder, written once per session."""
    from aurl.models.onnx_export import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny-onnx"))


@pytest.fixture(scope="session")
def tiny_engines(tiny_model, tiny_export) -> dict:
    """:func:`tiny_model` behind both engines: ``torch`` and ``onnx`` (its export), plus
    ``model`` and the export's ``folder``."""
    pytest.importorskip("onnxruntime")
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.engines.torch_engine import TorchEngine

    return {"torch": TorchEngine(tiny_model), "onnx": OnnxEngine(tiny_export),
            "model": tiny_model, "folder": tiny_export}  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def _aurl_cache(tmp_path_factory):
    """ONNX exports cached by ``aurl generate`` go to a temporary folder, never the home."""

    old = os.environ.get("AURL_CACHE")
    os.environ["AURL_CACHE"] = str(tmp_path_factory.mktemp("aurl-cache"))
    yield
    if old is None:
        os.environ.pop("AURL_CACHE", None)
    else:
        os.environ["AURL_CACHE"] = old


def assert_same_midi(ours: bytes, reference: bytes) -> None:
    """Two MIDI files hold the same music as symusic reads them back: resolution, tempo map,
    time and key signatures, and per track name, program, drum flag, every note (time,
    duration, pitch, velocity) and every control change; and each track's channel messages
    stay on one channel, the same in both (read with mido)."""
    import io

    import mido
    import numpy as np
    import symusic

    a, b = symusic.Score.from_midi(ours), symusic.Score.from_midi(reference)
    assert a.tpq == b.tpq
    for events in ("tempos", "time_signatures", "key_signatures"):
        x, y = getattr(a, events).numpy(), getattr(b, events).numpy()
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), f"{events}.{k}"
    assert len(a.tracks) == len(b.tracks)
    for s, t in zip(a.tracks, b.tracks):
        assert (s.name, s.program, s.is_drum) == (t.name, t.program, t.is_drum)
        for part in ("notes", "controls"):
            x, y = getattr(s, part).numpy(), getattr(t, part).numpy()
            for k in x:
                assert np.array_equal(x[k], y[k]), f"track {s.name!r} {part}.{k}"

    def channels(data: bytes) -> list[set[int]]:
        tracks = mido.MidiFile(file=io.BytesIO(data)).tracks
        chans = [{m.channel for m in t if hasattr(m, "channel")} for t in tracks]
        return [c for c in chans if c]  # a conductor track has none

    assert channels(ours) == channels(reference)
    assert all(len(c) == 1 for c in channels(ours))


@pytest.fixture(scope="session")
def same_midi():
    """:func:`assert_same_midi`, for tests in any folder."""
    return assert_same_midi


@pytest.fixture(scope="session")
def style_pieces():
    """``(vocab_config) -> [(style, file, ids, meter)]``: the 15 held-out pieces of
    tests/fixtures/styles/ (3 per style of the shipped style models), by style then name."""

    def pieces(vocab_config) -> list:
        import numpy as np

        from aurl.data.meter import read_meter
        from aurl.data.tokenizer import Tokenizer

        tok = Tokenizer(vocab_config)
        return [(f.parent.name, f, np.asarray(tok.encode_file(f), dtype=np.int64), read_meter(f))
                for f in sorted((FIXTURES / "styles").glob("*/*.mid"))]  # fmt: skip

    return pieces
