"""`aurl export --format onnx`: a top-level command that writes the graph and its config into
--out (a model folder, or the shipped model by default), which `aurl generate --engine onnx`
then reads."""

from __future__ import annotations

import json

import onnxruntime as ort

from aurl.cli import main
from aurl.cli.generate import SHIPPED


def test_export_writes_what_generate_reads(tiny_model, tmp_path, capsys) -> None:
    folder = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "export"
    args = ["export", "--format", "onnx", "--checkpoint", str(folder), "--int8", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder.onnx"]
    meta = json.loads((out / "config.json").read_text())
    assert (meta["format"], meta["version"], meta["weights"]) == ("aurl-onnx", 3, "int8")
    assert meta["opset"] == 17 and meta["vocab_size"] == 774
    assert meta["source"] == {"model": str(folder)}
    session = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    shapes = {x.name: x.shape for x in session.get_inputs()}
    assert shapes["ids"] == ["batch", "tokens"]  # dynamic batch and length
    assert shapes["past_key.0"] == ["batch", 2, "capacity", 16]  # tiny: 2 heads of 16
    capsys.readouterr()
    assert main(args) != 0  # an existing export is kept without --force
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already holds an export: pass --force" in lines[0]
    pieces = tmp_path / "pieces"
    assert main(["generate", "--engine", "onnx", "--checkpoint", str(out), "--out", str(pieces),
                 "--max-tokens", "48"]) == 0  # fmt: skip
    assert (pieces / "sample_seed0_000.mid").is_file()


def test_export_without_a_model_exports_the_shipped_one(tmp_path) -> None:
    out = tmp_path / "shipped"
    assert main(["export", "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    shipped = json.loads((SHIPPED / "config.json").read_text())
    assert meta["source"] == {"model": str(SHIPPED)} and meta["weights"] == "fp32"
    assert meta["model"]["d_model"] == shipped["model"]["d_model"]
    assert meta["n_layers"] == shipped["model"]["n_layers"]


def test_heads_onnxruntime_cannot_run_are_one_line(tmp_path, capsys) -> None:
    """onnxruntime's GroupQueryAttention runs heads whose width is a multiple of 8: a model of
    4-wide heads was exported without a word and every generation from the export then failed
    inside onnxruntime (a traceback). The export refuses it in one line; an export made before
    (its config.json saying so) is refused when the engine loads it."""
    import pytest
    import torch

    from aurl.config import load_config
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.errors import CheckpointError
    from aurl.models import build_model

    torch.manual_seed(0)
    cfg = load_config(preset="tiny", overrides=["model.d_model=8", "model.n_heads=2"])
    folder = build_model(cfg).eval().save_pretrained(tmp_path / "model")
    out = tmp_path / "export"
    assert main(["export", "--format", "onnx", "--checkpoint", str(folder), "--out", str(out)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "multiple of 8 (onnxruntime's GroupQueryAttention)" in lines[0]
    assert not out.exists()
    out.mkdir()
    meta = json.loads((folder / "config.json").read_text())
    meta.update(format="aurl-onnx", version=3, vocab_size=774, n_layers=2, n_heads=2, head_dim=4,
                inputs=["ids"], graphs={"decoder": "decoder.onnx"})  # fmt: skip
    (out / "config.json").write_text(json.dumps(meta))
    (out / "decoder.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="heads 4 wide, which onnxruntime's"):
        OnnxEngine(out)
