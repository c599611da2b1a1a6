"""Cadence-aware endings: redraw the last beats of a piece until its last phrase closes.

A piece generated to a length in seconds (``GenerationConfig.seconds``) ends where the clock
says, and the model chooses its last chord inside the last beat only: a third of the shipped
model's pieces then stop on no cadence at all. Bach's chorales nearly all end on one.

:func:`generate_with_cadence` generates as :func:`aurl.generation.generate.generate` does, then
reads each piece's ending with the analysis every report uses
(:func:`aurl.analysis.structure.phrase_cadences`: skyline phrases, keys, chords per beat, the
cadence at the last phrase's arrival). A piece that does not end on an authentic or plagal
cadence gets ``particles - 1`` new endings: its tokens up to ``tail_beats`` before its end are
the primer of a batch of continuations to the same length, drawn by the same sampler under the
same constraints (a sequential importance resampling step with one particle per ending, in the
spirit of Lew et al. 2023, "Sequential Monte Carlo steering of large language models", where
the weight is the analysis's verdict). The best ending wins: authentic or plagal over half or
deceptive over none, the first drawn on a tie, so the plain piece is kept unless a redrawn
ending closes better. Everything before the tail is the plain piece's, so the piece still lasts
the time asked and the primer is untouched.

Cost: the plain piece, plus, for the pieces that need it, one batch of ``particles - 1`` rows
over ``tail_beats`` (and one prefill of the primer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from aurl.config import DataConfig, GenerationConfig
from aurl.data.vocab import END, Kind
from aurl.errors import ConfigError
from aurl.generation.constraints import LogitMasker
from aurl.generation.generate import Piece, generate
from aurl.progress import Progress, silent

#: Ending scores: what closes a piece best.
CLOSING = {"authentic": 2, "plagal": 2, "half": 1, "deceptive": 1}


@dataclass(frozen=True)
class EndingOptions:
    """How endings are searched.

    Attributes:
        particles: Candidate endings per piece, the plain one included (1: no search).
        tail_beats: How many beats at the end of a piece are redrawn.
    """

    particles: int = 4
    tail_beats: float = 4.0

    def __post_init__(self) -> None:
        if self.particles < 1:
            raise ConfigError(f"cadence particles {self.particles}: give 1 or more")
        if not self.tail_beats > 0:
            raise ConfigError(f"cadence tail_beats {self.tail_beats}: give a positive number")


def ending_score(notes: np.ndarray) -> int:
    """2 when the piece's last phrase closes on an authentic or plagal cadence, 1 on a half or
    deceptive one, 0 on none (as :mod:`aurl.evaluation.phrases` reads ``ends_on_cadence``)."""
    from aurl.analysis.structure import phrase_boundaries, phrase_cadences

    _, last = phrase_cadences(notes, phrase_boundaries(notes))
    return CLOSING.get(last.kind, 0) if last is not None else 0


def token_beats(ids: np.ndarray, vocab: Any) -> np.ndarray:
    """Beat at which each token happens (after the shifts before it), (n,)."""
    kind, value = vocab.kind[ids], vocab.value[ids]
    steps = np.where(kind == Kind.TIME_SHIFT, value, 0)
    return (np.cumsum(steps) - steps) / vocab.config.steps_per_beat


def tail_cut(ids: np.ndarray, vocab: Any, tail_beats: float, primer_length: int) -> int:
    """Index of the first token of the last ``tail_beats`` beats (the tokens before it are the
    kept prefix), at the first token of that beat's time step; 0 when the tail would reach
    into the primer or the piece is shorter than its tail."""
    body = ids[: len(ids) - 1] if len(ids) and ids[-1] == END else ids
    beats = token_beats(body, vocab)
    end = beats[-1] if len(beats) else 0.0
    cut = int(np.searchsorted(beats, end - tail_beats, side="left"))
    return cut if primer_length <= cut and end - tail_beats > 0 else 0


def generate_with_cadence(
    model: Any,
    config: GenerationConfig,
    *,
    num_samples: int = 1,
    primer: np.ndarray | None = None,
    latents: Any = None,
    masker: LogitMasker | None = None,
    options: EndingOptions = EndingOptions(),
    progress: Progress = silent,
) -> list[Piece]:
    """:func:`aurl.generation.generate.generate`, each piece's ending searched for a cadence.

    Without a length in seconds (``config.seconds == 0``), with one particle, or with a vocabulary
    that counts time in seconds, this is ``generate`` itself.

    Args:
        model: An engine or a model (as for ``generate``).
        config: Sampling options, constraints, length and seed; the redrawn endings use seeds
            derived from ``config.seed`` and the piece's row.
        num_samples: Pieces.
        primer: Ids to continue (START first, no END): (P,) shared or (B, P) per row.
        latents: VAE latents with one row per sample, or None.
        masker: A prebuilt masker (as for ``generate``).
        options: Particles and tail length.
        progress: Progress helper over the plain pieces' tokens.

    Returns:
        One :class:`Piece` per sample, each ending with END.
    """
    from aurl.data.tokenizer import Tokenizer
    from aurl.engines import as_engine

    engine = as_engine(model)
    pieces = generate(
        engine, config, num_samples=num_samples, primer=primer, latents=latents, masker=masker,
        progress=progress,
    )  # fmt: skip
    vocab = engine.vocab
    if config.seconds <= 0 or options.particles <= 1 or vocab.config.time_unit != "beat":
        return pieces
    tokenizer = Tokenizer(vocab.config, DataConfig(polyphony_cap=config.polyphony_cap))
    out = []
    for row, piece in enumerate(pieces):
        best = ending_score(tokenizer.decode_to_notes(piece.ids))
        cut = tail_cut(piece.ids, vocab, options.tail_beats, piece.primer_length)
        if best == max(CLOSING.values()) or cut == 0:
            out.append(piece)
            continue
        done = cut - piece.primer_length  # tokens of the plain piece kept
        redo = dataclasses.replace(
            config,
            seed=config.seed * 1_000_003 + row + 1,
            max_tokens=max(config.max_tokens - done, 8),
            min_tokens=max(config.min_tokens - done, 0),
        )
        rows_latents = None
        if latents is not None:
            import torch

            from aurl.generation.constraints import index_state

            index = torch.full((options.particles - 1,), row, dtype=torch.long)
            rows_latents = index_state(latents, index.to(engine.device))
        # a masker of their own (built from ``redo``): their token limits are the remainder
        candidates = generate(
            engine, redo, num_samples=options.particles - 1, primer=piece.ids[:cut],
            latents=rows_latents,
        )  # fmt: skip
        chosen = piece
        for cand in candidates:
            score = ending_score(tokenizer.decode_to_notes(cand.ids))
            if score > best:
                best, chosen = score, Piece(cand.ids, piece.primer_length)
        out.append(chosen)
    return out
