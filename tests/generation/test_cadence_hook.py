"""The ending search takes the progress hook the plain decode takes (session 8): every token of
every redrawn ending and every candidate's analysis pass through it, so a hook that raises (the
server's request time limit, a client gone) stops the search there."""

from __future__ import annotations

import dataclasses

import pytest

from aurl.config import GenerationConfig
from aurl.generation.cadence import CADENCE_MODES, generate_with_cadence


@pytest.fixture(scope="module")
def tiny():
    import torch

    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN

    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    return MusicTransformerVAEGAN(config, VocabConfig()).eval()


class Stop(Exception):
    pass


def counting(seen: dict[str, int], stop_at: str | None = None):
    """A progress hook that counts its items per ``desc`` and raises at the first of
    ``stop_at``'s."""

    def hook(items, *, total=None, desc=""):
        for item in items:
            if desc == stop_at:
                raise Stop(desc)
            seen[desc] = seen.get(desc, 0) + 1
            yield item

    return hook


def embed_rows(model) -> list[int]:
    """The batch size of every decoding call of ``model`` (its token embedding's inputs)."""
    rows: list[int] = []
    model.embed.register_forward_hook(lambda m, args, out: rows.append(int(args[0].shape[0])))
    return rows


def test_every_redrawn_token_passes_the_hook_and_a_raise_stops_the_search(tiny):
    config = GenerationConfig(seconds=6, max_tokens=4096, seed=1)
    options = CADENCE_MODES["ending"]  # one row, then rounds of 7 redrawn endings
    k = options.endings - 1
    rows = embed_rows(tiny)
    seen: dict[str, int] = {}
    generate_with_cadence(tiny, config, options=options, progress=counting(seen))
    redrawn = rows.count(k)  # decoding calls of the endings' batches
    assert redrawn > 0, "the piece closed at once: nothing was redrawn"
    rounds = seen.get("endings", 0) // k
    # one hook item per decoding step of the endings (each round's prefill is one call more)
    # and one per candidate analysed
    assert seen.get("ending", 0) == redrawn - rounds > 0
    assert seen["endings"] == rounds * k

    rows.clear()  # stopped at the first redrawn token: the first round's prefill alone ran
    with pytest.raises(Stop, match="ending"):
        generate_with_cadence(tiny, config, options=options, progress=counting({}, "ending"))
    assert rows.count(k) == 1
    rows.clear()  # stopped at the first analysis: the first round decoded, no other
    with pytest.raises(Stop, match="endings"):
        generate_with_cadence(tiny, config, options=options, progress=counting({}, "endings"))
    assert 1 < rows.count(k) <= redrawn
