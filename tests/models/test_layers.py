"""Rotary positions and the attention mask."""

from __future__ import annotations

import torch

from aurl.models.layers import Rotary, apply_rotary, attention_mask_for


def test_rotary_rotates_each_pair_by_position_times_frequency():
    r = Rotary(4, 8)  # frequencies 1 and 1/100 for the pairs (0, 2) and (1, 3)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    cos, sin = r.tables(0, 3)
    y = apply_rotary(x, cos[:, 0], sin[:, 0])  # (1, 3, 1, 4)
    for p in range(3):
        expected = [torch.cos(torch.tensor(p)), 0.0, torch.sin(torch.tensor(p)), 0.0]
        torch.testing.assert_close(y[0, p, 0], torch.tensor(expected))


def test_rotary_scores_depend_only_on_the_distance():
    r = Rotary(8, 4)  # tables grow on demand past the initial length
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> torch.Tensor:
        ci, si = r.tables(i, 1)
        cj, sj = r.tables(j, 1)
        qi = apply_rotary(q.view(1, 1, 1, 8), ci[:, 0], si[:, 0])
        kj = apply_rotary(k.view(1, 1, 1, 8), cj[:, 0], sj[:, 0])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=1e-4)


def test_attention_mask_window_and_globals():
    pos = torch.arange(6)
    m = attention_mask_for(pos, pos, window=2, n_global=1).int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]
    assert attention_mask_for(pos, pos, None, 0).equal(torch.ones(6, 6).tril().bool())
