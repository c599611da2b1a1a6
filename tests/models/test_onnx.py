"""ONNX export of the shipped model: onnxruntime's log-probabilities against PyTorch's on real
pieces (fp32), int8 bits per note on the test split, and the shipped model's cached export used
by a process that never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.cli.generate import SHIPPED
from aurl.config import load_config
from aurl.data.split import split_of
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind
from aurl.engines.onnx_engine import OnnxEngine
from aurl.errors import CheckpointError
from aurl.models import MusicTransformerVAEGAN, build_model
from aurl.models.onnx_export import export_onnx

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(), reason="no shipped model in src/aurl/pretrained"
)
CHORALES = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"
TOKENS = 256  # per piece: the test split's pieces cut to this many tokens (keeps the test fast)


@pytest.fixture(scope="module")
def shipped():
    return MusicTransformerVAEGAN.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aurl-cache")


@pytest.fixture(scope="module")
def fp32_export(cache, monkeypatch_module) -> Path:
    """The shipped model's export, written where ``aurl generate --engine onnx`` looks."""
    from aurl.engines.shipped import ensure_shipped_onnx

    monkeypatch_module.setenv("AURL_CACHE", str(cache))
    return ensure_shipped_onnx(SHIPPED, log=lambda _: None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def test_pieces() -> list[np.ndarray]:
    tok = Tokenizer()
    paths = [p for p in sorted(CHORALES.glob("*.mid")) if split_of(p.name) == "test"]
    assert len(paths) >= 20
    return [np.asarray(tok.encode_file(p), dtype=np.int64)[:TOKENS] for p in paths]


def _onnx_log_probs(engine: OnnxEngine, ids: np.ndarray, split: int) -> np.ndarray:
    """(T, V) log-probs: a prefill of ``split`` tokens, then the step graph token by token."""
    state = engine.init_state(1)
    logits = [engine.step(ids[None, :split], state)[0]]
    logits += [engine.step(ids[None, j : j + 1], state)[0] for j in range(split, len(ids))]
    x = np.concatenate(logits).astype(np.float64)
    return (
        x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))[:, None]
    )


def test_fp32_log_probs_match_pytorch(shipped, fp32_export, test_pieces) -> None:
    engine = OnnxEngine(fp32_export)
    for ids in test_pieces[:3]:
        with torch.no_grad():
            ref = torch.log_softmax(shipped(torch.from_numpy(ids)[None]).logits[0].double(), -1)
        got = _onnx_log_probs(engine, ids, split=len(ids) - 32)
        assert np.abs(got - ref.numpy()).max() < 1e-4


def _bits_per_note(engine: OnnxEngine, pieces: list[np.ndarray]) -> float:
    nll, notes = 0.0, 0
    for ids in pieces:
        logits = engine.step(ids[None], engine.init_state(1))[0].astype(np.float64)  # (T, V)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        notes += int((engine.vocab.kind[ids[1:]] == Kind.NOTE_ON).sum())
    return nll / np.log(2.0) / notes


def test_int8_bits_per_note_close_to_fp32(shipped, fp32_export, test_pieces, tmp_path) -> None:
    int8 = export_onnx(shipped, tmp_path / "int8", int8=True)
    # int8 MatMul weights, fp32 embedding tables (a Gather of a dequantized table would
    # dequantize all of it every step): about a third of the fp32 size
    assert sum(p.stat().st_size for p in int8.glob("*.onnx")) < 0.36 * sum(
        p.stat().st_size for p in fp32_export.glob("*.onnx")
    )
    fp32_bits = _bits_per_note(OnnxEngine(fp32_export), test_pieces)
    int8_bits = _bits_per_note(OnnxEngine(int8), test_pieces)
    print(f"bits/note on the test split: fp32 {fp32_bits:.4f} int8 {int8_bits:.4f}")
    assert abs(int8_bits - fp32_bits) < 0.02
    assert int8_bits != fp32_bits  # the int8 graphs did change the weights


def test_shipped_export_is_reused_without_torch(fp32_export, cache, tmp_path) -> None:
    """The second and later runs of `aurl generate --engine onnx` (no --checkpoint) find the
    cached export and never import torch (--fp32: the fp32 export this module wrote; the CPU
    may pick int8 by default)."""
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"assert main(['generate', '--engine', 'onnx', '--fp32', '--out', {str(tmp_path)!r}, "
        "'--max-tokens', '48']) == 0\nprint('torch' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "AURL_CACHE": str(cache),
        "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
    }
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
    assert "wrote the ONNX export" not in r.stdout
    assert (tmp_path / "sample_seed0_000.mid").is_file()


@pytest.mark.parametrize(
    "override, setting", [("model.mode=vae", "mode"), ("model.attention=local", "attention")]
)
def test_unexportable_models_name_the_setting(override, setting, tmp_path) -> None:
    model = build_model(load_config(preset="tiny", overrides=[override]))
    with pytest.raises(CheckpointError, match=f"supports model.{setting}"):
        export_onnx(model, tmp_path)
