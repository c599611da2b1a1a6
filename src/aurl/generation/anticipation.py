"""Harmonizing with an anticipation model (``model.anticipation`` = beats ahead, trained with
``data.anticipation_rate``): the melody's NOTE_ONs are shown to the model as control ids
``delta`` ahead of their time, in the order it was trained on (:mod:`aurl.data.anticipation`).

The composing loop (:func:`aurl.generation.compose.decode`) is kept as it is: it still forces
the melody's own events at their times and shapes what the model may write. The model now also
*knows* the melody ahead: :class:`AnticipationEngine` is the engine the loop talks to; after
each music token it feeds every control whose time ``t - delta`` the row's stream time has
reached (control rows get zero musical-time and grammar features and leave the model's time
and grammar state as they are, as in training). Rows of a batch whose controls fall due at
different tokens are fed together, a row with none due feeding a masked PAD (its position is
never attended to); only with several rows (``num_samples`` or ``particles`` > 1) do the rows'
positions drift apart by such gaps (rotary positions are relative: a gap reads as a token
further away).

Scoring a known answer (the evaluation's bits per note of Bach's alto, tenor and bass given
his soprano): :func:`score_anticipated` interleaves the controls into Bach's tokens by the same
rule, runs the model once, and scores the music tokens through
:func:`aurl.generation.compose.score_plan` (the same masks, the same tokens counted as the
forcing row).

Torch is imported inside the functions (the generation package stays importable without it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aurl.data.anticipation import control_ids, interleave
from aurl.data.vocab import PAD, Kind, Vocab
from aurl.errors import ConstraintError


def supports_anticipation(model: Any) -> bool:
    """True for a torch model with anticipation control rows."""
    return getattr(model, "controls", None) is not None


def delta_steps(model: Any) -> int:
    """How far ahead (steps) the model was trained to read the melody."""
    return round(float(model.config.anticipation) * model.vocab.config.steps_per_beat)


def plan_controls(plan: Any, vocab: Vocab, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """``(due steps, control ids)`` of a harmonizing plan's melody: each given onset step's
    highest pitch (the top line, as in training), due ``delta`` steps before it."""
    steps = np.array(sorted(plan.ons), dtype=np.int64)
    pitches = np.array([max(plan.ons[int(s)]) for s in steps], dtype=np.int64)
    return steps - delta, control_ids(pitches, vocab)


class AnticipationEngine:
    """An anticipation model behind the composing loop's engine calls (``init_state``,
    ``step``, ``reorder`` on numpy arrays; see the module docstring).

    Args:
        model: A torch model with ``model.anticipation`` > 0.
        plan: The harmonizing plan (:func:`aurl.generation.compose.make_plan`); its given
            onsets are the melody.
        meter: The piece's ``(numerator, denominator)`` (meter models; None: 4/4).
    """

    def __init__(self, model: Any, plan: Any, *, meter: tuple[int, int] | None = None) -> None:
        import torch

        self.torch, self.model = torch, model
        self.vocab: Vocab = model.vocab
        self.device = model.embed.weight.device
        self.capacity = int(model.config.max_seq_len)
        self.meter = meter
        self.due, self.controls = plan_controls(plan, self.vocab, delta_steps(model))
        self._shift = np.where(self.vocab.kind == Kind.TIME_SHIFT, self.vocab.value, 0)

    def init_state(self, ids: np.ndarray) -> tuple[dict, np.ndarray]:
        """A state after the prefix ``ids`` (B, P) and the controls due there; returns
        (state, logits (B, V))."""
        torch = self.torch
        B = ids.shape[0]
        meter = None
        if self.meter is not None:
            meter = torch.tensor([self.meter], device=self.device).expand(B, 2)
        with torch.no_grad():
            model_state = self.model.init_state(
                B, device=self.device, capacity=self.capacity, meter=meter
            )
        state = {
            "model": model_state, "now": np.zeros(B, np.int64), "next": np.zeros(B, np.int64),
        }  # fmt: skip
        logits = None
        for j in range(ids.shape[1]):
            logits = self.step(np.asarray(ids[:, j], np.int64), state)
        return state, logits

    def _room(self, state: dict, n: int) -> None:
        if state["model"].pos + n > self.capacity:
            raise ConstraintError(
                f"the piece needs more than {self.capacity} tokens with its controls: this "
                "anticipation model composes pieces that fit in its context (model.max_seq_len)"
            )

    def step(self, ids: np.ndarray, state: dict) -> np.ndarray:
        """Feed one music id per row (B,), then the controls now due; returns the logits
        (B, V) after the last id each row was fed."""
        torch = self.torch
        self._room(state, 1)
        t = torch.as_tensor(ids[:, None], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = self.model.step(t, state["model"])[:, -1].float().cpu().numpy()
        state["now"] = state["now"] + self._shift[ids]
        D = int(self.model.config.d_model)
        n = len(self.due)
        while True:
            k = np.minimum(state["next"], n - 1) if n else state["next"]
            want = (state["next"] < n) & (self.due[k] <= state["now"]) if n else state["next"] < 0
            if not want.any():
                return logits
            self._room(state, 1)
            tok = np.where(want, self.controls[k], PAD)
            x = torch.as_tensor(tok[:, None], dtype=torch.long, device=self.device)
            mask = None if want.all() else torch.as_tensor(want[:, None], device=self.device)
            zero = torch.zeros(len(ids), 1, D, device=self.device)
            with torch.no_grad():
                out = self.model.step(x, state["model"], attention_mask=mask, features=zero)
            logits[want] = out[:, -1].float().cpu().numpy()[want]
            state["next"] = state["next"] + want

    def reorder(self, state: dict, rows: np.ndarray) -> dict:
        from aurl.generation.constraints import index_state

        index = self.torch.as_tensor(rows, dtype=self.torch.long, device=self.device)
        return {
            "model": index_state(state["model"], index), "now": state["now"][rows],
            "next": state["next"][rows],
        }  # fmt: skip


def score_anticipated(
    model: Any,
    plan: Any,
    ids: np.ndarray,
    *,
    meter: tuple[int, int] | None = None,
    controls_from: Any = None,
) -> Any:
    """:func:`aurl.generation.compose.score_plan` for an anticipation model: the plan's melody
    controls interleaved into ``ids`` (START TEMPO INSTRUMENT ... END) by the training rule,
    one teacher-forced pass, and each music token scored from the position before it (a
    control or the previous music token) under the plan's masks. ``controls_from``: another
    plan whose melody gives the controls (a diagnostic: does the model read them?).

    Raises:
        ConstraintError: the interleaved piece is longer than the model's context.
    """
    import torch

    from aurl.generation.compose import score_plan

    vocab: Vocab = model.vocab
    ids = np.asarray(ids, dtype=np.int64)
    due, ctrl = plan_controls(controls_from or plan, vocab, delta_steps(model))
    inter, pos = interleave(ids, due, ctrl, vocab)
    if len(inter) > model.config.max_seq_len:
        raise ConstraintError(
            f"{len(inter)} tokens with controls: longer than the model's context "
            f"({model.config.max_seq_len})"
        )
    m = None if meter is None else torch.tensor([meter])
    t = torch.as_tensor(inter)[None]
    with torch.no_grad():
        out = model(t, meter=m, fim=(torch.as_tensor(ids)[None], torch.as_tensor(pos)[None]))
    full = out.logits[0].float().numpy()  # (T', V)
    at = np.flatnonzero(pos >= 0)  # interleaved index of ids[0], ids[1], ...
    logits = np.concatenate([full[at[1:] - 1], full[-1:]])  # row i - 1 predicts ids[i]
    return score_plan(model, plan, ids, meter=meter, logits=logits)
