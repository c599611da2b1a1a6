"""Tiny models (dim 32, 2 layers) for the model tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from aurl.config import ModelConfig, VocabConfig
from aurl.models import MusicTransformerVAEGAN


def tiny_config(**overrides) -> ModelConfig:
    base = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        dropout=0.0,
        max_seq_len=128,
        local_window=8,
        global_tokens=3,
        latent_dim=8,
        segment_len=16,
        encoder_layers=1,
        disc_d_model=16,
        disc_layers=1,
        disc_scales=(8, 16, 0),
    )
    return dataclasses.replace(base, **overrides)


def tiny_model(seed: int = 0, **overrides) -> MusicTransformerVAEGAN:
    torch.manual_seed(seed)
    return MusicTransformerVAEGAN(tiny_config(**overrides), VocabConfig())


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 774, (3, 40), generator=g)


@pytest.fixture
def make_model():
    """``make_model(seed=0, **ModelConfig overrides)`` -> a tiny model."""
    return tiny_model


@pytest.fixture(scope="session")
def chorale() -> torch.Tensor:
    """A real Bach chorale (tests/fixtures/midi/bach_bwv66.6.mid) as ids (1, 364)."""
    from aurl.data.tokenizer import Tokenizer

    path = Path(__file__).parents[1] / "fixtures" / "midi" / "bach_bwv66.6.mid"
    return torch.as_tensor(Tokenizer().encode_file(path))[None]
