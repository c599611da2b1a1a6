"""A style model's likelihood of a piece under each of its styles, and the style it guesses
(:mod:`aurl.analysis.style` has the Bayes rule and the argument for it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from aurl.analysis.style import StyleGuess, guess_style
from aurl.errors import ConfigError

MAX_TOKENS = 1024  # the opening scored: enough to settle the style, bounded cost for long files


def style_log_likelihoods(
    model: Any, ids: np.ndarray, *, window: int | None = None, meter: Any = None,
    max_tokens: int = MAX_TOKENS, grammar: Any = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """``(nll, notes)``: the negative log-likelihood (nats, summed over the tokens) of the
    first ``max_tokens`` of ``ids`` given each of the model's styles, (K,), and the notes
    among those tokens. One scoring pass per style, sliding windows of ``window`` tokens
    (default the model's ``max_seq_len``), each distribution renormalised over the ids the
    grammar allows (``grammar``, default ``Grammar(model.vocab)``): a model trained with the
    grammar-masked loss never learns the logits of forbidden ids, which would otherwise swamp
    the comparison with noise.

    Raises:
        ConfigError: the model has no styles.
    """
    from aurl.evaluation.likelihood import score_sequences

    styles = tuple(getattr(model.config, "styles", ()))
    if not styles:
        raise ConfigError(
            "--style: this model was trained without styles (model.styles is empty): give a "
            "model trained with styles (--model NAME or --checkpoint DIR)"
        )
    if grammar is None:
        from aurl.data.grammar import Grammar

        grammar = Grammar(model.vocab)
    ids = np.asarray(ids, dtype=np.int64)[:max_tokens]
    window = window or model.config.max_seq_len
    meters = None if meter is None else [meter]
    nll, notes = np.zeros(len(styles)), 0
    for k in range(len(styles)):
        r = score_sequences(model, [ids], window=window, meters=meters, styles=[k], grammar=grammar)
        nll[k], notes = r.nll, r.notes
    return nll, notes


def piece_metrics(tokenizer: Any, ids: np.ndarray) -> dict[str, float]:
    """The scalar metrics (:data:`aurl.evaluation.metrics.SCALAR_METRICS`) of the notes ``ids``
    decode to (NaN where undefined)."""
    from aurl.evaluation.metrics import scalar_metrics

    return scalar_metrics(tokenizer.decode_to_notes(np.asarray(ids, dtype=np.int64)))


def classify_style(model: Any, ids: np.ndarray, **kw: Any) -> StyleGuess:
    """The most likely style of ``ids`` under ``model`` with the posterior over its styles
    (uniform prior); ``kw`` as :func:`style_log_likelihoods`."""
    nll, notes = style_log_likelihoods(model, ids, **kw)
    return guess_style(list(model.config.styles), nll.tolist(), notes)
