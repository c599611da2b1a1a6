"""A style model's likelihood of a piece under each of its styles, and the style it guesses
(:mod:`aurl.analysis.style` has the Bayes rule and the argument for it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aurl.analysis.style import CLASSIFIER_FILE, StyleClassifier, StyleGuess, guess_style
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


def load_style_classifier(folder: str | Path, styles: tuple[str, ...]) -> StyleClassifier | None:
    """The :class:`StyleClassifier` shipped in ``folder`` (its ``style_classifier.json``), or
    None where there is none.

    Raises:
        CheckpointError: the file is unreadable, of another version, or names other styles
            than the model's ``styles``.
    """
    from aurl.errors import CheckpointError

    path = Path(folder) / CLASSIFIER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable style classifier ({e}): refit it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a style classifier (a JSON object): refit it")
    clf = StyleClassifier.from_dict(data, source=str(path))
    if clf.styles != tuple(styles):
        raise CheckpointError(
            f"{path}: fitted for styles {list(clf.styles)}, the model has {list(styles)}: "
            "refit it for this model (benchmarks/bench_styles.py --save-classifier)"
        )
    return clf


def classify_style(
    model: Any, ids: np.ndarray, *, classifier: StyleClassifier | None = None,
    tokenizer: Any = None, **kw: Any,
) -> StyleGuess:  # fmt: skip
    """The most likely style of ``ids`` under ``model`` with the probabilities of its styles.

    Without ``classifier``: Bayes over the model's likelihoods (uniform prior). With one (the
    model folder's ``style_classifier.json``, :func:`load_style_classifier`): its logistic
    regression over the likelihood margins per note and the metrics of the same opening
    (``classifier.max_tokens`` tokens; ``tokenizer`` decodes them). ``kw`` as
    :func:`style_log_likelihoods`.
    """
    styles = list(model.config.styles)
    if classifier is None:
        nll, notes = style_log_likelihoods(model, ids, **kw)
        return guess_style(styles, nll.tolist(), notes)
    if tokenizer is None:
        from aurl.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(model.vocab_config)
    ids = np.asarray(ids, dtype=np.int64)[: classifier.max_tokens]
    kw["max_tokens"] = classifier.max_tokens
    nll, notes = style_log_likelihoods(model, ids, **kw)
    bits = nll / np.log(2) / max(notes, 1)
    prob = classifier.predict(classifier.vector(bits, piece_metrics(tokenizer, ids)))[0]
    return StyleGuess(
        style=styles[int(prob.argmax())],
        probabilities={s: float(p) for s, p in zip(styles, prob)},
        bits_per_note={s: float(b) for s, b in zip(styles, bits)},
    )
