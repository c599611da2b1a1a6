"""Continuous batching: many independent requests decode together on one model's KV cache.

:func:`aurl.generation.generate.generate` decodes a batch whose rows all start together and
share one set of options. A server gets requests one by one, each with its own options, seed
and length. :class:`ContinuousBatcher` keeps one batch of *rows* (one per request) and advances
all of them by one token per :meth:`ContinuousBatcher.step`: the model runs once for the whole
batch, while each row keeps its own grammar/constraint masker (:func:`make_masker`), sampling
options and random generator, exactly as ``generate`` would for that request alone. A row that
ends (END) or is cancelled leaves the batch at once, freeing its slot; a request that arrives
while others are decoding joins at the next step (iteration-level scheduling, as in Orca, Yu et
al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative Models").

How a row joins a running batch: the batch shares one cache position ``pos``. A newcomer's
prefix is run on its own and placed so that it ends at ``pos`` (positions before it are masked
out of its attention with the model's per-row key mask). Rotary positions make attention depend
only on distances, so the row sees what it would see from position 0. Models where absolute
positions matter (VAE latents indexed by position, hierarchical attention's global tokens) only
take newcomers when the batch is empty. When ``pos`` reaches the window, every row restarts on
its last ``window_overlap`` tokens (``generate`` slides the same way, row by row).

One request alone decodes exactly the ids ``generate(model, config)`` gives with the same seed
(the tests hold that); rows sharing a batch follow the same rules with per-row seeds.

:class:`NoteStream` turns a row's tokens into notes (seconds) as they complete, matching the
tokenizer's decoder, for streaming to a client.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aurl.config import GenerationConfig
from aurl.data.vocab import END, PAD, START, Kind, Vocab
from aurl.errors import ConstraintError
from aurl.generation.constraints import NEG_INF, LogitMasker, MaskState, index_state
from aurl.generation.generate import make_masker, sampling_options
from aurl.generation.sampling import SamplingOptions, filter_logits, sample
from aurl.models.prepack import PrepackedLinears
from aurl.models.prepack import available as prepacked_available

COMPACT_MIN = 64  # cache positions no live row reads, before the batch's cache moves down
_PLAIN = contextlib.nullcontext()


@dataclass(eq=False)
class Row:
    """One request in the batch. ``ids`` grows by one token per step (START .. END)."""

    config: GenerationConfig
    masker: LogitMasker
    options: SamplingOptions
    generator: torch.Generator
    ids: list[int]
    primer_length: int
    mask_state: MaskState
    latents: Any = None
    style: torch.Tensor | None = None  # (1,) style id of a model with styles (-1: none)
    seen: torch.Tensor | None = None  # (1, V) ids generated so far (repetition penalty)
    offset: int = 0  # cache position of the row's first cached token
    finished: bool = False  # emitted END
    cancelled: bool = False
    warming: bool = False  # joined with its START not yet run: no logits to sample from yet
    tag: Any = None  # the caller's handle (e.g. the server's job)

    @property
    def generated(self) -> int:
        return len(self.ids) - self.primer_length

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled


def cat_state(states: list[Any]) -> Any:
    """Concatenate batch-first states along the batch (the inverse of :func:`index_state`).

    Tensors are concatenated on dim 0 (0-d tensors and plain values are taken from the first);
    dataclasses, dicts, lists and tuples field by field; all-None stays None.
    """
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0) if first.dim() > 0 else first
    if first is None:
        return None
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        changes = {
            f.name: cat_state([getattr(s, f.name) for s in states])
            for f in dataclasses.fields(first)
        }
        return dataclasses.replace(first, **changes)
    if isinstance(first, dict):
        return {k: cat_state([s[k] for s in states]) for k in first}
    if isinstance(first, (list, tuple)):
        items = [cat_state(list(parts)) for parts in zip(*states)]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    return first


def _primed(masker: LogitMasker, prefix: torch.Tensor) -> MaskState:
    """The masker's state after ``prefix`` (1, P). START alone (most requests) takes one
    grammar step instead of the vectorised scan of a primer (a few ms a request, on the decode
    thread); START is always allowed first, and a primer does not count as generated tokens."""
    state = masker.initial_state(1)
    if prefix.shape[1] > 1:
        return masker.prime(state, prefix)
    return dataclasses.replace(state, grammar=masker.grammar.advance(state.grammar, prefix[0]))


def _without_cache(state: Any) -> Any:
    """A copy of a decode state without its KV cache (the batcher moves that itself)."""
    return dataclasses.replace(state, k=[], v=[])


class ContinuousBatcher:
    """Rows decoding together; see the module docstring.

    Args:
        model: A ``MusicTransformerVAEGAN`` (``init_state`` / ``step``), in eval mode.
        slots: Most rows decoding at once; more wait in :attr:`pending`.
        window: Cache positions (default ``GenerationConfig.window``, at most the context).
        overlap: Tokens a row keeps when the window slides (default ``window_overlap``).
        fold_starts: Rows without a primer joining a running batch skip their own one-row
            model call: their START runs in the step's batched call and they draw their first
            token at the next step (one step later than otherwise). What a server wants: a
            one-row call costs nearly as much as a whole batch's step.
        prepack: On a CPU model with MKL, run the batched decode call's Linear layers on
            weights packed once (:mod:`aurl.models.prepack`: the same results bit for bit, or
            the plain call; 6-9% less CPU for an 8-row step of the shipped model). Off: plain.

    Not thread-safe: one thread calls :meth:`add`, :meth:`cancel` and :meth:`step`.
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int = 16,
        window: int | None = None,
        overlap: int | None = None,
        fold_starts: bool = False,
        prepack: bool = True,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots {slots}: give 1 or more")
        defaults = GenerationConfig()
        self.model, self.vocab, self.slots = model, model.vocab, slots
        self.fold_starts = fold_starts
        self.device = model.embed.weight.device
        self.window = min(window or defaults.window, model.config.max_seq_len)
        ov = defaults.window_overlap if overlap is None else overlap
        self.overlap = max(1, min(ov, self.window // 2))
        # rows may join at any position only where attention depends on distances alone
        self.joins_anywhere = model.config.mode == "transformer" and model.n_global == 0
        # ... and the cache may move down (_compact) where rotary is the only position
        self.compacts = self.joins_anywhere and model.summary_len == 0 and model.window is None
        self.rows: list[Row] = []
        self.pending: list[Row] = []
        self.state: Any = None  # the model's DecodeState for self.rows
        self.logits: torch.Tensor | None = None  # (B, V) after each row's last token
        self._pool: list[torch.Tensor] = []  # KV cache buffers of ``slots`` rows (k..., v...)
        self._linears: PrepackedLinears | None = None  # for the batched decode call
        if prepack and slots > 1 and self.device.type == "cpu" and prepacked_available():
            self._linears = PrepackedLinears.of(model)  # shared by the model's batchers

    # -- requests ------------------------------------------------------------------------------

    def add(
        self,
        config: GenerationConfig,
        *,
        primer: np.ndarray | None = None,
        masker: LogitMasker | None = None,
        tag: Any = None,
    ) -> Row:
        """Queue one request; it joins the batch at the next :meth:`step` with a free slot.

        Raises:
            ConstraintError: bad constraints, beam search, or a primer that breaks the grammar.
            ConfigError: ``config.style`` is not one of the model's styles.
        """
        if config.beam > 1:
            raise ConstraintError("beam search does not batch with other requests: use beam 1")
        masker = masker or make_masker(self.vocab, config, self.masker_device)
        prefix = np.asarray([START] if primer is None else primer, dtype=np.int64)
        if prefix.ndim != 1 or len(prefix) == 0 or prefix[0] != START:
            raise ConstraintError("a primer must start with START (use load_primer)")
        prefix_t = torch.as_tensor(prefix, device=self.device)[None]
        bad = masker.grammar.violations(prefix_t) if len(prefix) > 1 else None
        if bad is not None and bool(bad.any()):
            col = int(bad.nonzero()[0][1])
            raise ConstraintError(
                f"primer breaks the grammar at token {col} "
                f"({self.vocab.names()[int(prefix[col])]}): encode primers with the tokenizer"
            )
        options = sampling_options(config)
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        latents = None
        if self.model.config.mode in ("vae", "vae_gan"):
            g = torch.Generator(device=self.device).manual_seed(config.seed)
            latents = self.model.sample_prior(1, generator=g)
        style = self._style(config.style)
        seen = None
        if options.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.vocab.size, dtype=torch.bool, device=self.device)
        row = Row(
            config=config, masker=masker, options=options, generator=generator,
            ids=prefix.tolist(), primer_length=len(prefix),
            mask_state=_primed(masker, prefix_t), latents=latents, style=style, seen=seen,
            tag=tag,
        )  # fmt: skip
        self.pending.append(row)
        return row

    @property
    def masker_device(self) -> Any:
        """Where rows' maskers should live: None (numpy) for a model on the CPU, whose rows
        mask and advance one at a time between model steps, where a numpy call costs a
        fraction of a torch op; the model's device otherwise. The masks are the same
        (``tests/engines/test_numpy_paths.py``), so are the ids."""
        return None if self.device.type == "cpu" else self.device

    def _style(self, name: str) -> torch.Tensor | None:
        """The (1,) style id of a request (-1: none) on a model with styles, so that rows with
        and without a style share one batch; None on a model without (where a name raises)."""
        from aurl.models.style import style_id

        styles = tuple(getattr(self.model.config, "styles", ()))
        sid = style_id(styles, name)  # raises ConfigError for a name the model lacks
        if not styles:
            return None
        return torch.full((1,), sid, dtype=torch.long, device=self.device)

    def cancel(self, row: Row) -> None:
        """Stop ``row``: it leaves the batch (or the queue) at the next :meth:`step`."""
        row.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    # -- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Drop cancelled rows, admit waiting ones, and give every row one more token.

        Returns:
            The rows that got a token (each ``row.ids`` one longer); those that emitted END have
            ``finished`` set and have left the batch.
        """
        self.pending = [r for r in self.pending if not r.cancelled]
        self._keep([not r.cancelled for r in self.rows])
        self._admit()
        if not self.rows:
            return []
        tokens = self._sample_rows()
        stepped = [r for r in self.rows if not r.warming]
        live = [not r.finished for r in self.rows]
        ids = torch.tensor([t for t, k in zip(tokens, live) if k], device=self.device)[:, None]
        self._keep(live)
        for row in self.rows:  # a newcomer's START runs in this step with the others
            row.warming = False
        if self.rows:
            self._compact()
            if self.state.pos >= self.window:
                self._slide()
            else:
                mask = None
                if self.state.key_mask is not None:  # new positions are the rows' own tokens
                    mask = torch.ones(len(self.rows), 1, dtype=torch.bool, device=self.device)
                packed = self._linears.rows(len(self.rows)) if self._linears else _PLAIN
                with packed:
                    self.logits = self.model.step(ids, self.state, attention_mask=mask)[:, -1]
        return stepped

    def _sample_rows(self) -> list[int]:
        """One token for every row, from :attr:`logits`, with each row's own masks, filters and
        generator; the per-row rules are ``generate``'s, the work batched across rows.

        Each row's grammar and constraints give its keep mask and soft bias (the masker's own
        :meth:`~aurl.generation.constraints.LogitMasker.constrain`); the masked logits of all
        rows are formed in one array, rows with equal sampling options are filtered together,
        and every row draws with its own generator. ``torch.multinomial(p, 1, generator=g)``
        is ``argmax(p / E)`` with ``E`` one Exponential(1) draw per id from ``g`` (PyTorch's
        CPU kernel does exactly that), so each row draws its ``E`` from its generator and one
        division and argmax serve the batch: the ids are those of row-by-row sampling (the
        tests hold them equal to ``generate``)."""
        ids = [row.ids[-1] for row in self.rows]  # warming rows feed their START
        sampling = [i for i, row in enumerate(self.rows) if not row.warming]
        if len(sampling) < len(self.rows):
            if not sampling:
                return ids
            index = torch.tensor(sampling, device=self.device)
            rows, x = [self.rows[i] for i in sampling], self.logits.index_select(0, index)
        else:
            rows, x = self.rows, self.logits
        B, x = len(rows), x.float()
        if x.device.type != "cpu":  # the masker's torch path, row by row
            for j, (i, row) in enumerate(zip(sampling, rows)):
                ids[i] = self._sample_one(j, row, x)
            return ids
        xs = x.numpy()
        masked = np.empty_like(xs)
        for i, row in enumerate(rows):
            allowed = np.asarray(row.masker.grammar.allowed(row.mask_state.grammar))
            keep, soft = row.masker.constrain(row.mask_state, allowed)
            xi = xs[i : i + 1] if soft is None else xs[i : i + 1] + soft
            masked[i : i + 1] = np.where(keep, xi, NEG_INF)
        masked_t = torch.from_numpy(masked)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row.options, row.seen is not None), []).append(i)
        drawn = [0] * B
        for (options, has_seen), members in groups.items():
            index = torch.tensor(members)
            part = masked_t if len(members) == B else masked_t.index_select(0, index)
            seen = torch.cat([rows[i].seen for i in members]) if has_seen else None
            filtered = filter_logits(part, options, seen)
            if options.greedy:
                chosen = filtered.argmax(dim=-1)
            else:
                probs = torch.softmax(filtered.float(), dim=-1)
                draws = torch.empty_like(probs)
                for j, i in enumerate(members):
                    draws[j].exponential_(1, generator=rows[i].generator)
                chosen = (probs / draws).argmax(dim=-1)
            for i, token in zip(members, chosen.tolist()):
                drawn[i] = token
        for i, row, token in zip(sampling, rows, drawn):
            self._advance_row(row, token)
            ids[i] = token
        return ids

    def _sample_one(self, i: int, row: Row, x: torch.Tensor) -> int:
        masked = row.masker.apply(x[i : i + 1], row.mask_state)
        tid = sample(filter_logits(masked, row.options, row.seen), row.options, row.generator)
        token = int(tid[0])
        self._advance_row(row, token)
        return token

    def _advance_row(self, row: Row, token: int) -> None:
        if row.masker.numpy:
            tid = np.array([token], dtype=np.int64)
        else:
            tid = torch.tensor([token], device=self.device)
        row.mask_state = row.masker.advance(row.mask_state, tid)
        row.ids.append(token)
        if row.seen is not None:
            row.seen[0, token] = True
        row.finished = token == END or bool(row.mask_state.grammar.ended[0])

    def _keep(self, keep: list[bool]) -> None:
        """Keep only the rows where ``keep`` is True (their cache rows and logits too)."""
        if all(keep):
            return
        index = [i for i, k in enumerate(keep) if k]
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.state, self.logits = None, None
            return
        for j, i in enumerate(index):  # the rows after a gap move up, in the slot buffers
            if i != j:
                for buf in self._pool:
                    buf[j].copy_(buf[i])
        rows = torch.tensor(index, device=self.device)
        self.state = self._with_pool(index_state(_without_cache(self.state), rows), len(index))
        self.logits = self.logits.index_select(0, rows)

    # The KV cache lives in buffers of ``slots`` rows, allocated once; the state's k and v are
    # views of their first B rows. Rows join and leave all the time, and allocating a cache per
    # newcomer and copying every row's cache per join or leave (cat, index_select: tens of ms at
    # 8 rows) would cost several decode steps; here a newcomer's prefix is run straight into its
    # slot, and a leaving row moves only the rows after it.

    def _slots_ready(self) -> None:
        if not self._pool:  # the model's own cache layout, ``slots`` rows deep
            probe = self.model.init_state(1, device=self.device, capacity=self.window)
            self._pool = [c.new_zeros((self.slots, *c.shape[1:])) for c in probe.k + probe.v]

    def _slot_cache(self, state: Any, slot: int) -> None:
        """Give ``state`` (one row) the zeroed cache row ``slot`` of the buffers."""
        n = len(self._pool) // 2
        views = [buf[slot : slot + 1] for buf in self._pool]
        for view in views:
            view.zero_()
        state.k, state.v = views[:n], views[n:]

    def _with_pool(self, state: Any, rows: int) -> Any:
        n = len(self._pool) // 2
        views = [buf[:rows] for buf in self._pool]
        return dataclasses.replace(state, k=views[:n], v=views[n:])

    def _prefix_keep(self, row: Row) -> int:
        """Tokens of a newcomer's prefix to run (``generate``'s rule for the first window)."""
        n = len(row.ids)
        return n if n <= self.window - 1 else self.overlap

    def _admit(self) -> None:
        free = self.slots - len(self.rows)
        if free <= 0 or not self.pending:
            return
        if self.rows and not self.joins_anywhere:
            return  # wait for the batch to empty
        take = self.pending[:free]
        if not self.joins_anywhere:  # rows of one batch start together, at one length
            k0 = self._prefix_keep(take[0])
            take = [r for r in take if self._prefix_keep(r) == k0]
        self.pending = [r for r in self.pending if r not in take]
        keeps = [self._prefix_keep(r) for r in take]
        need = max(keeps)
        if not self.rows:
            rest, self.logits = self._build(take, keeps, need)
            self.state, self.rows = self._with_pool(rest, len(take)), take
        elif need == 1 and self.fold_starts:  # no primers: STARTs run in this step's model call
            self._concat(*self._fresh(take), take)
        elif need <= self.state.pos:
            rest, logits = self._build(take, keeps, self.state.pos, first=len(self.rows))
            self._concat(rest, logits, take)
        else:  # a long primer: rebuild the running rows to end at ``need`` too
            cached = [self.state.pos - r.offset for r in self.rows]
            rest, self.logits = self._build(self.rows + take, cached + keeps, need)
            self.rows = self.rows + take
            self.state = self._with_pool(rest, len(self.rows))

    def _fresh(self, rows: list[Row]) -> tuple[Any, torch.Tensor]:
        """Rows holding only START, joining a running batch without a model call of their own:
        empty cache rows placed at the batch's position; :meth:`step` feeds their START with
        the other rows' tokens (which saves a one-row model call per request) and they sample
        from the next step on. Returns their state without cache, and placeholder logits."""
        pos, first = self.state.pos, len(self.rows)
        states = []
        for j, row in enumerate(rows):
            state = self.model.init_state(1, device=self.device, latents=row.latents,
                                          capacity=1, style=row.style)  # fmt: skip
            self._slot_cache(state, first + j)
            state.pos = pos
            state.key_mask = torch.zeros(1, self.window, dtype=torch.bool, device=self.device)
            row.offset, row.warming = pos, True
            states.append(_without_cache(state))
        rest = states[0] if len(states) == 1 else cat_state(states)
        return rest, self.logits.new_zeros(len(rows), self.logits.shape[1])

    def _concat(self, rest: Any, logits: torch.Tensor, rows: list[Row]) -> None:
        """Join ``rows`` (their caches already in the slots after the running rows; ``rest``
        their state without cache) to the batch."""
        for s, count in ((self.state, len(self.rows)), (rest, len(rows))):
            if s.key_mask is None:  # every cached position of such rows is their own token
                s.key_mask = torch.ones(count, self.window, dtype=torch.bool, device=self.device)
        both = cat_state([_without_cache(self.state), rest])
        self.state = self._with_pool(both, len(self.rows) + len(rows))
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

    def _compact(self) -> None:
        """Drop the cache positions no live row reads: when every row joined after position
        ``m`` >= :data:`COMPACT_MIN` (the rows before them have left), the rows' cached keys
        and values move ``m`` places down and the batch's position with them.

        Rows join at the batch's position and leave when done, so under steady traffic the
        position only grows: every step's attention would read ``B x pos`` cached positions
        (mostly masked out, as old as the server's busy spell) and the batch would restart
        every row at the window's end (:meth:`_slide`, a prefix run per row), although each
        row holds only its own few hundred tokens. Rotary attention depends on distances
        alone, so the keys, rotated at their old positions, are rotated back by ``m`` (values
        carry no position); what each row attends to is unchanged, up to float rounding."""
        if not self.compacts or self.state.key_mask is None:
            return
        m = min(r.offset for r in self.rows)
        if m < COMPACT_MIN:
            return
        from aurl.models.layers import apply_rotary

        B, pos = len(self.rows), self.state.pos
        cos, sin = self.model.rotary.tables(m, 1)  # (1, 1, 1, hd): position m's rotation
        n = len(self._pool) // 2
        for i, buf in enumerate(self._pool):  # k of each layer, then v: (slots, H, cap, hd)
            live = buf[:B, :, m:pos]
            # rotation by -m: cos(-a) = cos(a), the signed sin flips
            buf[:B, :, : pos - m] = apply_rotary(live, cos, -sin) if i < n else live.clone()
        mask = self.state.key_mask  # (B, window)
        mask[:, : pos - m] = mask[:, m:pos].clone()
        mask[:, pos - m :] = False
        self.state.pos = pos - m
        for row in self.rows:
            row.offset -= m

    def _slide(self) -> None:
        """The window is full: every row restarts on its last ``overlap`` tokens."""
        keeps = [min(len(r.ids), self.overlap) for r in self.rows]
        rest, self.logits = self._build(self.rows, keeps, max(keeps))
        self.state = self._with_pool(rest, len(self.rows))

    def _build(
        self, rows: list[Row], keeps: list[int], end: int, *, first: int = 0
    ) -> tuple[Any, torch.Tensor]:
        """Run each row's prefix into cache slot ``first + i``: row i holds its last
        ``keeps[i]`` ids at positions ``end - keeps[i] .. end - 1`` (the ids before them
        carried as history). Returns the rows' decode state without its cache (the caller
        takes views of the slots) and the logits (B, V) after each row's last id. Each row runs
        alone, so no padding enters its state; its slot is written in place (a rebuild or a
        slide starts from the rows' ids, not from what their slots held)."""
        self._slots_ready()
        states, logits = [], []
        any_offset = any(k < end for k in keeps)
        for j, (row, k) in enumerate(zip(rows, keeps)):
            ids = torch.as_tensor(row.ids, device=self.device)[None]  # (1, L)
            history = ids[:, : ids.shape[1] - k]
            state = self.model.init_state(
                1, device=self.device, latents=row.latents, capacity=1, style=row.style,
                history=history if history.shape[1] > 0 else None,
            )  # fmt: skip
            self._slot_cache(state, first + j)
            mask = None
            if any_offset:
                state.pos = end - k
                state.key_mask = torch.zeros(1, self.window, dtype=torch.bool, device=self.device)
                mask = torch.ones(1, k, dtype=torch.bool, device=self.device)
            logits.append(self.model.step(ids[:, -k:], state, attention_mask=mask)[:, -1])
            row.offset, row.warming = end - k, False
            states.append(_without_cache(state))
        if len(states) == 1:
            return states[0], logits[0]
        return cat_state(states), torch.cat(logits)


# --------------------------------------------------------------------------------------------
# Notes as they complete
# --------------------------------------------------------------------------------------------


@dataclass
class NoteStream:
    """Feed a row's ids one by one; get each note (seconds) once it is complete.

    Follows the decoder's rules (:meth:`aurl.data.tokenizer.Tokenizer.decode_events`): a
    NOTE_OFF closes its pitch in the current family, a NOTE_ON on a sounding pitch closes the
    earlier note (dropped if struck at the same step), END closes every note, every note lasts
    at least one step; time flows with TIME_SHIFTs at the tempo in force (120 BPM before any
    TEMPO; ``seconds`` vocabularies use the fixed step). So the notes streamed for a piece are
    the notes :meth:`Tokenizer.decode_to_notes` gives for its ids, in completion order.
    """

    vocab: Vocab
    step: int = 0
    seconds: float = 0.0
    bpm: float = 120.0
    family: int = 0
    velocity_bin: int = -1
    open: dict[tuple[int, int], tuple[int, float, int]] = field(default_factory=dict)
    ended: bool = False

    def __post_init__(self) -> None:
        v = self.vocab
        self._kind = v.kind.astype(np.int64).tolist()
        self._value = v.value.astype(np.int64).tolist()
        self._bin_bpm = [float(x) for x in v.bin_tempo]
        self._bin_velocity = [int(x) for x in v.bin_velocity]
        if self.velocity_bin < 0:
            self.velocity_bin = int(v.velocity_bin(64))

    def _sps(self) -> float:
        return self.vocab.seconds_per_step(self.bpm)

    def _close(self, key: tuple[int, int], out: list[dict]) -> None:
        on_step, start, vbin = self.open.pop(key)
        end = self.seconds if self.step > on_step else start + self._sps()
        out.append(
            {"pitch": key[1], "start": start, "end": end, "velocity": self._bin_velocity[vbin]}
        )

    def feed(self, token: int) -> list[dict]:
        """The notes ``token`` completes (``pitch``, ``start``, ``end`` in s, ``velocity``)."""
        out: list[dict] = []
        if self.ended or not 0 <= token < len(self._kind):
            return out
        kind, value = self._kind[token], self._value[token]
        if kind == Kind.TIME_SHIFT:
            self.step += value
            self.seconds += value * self._sps()
        elif kind == Kind.TEMPO:
            self.bpm = self._bin_bpm[value]
        elif kind == Kind.INSTRUMENT:
            self.family = value
        elif kind == Kind.VELOCITY:
            self.velocity_bin = value
        elif kind == Kind.NOTE_ON:
            key = (self.family, value)
            if key in self.open:
                if self.open[key][0] == self.step:  # re-struck at once: the first is nothing
                    del self.open[key]
                else:
                    self._close(key, out)
            self.open[key] = (self.step, self.seconds, self.velocity_bin)
        elif kind == Kind.NOTE_OFF:
            key = (self.family, value)
            if key in self.open:
                self._close(key, out)
        elif token == END:
            for key in sorted(self.open):
                self._close(key, out)
            self.ended = True
        elif token == PAD:
            pass
        return out


__all__ = ["ContinuousBatcher", "NoteStream", "Row", "cat_state"]
