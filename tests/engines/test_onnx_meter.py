"""Meter conditioning on the onnx engine: the numpy features count the bars in the piece's time
signature and the graphs embed its bar length, so log-probabilities and greedy pieces equal
PyTorch's in 3/4 and in the default 4/4; exports of meter-less models keep their inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aurl.config import GenerationConfig, load_config
from aurl.data.tokenizer import Tokenizer
from aurl.engines.onnx_engine import OnnxEngine
from aurl.generation.generate import generate, make_masker
from aurl.models import build_model
from aurl.models.onnx_export import export_onnx

PIECES = ("bach_bwv66.6.mid", "haydn_op74no1_mvt2.mid")
TOKENS = 200  # per piece (keeps the test fast; dozens of bars)


@pytest.fixture(scope="module")
def meter_model():
    """The tiny preset (meter conditioning on), with the beat and bar-length embeddings large
    enough that counting in the wrong meter moves the log-probs far beyond the tolerance."""
    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny")).eval()
    assert model.config.meter and model.time.meter is not None
    with torch.no_grad():
        model.time.meter.weight.normal_(0.0, 1.0)
        model.time.beat.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def meter_export(meter_model, tmp_path_factory):
    return export_onnx(meter_model, tmp_path_factory.mktemp("meter-onnx"))


@pytest.fixture(scope="module")
def pieces(fixtures_dir) -> list[np.ndarray]:
    tok = Tokenizer()
    return [
        np.asarray(tok.encode_file(fixtures_dir / "midi" / name), dtype=np.int64)[:TOKENS]
        for name in PIECES
    ]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _onnx_log_probs(engine: OnnxEngine, ids: np.ndarray, meter) -> np.ndarray:
    """(T, V): a prefill of all but the last 40 tokens, then the step graph token by token."""
    state = engine.init_state(1, meter=None if meter is None else np.asarray([meter]))
    split = len(ids) - 40
    logits = [engine.step(ids[None, :split], state)[0]]
    logits += [engine.step(ids[None, j : j + 1], state)[0] for j in range(split, len(ids))]
    return _log_softmax(np.concatenate(logits))


def _torch_log_probs(model, ids: np.ndarray, meter) -> np.ndarray:
    m = None if meter is None else torch.tensor([meter])
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None], meter=m).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()


def test_export_takes_the_bar_length(meter_export) -> None:
    meta = json.loads((meter_export / "config.json").read_text())
    assert meta["inputs"] == ["ids", "phase", "beat", "tempo", "bar_beats", "sounding", "age",
                              "family"]  # fmt: skip
    assert meta["model"]["meter"] is True


@pytest.mark.parametrize("meter", [(3, 4), None], ids=["3/4", "default-4/4"])
def test_fp32_log_probs_match_pytorch(meter_model, meter_export, pieces, meter) -> None:
    """fp32 log-probs within 1e-4 of PyTorch's on real pieces, counted in 3/4 and in the
    default 4/4 (through the prefill and the step graph)."""
    engine = OnnxEngine(meter_export)
    for ids in pieces:
        want = _torch_log_probs(meter_model, ids, meter)
        got = _onnx_log_probs(engine, ids, meter)
        assert np.abs(got - want).max() < 1e-4
        other = _torch_log_probs(meter_model, ids, (4, 4) if meter else (3, 4))
        assert np.abs(other - want).max() > 0.1  # the meter matters far beyond the tolerance


def test_an_explicit_4_4_is_the_default(meter_export, pieces) -> None:
    engine = OnnxEngine(meter_export)
    ids = pieces[0]
    np.testing.assert_array_equal(
        _onnx_log_probs(engine, ids, (4, 4)), _onnx_log_probs(engine, ids, None)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"key": "D minor", "key_strictness": 1.0},
        {"window": 24, "window_overlap": 8, "seconds": 6.0, "max_tokens": 1000},  # slides
    ],
)
def test_greedy_pieces_in_3_4_equal_the_torch_engine(meter_model, meter_export, overrides) -> None:
    """`generation.meter: 3/4` greedy gives the same ids on both engines (also across the
    sliding window, whose restarted state must keep the meter), and other ids than 4/4."""
    base = {"temperature": 0.0, "max_tokens": 96, "seed": 0, **overrides}
    three, four = GenerationConfig(**base, meter="3/4"), GenerationConfig(**base)
    engine = OnnxEngine(meter_export)
    masker = make_masker(engine.vocab, three, None)
    want = generate(meter_model, three, num_samples=2)
    got = generate(engine, three, num_samples=2, masker=masker)
    for a, b in zip(want, got):
        assert np.array_equal(a.ids, b.ids)
    in_four = generate(engine, four, num_samples=2, masker=make_masker(engine.vocab, four, None))
    assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(got, in_four))


def test_meterless_exports_keep_their_inputs(pieces, tmp_path) -> None:
    """A model without meter conditioning exports the inputs it always had (no bar_beats) and
    its engine counts in 4/4 whatever meter it is given, as the model does."""
    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny", overrides=["model.meter=false"])).eval()
    folder = export_onnx(model, tmp_path / "plain")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["inputs"] == ["ids", "phase", "beat", "tempo", "sounding", "age", "family"]
    engine = OnnxEngine(folder)
    ids = pieces[0]
    got = _onnx_log_probs(engine, ids, (3, 4))
    assert np.abs(got - _torch_log_probs(model, ids, None)).max() < 1e-4
