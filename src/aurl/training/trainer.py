"""The training loop, written out: AdamW, warmup + cosine, clipping, accumulation, mixed precision.

One call, :func:`train`, runs every stage of a config (``training.stages``, e.g. transformer ->
vae -> vae_gan, each starting from the weights of the last) in one process or under ``torchrun``
(DDP), checkpointing atomically and resuming exactly from the output folder's latest checkpoint.
Everything the loop does is visible here; small helpers compute the learning rate
(:func:`lr_at`), validation (:func:`evaluate`) and the optimizer (:func:`make_optimizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurl.config import Config, LossConfig, write_config
from aurl.errors import CheckpointError, ConfigError, DataError
from aurl.progress import Progress, set_status, silent
from aurl.training import checkpoint as ckpt
from aurl.training import distributed
from aurl.training.checkpoint import unwrap
from aurl.training.monitor import AnomalyDetector, Monitor, train_line

LN2 = math.log(2.0)


@dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    train_loss: float  # loss of the last optimizer step (this process's, before averaging)
    valid_loss: float | None  # last validation
    best_valid_loss: float | None
    stopped: str  # "max_steps", "early_stopping", "time_budget" or "interrupted"
    run_dir: Path
    model: torch.nn.Module | None = None  # the trained model (unwrapped), on its device


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine down to ``lr * min_ratio``.

    ``step`` counts from 0 within the stage; the value applies to the update made at ``step``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_plan(config: Config) -> list[tuple[str, int]]:
    """``[(mode, steps), ...]``: ``training.stages``, or one stage of ``model.mode``."""
    t = config.training
    if not t.stages:
        return [(config.model.mode, t.max_steps)]
    for i, (mode, steps) in enumerate(t.stages):
        if mode not in ("transformer", "vae", "vae_gan"):
            raise ConfigError(
                f"training.stages[{i}]: mode {mode!r}; choose transformer, vae or vae_gan"
            )
        if steps < 1:
            raise ConfigError(f"training.stages[{i}]: {steps} steps; use at least 1")
    return list(t.stages)


def autocast(precision: str, device: torch.device):
    """The autocast context of ``training.precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """bf16/fp16 where the device cannot run them is an error, never a silent fallback."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"training.precision: fp16 needs CUDA (device is {device.type}); use bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision: this GPU has no bf16; use fp16 or fp32")


def is_disc_param(name: str) -> bool:
    """Discriminator parameters get their own optimizer in vae_gan mode."""
    return name.startswith(("discriminator.", "disc."))


def make_optimizer(
    model: torch.nn.Module, config: Config, *, disc: bool = False
) -> torch.optim.AdamW | None:
    """AdamW over the generator's (or, with ``disc``, the discriminator's) parameters.

    Weight decay applies to matrices only (dim >= 2); biases and norm gains are not decayed.
    Returns None when there are no such parameters.
    """
    t = config.training
    params = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and is_disc_param(n) == disc
    ]
    if not params:
        return None
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.disc_lr if disc else t.lr, betas=(t.beta1, t.beta2))


def gan_schedule(config: Config, step: int) -> LossConfig:
    """The loss weights at ``step`` of a vae_gan stage: discriminator warm-up, then a ramp.

    For the first ``disc_warmup_steps`` only the discriminator learns the real/fake task (the
    generator's adversarial and feature-matching weights are 0, so a random discriminator
    sends it no noise); over the next ``disc_warmup_steps`` both weights ramp linearly to their
    configured values.
    """
    warm = config.training.disc_warmup_steps
    ramp = 1.0 if warm == 0 else min(1.0, max(0.0, (step - warm) / warm))
    loss = config.loss
    return dataclasses.replace(
        loss, adv_weight=loss.adv_weight * ramp,
        feature_matching_weight=loss.feature_matching_weight * ramp,
    )  # fmt: skip


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (inf/nan when any gradient is)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module, docs: Sequence[np.ndarray], config: Config, *,
    device: torch.device, d: distributed.Dist, grammar=None,
) -> dict[str, float]:  # fmt: skip
    """Loss, perplexity and bits per note of the validation pieces, all ranks together.

    Scored by :func:`aurl.evaluation.likelihood.score_sequences` (grammar-renormalised when the
    training loss is); rank ``r`` scores every ``world``-th piece and the totals are summed.
    """
    from aurl.evaluation.likelihood import score_sequences

    mine = [docs[i] for i in range(d.rank, len(docs), d.world)]
    r = score_sequences(
        unwrap(model), mine, window=config.data.window, batch_size=config.data.batch_size,
        device=device, grammar=grammar if config.loss.grammar_masked else None,
    )  # fmt: skip
    totals = torch.tensor([r.nll, r.tokens, r.notes], dtype=torch.float64, device=device)
    if d.enabled:
        torch.distributed.all_reduce(totals)
    nll, tokens, notes = (float(x) for x in totals)
    loss = nll / max(tokens, 1.0)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bits_per_note": nll / LN2 / notes if notes else float("nan"),
    }


def valid_count(lengths: np.ndarray, config: Config) -> int:
    """How many of the first validation pieces hold about ``eval_batches`` batches of tokens."""
    budget = config.training.eval_batches * config.data.batch_size * config.data.window
    return min(len(lengths), int(np.searchsorted(np.cumsum(lengths), budget)) + 1)


def open_cache(config: Config):
    """Open ``data.cache``; DataError naming what to do when it is missing or unusable."""
    from aurl.data.cache import TokenCache

    path = config.data.cache
    if not path:
        raise DataError("no training data: pass --data CACHE (a folder from 'aurl data prepare')")
    if not Path(path).exists():
        raise DataError(
            f"data cache {path} does not exist: run 'aurl data prepare MIDI_DIR --out {path}'"
        )
    cache = TokenCache(path)
    cache.check_vocab(config.vocab)
    if cache.total_tokens("train") == 0:
        raise DataError(
            f"data cache {path} has no tokens in its train split: prepare it from a folder of "
            "MIDI files (see 'aurl data prepare --help')"
        )
    return cache


def grammar_masks(grammar, batch: dict[str, torch.Tensor], cache) -> torch.Tensor:
    """(B, T, V) grammar masks of a batch of windows cut from longer pieces.

    A window starting at ``offset`` inside its piece is masked from the grammar state after the
    piece's first ``offset`` tokens, not from the initial state (which would expect START and
    forbid nearly everything). The prefixes go through ``Grammar.state_after`` in one batched
    call, right-aligned behind PAD tokens, which change nothing but the "last token" fields
    that the prefix's own last token then sets (tested against one call per row).
    Augmentation changes the window but not the prefix, so after a transposition the state's
    sounding pitches are approximate; the loss always counts the target as allowed, so this
    never gives an infinite loss.
    """
    from aurl.data.vocab import PAD

    ids, offsets = batch["ids"], batch["offset"].tolist()
    B, L = ids.shape[0], max(offsets)
    state = grammar.initial_state(B, ids.device)
    if L > 0:
        prefix = torch.full((B, L), PAD, dtype=torch.long)  # (B, L), right-aligned prefixes
        for r, (row, off) in enumerate(zip(batch["index"].tolist(), offsets)):
            if off:
                prefix[r, L - off :] = torch.from_numpy(
                    np.asarray(cache.tokens(row)[:off], dtype=np.int64)
                )
        after = grammar.state_after(prefix.to(ids.device))
        has = torch.tensor([off > 0 for off in offsets], device=ids.device)
        for f in dataclasses.fields(state):
            a, b = getattr(after, f.name), getattr(state, f.name)
            keep = has.view(B, *([1] * (a.dim() - 1)))
            setattr(state, f.name, torch.where(keep, a, b))
    return grammar.sequence_masks(ids, state)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train every stage of ``config`` into ``run_dir``; resume from its latest checkpoint.

    Args:
        config: the resolved config (``data.cache`` names the token cache).
        run_dir: output folder: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``,
            ``train.log``, ``tb/`` and ``samples/``.
        resume: a checkpoint folder to start from; default: the latest one in ``run_dir``.
        progress: progress helper (the CLI passes :func:`aurl.progress.bar`).
        echo: where log lines go besides ``train.log`` (default: stderr).

    Raises:
        ConfigError, DataError, CheckpointError: bad input, before the first step.
    """
    d = distributed.init(config.training.device)
    stop = _StopRequest()
    try:
        return _run(config, Path(run_dir), resume, progress, echo, d, stop)
    finally:
        stop.restore()
        distributed.shutdown()


class _StopRequest:
    """Ctrl-C or SIGTERM: finish the step, save a checkpoint, stop (a second Ctrl-C: at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _run(config, run_dir, resume, progress, echo, d: distributed.Dist, stop) -> TrainResult:  # noqa: C901
    from aurl.data.dataset import build_loader
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Vocab
    from aurl.models import build_model
    from aurl.models.losses import compute_losses
    from aurl.models.model import compile_model

    t = config.training
    device = d.device
    check_precision(t.precision, device)
    plan = stage_plan(config)
    ends = np.cumsum([s for _, s in plan]).tolist()

    # ---- bad input: all checks before any work ---------------------------------------------
    cache = open_cache(config)
    start: ckpt.Checkpoint | None = None
    source = resume if resume is not None else ckpt.latest_checkpoint(run_dir)
    if source is not None:
        start = ckpt.load_checkpoint(source)
        ckpt.check_compatible(start.config, config, start.path, ignore_mode=bool(t.stages))
    vocab = Vocab(config.vocab)

    monitor = Monitor(run_dir, echo=echo) if d.is_main else None
    log = monitor.line if monitor else (lambda line: None)
    if d.is_main:
        write_config(config, run_dir)
    if start is not None:
        log(f"resuming from {start.path} at step {start.step}")

    grammar = Grammar(vocab, config.data.polyphony_cap)
    use_grammar = config.loss.grammar_masked or config.loss.grammar_weight > 0
    a = config.data.augment
    augment = any((a.transpose_prob, a.stretch_prob, a.velocity_prob, a.instrument_prob,
                   a.jitter_prob))  # fmt: skip
    # the data layer's loader: rank r takes batches r, r + world, ... of each epoch's order, so
    # N processes see at each step what one process sees with grad_accum * N micro-batches
    loader = build_loader(
        cache, config.data, split="train", seed=t.seed, rank=d.rank, world=d.world,
        augment=augment, batches_per_step=t.grad_accum, vocab_config=config.vocab,
    )  # fmt: skip
    valid_rows = cache.split_indices("valid")
    valid_set = [
        np.asarray(cache.tokens(int(r)), dtype=np.int64)
        for r in valid_rows[: valid_count(cache.lengths[valid_rows], config)]
    ]
    if not valid_set:
        log("no valid split in the cache: validation and best-checkpoint tracking are off")

    step = start.step if start is not None else 0
    best_valid = start.state.get("best_valid") if start else None
    bad_evals = int(start.state.get("bad_evals", 0)) if start else 0
    lr_scale = float(start.state.get("lr_scale", 1.0)) if start else 1.0
    detector = AnomalyDetector()
    if start is not None:
        detector.load_state_dict(start.state.get("anomaly", {}))
        loader.load_state_dict(start.state["data"])
    batches = iter(loader)
    valid_loss: float | None = None
    last_loss = float("nan")
    stopped = "max_steps"
    t0 = time.perf_counter()
    prev_state: dict[str, torch.Tensor] | None = None
    model: torch.nn.Module | None = None
    if step >= ends[-1]:
        log(f"step {step}: the run is already complete (raise training.max_steps to go on)")

    for stage, (mode, steps) in enumerate(plan):
        stage_start = ends[stage] - steps
        if step >= ends[stage]:
            continue
        stage_cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, mode=mode))
        # identical initial weights on every rank and in every resumed run
        seed_everything(t.seed + stage)
        model = build_model(stage_cfg).to(device)
        if t.grad_checkpointing:
            _enable_grad_checkpointing(model)
        resuming = (
            start is not None and start.state.get("stage") == stage and start.step < ends[stage]
        )
        if prev_state is None and start is not None and not resuming:
            # resuming exactly at a stage boundary: the new stage starts from the saved weights
            from safetensors.torch import load_file

            prev_state = load_file(str(start.path / "model.safetensors"), device=str(device))
        if prev_state is not None:  # a new stage starts from the last one's weights
            own = model.state_dict()
            fit = {k: v for k, v in prev_state.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(fit, strict=False)
        opt = make_optimizer(model, stage_cfg)
        disc_opt = make_optimizer(model, stage_cfg, disc=True) if mode == "vae_gan" else None
        optimizers = {"model": opt} | ({"disc": disc_opt} if disc_opt is not None else {})
        scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        if resuming:
            start.load_weights(model)
            for name, o in optimizers.items():
                o.load_state_dict(start.train_state["optimizers"][name])
            if scaler is not None and start.train_state["scaler"]:
                scaler.load_state_dict(start.train_state["scaler"])
            ckpt.set_rng_state(
                {**start.state["rng"], "torch": start.train_state["torch_rng"],
                 "cuda": start.train_state["cuda_rng"]}
            )  # fmt: skip
        elif step == 0 or stage_start == step:
            seed_everything(t.seed + 1000 * (stage + 1))
            if stage > 0:  # a new objective: early stopping starts over
                best_valid, bad_evals = None, 0
        if d.rank > 0:  # different dropout masks per rank, reproducible per (seed, rank, step)
            torch.manual_seed(hash((t.seed, d.rank, step)) % 2**63)
        train_model: torch.nn.Module = model
        if d.enabled:
            train_model = distributed.DDP(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=mode != "transformer",
            )  # fmt: skip
        if t.compile:
            train_model = compile_model(train_model)
        params = [p for p in model.parameters() if p.requires_grad]
        disc_params = [p for n, p in model.named_parameters() if is_disc_param(n)]
        gen_params = [
            p for n, p in model.named_parameters() if p.requires_grad and not is_disc_param(n)
        ]
        model.train()
        if d.is_main:
            n_params = sum(p.numel() for p in params)
            log(f"stage {stage + 1}/{len(plan)} mode {mode} steps {stage_start}-{ends[stage]} "
                f"params {n_params / 1e6:.2f}M device {device} precision {t.precision} world {d.world}")  # fmt: skip

        # throughput counts the training steps only (not validation, samples, checkpoints)
        tokens_since, time_since, steps_since = 0, 0.0, 0
        # a rollback moves ``step`` back, so the loop runs on ``step``, not on a range
        pbar = progress(itertools.count(), total=ends[stage] - step, desc=f"train {mode}")
        for _ in pbar:
            if step >= ends[stage]:
                break
            step_t0 = time.perf_counter()
            local = step - stage_start
            lr = lr_at(local, lr=t.lr, warmup=t.warmup_steps, total=steps, min_ratio=t.min_lr_ratio)
            lr *= lr_scale
            set_lr(opt, lr)
            loss_cfg = stage_cfg.loss
            if disc_opt is not None:
                loss_cfg = gan_schedule(stage_cfg, local)
                set_lr(disc_opt, t.disc_lr * lr_scale)
            parts: dict[str, torch.Tensor] = {}  # kept on the device: no sync per micro-batch
            loss_sum = torch.zeros((), device=device)
            tokens = 0
            for micro in range(t.grad_accum):
                # a DataLoader draws its workers' base seed from the global torch RNG whenever it
                # starts an epoch; isolated here so that a resumed run, which starts one at a
                # different step, keeps the same dropout stream as an uninterrupted run
                with torch.random.fork_rng(devices=[]):
                    next_batch = next(batches)
                batch = {
                    k: next_batch[k].to(device, non_blocking=True)
                    for k in ("ids", "attention_mask")
                }
                tokens += int(batch["attention_mask"].sum()) * d.world
                allowed = None
                if use_grammar:  # built on the CPU beside the loader, then moved
                    allowed = grammar_masks(grammar, next_batch, cache).to(
                        device, non_blocking=True
                    )
                sync = micro == t.grad_accum - 1 or not d.enabled
                with (
                    contextlib.nullcontext() if sync else train_model.no_sync(),
                    autocast(t.precision, device),
                ):
                    losses = compute_losses(
                        train_model, batch, loss_cfg, step=local, allowed=allowed
                    )
                    loss = losses["total"] / t.grad_accum
                    # the generator terms never reach the discriminator and ``disc`` never the
                    # generator (aurl.models.losses), so one backward feeds both optimizers
                    objective = loss + losses["disc"] / t.grad_accum if disc_opt else loss
                (scaler.scale(objective) if scaler is not None else objective).backward()
                loss_sum += loss.detach().float()
                for k, v in losses.items():
                    if k != "total":
                        parts[k] = parts.get(k, 0.0) + v.detach().float() / t.grad_accum
            if scaler is not None:
                for o in optimizers.values():
                    scaler.unscale_(o)
            gnorm = grad_norm(gen_params)
            loss_all = distributed.mean(loss_sum, d)
            last_loss = float(loss_sum)
            action, what = detector.check(float(loss_all), float(gnorm))
            if scaler is not None and action == "skip" and math.isfinite(float(loss_all)):
                action = "ok"  # fp16 overflow: the scaler skips the update and lowers its scale
                detector.bad_in_row = 0
            if action in ("skip", "rollback"):
                model.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                if monitor:
                    monitor.event(step, what, action, loss=float(loss_all), grad_norm=float(gnorm))
                if action == "rollback":
                    lr_scale *= 0.5
                    good = ckpt.latest_checkpoint(run_dir)
                    if good is not None:
                        back = ckpt.load_checkpoint(good)
                        back.load_weights(model)
                        for name, o in optimizers.items():
                            o.load_state_dict(back.train_state["optimizers"][name])
                        step = back.step
                        if monitor:
                            monitor.event(
                                step, what, "rolled_back", to=good.name, lr_scale=lr_scale
                            )
                    elif monitor:
                        monitor.event(step, what, "lowered_lr", lr_scale=lr_scale)
                    distributed.barrier(d)
                    if step < stage_start:  # the last good checkpoint is from an earlier stage
                        raise CheckpointError(
                            f"training diverged at the start of stage {stage + 1}: lower training.lr"
                        )
                step += 1 if action == "skip" else 0
                continue
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(gen_params, t.grad_clip)
            if disc_opt is not None and t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(disc_params, t.grad_clip)
            for o in optimizers.values():  # one generator and (vae_gan) one discriminator update
                scaler.step(o) if scaler is not None else o.step()
            if scaler is not None:
                scaler.update()
            model.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's kernels belong to its time
            tokens_since += tokens
            time_since += time.perf_counter() - step_t0
            steps_since += 1
            if action == "spike" and monitor:
                monitor.event(step, what, "flagged", loss=float(loss_all), grad_norm=float(gnorm))

            if monitor and (step % t.log_every == 0 or step == ends[stage]):
                values = {
                    "loss": float(loss_all), "lr": lr, "grad_norm": float(gnorm),
                    "tok_per_s": tokens_since / max(time_since, 1e-9),
                    "step_s": time_since / max(steps_since, 1),
                    **{f"loss_{k}": float(v) for k, v in parts.items()}, **_memory(device),
                }  # fmt: skip
                monitor.scalars(step, "train", values)
                monitor.line(train_line(step, values))
                set_status(pbar, " ".join(train_line(step, values).split()[2:8]))
                tokens_since, time_since, steps_since = 0, 0.0, 0

            evaluated = False
            metrics: dict[str, float] | None = None
            # also at the end of the run (not of earlier stages: losses of another mode do not
            # rank against this one's)
            if valid_set and (step % t.eval_every == 0 or step == ends[-1]):
                v = evaluate(model, valid_set, stage_cfg, device=device, d=d, grammar=grammar)
                valid_loss, evaluated = v["loss"], True
                metrics = {"valid_loss": v["loss"], "train_loss": float(loss_all)}
                if best_valid is None or v["loss"] < best_valid - t.min_delta:
                    best_valid, bad_evals = v["loss"], 0
                else:
                    bad_evals += 1
                if monitor:
                    monitor.scalars(step, "valid", v)
                    monitor.line(f"step {step} valid loss {v['loss']:.3f} ppl {v['ppl']:.2f} "
                                 f"bits/note {v['bits_per_note']:.3f}")  # fmt: skip
            if monitor and t.sample_every and step % t.sample_every == 0:
                _sample(model, stage_cfg, step, run_dir, monitor, grammar)

            out_of_time = t.max_minutes > 0 and (time.perf_counter() - t0) / 60 >= t.max_minutes
            out_of_time = distributed.any_flag(out_of_time, d)
            interrupted = distributed.any_flag(stop.requested, d)
            patience_out = bool(t.patience) and evaluated and bad_evals >= t.patience
            if d.is_main and (
                step % t.save_every == 0
                or step == ends[stage]
                or out_of_time
                or patience_out
                or interrupted
            ):
                ckpt.save_checkpoint(
                    run_dir, step=step, model=model, config=stage_cfg, optimizers=optimizers,
                    scaler=scaler, metrics=metrics,
                    state={"stage": stage, "data": loader.state_dict(),
                           "anomaly": detector.state_dict(), "lr_scale": lr_scale,
                           "best_valid": best_valid, "bad_evals": bad_evals},
                )  # fmt: skip
                ckpt.prune_checkpoints(run_dir, t.keep_best)
            if patience_out or out_of_time or interrupted:
                stopped = (
                    "interrupted" if interrupted
                    else "early_stopping" if patience_out else "time_budget"
                )  # fmt: skip
                log(f"step {step} stop {stopped}")
                break
        prev_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stopped != "max_steps":
            break

    distributed.barrier(d)
    if d.is_main and model is not None and ckpt.list_checkpoints(run_dir):
        # the weights alone, ready for ``aurl generate --checkpoint RUN/model``: the best
        # checkpoint by validation loss, else the last one
        exported = ckpt.export_weights(run_dir, run_dir / "model")
        log(f"model weights in {exported} (from {ckpt.export_source(run_dir).name})")
    if monitor:
        monitor.line(f"done step {step} stopped {stopped} loss {last_loss:.4f}"
                     + (f" best valid {best_valid:.4f}" if best_valid is not None else ""))  # fmt: skip
        monitor.close()
    return TrainResult(step, last_loss, valid_loss, best_valid, stopped, run_dir, model)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    try:
        import resource

        return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    except ImportError:  # not on POSIX
        return {}


def _enable_grad_checkpointing(model: torch.nn.Module) -> None:
    fn = getattr(model, "set_gradient_checkpointing", None)
    if fn is None:
        raise ConfigError("training.grad_checkpointing: this model does not support it; set false")
    fn(True)


def _sample(model, cfg: Config, step: int, run_dir: Path, monitor: Monitor, grammar) -> None:
    """A short sample (``aurl.generation``, temperature 1) saved as MIDI with its numbers."""
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.generate import generate
    from aurl.training.monitor import sample_metrics

    was = model.training
    model.eval()
    gen = dataclasses.replace(cfg.generation, max_tokens=cfg.training.sample_tokens, seed=step)
    # generation seeds its own sampler; the training RNG streams must not move
    with torch.random.fork_rng(devices=[]):
        ids = generate(unwrap(model), gen, num_samples=1)[0].ids
    model.train(was)
    out = run_dir / "samples" / f"step-{step:07d}.mid"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(cfg.vocab, cfg.data)
    tokenizer.decode_to_midi(ids, out)
    values = sample_metrics(tokenizer.decode_to_notes(ids), ids, grammar)
    monitor.scalars(step, "sample", values)
    monitor.line(
        f"step {step} sample {out.name} " + " ".join(f"{k} {v:.3g}" for k, v in values.items())
    )
