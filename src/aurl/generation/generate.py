"""The generation loop: engine step -> grammar and constraint masks -> sampling filters -> id.

:func:`generate` runs a batch of pieces together on an engine's KV cache (:mod:`aurl.engines`:
a torch model, or an ONNX export on onnxruntime). With a numpy engine the whole loop runs in
numpy and never imports torch (the masker in numpy mode, the numpy sampling filters, a numpy
random generator, so the same seed draws other ids than the torch engine). Every row starts from
the same prefix (START, or a primer), optionally conditioned on VAE latents, one set per row.
Sampling strategies are set by :class:`aurl.config.GenerationConfig`: ``temperature == 0`` is
greedy, ``beam > 1`` is beam search over the masked distribution, otherwise ancestral sampling
with temperature, top-k, top-p, min-p and a repetition penalty. The same seed and options give
the same ids.

Pieces longer than the model's context slide the window: when the cache holds ``window`` tokens
the model restarts on the last ``window_overlap`` of them (with the musical time carried over),
while the grammar and the constraints keep following the whole piece, so the output stays valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aurl.config import GenerationConfig
from aurl.data.vocab import END, PAD, START, Kind, Vocab
from aurl.errors import ConfigError, ConstraintError
from aurl.generation.constraints import LogitMasker, build_constraints, index_state, map_state
from aurl.generation.sampling import (
    SamplingOptions,
    filter_logits,
    filter_logits_numpy,
    sample,
    sample_numpy,
)
from aurl.progress import Progress, silent

if TYPE_CHECKING:
    import torch

# Tokens the grammar may need past max_tokens to end cleanly (e.g. a NOTE_ON after a VELOCITY).
END_SLACK = 8
#: ``steer(buffer, n, state) -> rows | None``: see :func:`generate`.
Steer = Callable[[Any, int, Any], Any]
CHUNK = 4096  # the token buffer grows by this much: a limit in seconds may allow a great many


@dataclass(frozen=True)
class Piece:
    """One generated piece: its ids (START .. END, primer included) and where the primer ends."""

    ids: np.ndarray
    primer_length: int

    @property
    def generated(self) -> np.ndarray:
        return self.ids[self.primer_length :]


def sampling_options(config: GenerationConfig) -> SamplingOptions:
    return SamplingOptions(
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
    )


def make_masker(
    vocab: Vocab, config: GenerationConfig, device: torch.device | str | None = "cpu"
) -> LogitMasker:
    """Grammar (always on, with the generation polyphony cap) and the checked constraints;
    ``device`` None: a numpy masker (for a numpy engine).

    Raises:
        ConstraintError: bad or unsatisfiable constraints (before anything is generated).
    """
    from aurl.data.grammar import Grammar

    constraints = build_constraints(vocab, config)
    grammar = Grammar(vocab, polyphony_cap=config.polyphony_cap)
    return LogitMasker(vocab, grammar, constraints, device=device)


# --------------------------------------------------------------------------------------------
# Primers and latents
# --------------------------------------------------------------------------------------------


def token_seconds(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Time in seconds at which each token happens (after the shifts before it), vectorized."""
    kind, value = vocab.kind[ids], vocab.value[ids]
    is_tempo = kind == Kind.TEMPO
    # Current tempo bin at each token: the last TEMPO at or before it (120 BPM before any).
    last = np.maximum.accumulate(np.where(is_tempo, np.arange(len(ids)), -1))
    default_bin = int(vocab.tempo_bin(120.0))
    tempo_bin = np.where(last >= 0, value[np.maximum(last, 0)], default_bin)
    sps = np.array([vocab.seconds_per_step(float(b)) for b in vocab.bin_tempo])[tempo_bin]
    steps = np.where(kind == Kind.TIME_SHIFT, value, 0)
    elapsed = np.cumsum(steps * sps)
    return elapsed - steps * sps  # time before each token's own shift


def load_primer(path: str | Path, tokenizer: Any, *, seconds: float = 0.0) -> np.ndarray:
    """Ids of a primer MIDI file, START first, without END, cut after ``seconds`` (0: whole).

    Raises:
        MidiReadError: the file is missing or not MIDI (from the tokenizer).
        ConstraintError: the primer holds no notes before the cut.
    """
    ids = np.asarray(tokenizer.encode_file(path), dtype=np.int64)
    ids = ids[(ids != END) & (ids != PAD)]
    if seconds > 0:
        ids = ids[token_seconds(ids, tokenizer.vocab) < seconds]
    if not (tokenizer.vocab.kind[ids] == Kind.NOTE_ON).any():
        cut = f" in its first {seconds:g} s" if seconds > 0 else ""
        raise ConstraintError(f"primer {path} has no notes{cut}: give a MIDI file with notes")
    return ids


def _encode_file(model: Any, path: str | Path, tokenizer: Any, length: int | None = None) -> Any:
    """The VAE posterior of a MIDI file's first ``length`` tokens (default: the context)."""
    import torch

    ids = np.asarray(tokenizer.encode_file(path))[: length or model.config.max_seq_len]
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=model.embed.weight.device)[None]
    return model.encode(ids_t)


def file_latents(
    model: Any, path: str | Path, tokenizer: Any, *, n: int, generator: torch.Generator | None
) -> Any:
    """``n`` latents around the encoding of a MIDI file: row 0 its posterior mean, the others
    samples from its posterior (variations)."""
    return piece_latents(model, tokenizer.encode_file(path), n=n, generator=generator)


def piece_latents(model: Any, ids: np.ndarray, *, n: int, generator: torch.Generator | None) -> Any:
    """:func:`file_latents` of a piece's ids already read (its first ``max_seq_len``)."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids)[: model.config.max_seq_len], dtype=torch.long,
                            device=model.embed.weight.device)[None]  # fmt: skip
    posterior = model.encode(ids_t)
    rep = torch.zeros(n, dtype=torch.long, device=model.embed.weight.device)
    mean = index_state(posterior.mean(), rep)
    noisy = index_state(posterior, rep).sample(generator)
    levels = [torch.cat([m[:1], z[1:]]) for m, z in zip(mean.levels, noisy.levels)]
    return type(mean)(levels)


def prior_latents(model: Any, n: int, seed: int) -> Any:
    """``n`` prior draws for a VAE (seeded by ``seed``, on the model's device), or None for a
    model without an encoder: what a VAE decodes when no file gives its latents."""
    if getattr(model, "encoder", None) is None:
        return None
    import torch

    generator = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    return model.sample_prior(n, generator=generator)


def interpolation_latents(
    model: Any, a: str | Path, b: str | Path, tokenizer: Any, *, steps: int
) -> Any:
    """``steps`` latents from file ``a`` to file ``b`` (posterior means, spherical path).

    Both files are encoded over the same number of tokens (the shorter file's, at most the
    context), so their latents have the same shape.
    """
    length = min(len(tokenizer.encode_file(a)), len(tokenizer.encode_file(b)))
    length = min(length, model.config.max_seq_len)
    import torch

    za = _encode_file(model, a, tokenizer, length).mean()
    zb = _encode_file(model, b, tokenizer, length).mean()
    path = model.interpolate(za, zb, steps)
    return type(za)([torch.cat(level) for level in zip(*(z.levels for z in path))])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _Context:
    """The engine side of the loop: decode state, sliding window, logits of the last token."""

    def __init__(
        self, engine: Any, latents: Any, batch: int, window: int, overlap: int, meter: Any = None,
        style: Any = None,
    ) -> None:  # fmt: skip
        self.engine, self.latents, self.batch = engine, latents, batch
        self.window, self.overlap = window, overlap
        self.meter = meter  # (B, 2) time signatures for a meter-conditioned model, or None
        self.style = style  # (B,) style ids for a style-conditioned model, or None
        self.state: Any = None

    def start(self, buffer: Any, n: int) -> Any:
        """(Re)start the engine on the tokens ``buffer[:, :n]`` (the last ``overlap`` of them if
        they do not fit the window); returns the logits (B, V) after them."""
        first = 0 if n <= self.window - 1 else n - self.overlap
        # the tokens left behind still set the musical time and the grammar features
        meter = {"meter": self.meter} if self.meter is not None else {}
        if self.style is not None:
            meter["style"] = self.style
        self.state = self.engine.init_state(
            self.batch, latents=self.latents, capacity=self.window,
            history=buffer[:, :first] if first > 0 else None, **meter,
        )  # fmt: skip
        return self.engine.step(buffer[:, first:n], self.state)[:, -1]

    def full(self) -> bool:
        """The cache holds ``window`` tokens: the next step restarts the window."""
        return self.state.pos >= self.window

    def next(self, buffer: Any, n: int) -> Any:
        """Logits after ``buffer[:, n-1]``, sliding the window when the cache is full."""
        if self.full():
            return self.start(buffer, n)
        return self.engine.step(buffer[:, n - 1 : n], self.state)[:, -1]

    def grammar_state(self) -> Any:
        """The grammar state after every token fed so far, when the engine keeps one (for the
        model's grammar features), so the loop need not advance a second copy; else None."""
        return self.engine.grammar_state(self.state)

    def reorder(self, rows: Any) -> None:
        """Each row's decode state from the row ``rows`` names (the engine's ``reorder``)."""
        self.state = self.engine.reorder(self.state, rows)


def meter_tensor(engine: Any, config: GenerationConfig, batch: int) -> Any:
    """(B, 2) ``generation.meter`` for a model with meter conditioning (a numpy array for a
    numpy engine, else a tensor on the engine's device); None otherwise (the model counts in
    4/4, and so does a meter model given none)."""
    if not config.meter or not getattr(engine.config, "meter", False):
        return None
    from aurl.data.meter import parse_meter

    pair = parse_meter(config.meter)
    if engine.numpy:
        return np.tile(np.asarray(pair, dtype=np.int64), (batch, 1))
    import torch

    meter = torch.tensor(pair, dtype=torch.long, device=engine.device)
    return meter.expand(batch, 2).contiguous()


def style_tensor(engine: Any, config: GenerationConfig, batch: int) -> Any:
    """(B,) the id of ``generation.style`` among the model's ``model.styles``; None without a
    style (a style model then generates unconditioned, as style dropout trained it to).

    Raises:
        ConfigError: an unknown style (the message lists the model's), a model without
            styles, or an engine that cannot take one.
    """
    if not config.style:
        return None
    from aurl.style_ids import style_id

    if engine.numpy and not getattr(engine, "takes_style", False):
        raise ConfigError(
            f"--style {config.style}: the onnx engine takes no style (its export has no style "
            "input); use --engine torch or --engine native"
        )
    sid = style_id(tuple(getattr(engine.config, "styles", ())), config.style)
    if engine.numpy:
        import numpy as np

        return np.full(batch, sid, dtype=np.int64)
    import torch

    return torch.full((batch,), sid, dtype=torch.long, device=engine.device)


class _TorchArrays:
    """The loop's array calls for a torch engine (tensors on its device)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def prefix(self, primer: np.ndarray | None, batch: int) -> torch.Tensor:
        """(B, P) prefix: START alone, or the primer (1-d shared, or 2-d one per row)."""
        torch = self.torch
        if primer is None:
            return torch.full((batch, 1), START, dtype=torch.long, device=self.device)
        p = torch.as_tensor(np.asarray(primer), dtype=torch.long, device=self.device)
        return p[None].expand(batch, -1).contiguous() if p.dim() == 1 else p.contiguous()

    def float(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    def full(self, rows: int, cols: int) -> torch.Tensor:
        return self.torch.full((rows, cols), PAD, dtype=self.torch.long, device=self.device)

    def cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.torch.cat([a, b], dim=1)

    def first_violation(self, grammar: Any, prefix: torch.Tensor) -> tuple[int, int] | None:
        bad = grammar.violations(prefix)  # (B, P) bool
        return tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else None

    def generator(self, seed: int) -> torch.Generator:
        return self.torch.Generator(device=self.device).manual_seed(seed)

    def draw(self, masked: Any, options: SamplingOptions, seen: Any, generator: Any) -> Any:
        return sample(filter_logits(masked, options, seen), options, generator)

    def seen(self, rows: int, size: int) -> torch.Tensor:
        return self.torch.zeros(rows, size, dtype=self.torch.bool, device=self.device)

    def mark(self, seen: torch.Tensor, ids: torch.Tensor) -> None:
        seen[self.torch.arange(len(ids), device=self.device), ids] = True

    def rows(self, ids: torch.Tensor) -> np.ndarray:
        return ids.cpu().numpy()

    def take(self, state: Any, rows: torch.Tensor) -> Any:
        return index_state(state, rows)


class _NumpyArrays:
    """The same calls in numpy, for a numpy engine (no torch)."""

    def prefix(self, primer: np.ndarray | None, batch: int) -> np.ndarray:
        if primer is None:
            return np.full((batch, 1), START, dtype=np.int64)
        p = np.asarray(primer, dtype=np.int64)
        return np.ascontiguousarray(np.broadcast_to(p, (batch, len(p)))) if p.ndim == 1 else p

    def float(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def full(self, rows: int, cols: int) -> np.ndarray:
        return np.full((rows, cols), PAD, dtype=np.int64)

    def cat(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b], axis=1)

    def first_violation(self, grammar: Any, prefix: np.ndarray) -> tuple[int, int] | None:
        """The first token (row, column) the grammar does not allow, stepping the numpy
        machine along the prefix."""
        state = grammar.initial_numpy_state(len(prefix))
        rows = np.arange(len(prefix))
        for col in range(prefix.shape[1]):
            ok = grammar.allowed(state)[rows, prefix[:, col]]
            if not ok.all():
                return int(np.flatnonzero(~ok)[0]), col
            state = grammar.advance(state, prefix[:, col])
        return None

    def generator(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def draw(self, masked: Any, options: SamplingOptions, seen: Any, generator: Any) -> Any:
        return sample_numpy(filter_logits_numpy(masked, options, seen), options, generator)

    def seen(self, rows: int, size: int) -> np.ndarray:
        return np.zeros((rows, size), dtype=bool)

    def mark(self, seen: np.ndarray, ids: np.ndarray) -> None:
        seen[np.arange(len(ids)), ids] = True

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return ids

    def take(self, state: Any, rows: np.ndarray) -> Any:
        return take_rows(state, rows)


def take_rows(state: Any, rows: np.ndarray) -> Any:
    """:func:`aurl.generation.constraints.index_state` for numpy states (no torch): rows
    ``rows`` of every batch-first array inside dataclasses, dicts, lists and tuples; 0-d arrays
    and non-arrays are kept."""
    return map_state(state, np.ndarray, lambda a: a[rows] if a.ndim > 0 else a)


def _arrays(engine: Any) -> Any:
    return _NumpyArrays() if engine.numpy else _TorchArrays(engine.device)


def _room(buffer: Any, n: int, arrays: Any) -> Any:
    """``buffer`` with a free column at ``n`` (grown by :data:`CHUNK` columns of PAD)."""
    if n < buffer.shape[1]:
        return buffer
    return arrays.cat(buffer, arrays.full(buffer.shape[0], CHUNK))


def _prefix(primer: np.ndarray | None, batch: int, arrays: Any, size: int) -> Any:
    """(B, P) prefix: START alone, or the primer (1-d shared, or 2-d one per row) of ids below
    ``size`` (an id past the vocabulary was an IndexError, -1 read as the last id)."""
    if primer is not None:
        ids = np.asarray(primer)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ConstraintError(
                f"a primer of shape {ids.shape}: give ids (P,) or (B, P), START first"
            )
        if ids.dtype.kind not in "iu" or int(ids.min()) < 0 or int(ids.max()) >= size:
            raise ConstraintError(f"a primer holds ids outside the vocabulary's 0..{size - 1}")
    p = arrays.prefix(primer, batch)
    if p.shape[0] != batch:
        raise ConstraintError(
            f"{p.shape[0]} primers for {batch} samples: give one or one per sample"
        )
    if bool((p[:, 0] != START).any()):
        raise ConstraintError("a primer must start with START (use load_primer or encode_file)")
    return p


def generate(
    model: Any,
    config: GenerationConfig,
    *,
    num_samples: int = 1,
    primer: np.ndarray | None = None,
    latents: Any = None,
    masker: LogitMasker | None = None,
    progress: Progress = silent,
    steer: Steer | None = None,
) -> list[Piece]:
    """Generate ``num_samples`` pieces in one batch.

    Args:
        model: An engine (:mod:`aurl.engines`) or a ``MusicTransformerVAEGAN`` in eval mode
            (wrapped in the torch engine).
        config: Sampling options, constraints, length, window and seed.
        num_samples: Rows of the batch (beam search keeps ``config.beam`` beams per row).
        primer: Ids to continue (START first, no END): (P,) shared or (B, P) per row.
        latents: VAE latents with one row per sample, or None.
        masker: A prebuilt :func:`make_masker` (built from ``config`` when None; a numpy
            engine needs a numpy masker, ``device=None``).
        progress: Progress helper over the generated tokens.
        steer: Called after each sampled token with ``(buffer, n, state)`` (the ids so far,
            their count, the masker's state); a (B,) row index it returns replaces each row by
            the row it names (ids, decoding state, masks: sequential Monte Carlo resampling,
            e.g. :func:`aurl.generation.cadence.generate_phrased`); None leaves the rows as
            they are. Without beam search; the engine reorders its state with its
            ``reorder(state, rows)`` (numpy rows for a numpy engine).

    Returns:
        One :class:`Piece` per sample, each ending with END.

    Raises:
        ConstraintError: bad constraints or primer, before anything is generated.
        ConfigError: a numpy engine asked for what it cannot do (beam search, latents).
    """
    from aurl.engines import as_engine

    engine = as_engine(model)
    vocab = engine.vocab
    if engine.numpy and (config.beam > 1 or latents is not None):
        from aurl.errors import ConfigError

        what = "beam search (--beam)" if config.beam > 1 else "VAE latents"
        raise ConfigError(f"the onnx engine cannot do {what}: use --engine torch")
    if steer is not None and config.beam > 1:
        raise ConfigError("steered sampling runs without --beam")
    arrays = _arrays(engine)
    masker = masker or make_masker(vocab, config, None if engine.numpy else engine.device)
    prefix = _prefix(primer, num_samples, arrays, vocab.size)
    bad = arrays.first_violation(masker.grammar, prefix)
    if bad is not None:
        row, col = bad
        raise ConstraintError(
            f"primer row {row} breaks the grammar at token {col} "
            f"({vocab.names()[int(prefix[row, col])]}): encode primers with the tokenizer, "
            f"with data.polyphony_cap <= generation.polyphony_cap ({config.polyphony_cap})"
        )
    if latents is not None and latents.batch_size != num_samples:
        raise ConstraintError(
            f"{latents.batch_size} latents for {num_samples} samples: give one row per sample"
        )
    window = min(config.window, engine.config.max_seq_len)
    overlap = min(config.window_overlap, window // 2)
    if config.beam > 1:
        ids = _beam_search(engine, masker, prefix, latents, config, window, overlap, progress)
    else:
        ids = _sample(
            engine, masker, prefix, latents, config, window, overlap, progress, arrays, steer
        )
    out = []
    for row in arrays.rows(ids):
        end = np.flatnonzero(row == END)
        if len(end) == 0:  # the masks force END within END_SLACK tokens: a bug if not
            raise RuntimeError(f"generation did not end within {config.max_tokens} tokens")
        out.append(Piece(ids=row[: end[0] + 1], primer_length=prefix.shape[1]))
    return out


def _sample(
    engine: Any,
    masker: LogitMasker,
    prefix: Any,
    latents: Any,
    config: GenerationConfig,
    window: int,
    overlap: int,
    progress: Progress,
    arrays: Any,
    steer: Steer | None = None,
) -> Any:
    """Ancestral sampling (or greedy): (B, P + generated) ids, PAD after END; ``steer`` as in
    :func:`generate`."""
    B, P = prefix.shape
    options = sampling_options(config)
    generator = arrays.generator(config.seed)
    steps = config.max_tokens + END_SLACK
    buffer = arrays.full(B, P + min(steps, CHUNK))
    buffer[:, :P] = prefix
    state = masker.prime(masker.initial_state(B), prefix)
    ctx = _Context(
        engine, latents, B, window, overlap, meter_tensor(engine, config, B),
        style_tensor(engine, config, B),
    )  # fmt: skip
    logits = ctx.start(buffer, P)
    seen = None
    if options.repetition_penalty != 1.0:
        seen = arrays.seen(B, masker.vocab.size)
    apply = masker.apply_numpy if engine.numpy else masker.apply
    n = P
    for _ in progress(range(steps), total=steps, desc="generate"):
        ids = arrays.draw(apply(arrays.float(logits), state), options, seen, generator)  # (B,)
        buffer = _room(buffer, n, arrays)
        buffer[:, n] = ids
        n += 1
        if ctx.full() and all((masker.finished(state) | (ids == END)).tolist()):
            break  # every row has ended: no window to restart for logits nobody reads
        logits = ctx.next(buffer, n)  # one step past the last END at most: cheaper than a
        state = masker.advance(state, ids, ctx.grammar_state())  # second grammar copy
        if seen is not None:
            arrays.mark(seen, ids)
        if masker.all_finished(state):
            break
        src = steer(buffer, n, state) if steer is not None else None
        if src is not None:  # resample: each row goes on from the row it is given
            buffer, logits = buffer[src], logits[src]
            state = arrays.take(state, src)
            ctx.reorder(src)
            if seen is not None:
                seen = seen[src]
    return buffer[:, :n]


def _beam_search(
    engine: Any,
    masker: LogitMasker,
    prefix: torch.Tensor,
    latents: Any,
    config: GenerationConfig,
    window: int,
    overlap: int,
    progress: Progress,
) -> torch.Tensor:
    """Beam search over the masked distribution, ranked by length-normalised log-probability
    (sum of log p over generated tokens / their count). Returns the best beam of each row."""
    import torch

    from aurl.engines import as_engine

    engine = as_engine(engine)  # a model passed directly
    B, P = prefix.shape
    K, V = config.beam, masker.vocab.size
    device = prefix.device
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) row of each beam
    if latents is not None:
        latents = index_state(latents, rows)
    steps = config.max_tokens + END_SLACK
    buffer = torch.full((B * K, P + min(steps, CHUNK)), PAD, dtype=torch.long, device=device)
    buffer[:, :P] = prefix[rows]
    state = masker.prime(masker.initial_state(B * K), buffer[:, :P])
    ctx = _Context(
        engine, latents, B * K, window, overlap, meter_tensor(engine, config, B * K),
        style_tensor(engine, config, B * K),
    )  # fmt: skip
    logits = ctx.start(buffer, P)
    scores = torch.zeros(B, K, dtype=torch.float64, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one so they do not duplicate
    lengths = torch.zeros(B, K, dtype=torch.float64, device=device)
    base = (torch.arange(B, device=device) * K)[:, None]  # (B, 1) first beam of each row
    n = P
    for _ in progress(range(steps), total=steps, desc="beam search"):
        masked = masker.apply(logits.float(), state)
        logp = torch.log_softmax(masked.double(), dim=-1).view(B, K, V)  # finished: PAD = 0
        live = ~masker.finished(state).view(B, K)
        new_len = lengths + live.double()
        total = scores[..., None] + logp  # (B, K, V)
        ranked = total / new_len.clamp(min=1.0)[..., None]
        top = ranked.view(B, K * V).topk(K, dim=-1).indices  # (B, K)
        beam, token = top // V, top % V
        new_scores = total.view(B, K * V).gather(1, top)
        # Fewer valid continuations than beams: dead beams copy the best one, score -inf.
        dead = torch.isneginf(new_scores)
        beam = torch.where(dead, beam[:, :1], beam)
        token = torch.where(dead, token[:, :1], token)
        src = (base + beam).view(-1)  # (B*K,)
        scores, lengths = new_scores, new_len.gather(1, beam)
        buffer = buffer[src]
        state = index_state(state, src)
        ctx.reorder(src)
        ids = token.reshape(-1)
        buffer = _room(buffer, n, _TorchArrays(device))
        buffer[:, n] = ids
        n += 1
        logits = ctx.next(buffer, n)
        state = masker.advance(state, ids, ctx.grammar_state())
        if masker.all_finished(state):
            break
    best = (scores / lengths.clamp(min=1.0)).argmax(dim=-1)  # (B,)
    return buffer[(base[:, 0] + best), :n]
