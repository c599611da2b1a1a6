"""``aurl generate --meter``: the time signature reaches a meter-conditioned model's bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurl.cli import main
from aurl.config import GenerationConfig, load_config
from aurl.data.meter import parse_meter
from aurl.data.tokenizer import Tokenizer
from aurl.engines import as_engine
from aurl.errors import ConfigError
from aurl.generation.generate import generate, meter_tensor
from aurl.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = load_config(preset="tiny")
    assert config.model.meter  # the presets train with meter conditioning
    model = build_model(config).eval()
    with torch.no_grad():  # an untrained model's small embeddings would hardly move a sample
        model.time.meter.weight.normal_(0.0, 1.0)
        model.time.beat.weight.normal_(0.0, 1.0)
    return model


def test_parse_meter_and_its_errors() -> None:
    assert parse_meter("3/4") == (3, 4) and parse_meter("12/8") == (12, 8)
    for bad in ("3-4", "3/5", "0/4", "x"):
        with pytest.raises(ConfigError, match="--meter"):
            parse_meter(bad)


def test_generation_counts_bars_in_the_given_meter(model) -> None:
    three = GenerationConfig(meter="3/4", max_tokens=40, seed=1)
    assert meter_tensor(as_engine(model), three, 2).tolist() == [[3, 4], [3, 4]]
    assert meter_tensor(as_engine(model), GenerationConfig(), 2) is None  # 4/4
    old = build_model(load_config(preset="tiny", overrides=["model.meter=false"]))
    assert meter_tensor(as_engine(old), three, 2) is None  # a model without meter: unchanged
    # the decode state counts the beats of 3/4
    state = model.init_state(1, meter=torch.tensor([[3, 4]]))
    ids = torch.from_numpy(np.asarray(generate(model, three)[0].ids, np.int64))[None]
    model.step(ids, state)
    ticks = int(state.ticks[0])
    _, beat, _, cum = model.time.positions(ids, meter=torch.tensor([[3, 4]]))
    assert int(cum[0, -1]) == ticks and int(beat[0, -1]) == (ticks // 32) % 3


def test_cli_meter_changes_what_is_generated(model, tmp_path, capsys) -> None:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok = Tokenizer()
    pieces = {}
    for meter in ("3/4", "4/4"):
        out = tmp_path / meter.replace("/", "-")
        args = ["generate", "--checkpoint", str(folder), "--max-tokens", "200", "--seed", "2"]
        assert main([*args, "--meter", meter, "--out", str(out)]) == 0, capsys.readouterr().err
        (mid,) = out.glob("*.mid")
        pieces[meter] = tok.encode_file(mid)
        assert "meter: 3/4" in next(out.glob("*.yaml")).read_text() or meter != "3/4"
    assert not np.array_equal(pieces["3/4"], pieces["4/4"])
    assert main(["generate", "--checkpoint", str(folder), "--meter", "3-4", "--out",
                 str(tmp_path / "bad")]) != 0  # fmt: skip
    assert "--meter '3-4'" in capsys.readouterr().err
