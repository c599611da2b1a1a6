"""Training with anticipated windows (``data.anticipation_rate``): a tiny run learns, its
checkpoint rebuilds with the control rows and knows how far ahead they come, and the option is
refused without them."""

from __future__ import annotations

import pytest

from aurl.errors import ConfigError
from aurl.models.model import MusicTransformerVAEGAN
from aurl.training.trainer import train

from .test_trainer import records


def test_tiny_anticipation_run_learns_and_keeps_its_controls(chorale_cache, tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(chorale_cache, "model.anticipation=2", "data.anticipation_rate=0.5",
                      "training.max_steps=40", "training.lr=3e-3", "training.eval_every=40",
                      "training.save_every=40")  # fmt: skip
    train(cfg, run, echo=lambda line: None)
    recs = records(run, "train")
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert first > 5.5 and last < first - 2.0, (first, last)
    model = MusicTransformerVAEGAN.from_pretrained(run / "model")
    assert model.controls is not None and model.config.anticipation == 2


def test_anticipation_rate_without_controls_is_refused(fixture_cache, tmp_path, tiny_config):
    cfg = tiny_config(fixture_cache, "data.anticipation_rate=0.5", "training.max_steps=1")
    with pytest.raises(ConfigError, match="model.anticipation"):
        train(cfg, tmp_path / "run", echo=lambda line: None)
    assert not (tmp_path / "run" / "model").exists()
