"""Training checkpoints: atomic, hashed, resumable, and safe to load.

A checkpoint is one folder ``<run>/checkpoints/step-000250/`` holding

- ``model.safetensors``: the weights (tied tensors stored once);
- ``train_state.pt``: optimizer, grad scaler and torch RNG states -- tensors, numbers and lists
  only, read back with ``torch.load(weights_only=True)`` so no pickled object is ever executed;
- ``state.json``: step, config, scheduler, python/numpy RNG, data position, metrics;
- ``manifest.json``: the SHA-256 of each file above, written last.

Saving writes everything into a hidden temporary folder, fsyncs each file and the folder, then
renames it into place: a crash or a full disk at any moment leaves either the complete new
checkpoint or none, and the previous ones untouched. Loading verifies every hash first.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurl.config import Config, config_from_dict, to_dict
from aurl.errors import CheckpointError, ConfigError
from aurl.fileio import atomic_write, file_sha256, fsync_path

FORMAT = 1
FILES = ("model.safetensors", "train_state.pt", "state.json")
PREFIX = "step-"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------------------------
# RNG state as JSON / tensors
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) global RNG states."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *(float(x) for x in np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk (weights still on file until applied)."""

    path: Path
    step: int
    config: Config
    state: dict[str, Any]  # state.json
    train_state: dict[str, Any]  # optimizer / scaler / torch RNG
    metrics: dict[str, float] = field(default_factory=dict)

    def load_weights(self, model: torch.nn.Module) -> None:
        load_weights(unwrap(model), self.path / "model.safetensors")


def not_lora(path: Path, state: dict[str, Any]) -> None:
    """Refuse a LoRA fine-tune's checkpoint where a plain model's weights are wanted (export,
    average, evaluate; a resumed fine-tune loads them into its wrapped model, as it should): its
    weights file holds the adapters inside the wrapped model, which no plain model loads.

    Raises:
        CheckpointError: naming the adapter folder the run writes instead.
    """
    finetune = state.get("finetune") or {}
    lora = finetune.get("lora") if isinstance(finetune, dict) else None
    if lora:
        run = Path(path).parent.parent
        raise CheckpointError(
            f"{path} is a checkpoint of a LoRA fine-tune (rank {lora.get('rank') if isinstance(lora, dict) else lora}): its "
            f"weights are the adapter's; give --adapter {run / 'adapter'} (written when the "
            "run ends) with the model it tuned"
        )


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    config: Config,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None = None,
    state: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and return its folder.

    Args:
        run_dir: the training output folder.
        step: optimizer steps done.
        model: the (possibly wrapped) model.
        config: the resolved config; stored so the model rebuilds from the checkpoint alone.
        optimizers: name -> optimizer (``"model"``, and ``"disc"`` in vae_gan mode).
        scaler: the fp16 grad scaler, if any.
        state: JSON-able extras (scheduler, data position, anomaly counters).
        metrics: numbers used to rank checkpoints (``valid_loss``) and shown in listings.

    Raises:
        CheckpointError: when writing fails (e.g. the disk is full); the partial folder is
            removed and every earlier checkpoint stays intact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    rng = rng_state()
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(unwrap(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save(
            {
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "scaler": scaler.state_dict() if scaler is not None else {},
                "torch_rng": rng["torch"],
                "cuda_rng": rng["cuda"],
            },
            tmp / "train_state.pt",
        )
        _write_json(
            tmp / "state.json",
            {
                "format": FORMAT,
                "step": step,
                "config": to_dict(config),
                "rng": {"python": rng["python"], "numpy": rng["numpy"]},
                "metrics": dict(metrics or {}),
                **(state or {}),
            },
        )
        for name in FILES:
            fsync_path(tmp / name)
        _write_json(
            tmp / "manifest.json",
            {"step": step, "sha256": {n: file_sha256(tmp / n) for n in FILES}},
        )
        fsync_path(tmp)
        if final.exists():  # re-saving a step after a rollback: swap, never delete first
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. ENOSPC / EFBIG, however wrapped
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        keep = f"; {previous} is intact" if previous else ""
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}{keep}; free disk space and resume"
        ) from e
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_metrics(path: str | Path) -> dict[str, float]:
    """The metrics a checkpoint recorded (unverified: for ranking and listing only): its
    finite numbers; {} where ``state.json`` is no regular file (a FIFO blocked the listing for
    ever) or holds no mapping of metrics (a list, a loss ``"low"``: tracebacks)."""
    state = Path(path) / "state.json"
    if not state.is_file():
        return {}
    try:
        metrics = json.loads(state.read_text()).get("metrics", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(float(v))
    }  # fmt: skip


def best_checkpoints(run_dir: str | Path, n: int, key: str = "valid_loss") -> list[Path]:
    """Up to ``n`` checkpoints with the lowest ``key``, best first (those without it skipped)."""
    scored = []
    for p in list_checkpoints(run_dir):
        value = checkpoint_metrics(p).get(key)
        if value is not None and np.isfinite(value):
            scored.append((value, p.name, p))
    return [p for _, _, p in sorted(scored)[:n]]


def prune_checkpoints(run_dir: str | Path, keep_best: int) -> list[Path]:
    """Delete all but the latest checkpoint and the ``keep_best`` best; return what was deleted."""
    found = list_checkpoints(run_dir)
    keep = set(best_checkpoints(run_dir, keep_best)) | set(found[-1:])
    gone = [p for p in found if p not in keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for stale in root.glob(".*.tmp-*"):  # left by a killed save; never the ones of this process
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return gone


def verify(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no manifest.json): pick another checkpoint"
        )
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        expected = manifest["sha256"]
        if not isinstance(expected, dict):
            raise ValueError("'sha256' is not a mapping of file names to hashes")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(
            f"{path}/manifest.json is damaged ({e}): pick another checkpoint"
        ) from None
    for name in FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}: pick another checkpoint")
        if file_sha256(path / name) != expected.get(name):
            raise CheckpointError(
                f"checkpoint file {path / name} does not match its SHA-256 in manifest.json "
                "(corrupt or modified): pick another checkpoint"
            )
    return manifest


def read_state(path: Path) -> tuple[dict[str, Any], Config]:
    """``state.json`` of a verified checkpoint folder and the config it holds.

    Raises:
        CheckpointError: naming the file, where it is no object with an integer ``step`` and a
            ``config`` mapping, of another format, or its config is invalid.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("step"), int)
        or not isinstance(state.get("config"), dict)
    ):
        raise CheckpointError(
            f"{path}/state.json is damaged (needs an object with an integer 'step' and a "
            "'config' mapping): pick another checkpoint"
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format')}, this Aurl reads {FORMAT}: "
            "load it with the Aurl version that wrote it"
        )
    try:
        config = config_from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {e}") from e
    return state, config


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and read a checkpoint folder (or a run folder: its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if not (path / "manifest.json").exists() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"run folder {path} holds no complete checkpoint: train longer or pick another"
            )
        path = latest
    verify(path)
    try:
        train_state = torch.load(
            path / "train_state.pt", map_location=map_location, weights_only=True
        )
    except Exception as e:  # the unpickler refuses objects: say so, do not execute them
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    state, config = read_state(path)
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        config=config,
        state=state,
        train_state=train_state,
        metrics=state.get("metrics", {}),
    )


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors weights file into ``model`` (strict: every key must match)."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except RuntimeError as e:
        raise CheckpointError(
            f"weights {path} do not fit this model ({str(e).splitlines()[0]}): "
            "the config differs from the one the checkpoint was trained with"
        ) from e


def check_compatible(
    saved: Config, current: Config, path: str | Path, *, ignore_mode: bool = False
) -> None:
    """Refuse to resume when the architecture or vocabulary changed.

    ``ignore_mode``: multi-stage runs change ``model.mode`` from stage to stage.
    """
    for section in ("vocab", "model"):
        a, b = to_dict(getattr(saved, section)), to_dict(getattr(current, section))
        diff = [k for k in a if a[k] != b.get(k) and not (ignore_mode and k == "mode")]
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with {section}.{k}={a[k]!r} but the "
                f"config says {b[k]!r}; use the checkpoint's config or a new --out folder"
            )


def _model_from(config: Config, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model built from ``config`` holding ``weights`` (tied tensors stored once)."""
    from aurl.models import build_model
    from aurl.models.pretrained import fill_tied

    model = build_model(config)
    try:
        model.load_state_dict(fill_tied(weights, model.state_dict()))
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit their config: {str(e).splitlines()[0]}") from e
    return model.eval()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file; a file cut short (its manifest written
    to match) is one line naming it, not safetensors' own exception."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {path} cannot be read ({str(e).splitlines()[0]}): pick another "
            "checkpoint"
        ) from None


def average_checkpoints(paths: list[Path], out: str | Path) -> Path:
    """Average the weights of verified checkpoints into a pretrained model folder.

    Writes ``model.safetensors`` + ``config.json`` (``save_pretrained``'s format, loadable by
    ``MusicTransformerVAEGAN.from_pretrained``) and returns the folder. Averaging the last few
    good checkpoints usually gives a slightly lower validation loss than any one of them.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average: the run has none with a validation loss")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    config = None
    for p in paths:
        verify(p)
        state, cfg = read_state(Path(p))
        not_lora(Path(p), state)
        if config is not None and (cfg.model != config.model or cfg.vocab != config.vocab):
            raise CheckpointError(
                f"{p} has another architecture than {paths[0]}: average checkpoints of one run"
            )
        config = cfg
        weights = _weights(Path(p) / "model.safetensors")
        if total and (weights.keys() != total.keys()
                      or any(v.shape != total[k].shape for k, v in weights.items())):  # fmt: skip
            # a sum over other names or shapes fails, or (a name missing) averages wrongly
            raise CheckpointError(
                f"{p} holds other weights (names or shapes) than {paths[0]}: average "
                "checkpoints of one run"
            )
        for k, v in weights.items():
            dtypes[k] = v.dtype
            # accumulate in float64: the mean of N float32 tensors is then exact to float32
            total[k] = (total.get(k, 0) + v.double()) if v.is_floating_point() else v
    avg = {
        k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()
    }
    _model_from(config, avg).save_pretrained(out, window=config.data.window)
    return Path(out)


def export_source(source: str | Path) -> Path:
    """A checkpoint folder as is; a run folder: its best checkpoint, else its latest."""
    source = Path(source)
    if not (source / "manifest.json").is_file() and (source / "checkpoints").is_dir():
        best = best_checkpoints(source, 1) or list_checkpoints(source)[-1:]
        if not best:
            raise CheckpointError(
                f"run folder {source} holds no complete checkpoint: train longer or pick another"
            )
        return best[0]
    return source


def export_weights(
    source: str | Path, out: str | Path, *, dtype: str = "float32", voices: int = 0
) -> Path:
    """The weights alone of one checkpoint (or a run's best, else latest) as a pretrained folder.

    ``dtype`` ``bfloat16``/``float16`` halves the file (the weights load back into float32).
    ``voices``: recorded in its ``config.json`` (:func:`~aurl.models.pretrained.save_pretrained`).
    """
    from safetensors.torch import load_file, save_file

    c = load_checkpoint(export_source(source))
    not_lora(c.path, c.state)
    model = _model_from(c.config, _weights(c.path / "model.safetensors"))
    out = model.save_pretrained(out, window=c.config.data.window, voices=voices)
    if dtype != "float32":
        weights = Path(out) / "model.safetensors"
        tensors = load_file(str(weights))
        cast = getattr(torch, dtype)
        tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
        atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return Path(out)
