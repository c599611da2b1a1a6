"""Likelihood of token sequences under a model: loss, perplexity and bits per note.

Bits per note is the total negative log-likelihood in bits divided by the number of notes
(NOTE_ON tokens), so models with different tokenizations (our events, MidiTok REMI, an n-gram
over either) compare on the same pieces. Loss and perplexity are per token and only compare
within one vocabulary.

Each sequence is a START ... END id array; every token after the first is predicted from the
tokens before it. A piece longer than ``window`` is scored in overlapping windows: the first
window scores all its positions, each later window moves on by ``window - context`` tokens and
scores only its new positions, so every token is scored once with at least ``context`` tokens of
history (fewer only at the very start of the piece). A later window starts from the model's
musical-time and grammar state after the whole prefix (``init_state(history=)``), as generation
with a sliding window does; only attention is cut to the window. In ``vae``/``vae_gan`` modes
the model conditions on the posterior mean of each window itself (through ``forward``), so the
number is a reconstruction loss, not a likelihood bound.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aurl.data.vocab import PAD, Kind, Vocab
from aurl.errors import DataError
from aurl.progress import Progress, silent

LN2 = math.log(2.0)


@dataclass(frozen=True)
class LikelihoodResult:
    """Totals over a set of sequences; the rates are derived from them.

    Attributes:
        nll: Total negative log-likelihood in nats.
        tokens: Number of scored tokens (every token after the first of each sequence).
        notes: Number of NOTE_ON tokens among them.
        sequences: Number of sequences scored.
        grammar_violations: Scored tokens the grammar did not allow (scored unmasked instead).
    """

    nll: float
    tokens: int
    notes: int
    sequences: int = 0
    grammar_violations: int = 0

    @property
    def loss(self) -> float:
        """Mean NLL per token in nats (the cross-entropy the trainer reports)."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.loss / LN2

    @property
    def bits_per_note(self) -> float:
        """Total NLL in bits divided by the number of notes."""
        return self.nll / LN2 / self.notes if self.notes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Totals and rates as plain numbers (for ``metrics.json`` and logs)."""
        return {
            "nll": self.nll,
            "tokens": self.tokens,
            "notes": self.notes,
            "sequences": self.sequences,
            "grammar_violations": self.grammar_violations,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_note": self.bits_per_note,
        }


def plan_windows(length: int, window: int, context: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first)`` covering target positions ``1 .. length - 1`` once.

    The window feeds ``ids[start:end]`` and scores the targets ``first .. end - 1``; each later
    window keeps ``context`` tokens of the previous one. ``window >= 2``, ``0 <= context <
    window``.
    """
    if window < 2 or not 0 <= context < window:
        raise ValueError(f"need window >= 2 and 0 <= context < window, got {window}, {context}")
    if length < 2:
        return []
    end = min(length, window)
    out = [(0, end, 1)]
    stride = window - context
    while end < length:
        new_end = min(end + stride, length)
        out.append((max(0, new_end - window), new_end, end))
        end = new_end
    return out


def _note_on_mask(vocab: Vocab) -> np.ndarray:
    return vocab.kind == Kind.NOTE_ON


def _can_carry(model: Any) -> bool:
    """Whether later windows can start from the state of the whole prefix: the model has
    ``init_state(history=)`` and ``step`` and no VAE encoder (whose latents come from forward)."""
    init = getattr(model, "init_state", None)
    if init is None or not hasattr(model, "step") or getattr(model, "encoder", None) is not None:
        return False
    return "history" in inspect.signature(init).parameters


def _prefix_start(model: Any, seqs: list[np.ndarray], batch: list, device: Any) -> Any:
    """For a model that cannot carry its state through ``step`` (a VAE, whose latents come from
    ``forward``) but can compute it (``start_after``): the musical-time and grammar state
    after each row's prefix, so that a later window starts where its piece is, as in training;
    None when every row starts its piece or the model has no ``start_after``."""
    starts = [start for _, start, _, _ in batch]
    if max(starts) == 0 or not hasattr(model, "start_after"):
        return None
    history = torch.full((len(batch), max(starts)), PAD, dtype=torch.long)  # right-aligned
    for r, (i, start, _, _) in enumerate(batch):
        if start:
            history[r, -start:] = torch.from_numpy(seqs[i][:start])
    empty = torch.tensor([start == 0 for start in starts])
    return model.start_after(history, empty=empty, device=device)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: Iterable[np.ndarray] | Sequence[np.ndarray],
    *,
    window: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    grammar: Any = None,
    context: int | None = None,
    vocab: Vocab | None = None,
    progress: Progress = silent,
    meters: Sequence[Any] | None = None,
    styles: Sequence[int] | None = None,
) -> LikelihoodResult:
    """Negative log-likelihood of ``sequences`` under ``model`` (``model(ids).logits``).

    Args:
        model: Maps ids (B, T) to an object with ``.logits`` (B, T, V). Put in eval mode for the
            call and restored to its previous mode after.
        sequences: int id arrays, each START ... END.
        window: Longest input fed at once (the model's training window is a good choice).
        batch_size: Windows per forward pass.
        device: Where the ids go; default: the model's device.
        grammar: Optional :class:`aurl.data.grammar.Grammar`; with it the distribution at each
            position is renormalised over the ids ``grammar.sequence_masks`` allows (how the
            sampler draws). Tokens the grammar forbids are scored unmasked and counted in
            ``grammar_violations``.
        context: History each later window keeps (default ``window // 2``).
        vocab: Which ids are notes; default ``model.vocab`` or the default vocabulary.
        progress: Progress wrapper over batches.
        meters: Each sequence's time signature ``(numerator, denominator)``, passed to a model
            with meter conditioning (``model.config.meter``); default 4/4.
        styles: Each sequence's style id (:mod:`aurl.models.style`; -1: none), passed to a
            model with style conditioning (``model.config.styles``); default: no style.

    Returns:
        The totals; ``.loss``, ``.perplexity`` and ``.bits_per_note`` derive from them.

    Raises:
        DataError: An id is outside the model's vocabulary (a cache of another vocabulary).
    """
    vocab = vocab or getattr(model, "vocab", None) or Vocab()
    is_note = torch.from_numpy(_note_on_mask(vocab))
    context = window // 2 if context is None else context
    if device is None:
        device = next(model.parameters()).device
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    for i, s in enumerate(seqs):
        if s.size and (s.min() < 0 or s.max() >= vocab.size):
            raise DataError(
                f"sequence {i} has id {int(s.max())} outside the model's vocabulary of "
                f"{vocab.size}: the data was tokenized with another vocabulary; re-prepare it "
                "with the model's config"
            )
    chunks = [
        (i, start, end, first)
        for i, s in enumerate(seqs)
        for start, end, first in plan_windows(len(s), window, context)
    ]
    # Windows at the start of a piece go through forward() in batches; later windows, when the
    # model can carry its musical-time and grammar state over the history, go one by one
    # through init_state(history=) + step(), so their positions see the state of the whole
    # prefix (as in generation with a sliding window).
    carry = _can_carry(model)
    batched = [c for c in chunks if c[1] == 0 or not carry]
    alone = [c for c in chunks if c[1] > 0 and carry]  # each with its own history
    batches = [batched[k : k + batch_size] for k in range(0, len(batched), batch_size)]
    batches += [[c] for c in alone]
    # Grammar masks need the whole prefix, so they are built once per sequence and dropped
    # after the last batch that uses them.
    last_use = {i: b for b, batch in enumerate(batches) for i, *_ in batch}
    masks: dict[int, torch.Tensor] = {}

    was_training = model.training
    model.eval()
    nll, tokens, notes, violations = 0.0, 0, 0, 0
    try:
        for b, batch in enumerate(progress(batches, total=len(batches), desc="likelihood")):
            T = max(end - start for _, start, end, _ in batch)
            ids = torch.full((len(batch), T), PAD, dtype=torch.long)  # (B, T), right-padded
            for r, (i, start, end, _) in enumerate(batch):
                ids[r, : end - start] = torch.from_numpy(seqs[i][start:end])
            i0, start0 = batch[0][0], batch[0][1]
            meter = None
            if meters is not None and getattr(getattr(model, "config", None), "meter", False):
                meter = torch.tensor(np.array([meters[c[0]] for c in batch]), dtype=torch.long)
                meter = meter.to(device)
            kw = {"meter": meter} if meter is not None else {}
            if styles is not None and getattr(getattr(model, "config", None), "styles", ()):
                kw["style"] = torch.tensor([styles[c[0]] for c in batch], device=device)
            if carry and start0 > 0:
                history = torch.from_numpy(seqs[i0][:start0])[None].to(device)  # (1, start)
                state = model.init_state(1, device=device, capacity=T, history=history, **kw)
                logits = model.step(ids.to(device), state).float()  # (1, T, V)
            else:
                begin = _prefix_start(model, seqs, batch, device)
                if begin is not None:
                    kw["start"] = begin
                logits = model(ids.to(device), **kw).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits, dim=-1)
            for r, (i, start, end, first) in enumerate(batch):
                # logits at local position j predict token start + j + 1
                rows = slice(first - 1 - start, end - 1 - start)
                target = ids[r, first - start : end - start].to(device)  # (n,)
                lp = logp[r, rows]  # (n, V)
                if grammar is not None:
                    if i not in masks:
                        full = torch.from_numpy(seqs[i])[None]  # (1, L), masks built on CPU
                        masks[i] = grammar.sequence_masks(full)[0]  # (L, V)
                    allowed = masks[i][first - 1 : end - 1].to(device)  # (n, V)
                    masked = torch.log_softmax(logits[r, rows].masked_fill(~allowed, -math.inf), -1)
                    ok = allowed.gather(1, target[:, None])[:, 0]
                    violations += int((~ok).sum())
                    lp = torch.where(ok[:, None], masked, lp)
                nll -= float(lp.gather(1, target[:, None]).sum())
                tokens += target.shape[0]
                notes += int(is_note[target.cpu()].sum())
            for i in {c[0] for c in batch}:
                if last_use[i] == b:
                    masks.pop(i, None)
    finally:
        model.train(was_training)
    return LikelihoodResult(nll, tokens, notes, len(seqs), violations)
