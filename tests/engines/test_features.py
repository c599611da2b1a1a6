"""The numpy feature inputs of the onnx engine equal what the torch model computes itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurl.config import ModelConfig, VocabConfig
from aurl.data.tokenizer import Tokenizer
from aurl.engines import features as F
from aurl.models import MusicTransformerVAEGAN
from aurl.models import model as M


def test_constants_match_the_model() -> None:
    assert (F.PHASE_BINS, F.BEATS_PER_BAR) == (M.PHASE_BINS, M.BEATS_PER_BAR)


@pytest.mark.parametrize("time_unit", ["beat", "seconds"])
def test_features_equal_the_models_own(time_unit, fixtures_dir) -> None:
    """On real pieces, fed in two calls (a prefix, then token by token, as generation does),
    the indices and vectors equal MusicalTime.positions and GrammarFeatures.features over the
    whole sequence."""
    vcfg = VocabConfig(time_unit=time_unit)
    model = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=1, n_heads=2), vcfg)
    tok = Tokenizer(vcfg)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:3]
    assert files
    feats = F.Features(model.vocab, musical_time=True, grammar_features=True)
    for path in files:
        ids = np.asarray(tok.encode_file(path), dtype=np.int64)[None, :300]  # (1, T)
        state = feats.initial(1)
        parts, state = feats(ids[:, :100], state)
        got = {k: [v] for k, v in parts.items()}
        for j in range(100, ids.shape[1]):
            parts, state = feats(ids[:, j : j + 1], state)
            for k, v in parts.items():
                got[k].append(v)
        got = {k: np.concatenate(v, axis=1) for k, v in got.items()}
        t = torch.from_numpy(ids)
        phase, beat, tempo, _ = model.time.positions(t)
        snd, age, family, _ = model.grammar_features.features(t)
        assert np.array_equal(got["phase"], phase.numpy())
        assert np.array_equal(got["beat"], beat.numpy())
        assert np.array_equal(got["tempo"], tempo.numpy() + 1)
        assert np.array_equal(got["sounding"], snd.numpy().astype(np.float32))
        assert np.array_equal(got["age"], age.numpy().astype(np.float32))
        assert np.array_equal(got["family"], family.numpy())
