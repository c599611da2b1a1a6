"""Token caches for the training tests, prepared once per session from real MIDI files."""

from __future__ import annotations

from pathlib import Path

import pytest

from aurl.config import Config, load_config
from aurl.data.cache import prepare

FIXTURE_MIDI = Path(__file__).parents[1] / "fixtures" / "midi"
CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"

# a tiny, fast, dropout-free run: window 64, batch 4, no augmentation, no sampling
TINY = [
    "data.window=64", "data.batch_size=4", "model.dropout=0", "training.warmup_steps=2",
    "training.log_every=1", "training.eval_batches=1", "training.sample_every=0",
    "data.augment.transpose_prob=0", "data.augment.velocity_prob=0",
]  # fmt: skip


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory) -> Path:
    """The 6 checked-in fixture files (4 train, 2 valid)."""
    out = tmp_path_factory.mktemp("cache") / "fixtures"
    prepare(FIXTURE_MIDI, out, workers=1)
    return out


@pytest.fixture(scope="session")
def chorale_cache(tmp_path_factory) -> Path:
    """The bundled Bach chorales (350 files, ~180k train tokens)."""
    out = tmp_path_factory.mktemp("cache") / "chorales"
    prepare(CHORALES, out, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(cache, *overrides) -> Config``: the tiny preset made fast for tests."""

    def make(cache: Path | str, *overrides: str) -> Config:
        return load_config(preset="tiny", overrides=[*TINY, f"data.cache={cache}", *overrides])

    return make


def train_single_threaded(config: Config, out: Path):
    """``train(config, out)`` on one torch thread, as each DDP worker runs: the same float
    summation order in the kernels, so a gloo run can be compared with it step by step."""
    import torch

    from aurl.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, out, echo=lambda line: None)
    finally:
        torch.set_num_threads(threads)
