"""Style conditioning (``model.styles``): one vector per style added at every position; none for
models without styles, which build, save and compute as before."""

from __future__ import annotations

import pytest
import torch

from aurl.config import load_config
from aurl.errors import ConfigError
from aurl.models import build_model
from aurl.models.style import NO_STYLE, style_id

STYLES = "model.styles=[chorale,folk,palestrina]"


def _model(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(preset="tiny", overrides=["model.dropout=0", *overrides]))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(5, 300, (3, 24))  # (B, T)


def test_a_model_without_styles_has_no_style_parameters_and_ignores_a_style(ids):
    plain, styled = _model(), _model(STYLES)
    assert plain.style is None and not any("style" in k for k in plain.state_dict())
    assert set(styled.state_dict()) - set(plain.state_dict()) == {"style.table.weight"}
    plain.eval()
    with torch.no_grad():
        base = plain(ids).logits
        assert torch.equal(plain(ids, style=torch.tensor([0, 1, 2])).logits, base)


def test_style_changes_the_logits_and_no_style_is_the_plain_model(ids):
    model = _model(STYLES).eval()
    with torch.no_grad():
        none = model(ids).logits
        assert torch.equal(model(ids, style=torch.full((3,), NO_STYLE)).logits, none)
        styled = model(ids, style=torch.tensor([0, 1, 2])).logits
        assert (styled - none).abs().amax(dim=(1, 2)).min() > 1e-3  # every row moved
        # a row's logits depend on its own style only
        again = model(ids, style=torch.tensor([0, 2, 2])).logits
        assert torch.equal(again[0], styled[0]) and torch.equal(again[2], styled[2])
        assert not torch.equal(again[1], styled[1])


def test_decoding_step_by_step_carries_the_style(ids):
    model = _model(STYLES).eval()
    style = torch.tensor([2, 0, 1])
    with torch.no_grad():
        full = model(ids, style=style).logits
        state = model.init_state(3, style=style)
        steps = torch.cat([model.step(ids[:, t : t + 1], state) for t in range(ids.shape[1])], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_style_dropout_drops_whole_sequences_in_training_only(ids):
    model = _model(STYLES, "model.style_dropout=1.0")
    style = torch.tensor([0, 1, 2])
    model.train()
    with torch.no_grad():
        dropped = model(ids, style=style).logits
        model.eval()
        assert torch.equal(dropped, model(ids).logits)  # training with p=1: no style at all
        assert not torch.equal(dropped, model(ids, style=style).logits)


def test_style_names_and_errors():
    assert style_id(("chorale", "folk"), "folk") == 1 and style_id(("chorale",), "") == NO_STYLE
    with pytest.raises(ConfigError, match="this model knows chorale, folk"):
        style_id(("chorale", "folk"), "jazz")
    with pytest.raises(ConfigError, match="trained without styles"):
        style_id((), "folk")
    with pytest.raises(ConfigError, match="distinct"):
        load_config(preset="tiny", overrides=["model.styles=[folk,folk]"])
