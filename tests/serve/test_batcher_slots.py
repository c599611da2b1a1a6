"""The batcher's host work and KV cache at many rows (see aurl.generation.batching).

Rows leave from the middle of the batch (cancelled, or ending early) and join behind the others:
the cache stays in the same slot buffers (no copy of every row per join or leave), and every
remaining row's logits at every step are still those it would have alone. Batched sampling
(one exponential draw per row from its own generator, one argmax for the batch) gives each
row the ids `generate` gives it alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aurl.config import GenerationConfig, ModelConfig, VocabConfig
from aurl.generation.batching import ContinuousBatcher
from aurl.generation.generate import generate
from aurl.models import MusicTransformerVAEGAN
from tests.generation.test_batching import alone_logits


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=128
    )
    yield MusicTransformerVAEGAN(config, VocabConfig()).eval()
    torch.set_num_threads(threads)


def test_rows_leaving_from_the_middle_keep_the_others_exact_and_the_buffers(model):
    b = ContinuousBatcher(model, slots=6)
    configs = [GenerationConfig(max_tokens=n, min_tokens=n - 8, seed=s, top_k=40 if s % 2 else 0)
               for s, n in enumerate([60, 24, 70, 30, 50])]  # fmt: skip
    rows = [b.add(c) for c in configs]
    late, buffers, count = None, None, 0
    for step in range(200):
        if step == 10:
            b.cancel(rows[2])  # a row in the middle goes away
        if step == 15:
            late = b.add(GenerationConfig(max_tokens=40, min_tokens=32, seed=9))
        b.step()
        if b.state is not None:
            ptrs = [t.data_ptr() for t in b.state.k + b.state.v]
            buffers = buffers or ptrs
            assert ptrs == buffers  # the cache stays in its buffers as rows come and go
            # every row's logits are its own, alone: after each leave and join, and now and then
            changed, count = len(b.rows) != count, len(b.rows)
            for i, row in enumerate(b.rows if changed or step % 7 == 0 else []):
                want = alone_logits(model, row.ids, b.window, b.overlap)
                torch.testing.assert_close(b.logits[i], want, atol=2e-5, rtol=1e-5)
        if not b.busy:
            break
    assert not b.busy and rows[2].cancelled and late.finished
    for row in rows[:2] + rows[3:] + [late]:
        assert row.finished
        assert row.ids == generate(model, row.config)[0].ids.tolist(), row.config.seed


def test_folded_starts_join_without_a_model_call_of_their_own_and_stay_exact(model):
    """fold_starts (what the server uses): a row without a primer joining a running batch has
    its START run in the batch's own model call; it samples from the next step, and decodes
    what `generate` decodes for it alone."""
    b = ContinuousBatcher(model, slots=6, fold_starts=True)
    calls = []
    real_step = model.step

    def counted(ids, state, **kw):
        calls.append(ids.shape)
        return real_step(ids, state, **kw)

    model.step = counted
    try:
        first = b.add(GenerationConfig(max_tokens=60, min_tokens=52, seed=0))
        joined = []
        for step in range(200):
            for _ in range({4: 1, 9: 2, 20: 1}.get(step, 0)):
                joined.append(b.add(GenerationConfig(max_tokens=30, seed=10 + len(joined),
                                                     temperature=0.9)))  # fmt: skip
            before = len(calls)
            b.step()
            if step > 0 and b.rows:
                assert len(calls) == before + 1  # one model call per step, joins included
            for i, row in enumerate(
                b.rows if step in (4, 5, 9, 10, 20, 21) or step % 9 == 0 else []
            ):  # every row's logits are its own, alone (fmt: skip)
                want = alone_logits(model, row.ids, b.window, b.overlap)
                torch.testing.assert_close(b.logits[i], want, atol=2e-5, rtol=1e-5)
            if not b.busy:
                break
    finally:
        del model.step
    assert calls[0] == (1, 1)  # the first row, into an empty batch: its own START call
    assert len(joined) == 4 and max(shape[0] for shape in calls) == 5  # 4 joined a running row
    for row in [first, *joined]:
        assert row.finished
        assert row.ids == generate(model, row.config)[0].ids.tolist(), row.config.seed
