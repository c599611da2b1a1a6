"""Cadence-aware generation: particles steered towards phrases that close, and endings that do.

A piece generated to a length in seconds (``GenerationConfig.seconds``) ends where the clock
says (in its last beat, on a chord struck a beat or more before: the end rule of
:mod:`aurl.generation.constraints`, which every candidate below obeys too), and the model does
not prepare that ending: most of the shipped model's pieces then stop on no cadence, and inside the piece its phrases close on a cadence
about a third as often as Bach's do. Two searches over the same sampler help without retraining;
both judge a piece with the analysis every report uses
(:func:`aurl.analysis.structure.phrase_cadences`: skyline phrases, keys, chords per beat, the
cadence at each phrase's arrival), so what they optimise is what ``aurl evaluate`` measures.

- Phrases (:func:`generate_phrased`, ``CadenceOptions.phrase_beats > 0``): each piece is
  ``particles`` rows of one batch; every ``phrase_beats`` beats the row whose cadences so far
  come nearest the chorales' rate (:data:`CHORALE_CADENCES_PER_BEAT`, from the training split)
  replaces the piece's other rows, which go on with their own random draws (sequential
  Monte Carlo with a greedy resampling step, as in Lew et al. 2023, "Sequential Monte Carlo
  steering of large language models"; here the potential is the analysis's count). On a CPU a
  batch of 4 rows costs far less than 4 single rows (the step is dominated by per-call work).
- Endings (:func:`generate_with_cadence`): a piece that does not end on an authentic or plagal
  cadence gets ``endings - 1`` new endings: its tokens up to ``tail_beats`` before its end are
  the primer of a batch of continuations to the same length, drawn by the same sampler under
  the same constraints. The best ending wins: authentic or plagal over half or deceptive over
  none, the first drawn on a tie, so a piece is kept unless a redrawn ending closes better.
  Everything before the tail is kept, so the piece still lasts the time asked and a primer is
  untouched. While the winner still ends on no cadence at all, ``retries`` further rounds
  redraw a longer tail (:func:`close_ending`); the cost falls only on the pieces that stay
  open, and the numpy (onnx) engine runs both searches too.
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
#: Cadences per beat of the bundled chorales' training split (262 files, skyline phrases, mean
#: over pieces: 0.0374, i.e. 0.299 per 8 beats), as :mod:`aurl.evaluation.phrases` reads them:
#: ``mean(cadences_per_beat(analyze_phrases(notes_from_file(f))))`` over the manifest's
#: ``split == "train"`` files (the test split's 0.370 per 8 beats is what the benchmark compares
#: with, and is not used here).
CHORALE_CADENCES_PER_BEAT = 0.0374


@dataclass(frozen=True)
class CadenceOptions:
    """How cadences are searched.

    Attributes:
        particles: Rows per piece of the phrase search (:func:`generate_phrased`).
        endings: Candidate endings per piece, the piece's own included (1: none redrawn).
        tail_beats: How many beats at the end of a piece are redrawn when it does not close.
        phrase_beats: Every this many beats the particles of a piece are compared and the one
            whose cadences so far come nearest ``target_per_beat`` x the beats so far (with
            ``target_per_beat == 0``: the one with the most) replaces the others (0: endings
            only).
        target_per_beat: The cadence rate the phrase search steers to (default: the chorales'
            training split, :data:`CHORALE_CADENCES_PER_BEAT`); 0 for as many as it can find.
        lookahead_beats: A checkpoint waits until every particle is this far past it, so a
            phrase arriving just before it is seen to end (the skyline needs the next onset).
        retries: Further rounds of ``endings - 1`` redrawn endings while the piece still ends
            on no cadence at all (0: one round); the search stops at the first round that
            closes on any cadence (:func:`close_ending`).
        retry_tail_beats: How many beats a further round redraws (0: ``tail_beats``).
    """

    particles: int = 4
    endings: int = 8
    tail_beats: float = 4.0
    phrase_beats: float = 0.0
    lookahead_beats: float = 2.0
    target_per_beat: float = CHORALE_CADENCES_PER_BEAT
    retries: int = 0
    retry_tail_beats: float = 0.0

    def __post_init__(self) -> None:
        if self.particles < 1 or self.endings < 1 or self.retries < 0:
            raise ConfigError(
                f"cadence particles {self.particles} / endings {self.endings} / retries "
                f"{self.retries}: give 1 or more (retries: 0 or more)"
            )
        if not self.tail_beats > 0:
            raise ConfigError(f"cadence tail_beats {self.tail_beats}: give a positive number")
        if min(self.phrase_beats, self.lookahead_beats, self.target_per_beat) < 0:
            raise ConfigError(
                f"cadence phrase_beats {self.phrase_beats} / lookahead_beats "
                f"{self.lookahead_beats} / target_per_beat {self.target_per_beat}: give 0 or more"
            )
        if self.retry_tail_beats < 0:
            raise ConfigError(f"cadence retry_tail_beats {self.retry_tail_beats}: give 0 or more")


#: ``aurl generate --cadence MODE``: the searches by name (``off``: plain sampling).
#: ``phrases`` (the default) is the phrase search, 8 endings of a bar, then up to 3 more rounds
#: of 7 endings of two bars while the piece still ends on no cadence (the default before
#: issue 12's second pass had no further rounds: ``retries=0``); ``thorough`` 16 endings of two
#: bars; ``ending`` the ending search alone, with the same further rounds.
CADENCE_MODES: dict[str, CadenceOptions] = {
    "phrases": CadenceOptions(phrase_beats=8.0, retries=3, retry_tail_beats=8.0),
    "thorough": CadenceOptions(phrase_beats=8.0, endings=16, tail_beats=8.0),
    "ending": CadenceOptions(phrase_beats=0.0, retries=3, retry_tail_beats=8.0),
}


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
    options: CadenceOptions = CadenceOptions(),
    progress: Progress = silent,
) -> list[Piece]:
    """:func:`aurl.generation.generate.generate`, each piece's ending searched for a cadence.

    Without a length in seconds (``config.seconds == 0``), with one particle and one ending, or
    with a vocabulary that counts time in seconds, this is ``generate`` itself. With
    ``options.phrase_beats`` the pieces come from :func:`generate_phrased` (without beam
    search; with it the phrase search is skipped and only the endings are searched).

    Args:
        model: An engine or a model (as for ``generate``).
        config: Sampling options, constraints, length and seed; the redrawn endings use seeds
            derived from ``config.seed`` and the piece's row.
        num_samples: Pieces.
        primer: Ids to continue (START first, no END): (P,) shared or (B, P) per row.
        latents: VAE latents with one row per sample, or None.
        masker: A prebuilt masker (as for ``generate``).
        options: Particles, endings, tail and checkpoint lengths, further ending rounds.
        progress: Progress helper over the tokens of the plain pieces and of every redrawn
            ending, and over the redrawn endings' analysis (:func:`close_ending`): a hook that
            raises (the server's time limit, a client gone) stops the whole search.

    Returns:
        One :class:`Piece` per sample, each ending with END.
    """
    from aurl.data.tokenizer import Tokenizer
    from aurl.engines import as_engine

    engine = as_engine(model)
    vocab = engine.vocab
    search = config.seconds > 0 and vocab.config.time_unit == "beat"
    tokenizer = Tokenizer(vocab.config, DataConfig(polyphony_cap=config.polyphony_cap))
    phrased = options.phrase_beats > 0 and options.particles > 1
    if search and phrased and config.beam <= 1:
        pieces = generate_phrased(
            engine, config, tokenizer, options, num_samples=num_samples, primer=primer,
            latents=latents, masker=masker, progress=progress,
        )  # fmt: skip
    else:
        pieces = generate(
            engine, config, num_samples=num_samples, primer=primer, latents=latents,
            masker=masker, progress=progress,
        )  # fmt: skip
    if not search or options.endings <= 1:
        return pieces
    return [
        close_ending(
            engine, config, piece, row, tokenizer, options, latents=latents, progress=progress
        )
        for row, piece in enumerate(pieces)
    ]


def close_ending(
    engine: Any,
    config: GenerationConfig,
    piece: Piece,
    row: int,
    tokenizer: Any,
    options: CadenceOptions,
    *,
    latents: Any = None,
    progress: Progress = silent,
) -> Piece:
    """``piece`` with its ending searched for a cadence (the ending search of
    :func:`generate_with_cadence`; any engine, torch or numpy).

    A piece that closes on an authentic or plagal cadence is kept. Otherwise round 0 draws
    ``endings - 1`` continuations of the piece cut ``tail_beats`` before its end, and the best
    ending (:func:`ending_score`; the piece's own, then the first drawn, on a tie) wins; while
    the winner still ends on no cadence, up to ``retries`` further rounds redraw the last
    ``retry_tail_beats`` (of the original piece) the same way, and the first round that closes
    on any cadence ends the search. Round ``r`` of row ``row`` draws with seed
    ``config.seed * 1000003 + row + 1`` (round 0, as before the retries existed) or that times
    7919 plus ``r``.

    Args:
        engine: The engine the piece was drawn with.
        config: Its sampling options, constraints, length and seed.
        piece: The piece (START .. END).
        row: Its row in the batch (the seeds of its rounds, and its row of ``latents``).
        tokenizer: Decodes ids to notes for the analysis.
        options: Endings, tails and retries.
        latents: The batch's VAE latents, or None.
        progress: Progress helper over each round's tokens (``desc`` "ending") and its
            candidates' analysis (``desc`` "endings"), as ``generate`` takes it: the server's
            hook checks its time limit and its client there.

    Returns:
        The piece, or the same piece with the best ending found.
    """
    vocab = engine.vocab
    best = ending_score(tokenizer.decode_to_notes(piece.ids))
    chosen = piece
    base_seed = config.seed * 1_000_003 + row + 1
    for round_ in range(options.retries + 1 if options.endings > 1 else 0):
        if best == max(CLOSING.values()) or (round_ > 0 and best > 0):
            break
        tail = options.tail_beats if round_ == 0 else options.retry_tail_beats or options.tail_beats
        cut = tail_cut(piece.ids, vocab, tail, piece.primer_length)
        if cut == 0:
            continue
        done = cut - piece.primer_length  # tokens of the plain piece kept
        redo = dataclasses.replace(
            config,
            seed=base_seed if round_ == 0 else base_seed * 7919 + round_,
            max_tokens=max(config.max_tokens - done, 8),
            min_tokens=max(config.min_tokens - done, 0),
        )
        rows_latents = None
        if latents is not None:
            import torch

            from aurl.generation.constraints import index_state

            index = torch.full((options.endings - 1,), row, dtype=torch.long)
            rows_latents = index_state(latents, index.to(engine.device))
        # a masker of their own (built from ``redo``): their token limits are the remainder
        candidates = generate(
            engine, redo, num_samples=options.endings - 1, primer=piece.ids[:cut],
            latents=rows_latents, progress=_named(progress, "ending"),
        )  # fmt: skip
        for cand in progress(candidates, total=len(candidates), desc="endings"):
            score = ending_score(tokenizer.decode_to_notes(cand.ids))
            if score > best:
                best, chosen = score, Piece(cand.ids, piece.primer_length)
    return chosen


def _named(progress: Progress, label: str) -> Progress:
    """``progress`` with its bars labelled ``label``."""

    def named(items: Any, *, total: int | None = None, desc: str = "") -> Any:
        return progress(items, total=total, desc=label)

    return named


def pick_row(counts: np.ndarray, target: float) -> int:
    """The row whose cadence count is nearest ``target`` (``target <= 0``: the largest count),
    the first on a tie."""
    counts = np.asarray(counts, dtype=np.float64)
    return int(np.argmax(-np.abs(counts - target) if target > 0 else counts))


def cadence_count(notes: np.ndarray, until: float) -> int:
    """Cadences at the skyline phrases' arrivals up to beat ``until`` (the analysis of
    :func:`ending_score`)."""
    from aurl.analysis.structure import phrase_boundaries, phrase_cadences

    cadences, _ = phrase_cadences(notes, phrase_boundaries(notes))
    return sum(c.beat <= until for c in cadences)


def generate_phrased(
    engine: Any,
    config: GenerationConfig,
    tokenizer: Any,
    options: CadenceOptions,
    *,
    num_samples: int = 1,
    primer: np.ndarray | None = None,
    latents: Any = None,
    masker: LogitMasker | None = None,
    progress: Progress = silent,
) -> list[Piece]:
    """Particles per piece, resampled at phrase checkpoints towards more cadences.

    Each piece is ``options.particles`` rows of one batch, sampled as ``generate`` samples
    (grammar, constraints, sampling filters). Every ``options.phrase_beats`` beats (once every
    row of the piece is ``lookahead_beats`` past the checkpoint), each row's notes so far are
    analysed and the row whose cadences up to the checkpoint come nearest the target rate
    (``options.target_per_beat`` x the beats since the primer; the most cadences without a
    target; the first row on a tie) is copied over the piece's other rows: the others start again from it, with their own random
    draws. This is sequential Monte Carlo with a greedy resampling step (Lew et al. 2023), a
    beam of ``particles`` rows whose score is the analysis. At the end, the row that closes
    best (:func:`ending_score`, then the most cadences) is the piece.

    Torch engines (the rows' decoding states are reordered as in beam search) and numpy
    engines (their own ``reorder``; no torch is imported).

    Raises:
        ConfigError: beam search asked too.
    """
    from aurl.generation.generate import make_masker

    if config.beam > 1:
        raise ConfigError("cadence phrase search runs without --beam")
    K, B = options.particles, num_samples
    vocab, spb = engine.vocab, engine.vocab.config.steps_per_beat
    masker = masker or make_masker(vocab, config, None if engine.numpy else engine.device)
    if primer is not None and np.ndim(primer) == 2:
        primer = np.repeat(np.asarray(primer), K, axis=0)  # each piece's rows share its primer
    if latents is not None:  # torch engines only (generate refuses latents on numpy ones)
        import torch

        from aurl.generation.constraints import index_state

        latents = index_state(latents, torch.arange(B, device=engine.device).repeat_interleave(K))
    shared = np.atleast_2d(primer) if primer is not None else np.zeros((1, 0), dtype=np.int64)
    shifts = np.where(vocab.kind[shared] == Kind.TIME_SHIFT, vocab.value[shared], 0)
    start = float(shifts.sum(axis=1).min()) / spb  # the primer's end (its earliest row)
    checkpoint = start + options.phrase_beats

    def steer(buffer: Any, n: int, state: Any) -> Any:
        """At each checkpoint, every piece's rows from the one nearest the target rate."""
        nonlocal checkpoint
        if bool(masker.finished(state).any()):
            return None  # the end is near: rows are no longer compared
        if float(state.grammar.time.min()) / spb < checkpoint + options.lookahead_beats:
            return None
        ids = buffer[:, :n] if engine.numpy else buffer[:, :n].cpu().numpy()
        src = np.arange(B * K)
        target = options.target_per_beat * (checkpoint - start)
        for b in range(B):
            counts = np.array([
                cadence_count(tokenizer.decode_to_notes(ids[r]), checkpoint)
                for r in range(b * K, (b + 1) * K)
            ])  # fmt: skip
            src[b * K : (b + 1) * K] = b * K + pick_row(counts, target)
        checkpoint += options.phrase_beats
        if engine.numpy:
            return src
        import torch

        return torch.as_tensor(src, device=engine.device)

    rows = generate(
        engine, config, num_samples=B * K, primer=primer, latents=latents, masker=masker,
        progress=progress, steer=steer,
    )  # fmt: skip
    out = []
    for b in range(B):
        best, best_key = None, None
        for piece in rows[b * K : (b + 1) * K]:
            notes = tokenizer.decode_to_notes(piece.ids)
            key = (ending_score(notes), cadence_count(notes, np.inf))
            if best_key is None or key > best_key:
                best, best_key = piece, key
        out.append(best)
    return out
