"""A tiny model (tiny preset, dim 32, 2 layers, seeded) and its ONNX export, once per session."""

from __future__ import annotations

import pytest
import torch

from aurl.config import load_config
from aurl.models import build_model


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config(preset="tiny")).eval()


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tmp_path_factory):
    from aurl.models.onnx_export import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny-onnx"))
