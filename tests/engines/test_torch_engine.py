"""The torch engine's own refusals (``aurl generate --engine torch``)."""

from __future__ import annotations

import dataclasses

from aurl.cli import main


def test_int8_of_a_width_the_kernel_cannot_take_is_one_line(tmp_path, capsys) -> None:
    """`--engine torch --int8` on a model of d_model 40: the int8 kernel takes inputs in blocks
    of 32, and quantizing stopped with a ValueError traceback; now one line naming
    model.d_model and what to use instead."""
    import torch

    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN

    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig(), d_model=40, n_layers=1, n_heads=1, dropout=0.0)
    folder = MusicTransformerVAEGAN(config, VocabConfig()).eval().save_pretrained(tmp_path / "m")
    args = ["generate", "--engine", "torch", "--int8", "--checkpoint", str(folder)]
    assert main([*args, "--max-tokens", "16", "--out", str(tmp_path / "pieces")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "need model.d_model a multiple of 32" in lines[0]
    assert "this model's is 40" in lines[0]
