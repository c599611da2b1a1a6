"""4-bit weights (`aurl export --int4`, onnxruntime's MatMulNBits; what `--engine onnx` takes by
default where the CPU has integer dot products, tests/engines/test_shipped_cache.py): every weight
MatMul quantized, under a quarter of the fp32 graph's size, and bits per note on the test split of the
bundled chorales within 0.02 of the fp32 graphs (the shipped model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from aurl.cli import main
from aurl.cli.generate import SHIPPED
from aurl.config import GenerationConfig
from aurl.data.split import split_of
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind
from aurl.engines.onnx_engine import OnnxEngine
from aurl.generation.generate import generate

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(), reason="no shipped model in src/aurl/pretrained"
)
CHORALES = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"
TOKENS = 256  # per piece: the test split's pieces cut to this many tokens (keeps the test fast)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The shipped model's fp32 export and its int4 quantization."""
    tmp = tmp_path_factory.mktemp("int4")
    assert main(["export", "--format", "onnx", "--out", str(tmp / "fp32")]) == 0
    assert main(["export", "--format", "onnx", "--int4", "--out", str(tmp / "int4")]) == 0
    return {"fp32": tmp / "fp32", "int4": tmp / "int4"}


def _bits_per_note(engine: OnnxEngine, pieces: list[np.ndarray]) -> float:
    """Grammar-masked bits per note (each distribution over the ids the grammar allows, as the
    sampler draws and the model card reports)."""
    import torch

    from aurl.data.grammar import Grammar

    grammar = Grammar(engine.vocab, 16)
    nll, notes = 0.0, 0
    for ids in pieces:
        logits = engine.step(ids[None], engine.init_state(1))[0].astype(np.float64)  # (T, V)
        allowed = grammar.sequence_masks(torch.from_numpy(ids[None]))[0].numpy()
        logits = np.where(allowed, logits, -np.inf)[:-1]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        notes += int((engine.vocab.kind[ids[1:]] == Kind.NOTE_ON).sum())
    return nll / np.log(2.0) / notes


def test_int4_weights_every_matmul_and_keep_the_likelihood(exports) -> None:
    graph = onnx.load(str(exports["int4"] / "decoder.onnx")).graph
    weights = {t.name for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    plain = [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]
    assert not plain and ops.count("MatMulNBits") == 19  # 4 blocks x 4, features x 2, the head
    fp32_size = (exports["fp32"] / "decoder.onnx").stat().st_size
    # 4-bit weights with a fp32 scale per 32, the embedding tables left in fp32: under a
    # quarter of the fp32 graph (int8: about a third)
    assert (exports["int4"] / "decoder.onnx").stat().st_size < 0.25 * fp32_size
    tok = Tokenizer()
    paths = [p for p in sorted(CHORALES.glob("*.mid")) if split_of(p.name) == "test"]
    pieces = [np.asarray(tok.encode_file(p), dtype=np.int64)[:TOKENS] for p in paths]
    fp32 = _bits_per_note(OnnxEngine(exports["fp32"]), pieces)
    int4 = _bits_per_note(OnnxEngine(exports["int4"]), pieces)
    print(f"bits/note on the test split ({TOKENS}-token cuts): fp32 {fp32:.4f} int4 {int4:.4f}")
    assert abs(int4 - fp32) < 0.02 and int4 != fp32


def test_an_int4_export_generates_valid_pieces(exports) -> None:
    """The engine reads an int4 folder as any export (the graph's inputs are the same)."""
    meta = json.loads((exports["int4"] / "config.json").read_text())
    assert (meta["weights"], meta["version"]) == ("int4", 3)
    engine = OnnxEngine(exports["int4"])
    assert engine.weights == "int4"
    piece = generate(engine, GenerationConfig(max_tokens=64, seed=0))[0]
    assert piece.ids[-1] == 1 and len(piece.generated) > 32  # END, after a real piece


def test_int8_and_int4_together_is_one_line(tmp_path, capsys) -> None:
    assert main(["export", "--format", "onnx", "--int8", "--int4", "--out", str(tmp_path)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "give one of --int8 and --int4" in lines[0]
