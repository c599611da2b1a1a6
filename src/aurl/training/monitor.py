"""What a training run reports: log lines, JSONL + TensorBoard scalars, anomalies, samples.

Only rank 0 builds a :class:`Monitor`. Log lines are plain and greppable::

    step 1200 loss 1.834 tok/s 41k lr 3.0e-4 gnorm 0.82
    step 1250 valid loss 1.902 ppl 6.70 bits/note 5.91
    step 1301 anomaly nan_loss action skip
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def human(n: float) -> str:
    """41234 -> '41k' (for throughput in log lines)."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.0f}{unit}" if abs(n) >= 10 * scale else f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Monitor:
    """Writes ``metrics.jsonl``, ``train.log`` and TensorBoard scalars under the run folder."""

    def __init__(
        self, run_dir: str | Path, *, echo: Callable[[str], None] | None = None,
        tensorboard: bool = True,
    ) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # held open for the run (closed by close()): one line per record, flushed
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self._log = open(self.run_dir / "train.log", "a")  # noqa: SIM115
        self.echo = echo if echo is not None else (lambda line: print(line, file=sys.stderr))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; an odd install lacks it
                self.line("tensorboard is not installed: scalars go to metrics.jsonl only")

    def line(self, text: str) -> None:
        """One plain log line to the terminal and ``train.log``."""
        self.echo(text)
        self._log.write(text + "\n")
        self._log.flush()

    def scalars(self, step: int, kind: str, values: dict[str, float]) -> None:
        """A JSONL record ``{"step", "kind", ...}`` and the same numbers in TensorBoard."""
        record = {"step": step, "kind": kind, **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def event(self, step: int, what: str, action: str, **extra: Any) -> None:
        """An anomaly or another notable event, with the action taken."""
        tail = "".join(f" {k} {_fmt(v)}" for k, v in extra.items())
        self.line(f"step {step} anomaly {what} action {action}{tail}")
        self.scalars(step, "event", {"what": what, "action": action, **extra})

    def close(self) -> None:
        self._jsonl.close()
        self._log.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def train_line(step: int, values: dict[str, float]) -> str:
    """``step 1200 loss 1.834 tok/s 41k lr 3.0e-4 gnorm 0.82`` (+ other losses by name)."""
    parts = [f"step {step}", f"loss {values['loss']:.3f}"]
    if "tok_per_s" in values:
        parts.append(f"tok/s {human(values['tok_per_s'])}")
    if "mfu" in values:
        parts.append(f"mfu {100 * values['mfu']:.1f}%")
    parts.append(f"lr {values['lr']:.1e}")
    if "grad_norm" in values:
        parts.append(f"gnorm {values['grad_norm']:.2f}")
    for k, v in values.items():  # the named losses this mode has (zero ones are not shown)
        if k.startswith("loss_") and k not in ("loss_kl_raw", "loss_kl_weight") and v != 0.0:
            parts.append(f"{k[5:]} {v:.3f}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Anomalies
# --------------------------------------------------------------------------------------------


@dataclass
class AnomalyDetector:
    """Flags non-finite steps and spikes against an exponential moving average.

    ``check`` returns the action for one optimizer step: ``"ok"``, ``"skip"`` (non-finite loss or
    gradient: the update is dropped), ``"rollback"`` (``max_bad`` non-finite steps in a row:
    restore the last good checkpoint with a lower learning rate) or ``"spike"`` (finite, but loss
    or gradient norm above ``spike_factor`` times its running mean after ``warmup`` steps: the step
    is kept and flagged).
    """

    max_bad: int = 3
    spike_factor: float = 3.0
    warmup: int = 20
    decay: float = 0.98
    bad_in_row: int = 0
    seen: int = 0
    loss_avg: float = 0.0
    gnorm_avg: float = 0.0

    def check(self, loss: float, grad_norm: float) -> tuple[str, str]:
        """Return ``(action, what)`` for a step's loss and (pre-clipping) gradient norm."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            self.bad_in_row += 1
            what = "nan_loss" if not math.isfinite(loss) else "nan_grad"
            if self.bad_in_row >= self.max_bad:
                self.bad_in_row = 0
                return "rollback", what
            return "skip", what
        self.bad_in_row = 0
        action, what = "ok", ""
        if self.seen >= self.warmup:
            if loss > self.spike_factor * self.loss_avg:
                action, what = "spike", "loss_spike"
            elif grad_norm > self.spike_factor * self.gnorm_avg:
                action, what = "spike", "grad_spike"
        # bias-corrected EMA: the first steps do not read as spikes against a zero average
        self.seen += 1
        w = 1 - self.decay
        self.loss_avg += (loss - self.loss_avg) * max(w, 1 / self.seen)
        self.gnorm_avg += (grad_norm - self.gnorm_avg) * max(w, 1 / self.seen)
        return action, what

    def state_dict(self) -> dict[str, float]:
        return {"seen": self.seen, "loss_avg": self.loss_avg, "gnorm_avg": self.gnorm_avg,
                "bad_in_row": self.bad_in_row}  # fmt: skip

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.seen = int(state.get("seen", 0))
        self.loss_avg = float(state.get("loss_avg", 0.0))
        self.gnorm_avg = float(state.get("gnorm_avg", 0.0))
        self.bad_in_row = int(state.get("bad_in_row", 0))


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def sample_metrics(notes: np.ndarray, ids: np.ndarray, grammar=None) -> dict[str, float]:
    """Musical-quality numbers of one generated sample, from :mod:`aurl.evaluation.metrics`.

    ``pitch_class_entropy`` (bits), ``scale_consistency`` (fraction of notes in the best-fitting
    major/minor scale), ``note_density`` (notes per beat), and ``grammar_valid`` (1 when the
    grammar state machine accepts every token; ``grammar_violations`` counts the others).
    """
    from aurl.evaluation import metrics

    out = {
        "tokens": float(len(ids)),
        "notes": float(len(notes)),
        "pitch_class_entropy": float(metrics.pitch_class_entropy(notes)),
        "scale_consistency": float(metrics.scale_consistency(notes)),
        "note_density": float(metrics.note_density(notes)),
    }
    if grammar is not None:
        violations = grammar.count_violations(np.asarray(ids, dtype=np.int64))
        out["grammar_violations"] = float(violations)
        out["grammar_valid"] = float(violations == 0)
    return out
