"""Sampling filters on hand-made logits, with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from aurl.generation.sampling import (
    SamplingOptions,
    apply_temperature,
    filter_logits,
    min_p_filter,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor([probs], dtype=torch.float64))


def kept(x: torch.Tensor) -> list[bool]:
    return torch.isfinite(x)[0].tolist()


def test_temperature_scales_logits() -> None:
    x = torch.tensor([[2.0, -4.0, 0.0]])
    assert apply_temperature(x, 0.5).tolist() == [[4.0, -8.0, 0.0]]
    assert apply_temperature(x, 1.0) is x
    with pytest.raises(ValueError):
        apply_temperature(x, 0.0)


def test_top_k_keeps_the_k_largest() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0, -2.0]])
    assert kept(top_k_filter(x, 2)) == [False, True, False, True, False]
    assert top_k_filter(x, 2)[0, 1] == 5.0  # kept values unchanged
    assert kept(top_k_filter(x, 0)) == [True] * 5  # 0 is off
    assert kept(top_k_filter(x, 99)) == [True] * 5


def test_top_p_keeps_the_smallest_nucleus() -> None:
    x = logits_of([0.1, 0.5, 0.25, 0.15])
    # sorted: 0.5, 0.25, 0.15, 0.1 -> cumulative 0.5, 0.75, 0.9, 1.0
    assert kept(top_p_filter(x, 0.5)) == [False, True, False, False]
    assert kept(top_p_filter(x, 0.6)) == [False, True, True, False]
    assert kept(top_p_filter(x, 0.8)) == [False, True, True, True]
    assert kept(top_p_filter(x, 0.01)) == [False, True, False, False]  # top id always kept
    assert kept(top_p_filter(x, 1.0)) == [True] * 4


def test_top_p_is_per_row() -> None:
    x = torch.cat([logits_of([0.7, 0.2, 0.1]), logits_of([0.1, 0.3, 0.6])])
    keep = torch.isfinite(top_p_filter(x, 0.75)).tolist()
    assert keep == [[True, True, False], [False, True, True]]


def test_min_p_relative_to_the_top_probability() -> None:
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    # threshold 0.3 * 0.5 = 0.15: ids with p >= 0.15 stay
    assert kept(min_p_filter(x, 0.3)) == [True, True, True, False]
    assert kept(min_p_filter(x, 0.61)) == [True, False, False, False]
    assert kept(min_p_filter(x, 0.0)) == [True] * 4


def test_repetition_penalty_ctrl_rule() -> None:
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = repetition_penalty(x, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert repetition_penalty(x, seen, 1.0) is x


def test_filter_logits_composes_in_order() -> None:
    x = logits_of([0.4, 0.3, 0.2, 0.1]).float()
    opts = SamplingOptions(temperature=1.0, top_k=3, top_p=0.6)
    # top-k drops 0.1; renormalised 0.4/0.9, 0.3/0.9 reach 0.6 after two ids
    assert kept(filter_logits(x, opts)) == [True, True, False, False]
    greedy = SamplingOptions(temperature=0.0, top_k=1)
    assert torch.equal(filter_logits(x, greedy), x)  # greedy ignores the sampling filters


def test_sample_greedy_and_seeded() -> None:
    x = logits_of([0.1, 0.6, 0.3]).float().repeat(4, 1)
    assert sample(x, SamplingOptions(temperature=0.0)).tolist() == [1, 1, 1, 1]
    opts = SamplingOptions()
    a = sample(x, opts, torch.Generator().manual_seed(3))
    b = sample(x, opts, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    masked = torch.tensor([[-INF, 0.0, -INF]]).repeat(64, 1)
    assert sample(masked, opts, torch.Generator().manual_seed(0)).tolist() == [1] * 64


def test_sample_frequencies_follow_the_distribution() -> None:
    probs = [0.2, 0.5, 0.3]
    x = logits_of(probs).float().repeat(20000, 1)
    ids = sample(x, SamplingOptions(), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).double() / ids.numel()
    assert torch.allclose(freq, torch.tensor(probs, dtype=torch.float64), atol=0.015)
    t = sample(apply_temperature(x, 0.5), SamplingOptions(), torch.Generator().manual_seed(0))
    sharp = torch.tensor([p**2 for p in probs], dtype=torch.float64)
    sharp /= sharp.sum()
    freq_t = torch.bincount(t, minlength=3).double() / t.numel()
    assert torch.allclose(freq_t, sharp, atol=0.015)
    assert not math.isclose(freq_t[1].item(), freq[1].item(), abs_tol=0.05)
