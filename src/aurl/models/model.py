"""MusicTransformerVAEGAN: a decoder-only Transformer over event tokens, optionally a VAE and a GAN.

Reads top to bottom like nanoGPT's ``model.py``: small modules (rotary positions, attention,
feed-forward, block, musical time), then the decode state, then the top model. The VAE encoder
lives in :mod:`aurl.models.vae`, the discriminator in :mod:`aurl.models.discriminator`, the
losses in :mod:`aurl.models.losses`, weights I/O in :mod:`aurl.models.pretrained`.

Shapes: ``B`` batch, ``T`` tokens, ``D`` model width, ``H`` heads, ``hd`` head width, ``V`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aurl.config import Config, ModelConfig, VocabConfig
from aurl.data.grammar import Grammar, GrammarState, SequenceScan
from aurl.data.vocab import ANTICIPATION_BASE, FIM_SENTINELS, PAD, UNK, Kind, Vocab
from aurl.errors import ConfigError
from aurl.models.discriminator import MultiScaleDiscriminator
from aurl.models.layers import Packing, Rotary, Sparse, attention_mask_for, make_blocks
from aurl.models.style import style_embedding
from aurl.models.vae import (
    LatentConditioner,
    LatentEncoder,
    Latents,
    Posterior,
    hide_tokens,
    token_drop_mask,
)

if TYPE_CHECKING:
    from pathlib import Path

# --------------------------------------------------------------------------------------------
# Musical time (the other small modules live in aurl.models.layers)
# --------------------------------------------------------------------------------------------

PHASE_BINS = 32  # position inside the beat, in 1/32 beat
BEATS_PER_BAR = 4  # models without meter conditioning (``model.meter`` off) count in 4/4
MAX_BEATS = 12  # with meter conditioning: bars of up to 12 quarter notes (12/8, 3/1)


def bar_ticks(meter: Tensor, ticks_per_beat: int) -> Tensor:
    """Ticks per bar of each meter ``(numerator, denominator)`` (B, 2), counting in quarter-note
    beats of ``ticks_per_beat`` ticks: 3/4 -> 3 beats, 6/8 -> 3, 3/2 -> 6; at most
    :data:`MAX_BEATS` beats. (B,) long."""
    num, den = meter[:, 0].long(), meter[:, 1].long().clamp(min=1)
    return (ticks_per_beat * 4 * num // den).clamp(1, MAX_BEATS * ticks_per_beat)


class MusicalTime(nn.Module):
    """Beat-aware position: where in the beat and the bar each token falls, and the tempo.

    Derived from the ids alone: cumulative TIME_SHIFT steps (converted to 1/32-beat ticks
    through the current TEMPO in ``seconds`` mode) -> (phase in beat, beat in bar), plus the
    current tempo bin. The time of token t includes token t's own shift: it is the time at
    which token t+1, the one predicted from position t, happens. Incremental through
    ``(ticks, tempo)`` per sequence, kept in the decode state.

    With ``meter`` the bar follows each sequence's time signature (conditioning outside the
    vocabulary: the file's, from the cache index, or ``aurl generate --meter``), and an
    embedding of the bar's length in beats is added; without it (models trained before meter
    conditioning) every bar has 4 beats and a meter passed in is ignored.
    """

    def __init__(self, vocab: Vocab, d_model: int, *, meter: bool = False) -> None:
        super().__init__()
        c = vocab.config
        kind = torch.as_tensor(vocab.kind, dtype=torch.long)
        value = torch.as_tensor(vocab.value, dtype=torch.long)
        shift = torch.where(kind == Kind.TIME_SHIFT, value, 0)  # (V,) steps of each id
        tempo = torch.where(kind == Kind.TEMPO, value, -1)  # (V,) tempo bin, -1: not a tempo
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("tempo_of", tempo, persistent=False)
        # ticks[tempo + 1, steps]: 1/32-beat ticks a shift of ``steps`` lasts at that tempo
        # (row 0: no tempo seen yet, read as 120 BPM). Integer, so cumulative sums are exact.
        steps = torch.arange(c.max_shift_steps + 1, dtype=torch.float64)
        if c.time_unit == "beat":
            self.ticks_per_beat = c.steps_per_beat
            table = steps.expand(c.tempo_bins + 1, -1).round()
        else:
            self.ticks_per_beat = PHASE_BINS
            bpm = torch.cat([torch.tensor([120.0]), torch.as_tensor(vocab.bin_tempo)])
            table = (steps[None, :] * c.step_seconds * bpm[:, None] / 60.0 * PHASE_BINS).round()
        self.register_buffer("ticks", table.long(), persistent=False)
        self.phase = nn.Embedding(PHASE_BINS, d_model)
        self.beat = nn.Embedding(MAX_BEATS if meter else BEATS_PER_BAR, d_model)
        self.tempo = nn.Embedding(c.tempo_bins + 1, d_model)
        self.meter = nn.Embedding(MAX_BEATS + 1, d_model) if meter else None

    def _bar(self, meter: Tensor | None, B: int, device: torch.device) -> Tensor:
        """(B, 1) ticks per bar: the meter's with meter conditioning, else 4 beats."""
        r = self.ticks_per_beat
        if self.meter is None or meter is None:
            return torch.full((B, 1), BEATS_PER_BAR * r, dtype=torch.long, device=device)
        return bar_ticks(meter.to(device), r)[:, None]

    def _phase_beat(self, cum: Tensor, bar: Tensor) -> tuple[Tensor, Tensor]:
        r = self.ticks_per_beat
        return (cum % r) * PHASE_BINS // r, (cum % bar) // r

    def positions(
        self,
        ids: Tensor,
        ticks0: Tensor | None = None,
        tempo0: Tensor | None = None,
        meter: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``ids`` (B, T) -> (phase in beat 0..31, beat in bar, tempo bin or -1, ticks), each
        (B, T). ``ticks0``/``tempo0`` (B,) continue from an earlier call (a window's prefix);
        ``meter`` (B, 2) ``(numerator, denominator)``, default 4/4."""
        B, T = ids.shape
        bar = self._bar(meter, B, ids.device)  # (B, 1)
        if T == 1 and tempo0 is not None and ticks0 is not None:  # generation: fewer ops
            t = self.tempo_of[ids]  # (B, 1)
            tempo = torch.where(t >= 0, t, tempo0[:, None])
            cum = ticks0[:, None] + self.ticks[tempo + 1, self.shift[ids]]
            return (*self._phase_beat(cum, bar), tempo, cum)
        if tempo0 is None:
            tempo0 = torch.full((B,), -1, dtype=torch.long, device=ids.device)
        tempo_here = torch.cat([tempo0[:, None], self.tempo_of[ids]], dim=1)  # (B, 1+T)
        # the current tempo is the last TEMPO at or before t (column 0: the carried one)
        idx = torch.arange(T + 1, device=ids.device).expand_as(tempo_here)
        last = torch.where(tempo_here >= 0, idx, 0).cummax(dim=1).values
        tempo = tempo_here.gather(1, last)[:, 1:]  # (B, T)
        cum = self.ticks[tempo + 1, self.shift[ids]].cumsum(dim=1)  # (B, T)
        if ticks0 is not None:
            cum = cum + ticks0[:, None]
        return (*self._phase_beat(cum, bar), tempo, cum)

    def forward(
        self,
        ids: Tensor,
        ticks0: Tensor | None = None,
        tempo0: Tensor | None = None,
        meter: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``ids`` (B, T) -> (embedding (B, T, D), last ticks (B,), last tempo (B,))."""
        phase, beat, tempo, cum = self.positions(ids, ticks0, tempo0, meter)
        emb = self.phase(phase) + self.beat(beat) + self.tempo(tempo + 1)
        if self.meter is not None:
            r = self.ticks_per_beat
            beats = -(-self._bar(meter, ids.shape[0], ids.device) // r)  # (B, 1) ceil
            emb = emb + self.meter(beats)
        return emb, cum[:, -1], tempo[:, -1]


class GrammarFeatures(nn.Module):
    """What the grammar state knows, as an input embedding: which pitches sound, how long they
    have sounded (log1p of beats), and the current instrument family.

    The state comes from the one grammar implementation (:mod:`aurl.data.grammar`): vectorized
    over a whole sequence in :meth:`forward`, token by token in :meth:`advance`. Knowing which
    notes are open is what an event vocabulary with NOTE_OFFs needs to pair them cheaply.
    """

    def __init__(self, vocab: Vocab, d_model: int) -> None:
        super().__init__()
        c = vocab.config
        self.grammar = Grammar(vocab)
        # beats per TIME_SHIFT step (seconds mode: at 120 BPM, as the decoder writes)
        spb = c.steps_per_beat if c.time_unit == "beat" else 1.0 / (2.0 * c.step_seconds)
        self.beats_per_step = 1.0 / spb
        P = vocab.n_pitches
        self.sounding = nn.Linear(P, d_model, bias=False)
        self.age = nn.Linear(P, d_model, bias=False)
        self.family = nn.Embedding(c.num_instruments + 1, d_model)

    def embed(self, sounding: Tensor, age_steps: Tensor, family: Tensor) -> Tensor:
        """Sounding pitches (..., P) bool, their ages in steps (..., P), family (...) -> (..., D)."""
        age = torch.log1p(age_steps.to(self.family.weight.dtype) * self.beats_per_step)
        return self.sounding(sounding.to(age.dtype)) + self.age(age) + self.family(family)

    def initial(self, batch: int, device: torch.device) -> tuple[GrammarState, Tensor]:
        """(grammar state, onset step of each pitch (B, P)) before any token."""
        onset = torch.zeros(batch, self.sounding.in_features, dtype=torch.long, device=device)
        return self.grammar.initial_state(batch, device), onset

    # the grammar scan is data-dependent Python (families present, dict state): under
    # torch.compile it runs eagerly (see compile_model) and the rest compiles around it
    def features(
        self, ids: Tensor, carry: tuple[GrammarState, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``ids`` (B, T) -> (sounding (B, T, P) bool, steps each has sounded (B, T, P),
        family (B, T), onset step of each pitch at the end (B, P)), after each token.
        ``carry``: the state before ``ids`` (default: the initial state)."""
        B = ids.shape[0]
        carry = carry if carry is not None else self.initial(B, ids.device)
        return self.from_scan(ids, self.grammar.scan(ids, carry[0]), carry)

    def from_scan(
        self, ids: Tensor, scan: SequenceScan, carry: tuple[GrammarState, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`features` from a grammar scan of ``ids`` started at ``carry`` (the trainer's,
        which its grammar masks read too: one scan per batch)."""
        return self._from(ids, scan.features(), carry[0], carry[1])

    def carry_after(
        self, ids: Tensor, carry: tuple[GrammarState, Tensor]
    ) -> tuple[GrammarState, Tensor]:
        """The carry after ``ids`` (B, T), from one grammar scan and no embedding (a window's
        past: :meth:`MusicTransformerVAEGAN.start_after`)."""
        f, after = self.grammar.features_and_state(ids, carry[0])
        return after, self._from(ids, f, carry[0], carry[1])[3]

    def _from(
        self, ids: Tensor, f: Any, gstate: GrammarState, onset0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-position features from the grammar's ``f`` over ``ids`` started at ``gstate``."""
        T = ids.shape[1]
        sounding0 = gstate.sounding.any(1)  # (B, P) before the first token
        snd = f.sounding  # (B, T, P)
        before = torch.cat([sounding0[:, None], snd[:, :-1]], dim=1)
        # a pitch's onset: the time at the last position where it started sounding
        pos = torch.arange(T, device=ids.device)[None, :, None]
        idx = torch.where(snd & ~before, pos, -1).cummax(dim=1).values  # (B, T, P)
        time = f.time[..., None].expand_as(idx)
        onset = torch.where(idx >= 0, time.gather(1, idx.clamp(min=0)), onset0[:, None, :])
        return snd, torch.where(snd, time - onset, 0), f.family, onset[:, -1]

    def forward(
        self, ids: Tensor, carry: tuple[GrammarState, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``ids`` (B, T) -> (embedding (B, T, D), onset step of each pitch at the end (B, P))."""
        snd, age, family, onset = self.features(ids, carry)
        return self.embed(snd, age, family), onset

    def extend(
        self, ids: Tensor, carry: tuple[GrammarState, Tensor]
    ) -> tuple[Tensor, tuple[GrammarState, Tensor]]:
        """Several tokens per sequence, ``ids`` (B, T) -> (embedding (B, T, D), new carry)."""
        emb, onset = self(ids, carry)
        return emb, (self.grammar.state_after(ids, carry[0]), onset)

    def advance(
        self, ids: Tensor, carry: tuple[GrammarState, Tensor]
    ) -> tuple[Tensor, tuple[GrammarState, Tensor]]:
        """One token per sequence, ``ids`` (B, 1) -> (embedding (B, 1, D), new carry)."""
        gstate, onset = carry
        before = gstate.sounding.any(1)  # (B, P)
        gstate = self.grammar.advance(gstate, ids[:, 0])
        snd = gstate.sounding.any(1)
        time = gstate.time[:, None]  # (B, 1)
        onset = torch.where(snd & ~before, time, onset)
        age = torch.where(snd, time - onset, 0)
        emb = self.embed(snd[:, None], age[:, None], gstate.family[:, None])
        return emb, (gstate, onset)


# --------------------------------------------------------------------------------------------
# Outputs and decode state
# --------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """What :meth:`MusicTransformerVAEGAN.forward` returns."""

    logits: Tensor  # (B, T, V)
    hidden: Tensor  # (B, T, D), after the final norm
    posterior: Posterior | None = None  # VAE modes
    latents: Latents | None = None  # VAE modes: the latents the decoder was conditioned on


@dataclass
class WindowStart:
    """What the tokens before a window leave to its first position (:meth:`~MusicTransformerVAEGAN.start_after`):
    musical time and the grammar features' state. Passed to ``forward(start=...)`` so that a
    training window cut from the middle of a piece sees the features evaluation and generation
    see there (which carry the same state through ``init_state(history=...)``)."""

    ticks: Tensor | None = None  # (B,) musical time in ticks
    tempo: Tensor | None = None  # (B,) current tempo bin, -1 before the first TEMPO
    grammar: tuple[GrammarState, Tensor] | None = None  # grammar state, pitch onsets (B, P)
    # the window's own grammar features (sounding (B, T, P), age (B, T, P), family (B, T)),
    # when the caller computed them (the trainer: from the scan its masks read); None: forward
    # scans the window itself
    features: tuple[Tensor, Tensor, Tensor] | None = None


@dataclass
class DecodeState:
    """Everything incremental decoding carries between :meth:`step` calls."""

    k: list[Tensor]  # per layer (B, H, capacity, hd): preallocated KV cache
    v: list[Tensor]
    pos: int = 0  # tokens consumed so far
    ticks: Tensor | None = None  # (B,) musical time in ticks
    tempo: Tensor | None = None  # (B,) current tempo bin, -1 before the first TEMPO
    latents: Latents | None = None
    key_mask: Tensor | None = None  # (B, capacity) bool, only once step() got a mask
    grammar: tuple[GrammarState, Tensor] | None = None  # grammar state, pitch onsets (B, P)
    meter: Tensor | None = None  # (B, 2) time signature (numerator, denominator); None: 4/4
    style: Tensor | None = None  # (B,) style ids of a model with styles; None or -1: no style
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class MusicTransformerVAEGAN(nn.Module):
    """Autoregressive Transformer (``transformer``), Transformer-VAE (``vae``) or VAE-GAN
    (``vae_gan``) over the event vocabulary of ``vocab_config``.

    Args:
        model_config: sizes, attention variant, VAE and discriminator settings.
        vocab_config: the vocabulary the ids come from (its size and time tables).
        auto_balance: add learned uncertainty weights for the named losses
            (``loss.auto_balance``; see :mod:`aurl.models.losses`).
    """

    LOSS_TERMS = ("ce", "kl", "adv", "fm", "grammar")
    prefix_part = 2048  # start_after scans a window's past in parts of this many tokens

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        vocab_config: VocabConfig | None = None,
        *,
        auto_balance: bool = False,
    ) -> None:
        super().__init__()
        self.config = c = model_config or ModelConfig()
        self.vocab_config = vocab_config or VocabConfig()
        self.vocab = Vocab(self.vocab_config)
        self.auto_balance = auto_balance
        V, D = self.vocab.size, c.d_model
        check_fits_memory(c, V)
        self.window = None if c.attention == "full" else c.local_window
        self.n_global = c.global_tokens if c.attention == "hierarchical" else 0
        self.summary_len = c.summary_len if c.attention == "hierarchical" else 0

        self.embed = nn.Embedding(V, D)
        self.time = MusicalTime(self.vocab, D, meter=c.meter) if c.musical_position else None
        self.grammar_features = GrammarFeatures(self.vocab, D) if c.grammar_features else None
        self.rotary = Rotary(D // c.n_heads, c.max_seq_len)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = make_blocks(c.n_layers, D, c.n_heads, c.ff_mult, c.dropout, causal=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight  # tied: one table for ids in and logits out

        vae = c.mode in ("vae", "vae_gan")
        self.encoder = LatentEncoder(c) if vae else None
        self.conditioner = LatentConditioner(c) if vae else None
        self.style = style_embedding(c)
        self.discriminator = MultiScaleDiscriminator(c, V) if c.mode == "vae_gan" else None
        self.grad_checkpointing = False
        self.right_padding = False  # set_right_padding
        self.loss_log_vars = (
            nn.Parameter(torch.zeros(len(self.LOSS_TERMS))) if auto_balance else None
        )
        # fill-in-the-middle sentinels (aurl.data.fim): rows for ids V.. V+3, last so that the
        # other parameters draw the same initial values with or without them
        # (built from an empty table: constructing draws nothing, _init_weights draws it last)
        self.fim = (
            nn.Embedding(FIM_SENTINELS, D, _weight=torch.empty(FIM_SENTINELS, D)) if c.fim else None
        )
        # anticipation controls (aurl.data.anticipation): one row per pitch for ids from
        # ANTICIPATION_BASE, created after everything else for the same reason
        P = self.vocab.n_pitches
        self.controls = (
            nn.Embedding(P, D, _weight=torch.empty(P, D)) if c.anticipation > 0 else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init; residual projections scaled by 1/sqrt(2 * layers) so depth keeps the
        # residual stream's variance (nanoGPT).
        for name, p in self.named_parameters():
            if name.startswith("discriminator") or name == "loss_log_vars":
                continue
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("attn.proj.weight", "ff.proj.weight")):
                    std = 0.02 / math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if self.conditioner is not None and self.config.latent_zero_init:
            self.conditioner.zero_init()  # after the draws: every other weight as before

    # -- backbone ------------------------------------------------------------------------------

    def _mask(self, q_start: int, Tq: int, k_pos: Tensor, key_mask: Tensor | None):
        """Attention mask (1 or B, 1, Tq, Tk) bool for queries ``q_start..q_start+Tq-1`` over
        keys at ``k_pos``, or None where SDPA needs none (one query that sees every key it is
        given, or plain causal over the same positions)."""
        Tk = k_pos.shape[0]
        if key_mask is None:
            if Tq == 1:
                return None
            aligned = Tq == Tk and q_start == 0
            if aligned and (self.window is None or Tk <= self.window):
                return None
        q_pos = torch.arange(q_start, q_start + Tq, device=k_pos.device)
        mask = attention_mask_for(q_pos, k_pos, self.window, self.n_global)[None, None]
        if key_mask is not None:
            # each query always sees itself, so padded rows stay finite (their outputs unused)
            mask = (mask & key_mask[:, None, None, :]) | (q_pos[:, None] == k_pos[None, :])
        return mask

    def _input(self, ids: Tensor, cond: Tensor | None, *features: Tensor | None) -> Tensor:
        if self.controls is not None:
            x = self._embed_controls(ids)
        else:
            x = self.embed(ids) if self.fim is None else self._embed_fim(ids)
        for f in features:
            if f is not None:
                x = x + f
        if cond is not None:
            x = x + cond
        return self.drop(x)

    # -- fill in the middle (aurl.data.fim) -----------------------------------------------------

    def _embed_fim(self, ids: Tensor) -> Tensor:
        """Embeddings of music ids and sentinels (ids V.. V+3)."""
        V = self.embed.num_embeddings
        music = self.embed(ids.clamp(max=V - 1))
        sentinel = self.fim((ids - V).clamp(0, FIM_SENTINELS - 1))
        return torch.where((ids >= V)[..., None], sentinel, music)

    def _embed_controls(self, ids: Tensor) -> Tensor:
        """Embeddings (B, T, D) of music ids, sentinels (with ``model.fim``) and anticipation
        controls (ids ``ANTICIPATION_BASE + pitch index``, :mod:`aurl.data.anticipation`, from
        their own table)."""
        n = self.controls.num_embeddings
        is_control = ids >= ANTICIPATION_BASE
        other = ids.masked_fill(is_control, PAD)
        x = self.embed(other) if self.fim is None else self._embed_fim(other)
        control = self.controls((ids - ANTICIPATION_BASE).clamp(0, n - 1))
        return torch.where(is_control[..., None], control, x)

    def eom_logits(self, logits: Tensor, hidden: Tensor) -> Tensor:
        """Music logits (B, T, V) with the EOM sentinel's column appended (B, T, V + 1): the
        one sentinel a FIM model predicts (its output row is its embedding, as the music ids'
        rows are theirs)."""
        eom = hidden @ self.fim.weight[0].to(hidden.dtype)  # (B, T)
        return torch.cat([logits, eom[..., None].to(logits.dtype)], dim=-1)

    def fim_features(
        self, source: Tensor, pos: Tensor, start: WindowStart | None = None,
        meter: Tensor | None = None,
    ) -> Tensor | None:  # fmt: skip
        """Musical-time and grammar features (B, T, D) of a reordered window: computed over
        ``source`` (B, S), the window in time order from ``start``, then gathered at ``pos``
        (B, T), each token's source position; zero (neutral) where ``pos`` is -1 (sentinels,
        padding). None for a model without either feature."""
        start = start or WindowStart()
        f = None
        if self.time is not None:
            f = self.time(source, start.ticks, start.tempo, meter)[0]  # (B, S, D)
        if self.grammar_features is not None:
            g = self.grammar_features(source, start.grammar)[0]
            f = g if f is None else f + g
        if f is None:
            return None
        B, T = pos.shape
        picked = f.gather(1, pos.clamp(min=0)[:, :, None].expand(B, T, f.shape[-1]))
        return picked * (pos >= 0)[:, :, None].to(picked.dtype)  # (B, T, D)

    def _logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm(x)
        return self.head(h), h

    def forward(
        self,
        ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        latents: Latents | None = None,
        start: WindowStart | None = None,
        meter: Tensor | None = None,
        style: Tensor | None = None,
        fim: tuple[Tensor, Tensor] | None = None,
        pack: Packing | None = None,
    ) -> ModelOutput:
        """Logits for every position of ``ids`` (B, T).

        Args:
            ids: token ids (B, T).
            attention_mask: (B, T), 1/True for real tokens; masked keys are never attended.
            latents: VAE modes: condition on these instead of encoding ``ids`` (which are then
                only decoded). Without them the posterior is sampled (mean in eval mode).
            start: the state the tokens before ``ids`` left (:meth:`start_after`); default:
                ``ids`` start the piece. Attention still sees ``ids`` only.
            meter: (B, 2) time signatures ``(numerator, denominator)``; default 4/4. Read only
                by a model with ``model.meter``.
            style: (B,) style ids (:mod:`aurl.models.style`; -1: none). Read only by a model
                with ``model.styles``.
            fim: ``(source (B, S), pos (B, T))`` for windows in FIM order (``model.fim``):
                the features come from :meth:`fim_features` instead of from ``ids``.
            pack: the rows of ``ids`` are segments of a packed batch (``data.pack``): they are
                embedded as rows (each from its own ``start``, ``meter`` and ``style``), run
                through the blocks packed as ``pack`` says, and come back as rows, so the
                outputs keep ``ids``' shape. Transformer mode with full attention only.
        """
        B, T = ids.shape
        if pack is not None and (self.encoder is not None or self.window is not None):
            raise ValueError(
                "packed segments need model.mode=transformer and model.attention=full "
                f"(got {self.config.mode!r}, {self.config.attention!r})"
            )
        posterior = None
        if self.encoder is not None and latents is None:
            posterior = self.encoder(ids, self.embed, attention_mask)
            latents = posterior.sample() if self.training else posterior.mean()
        cond = self.conditioner(latents, 0, T) if latents is not None else None
        start = start or WindowStart()
        time_emb = gram_emb = None
        if fim is not None:
            time_emb = self.fim_features(fim[0], fim[1], start, meter)
        else:
            if self.time is not None:
                time_emb = self.time(ids, start.ticks, start.tempo, meter)[0]
            if self.grammar_features is not None and start.features is not None:
                gram_emb = self.grammar_features.embed(*start.features)
            elif self.grammar_features is not None:
                gram_emb = self.grammar_features(ids, start.grammar)[0]
        seen, drop = ids, None
        if posterior is not None and self.training:  # VAE word dropout (aurl.models.vae)
            drop = token_drop_mask(ids, self.config.decoder_token_dropout)
        if drop is not None:
            features = [f for f in (time_emb, gram_emb) if f is not None]
            seen, feats = hide_tokens(drop, ids, UNK, sum(features) if features else None)
            time_emb, gram_emb = feats, None
        x = self._input(seen, cond, time_emb, gram_emb, self._style(style))
        key_mask = attention_mask.bool() if attention_mask is not None else None
        if self.right_padding and self.window is None:  # causal: no real query sees the padding
            key_mask = None
        if pack is not None:  # (S, T, D) segments -> (rows, width, D), each at its own positions
            x = pack.to_rows(x)
            mask = pack.attention()
            cos, sin = self.rotary.tables(0, pack.width)
            cos, sin = cos[pack.pos], sin[pack.pos]  # (rows, width, 1, 1, hd)
        else:
            if self.window is not None and self.window < T:  # block-local, linear in T
                mask = Sparse(self.window, self.n_global, self.summary_len, key_mask)
            else:
                mask = self._mask(0, T, torch.arange(T, device=ids.device), key_mask)
            cos, sin = self.rotary.tables(0, T)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:  # keep only block inputs; recompute the inside during backward
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        if pack is not None:
            x = pack.to_segments(x, T)  # (S, T, D) again: the head and the loss read rows
        logits, h = self._logits(x)
        return ModelOutput(logits=logits, hidden=h, posterior=posterior, latents=latents)

    def set_right_padding(self, enabled: bool = True) -> None:
        """Promise that every ``attention_mask`` given to :meth:`forward` pads on the right
        only (as the training loader and the likelihood batches do). Causal full attention then
        needs no mask (a real token never sees a later position) and runs SDPA's causal kernel
        (flash attention on a GPU) instead of materialising a (B, 1, T, T) mask; outputs at
        padded positions change, those at real ones do not. The VAE encoder still reads it."""
        self.right_padding = enabled

    def _style(self, style: Tensor | None) -> Tensor | None:
        """(B, 1, D) style vectors, or None for a model without styles or no style given."""
        if self.style is None or style is None:
            return None
        return self.style(style)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (training)."""
        self.grad_checkpointing = enabled

    # -- incremental decoding ------------------------------------------------------------------

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        latents: Latents | None = None,
        capacity: int | None = None,
        dtype: torch.dtype | None = None,
        history: Tensor | None = None,
        meter: Tensor | None = None,
        style: Tensor | None = None,
    ) -> DecodeState:
        """A fresh decode state with a preallocated KV cache of ``capacity`` positions
        (default ``max_seq_len``); generation past it re-primes a new state on a window.

        ``history`` (B, n): tokens that came before the first :meth:`step` (e.g. those a
        sliding window left behind): the musical time and the grammar features continue from
        them, while attention starts fresh. ``meter`` (B, 2): the time signatures the bars
        follow (models with ``model.meter``; default 4/4). ``style`` (B,): style ids (models
        with ``model.styles``; -1 or None: no style)."""
        p = self.embed.weight
        device = torch.device(device) if device is not None else p.device
        dtype = dtype or p.dtype
        cap = capacity or self.config.max_seq_len
        H, hd = self.config.n_heads, self.config.d_model // self.config.n_heads
        shape = (batch_size, H, cap, hd)
        n = len(self.blocks)
        state = DecodeState(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            latents=latents,
            meter=meter.to(device) if meter is not None else None,
            style=style.to(device) if style is not None else None,
        )
        start = self.start_after(
            history if history is not None else torch.zeros(batch_size, 0, dtype=torch.long),
            device=device,
        )
        state.ticks, state.tempo, state.grammar = start.ticks, start.tempo, start.grammar
        return state

    @torch.no_grad()
    def start_after(
        self,
        history: Tensor,
        *,
        empty: Tensor | None = None,
        device: torch.device | str | None = None,
        initial: WindowStart | None = None,
    ) -> WindowStart:
        """The musical-time and grammar-feature state after ``history`` (B, n), the tokens
        before a window, without attending to them. Rows may be right-aligned behind PAD
        tokens (which move neither time nor the grammar's sounding notes); rows marked in
        ``empty`` (B,) bool have no history and get the initial state. ``initial``: the state
        ``history`` continues from (default: a piece's start), e.g. a checkpoint of the piece
        (:class:`aurl.data.window_state.PrefixCheckpoints`)."""
        device = torch.device(device) if device is not None else self.embed.weight.device
        history = history.to(device)
        B = history.shape[0]
        start = WindowStart()
        if self.time is not None:
            ticks = torch.zeros(B, dtype=torch.long, device=device)
            tempo = torch.full((B,), -1, dtype=torch.long, device=device)
            if initial is not None:
                ticks, tempo = initial.ticks, initial.tempo
            if history.shape[1]:  # positions only: no (B, n, D) embedding of the past
                *_, tempos, cum = self.time.positions(history, ticks, tempo)
                ticks, tempo = cum[:, -1], tempos[:, -1]
            start.ticks, start.tempo = ticks, tempo
        if self.grammar_features is not None:
            carry = self.grammar_features.initial(B, device)
            if initial is not None:
                carry = initial.grammar
            if history.shape[1]:
                after = carry
                # in parts: a scan holds (B, part, families x pitches) on a GPU, and the state
                # after a part is where the next one starts (the same state, bitwise)
                for part in history.split(self.prefix_part, dim=1):
                    after = self.grammar_features.carry_after(part, after)
                carry = after if empty is None else _where_rows(~empty.to(device), after, carry)
            start.grammar = carry
        return start

    def _keys_for(self, start: int, T: int, device: torch.device) -> slice | Tensor:
        """Cache positions the queries at ``start..start+T-1`` may read: everything so far,
        or for windowed attention only the window of the first query (plus the globals)."""
        end = start + T
        lo = 0 if self.window is None else max(0, start - self.window + 1)
        if lo <= self.n_global:
            return slice(0, end)
        if self.n_global == 0:
            return slice(lo, end)
        return torch.cat([torch.arange(self.n_global), torch.arange(lo, end)]).to(device)

    @torch.no_grad()
    def step(
        self,
        ids: Tensor,
        state: DecodeState,
        *,
        attention_mask: Tensor | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Feed ``ids`` (B, t) after what ``state`` has seen; returns their logits (B, t, V)
        and advances the state in place (KV cache, musical time).

        ``features`` (B, t, D): the musical-time and grammar features of ``ids``, given by the
        caller (FIM decoding, whose order is not time order: :mod:`aurl.generation.fim`); the
        state's time and grammar are then left as they are."""
        B, T = ids.shape
        start = state.pos
        if start + T > state.capacity:
            raise ValueError(
                f"decode state is full ({state.capacity} positions): start a new state on the "
                "last window of tokens (init_state(capacity=...) for a longer one)"
            )
        device = ids.device
        if attention_mask is not None and state.key_mask is None:
            state.key_mask = torch.ones(B, state.capacity, dtype=torch.bool, device=device)
        if attention_mask is not None:
            state.key_mask[:, start : start + T] = attention_mask.bool()
        time_emb = features
        if features is None and self.time is not None:
            time_emb, state.ticks, state.tempo = self.time(
                ids, state.ticks, state.tempo, state.meter
            )
        cond = None
        if state.latents is not None:
            cond = self.conditioner(state.latents, start, T)
        gram_emb = None
        if features is None and self.grammar_features is not None:
            g = self.grammar_features
            gram_emb, state.grammar = (g.advance if T == 1 else g.extend)(ids, state.grammar)
        x = self._input(ids, cond, time_emb, gram_emb, self._style(state.style))

        keys = self._keys_for(start, T, device)
        if isinstance(keys, slice):
            k_pos = torch.arange(keys.start, keys.stop, device=device)
        else:
            k_pos = keys
        key_mask = None
        if state.key_mask is not None:
            key_mask = state.key_mask.index_select(1, k_pos)
        mask = self._mask(start, T, k_pos, key_mask)
        if self.summary_len > 0:  # hierarchical: the summaries come from the whole cache
            if mask is None and T > 1:
                q_pos = torch.arange(start, start + T, device=device)
                mask = attention_mask_for(q_pos, k_pos, self.window, self.n_global)[None, None]
            sk = state.key_mask[:, : start + T] if state.key_mask is not None else None
            mask = Sparse(self.window, self.n_global, self.summary_len, sk, mask, start)
        cos, sin = self.rotary.tables(start, T)
        logits = self._decode_blocks(x, cos, sin, mask, state.k, state.v, start, keys)
        state.pos = start + T
        return logits

    def _decode_blocks(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        k: list[Tensor],
        v: list[Tensor],
        start: int,
        keys: slice | Tensor,
    ) -> Tensor:
        """The blocks and the head over new positions, reading and filling the KV cache."""
        for block, k_cache, v_cache in zip(self.blocks, k, v):
            x = block(x, cos, sin, mask, (k_cache, v_cache, start, keys))
        return self._logits(x)[0]

    # -- VAE -----------------------------------------------------------------------------------

    def _require(self, part: str) -> None:
        if getattr(self, part) is None:
            raise ValueError(
                f"model.mode={self.config.mode!r} has no {part}: use mode 'vae' or 'vae_gan'"
            )

    def encode(self, ids: Tensor, *, attention_mask: Tensor | None = None) -> Posterior:
        """The approximate posterior q(z | ids); ``.sample()`` or ``.mean()`` gives latents."""
        self._require("encoder")
        return self.encoder(ids, self.embed, attention_mask)

    def decode(self, latents: Latents, ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of ``ids`` conditioned on ``latents``. To generate
        from latents, pass them to :meth:`init_state` and feed :meth:`step`."""
        self._require("encoder")
        return self.forward(ids, latents=latents).logits

    def sample_prior(
        self, n: int, *, length: int | None = None, generator: torch.Generator | None = None
    ) -> Latents:
        """``n`` latents from the prior N(0, I), covering ``length`` tokens (default context)."""
        self._require("encoder")
        return self.encoder.sample_prior(
            n, length or self.config.max_seq_len, self.embed.weight.device, generator
        )

    def interpolate(self, a: Latents, b: Latents, steps: int) -> list[Latents]:
        """``steps`` latents from ``a`` to ``b`` (spherical, which stays on the prior's shell)."""
        return [Latents.slerp(a, b, float(t)) for t in torch.linspace(0, 1, steps)]

    # -- GAN -----------------------------------------------------------------------------------

    def discriminate(self, ids_or_soft: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Real/fake scores per scale and the features used for feature matching.

        ``ids_or_soft``: ids (B, T) or soft one-hots (B, T, V), e.g. Gumbel-softmax samples
        of the decoder, which keep the generator differentiable."""
        self._require("discriminator")
        return self.discriminator(ids_or_soft)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the discriminator's (the generator optimizer's)."""
        return [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]

    # -- bookkeeping ---------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component (the tied output head counts once, under embedding)."""
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():  # shared tensors are listed once
            top = name.split(".")[0]
            key = {"embed": "embedding", "time": "musical_time", "norm": "blocks"}.get(top, top)
            groups[key] = groups.get(key, 0) + p.numel()
        groups["total"] = sum(groups.values())
        return groups

    def parameter_summary(self) -> str:
        """One greppable line, e.g. ``parameters embedding 396.3k blocks 25.2M total 25.8M``."""

        def human(n: int) -> str:
            return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"

        parts = " ".join(f"{k} {human(v)}" for k, v in self.parameter_counts().items())
        return f"parameters {parts}"

    def save_pretrained(
        self, folder: str | Path, *, window: int | None = None, voices: int = 0
    ) -> Path:
        """Weights as safetensors plus ``config.json`` (model and vocab config; the training
        window and the voices the music is written in, when given)."""
        from aurl.models.pretrained import save_pretrained

        return save_pretrained(self, folder, window=window, voices=voices)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, map_location: str | torch.device = "cpu"
    ) -> MusicTransformerVAEGAN:
        """Rebuild from :meth:`save_pretrained` output. Never unpickles."""
        from aurl.models.pretrained import load_pretrained

        return load_pretrained(folder, map_location=map_location)


def _where_rows(
    keep: Tensor, a: tuple[GrammarState, Tensor], b: tuple[GrammarState, Tensor]
) -> tuple[GrammarState, Tensor]:
    """Rows of carry ``a`` where ``keep`` (B,), else of ``b``."""
    import dataclasses

    def pick(x: Tensor, y: Tensor) -> Tensor:
        return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, y)

    state = dataclasses.replace(
        a[0], **{f.name: pick(getattr(a[0], f.name), getattr(b[0], f.name))
                 for f in dataclasses.fields(a[0])}
    )  # fmt: skip
    return state, pick(a[1], b[1])


def compile_model(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with the grammar scan kept eager.

    The eager marker is applied here rather than as a decorator at import time because
    ``torch.compiler.disable`` imports torch._dynamo (about 1.5 s), which every ``aurl generate``
    would otherwise pay.
    """
    if not getattr(GrammarFeatures.features, "_torchdynamo_disable", False):
        GrammarFeatures.features = torch.compiler.disable(GrammarFeatures.features)
    return torch.compile(module)


def weight_count_lower_bound(c: ModelConfig, vocab_size: int) -> int:
    """Parameters the blocks and the embedding alone take (attention 4 D^2 and MLP 2 f D^2 per
    block; the VAE encoder's blocks too): a lower bound of the model's size, from the config."""
    per_block = (4 + 2 * c.ff_mult) * c.d_model**2
    blocks = c.n_layers + (c.encoder_layers if c.mode != "transformer" else 0)
    return blocks * per_block + vocab_size * c.d_model


def check_fits_memory(c: ModelConfig, vocab_size: int) -> None:
    """Refuse, before any allocation, a model whose fp32 weights alone exceed this machine's
    memory (building it would only end in the kernel killing the process)."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to check
        return
    need = 4 * weight_count_lower_bound(c, vocab_size)
    if need > memory:
        raise ConfigError(
            f"model.d_model={c.d_model}, model.n_layers={c.n_layers}, model.ff_mult={c.ff_mult}: "
            f"at least {need / 2**30:.0f} GiB of weights, more than this machine's "
            f"{memory / 2**30:.0f} GiB of memory: choose a smaller model"
        )


def build_model(config: Config) -> MusicTransformerVAEGAN:
    """The model a full :class:`Config` describes."""
    return MusicTransformerVAEGAN(config.model, config.vocab, auto_balance=config.loss.auto_balance)
