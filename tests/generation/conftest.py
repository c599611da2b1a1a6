"""Fixtures shared by the generation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory) -> dict:
    """A tiny random model (the `tiny` preset, seed 0) behind both engines: ``torch`` and
    ``onnx`` (its export), plus ``model`` and the export's ``folder``."""
    pytest.importorskip("onnxruntime")
    import torch

    from aurl.config import load_config
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.engines.torch_engine import TorchEngine
    from aurl.models import build_model
    from aurl.models.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny")).eval()
    folder = export_onnx(model, tmp_path_factory.mktemp("tiny-onnx"))
    return {"torch": TorchEngine(model), "onnx": OnnxEngine(folder), "model": model,
            "folder": folder}  # fmt: skip
