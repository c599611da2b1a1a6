"""The training loop, written out: AdamW, warmup + cosine, clipping, accumulation, mixed precision.

One call, :func:`train`, runs every stage of a config (``training.stages``, e.g. transformer ->
vae -> vae_gan, each starting from the weights of the last) in one process or under ``torchrun``
(DDP), checkpointing atomically and resuming exactly from the output folder's latest checkpoint.
Everything the loop does is visible here; small helpers compute the learning rate
(:func:`lr_at`), validation (:func:`evaluate`) and the optimizer (:func:`make_optimizer`).
In vae_gan mode each optimizer step is two: the discriminator's (:func:`_discriminator_step`),
then the generator's through the updated discriminator (:func:`_train_step`).
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
from collections.abc import Callable, Iterator, Sequence
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
    """bf16/fp16 where the device cannot run them is an error, never a silent fallback.

    fp16 (with a grad scaler) is for CUDA; the CPU runs it too (slowly, but the same code:
    that is how the tests cover it), other devices do not."""
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
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
    # one fused kernel for the whole update on CUDA, instead of a loop of small kernels
    fused = all(p.is_cuda for _, p in params)
    return torch.optim.AdamW(
        groups, lr=t.disc_lr if disc else t.lr, betas=(t.beta1, t.beta2), fused=fused or None
    )


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
    meters: Sequence[np.ndarray] | None = None,
    styles: Sequence[int] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Loss, perplexity and bits per note of the validation pieces, all ranks together.

    Scored by :func:`aurl.evaluation.likelihood.score_sequences` (grammar-renormalised when the
    training loss is); rank ``r`` scores every ``world``-th piece and the totals are summed.
    """
    from aurl.evaluation.likelihood import score_sequences

    mine = [docs[i] for i in range(d.rank, len(docs), d.world)]
    my_meters = None if meters is None else [meters[i] for i in range(d.rank, len(docs), d.world)]
    my_styles = None if styles is None else [styles[i] for i in range(d.rank, len(docs), d.world)]
    r = score_sequences(
        unwrap(model), mine, window=config.data.window, batch_size=config.data.batch_size,
        device=device, grammar=grammar if config.loss.grammar_masked else None, meters=my_meters,
        styles=my_styles,
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
    """(B, T, V) grammar masks of a batch of windows cut from longer pieces, each window from the
    grammar state of its prefix carried across the window's augmentation
    (:func:`aurl.data.window_state.window_masks`; what stays approximate is listed there)."""
    from aurl.data.window_state import window_masks

    return window_masks(grammar, batch, cache)


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
    init_from: Any = None,
    lora: int = 0,
    lora_alpha: float | None = None,
) -> TrainResult:
    """Train every stage of ``config`` into ``run_dir``; resume from its latest checkpoint.

    Args:
        config: the resolved config (``data.cache`` names the token cache).
        run_dir: output folder: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``,
            ``train.log``, ``tb/`` and ``samples/``.
        resume: a checkpoint folder to start from; default: the latest one in ``run_dir``.
        progress: progress helper (the CLI passes :func:`aurl.progress.bar`).
        echo: where log lines go besides ``train.log`` (default: stderr).
        init_from: start a new run from this model's weights: a
            :class:`aurl.training.finetune.Base` or what :func:`~aurl.training.finetune.load_base`
            reads (``"shipped"``, a shipped name, a model / checkpoint / run folder). The
            config's model and vocabulary must be the base's (``finetune_config``); ``run_dir``
            must hold no checkpoint yet. A resumed fine-tune run needs no ``init_from``: its
            checkpoints say what it is.
        lora: with ``init_from``: train LoRA adapters of this rank on the blocks' projections
            (:mod:`aurl.models.lora`), the base frozen; the run ends by writing
            ``run_dir/adapter``.
        lora_alpha: the adapters' alpha (default ``2 * lora``).

    Raises:
        ConfigError, DataError, CheckpointError: bad input, before the first step.
    """
    d = distributed.init(config.training.device)
    stop = _StopRequest()
    try:
        tune = _Tune(init_from, lora, lora_alpha)
        return _run(config, Path(run_dir), resume, progress, echo, d, stop, tune)
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


@dataclass
class _Tune:
    """What ``train`` was asked to start from (``init_from``) and to train (``lora``)."""

    init_from: Any = None
    lora: int = 0
    lora_alpha: float | None = None


@dataclass
class _Run:
    """What lasts from the first stage to the last: data, monitoring and the loop's counters
    (the counters travel in every checkpoint's ``state``)."""

    config: Config
    run_dir: Path
    d: distributed.Dist
    plan: list[tuple[str, int]]
    ends: list[int]  # global step at which each stage ends
    start: ckpt.Checkpoint | None  # the checkpoint resumed from
    monitor: Monitor | None  # rank 0 only
    cache: Any  # aurl.data.cache.TokenCache
    grammar: Any  # aurl.data.grammar.Grammar
    use_grammar: bool  # the loss needs grammar masks
    loader: Any
    batches: Iterator[dict[str, torch.Tensor]]
    valid_set: list[np.ndarray]
    valid_meters: list[np.ndarray]  # (2,) time signature of each validation piece
    detector: AnomalyDetector
    step: int = 0
    best_valid: float | None = None
    bad_evals: int = 0
    lr_scale: float = 1.0  # halved by every rollback
    # (N,) each cache row's style as a model style id (-1: none); None: a model without styles
    row_styles: np.ndarray | None = None
    valid_styles: list[int] | None = None  # the style id of each validation piece
    valid_loss: float | None = None
    pending_validation: bool = False  # stopped by a signal before validating its last step
    owed_train_loss: float = float("nan")  # that step's training loss, for its metrics
    last_loss: float = float("nan")
    stopped: str = "max_steps"
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    base: Any = None  # aurl.training.finetune.Base of a new fine-tune run (stage 0 starts there)
    # {"base", "base_sha256", "lora": {"rank", "alpha"} or None}: travels in every checkpoint,
    # so that a resumed fine-tune rebuilds its adapters and writes its adapter folder
    finetune: dict[str, Any] | None = None
    prefixes: Any = None  # aurl.data.window_state.TokenTable: the train pieces on the device

    def log(self, line: str) -> None:
        if self.monitor:
            self.monitor.line(line)


@dataclass
class _Stage:
    """One stage of the plan, built: its model, the wrapper that trains it (DDP and/or
    ``torch.compile``), its optimizers (``model`` and, in vae_gan mode, ``disc``)."""

    index: int
    mode: str
    config: Config  # the run's config with ``model.mode = mode``
    start: int  # global step at which the stage starts
    end: int
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None = None
    gen_params: list[torch.Tensor] = dataclasses.field(init=False)
    disc_params: list[torch.Tensor] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        named = list(self.model.named_parameters())
        self.gen_params = [p for n, p in named if p.requires_grad and not is_disc_param(n)]
        self.disc_params = [p for n, p in named if is_disc_param(n)]

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.optimizers["model"]

    @property
    def disc_opt(self) -> torch.optim.Optimizer | None:
        return self.optimizers.get("disc")


@dataclass
class _Step:
    """What one optimizer step computed and what the anomaly check made of it."""

    loss: float  # generator objective, mean over all ranks
    grad_norm: float  # generator's, before clipping
    lr: float
    tokens: int  # all ranks
    parts: dict[str, torch.Tensor]  # named losses, this rank's mean over its micro-batches
    action: str  # AnomalyDetector's: ok, spike, skip or rollback
    what: str
    disc_grad_norm: float | None = None  # vae_gan: the discriminator's, before clipping
    # this rank's real tokens, the sum of their sequences' squared lengths (each window's own
    # length: a segment of a packed row, or an unpacked row's real tokens) and the positions
    # the blocks ran over (rows x their width): attention FLOPs and the rows' real share
    own_tokens: int = 0
    token_sq: int = 0
    positions: int = 0


@dataclass
class _DiscStep:
    """What the discriminator's step computed."""

    loss: float  # hinge loss, mean over all ranks
    own_loss: torch.Tensor  # this rank's, on the device
    grad_norm: float  # before clipping, all ranks' gradients averaged
    ok: bool  # finite: the update was made (under fp16 the scaler may still skip it)


def _run(config, run_dir, resume, progress, echo, d: distributed.Dist, stop, tune) -> TrainResult:
    run = _open_run(config, run_dir, resume, echo, d, tune)
    prev_state: dict[str, torch.Tensor] | None = None
    model: torch.nn.Module | None = None
    for index, (mode, _) in enumerate(run.plan):
        if run.step >= run.ends[index]:
            continue
        stage = _build_stage(run, index, mode, prev_state)
        model = stage.model
        _train_stage(run, stage, progress, stop)
        prev_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if run.stopped != "max_steps":
            break
    return _finish(run, model)


def check_fim(config: Config) -> None:
    """FIM windows need the sentinel rows and a plain transformer; anticipated windows
    (:mod:`aurl.data.anticipation`) the control rows, a plain transformer and no FIM."""
    a = config.data.anticipation_rate
    if a > 0 and (config.model.anticipation <= 0 or config.model.mode != "transformer"):
        raise ConfigError(
            f"data.anticipation_rate={a} needs model.anticipation > 0 (beats ahead) and "
            f"model.mode=transformer (got {config.model.anticipation}, {config.model.mode!r}): "
            "set both, or data.anticipation_rate=0"
        )
    if a > 0 and config.data.fim_rate > 0:
        raise ConfigError(
            f"data.anticipation_rate={a} and data.fim_rate={config.data.fim_rate}: "
            "one window order at a time; set one of them to 0"
        )
    if config.data.fim_rate > 0 and not config.model.fim:
        raise ConfigError(
            f"data.fim_rate={config.data.fim_rate} needs model.fim=true (the sentinel ids' rows): "
            "set both, or data.fim_rate=0"
        )
    if config.data.fim_rate > 0 and config.model.mode != "transformer":
        raise ConfigError(
            f"data.fim_rate={config.data.fim_rate} is for model.mode=transformer (got "
            f"{config.model.mode!r}): set data.fim_rate=0 for VAE modes"
        )


def check_samples(config: Config) -> None:
    """The settings of the training samples (``config.generation``, ``training.sample_tokens``
    long), checked as :func:`_sample` uses them, before the run folder is written: a bad one
    once stopped the run at its first sample (step ``training.sample_every``, 1000 by default)
    with a line naming a flag ``aurl train`` does not have (``--key: unknown key 'Q'``).

    Raises:
        ConfigError: naming the ``generation.*`` setting and what to do.
    """
    if not config.training.sample_every:
        return
    from aurl.analysis.keys import parse_key
    from aurl.data.vocab import Vocab
    from aurl.errors import AurlError
    from aurl.generation.generate import make_masker
    from aurl.style_ids import style_id

    gen = dataclasses.replace(config.generation, max_tokens=config.training.sample_tokens)
    if gen.key:
        try:
            parse_key(gen.key)
        except AurlError as e:
            raise ConfigError(f"generation.key: {e}") from None
    try:
        make_masker(Vocab(config.vocab), gen, None)
        style_id(tuple(config.model.styles), gen.style)
    except AurlError as e:
        raise ConfigError(
            f"the training samples' generation settings: {e}; change that generation.* (or "
            "training.sample_tokens) override, or set training.sample_every=0"
        ) from None


def check_pack(config: Config) -> None:
    """Packed rows (``data.pack``) hold windows in time order under full causal attention, one
    row length: a transformer without FIM, anticipation or a window curriculum."""
    if not config.data.pack:
        return
    modes = {mode for mode, _ in stage_plan(config)}
    wrong = [
        f"{key}={value}" for key, value, bad in (
            ("model.mode", "/".join(sorted(modes)), modes != {"transformer"}),
            ("model.attention", config.model.attention, config.model.attention != "full"),
            ("data.fim_rate", config.data.fim_rate, config.data.fim_rate > 0),
            ("data.anticipation_rate", config.data.anticipation_rate,
             config.data.anticipation_rate > 0),
            ("data.curriculum", list(config.data.curriculum), bool(config.data.curriculum)),
        ) if bad
    ]  # fmt: skip
    if wrong:
        raise ConfigError(
            f"data.pack=true packs plain windows for model.mode=transformer with full attention, "
            f"one row length; got {', '.join(wrong)}: change those or set data.pack=false"
        )


def _open_run(config: Config, run_dir: Path, resume, echo, d: distributed.Dist, tune) -> _Run:
    """Every check of the input before any work, then the checkpoint to resume from, the
    monitor, the training batches and the validation pieces."""
    from aurl.data.dataset import build_loader
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Vocab

    t = config.training
    check_precision(t.precision, d.device)
    check_fim(config)
    check_pack(config)
    check_samples(config)
    plan = stage_plan(config)
    ends = np.cumsum([s for _, s in plan]).tolist()
    cache = open_cache(config)
    base, finetune = _open_finetune(config, run_dir, resume, tune, plan)
    start: ckpt.Checkpoint | None = None
    source = resume if resume is not None else ckpt.latest_checkpoint(run_dir)
    if source is not None:
        start = ckpt.load_checkpoint(source)
        ckpt.check_compatible(start.config, config, start.path, ignore_mode=bool(t.stages))
    vocab = Vocab(config.vocab)
    if start is not None and finetune is None:
        finetune = start.state.get("finetune")

    a = config.data.augment
    augment = any((a.transpose_prob, a.stretch_prob, a.velocity_prob, a.instrument_prob,
                   a.jitter_prob))  # fmt: skip
    # the data layer's loader: rank r takes batches r, r + world, ... of each epoch's order, so
    # N processes see at each step what one process sees with grad_accum * N micro-batches
    loader = build_loader(
        cache, config.data, split="train", seed=t.seed, rank=d.rank, world=d.world,
        augment=augment, batches_per_step=t.grad_accum, vocab_config=config.vocab,
        anticipation_beats=config.model.anticipation,
    )  # fmt: skip
    valid_rows = cache.split_indices("valid")
    valid_rows = valid_rows[: valid_count(cache.lengths[valid_rows], config)]
    valid_set = [np.asarray(cache.tokens(int(r)), dtype=np.int64) for r in valid_rows]
    valid_meters = [cache.meters[int(r)] for r in valid_rows]
    row_styles = cache.model_styles(config.model.styles) if config.model.styles else None
    valid_styles = None if row_styles is None else [int(row_styles[r]) for r in valid_rows]

    # the run folder is written only now: a cache that cannot fill a batch, a style the cache
    # or the model lacks leave no half-made run behind (docs/design.md, session 10's sweep)
    monitor = Monitor(run_dir, echo=echo) if d.is_main else None
    if d.is_main:
        write_config(config, run_dir)
    if monitor and start is not None:
        monitor.line(f"resuming from {start.path} at step {start.step}")
    if monitor and base is not None:
        lora = f" lora rank {finetune['lora']['rank']}" if finetune["lora"] else ""
        monitor.line(f"fine-tuning from {base.name} (sha256 {base.sha256[:12]}){lora}")
    if monitor and not valid_set:
        monitor.line("no valid split in the cache: validation and best-checkpoint tracking are off")

    detector = AnomalyDetector()
    if start is not None:
        detector.load_state_dict(start.state.get("anomaly", {}))
        loader.load_state_dict(start.state["data"])
    run = _Run(
        config=config, run_dir=run_dir, d=d, plan=plan, ends=ends, start=start, monitor=monitor,
        cache=cache, grammar=Grammar(vocab, config.data.polyphony_cap),
        use_grammar=config.loss.grammar_masked or config.loss.grammar_weight > 0,
        loader=loader, batches=iter(loader), valid_set=valid_set, detector=detector,
        valid_meters=valid_meters, base=base, finetune=finetune, row_styles=row_styles,
        valid_styles=valid_styles,
    )  # fmt: skip
    if start is not None:
        run.step = start.step
        run.best_valid = start.state.get("best_valid")
        run.bad_evals = int(start.state.get("bad_evals", 0))
        run.lr_scale = float(start.state.get("lr_scale", 1.0))
        run.pending_validation = bool(start.state.get("pending_validation", False))
        run.owed_train_loss = float(start.state.get("owed_train_loss", float("nan")))
    if run.step >= ends[-1]:
        run.log(f"step {run.step}: the run is already complete (raise training.max_steps to go on)")
    return run


def _build_stage(
    run: _Run, index: int, mode: str, prev_state: dict[str, torch.Tensor] | None
) -> _Stage:
    """The model of stage ``index`` (from the last stage's weights, or the checkpoint's when
    resuming inside it), its optimizers, and its DDP / compiled wrapper."""
    from aurl.models import build_model

    config, t, d, start = run.config, run.config.training, run.d, run.start
    device = d.device
    cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, mode=mode))
    # identical initial weights on every rank and in every resumed run
    seed_everything(t.seed + index)
    model = build_model(cfg).to(device)
    model.set_right_padding(True)  # the loader's and validation's batches pad on the right
    if t.grad_checkpointing:
        _enable_grad_checkpointing(model)
    end = run.ends[index]
    resuming = start is not None and start.state.get("stage") == index and start.step < end
    if prev_state is None and start is not None and not resuming:
        # resuming exactly at a stage boundary: the new stage starts from the saved weights
        from safetensors.torch import load_file

        prev_state = load_file(str(start.path / "model.safetensors"), device=str(device))
    if prev_state is not None:  # a new stage starts from the last one's weights
        own = model.state_dict()
        fit = {k: v for k, v in prev_state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fit, strict=False)
    elif run.base is not None and index == 0 and not resuming:  # a fine-tune run's first step
        from aurl.training.finetune import load_base_weights

        fresh = load_base_weights(model, run.base)
        if fresh:
            run.log(f"not in the base, freshly initialized: {', '.join(fresh[:6])}")
    lora = (run.finetune or {}).get("lora")
    if lora:  # after the base's weights are in: the adapters wrap them
        from aurl.models.lora import add_lora

        add_lora(model, lora["rank"], lora["alpha"])
    optimizers = {"model": make_optimizer(model, cfg)}
    if mode == "vae_gan":
        optimizers["disc"] = make_optimizer(model, cfg, disc=True)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    stage_start = end - run.plan[index][1]
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
    elif run.step == 0 or stage_start == run.step:
        seed_everything(t.seed + 1000 * (index + 1))
        if index > 0:  # a new objective: early stopping starts over
            run.best_valid, run.bad_evals = None, 0
    if d.rank > 0:  # different dropout masks per rank, reproducible per (seed, rank, step)
        torch.manual_seed(hash((t.seed, d.rank, run.step)) % 2**63)
    stage = _Stage(
        index=index, mode=mode, config=cfg, start=stage_start, end=end, model=model,
        train_model=_wrap(model, mode, d, t.compile), optimizers=optimizers, scaler=scaler,
    )  # fmt: skip
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if lora:
        total = sum(p.numel() for p in model.parameters())
        run.log(f"lora: {n_params:,} of {total:,} parameters trained "
                f"({100 * n_params / total:.2f}%)")  # fmt: skip
    run.log(f"stage {index + 1}/{len(run.plan)} mode {mode} steps {stage_start}-{end} "
            f"params {n_params / 1e6:.2f}M device {device} precision {t.precision} world {d.world}")  # fmt: skip
    return stage


def _wrap(
    model: torch.nn.Module, mode: str, d: distributed.Dist, compiled: bool
) -> torch.nn.Module:
    """The module the training step calls: ``model`` under DDP (several processes) and
    ``torch.compile`` (``training.compile``)."""
    from aurl.models.model import compile_model

    train_model = model
    if d.enabled:
        # Parameters the step averages itself (distributed.average_gradients), so DDP must not
        # hook them: the learned loss weights (used after the forward, in the losses: DDP's
        # search for unused parameters would mark them ready before their backward), and in
        # vae_gan the discriminator, which learns in a step of its own (_discriminator_step)
        # whose backward would fire the hooks (its buffers are not synced either).
        named = itertools.chain(model.named_parameters(), model.named_buffers())
        ignore = [
            n for n, _ in named
            if n == "loss_log_vars" or (mode == "vae_gan" and is_disc_param(n))
        ]  # fmt: skip
        if model.loss_log_vars is not None:
            ignore.append(".loss_log_vars")  # DDP names the root module's parameters ".name"
        if ignore:
            distributed.DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        train_model = distributed.DDP(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=mode != "transformer",
        )  # fmt: skip
    return compile_model(train_model) if compiled else train_model


def _train_stage(run: _Run, stage: _Stage, progress: Progress, stop: _StopRequest) -> None:
    """Optimizer steps until the stage ends or a stop (early stopping, time budget, Ctrl-C)."""
    from aurl.training import mfu

    t, d = run.config.training, run.d
    # throughput counts the training steps only (not validation, samples, checkpoints)
    tokens_since, time_since, steps_since = 0, 0.0, 0
    own_since, sq_since, positions_since = 0, 0, 0  # this rank's (MFU's attention, fill)
    peak = mfu.peak_tflops(d.device, t.peak_tflops)
    c = stage.config.model
    n_params = sum(p.numel() for p in stage.gen_params)
    # a rollback moves ``run.step`` back, so the loop runs on it, not on a range
    if run.pending_validation:  # the run stopped before validating its last step
        run.pending_validation = False
        owed = _validate(run, stage, run.owed_train_loss)
        patience_out = bool(t.patience) and owed is not None and run.bad_evals >= t.patience
        if d.is_main and owed is not None and (_save_due(run, stage) or patience_out):
            _save(run, stage, owed)  # the step's checkpoint as the straight run saved it
        if patience_out:
            run.stopped = "early_stopping"  # where the straight run stopped
            run.log(f"step {run.step} stop {run.stopped}")
            return
    pbar = progress(itertools.count(), total=stage.end - run.step, desc=f"train {stage.mode}")
    for _ in pbar:
        if run.step >= stage.end:
            break
        step_t0 = time.perf_counter()
        out = _train_step(run, stage)
        if out.action in ("skip", "rollback"):
            _handle_anomaly(run, stage, out)
            continue
        run.step += 1
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)  # the step's kernels belong to its time
        tokens_since += out.tokens
        time_since += time.perf_counter() - step_t0
        steps_since += 1
        own_since += out.own_tokens
        sq_since += out.token_sq
        positions_since += out.positions
        if out.action == "spike" and run.monitor:
            run.monitor.event(run.step, out.what, "flagged", loss=out.loss, grad_norm=out.grad_norm)
        if run.step % t.log_every == 0 or run.step == stage.end:
            parts = _mean_over_ranks(out.parts, d)  # a collective: every rank takes part
            values = {
                "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                "tok_per_s": tokens_since / max(time_since, 1e-9),
                "step_s": time_since / max(steps_since, 1),
                "fill": own_since / max(positions_since, 1),  # real share of the rows
                **{f"loss_{k}": v for k, v in parts.items()}, **_memory(d.device),
            }  # fmt: skip
            if out.disc_grad_norm is not None:
                values["disc_grad_norm"] = out.disc_grad_norm
            if peak is not None:  # per device: each rank's share of the tokens on its own GPU
                context = mfu.attention_context(sq_since, own_since)
                per_token = mfu.flops_per_token(n_params, c.n_layers, c.d_model, context)
                values["mfu"] = mfu.mfu(values["tok_per_s"] / d.world, per_token, peak)
            if run.monitor:
                run.monitor.scalars(run.step, "train", values)
                run.monitor.line(train_line(run.step, values))
                set_status(pbar, " ".join(train_line(run.step, values).split()[2:8]))
            tokens_since, time_since, steps_since = 0, 0.0, 0
            own_since, sq_since, positions_since = 0, 0, 0

        # a stop skips this step's validation and samples (minutes under load): the checkpoint
        # says so and the resumed run validates the step first (see _train_stage's start)
        interrupted = distributed.any_flag(stop.requested, d)
        metrics = None
        if interrupted:
            run.pending_validation = _due_validation(run)
            run.owed_train_loss = out.loss
        else:
            metrics = _validate(run, stage, out.loss)
            if run.monitor and t.sample_every and run.step % t.sample_every == 0:
                _sample(stage.model, stage.config, run.step, run.run_dir, run.monitor, run.grammar)

        out_of_time = t.max_minutes > 0 and (time.perf_counter() - run.t0) / 60 >= t.max_minutes
        out_of_time = distributed.any_flag(out_of_time, d)
        patience_out = bool(t.patience) and metrics is not None and run.bad_evals >= t.patience
        if d.is_main and (_save_due(run, stage) or out_of_time or patience_out or interrupted):
            _save(run, stage, metrics)
        if patience_out or out_of_time or interrupted:
            run.stopped = (
                "interrupted" if interrupted
                else "early_stopping" if patience_out else "time_budget"
            )  # fmt: skip
            run.log(f"step {run.step} stop {run.stopped}")
            break


def _mean_over_ranks(parts: dict[str, torch.Tensor], d: distributed.Dist) -> dict[str, float]:
    """The named losses averaged over all processes, in one all-reduce."""
    if not parts:
        return {}
    values = torch.stack([torch.as_tensor(v, device=d.device).float() for v in parts.values()])
    values = distributed.mean(values, d)
    return dict(zip(parts, values.tolist()))


def _train_step(run: _Run, stage: _Stage) -> _Step:
    """One optimizer step over ``grad_accum`` micro-batches: in vae_gan mode first the
    discriminator's (:func:`_discriminator_step`), then the generator's forward and backward
    through the updated discriminator, the anomaly check, and (unless it says skip or rollback)
    the clipped update. ``run.step`` is left to the caller."""
    t, d = run.config.training, run.d
    local = run.step - stage.start
    steps = stage.end - stage.start
    lr = lr_at(local, lr=t.lr, warmup=t.warmup_steps, total=steps, min_ratio=t.min_lr_ratio)
    lr *= run.lr_scale
    set_lr(stage.opt, lr)
    loss_cfg = stage.config.loss
    micro = _micro_batches(run, stage)
    own = {k: sum(batch[k] for batch, _ in micro) for k in ("tokens", "token_sq", "positions")}
    tokens = own["tokens"] * d.world
    # VAE modes draw posterior samples (and vae_gan Gumbel noise) in every micro-batch: seeded
    # by the micro-batch's place in the global batch, N processes draw what one process does
    seeds = micro_seeds(t.seed, run.step, len(micro), d) if stage.mode != "transformer" else None
    disc: _DiscStep | None = None
    if stage.disc_opt is not None:
        loss_cfg = gan_schedule(stage.config, local)
        set_lr(stage.disc_opt, t.disc_lr * run.lr_scale)
        disc = _discriminator_step(stage, micro, seeds=seeds, d=d, precision=t.precision,
                                   grad_clip=t.grad_clip)  # fmt: skip
        if not disc.ok:  # neither network learns from this step
            action, what = run.detector.check(disc.loss, disc.grad_norm)
            run.last_loss = float("nan")
            return _Step(
                loss=disc.loss, grad_norm=disc.grad_norm, lr=lr, tokens=tokens, parts={},
                action=action, what=f"disc_{what}", disc_grad_norm=disc.grad_norm,
            )  # fmt: skip
    loss_sum, parts = _generator_backward(stage, micro, loss_cfg, step=local, d=d,
                                          precision=t.precision, seeds=seeds)  # fmt: skip
    if disc is not None:
        parts["disc"] = disc.own_loss
    if stage.model.loss_log_vars is not None:  # outside DDP (see _wrap)
        distributed.average_gradients([stage.model.loss_log_vars], d)
    scaler = stage.scaler
    if scaler is not None:
        scaler.unscale_(stage.opt)
    gnorm = grad_norm(stage.gen_params)
    loss_all = distributed.mean(loss_sum, d)
    run.last_loss = float(loss_sum)
    action, what = run.detector.check(float(loss_all), float(gnorm))
    if scaler is not None and action == "skip" and math.isfinite(float(loss_all)):
        action = "ok"  # fp16 overflow: the scaler skips the update and lowers its scale
        run.detector.bad_in_row = 0
    if action not in ("skip", "rollback"):
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stage.gen_params, t.grad_clip)
        scaler.step(stage.opt) if scaler is not None else stage.opt.step()
        if scaler is not None:
            scaler.update()
        stage.model.zero_grad(set_to_none=True)
    return _Step(
        loss=float(loss_all), grad_norm=float(gnorm), lr=lr, tokens=tokens, parts=parts,
        action=action, what=what, disc_grad_norm=disc.grad_norm if disc is not None else None,
        own_tokens=own["tokens"], token_sq=own["token_sq"], positions=own["positions"],
    )  # fmt: skip


def micro_seeds(seed: int, step: int, n: int, d: distributed.Dist) -> list[int]:
    """A seed for each of this rank's ``n`` micro-batches of ``step`` (vae_gan mode).

    Named by the micro-batch's place in the global batch (rank r's micro-batch i is number
    ``i * world + r``, as the loader deals them out), so that N processes draw the same
    posterior samples, Gumbel noise and dropout masks as one process with N times the
    accumulation; and the discriminator's and the generator's passes over a micro-batch replay
    the same draws, so both judge the same sample of the generator.
    """
    seed &= 2**64 - 1  # SeedSequence takes non-negative entropy
    ids = [i * d.world + d.rank for i in range(n)]
    return [int(np.random.SeedSequence([seed, step, g]).generate_state(1)[0]) for g in ids]


@contextlib.contextmanager
def _replay(seed: int | None, device: torch.device) -> Iterator[None]:
    """The block's random draws come from ``seed``; the global streams are left as they were
    (nothing changes for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _discriminator_step(
    stage: _Stage, micro: list, *, seeds: list[int], d: distributed.Dist, precision: str,
    grad_clip: float,
) -> _DiscStep:  # fmt: skip
    """The discriminator's half of a vae_gan step: its hinge loss on the real micro-batches
    against sequences the generator samples without gradient (the same draws its own pass will
    make), gradients accumulated over the micro-batches, averaged over the processes (the
    generator's DDP leaves the discriminator alone), clipped, one update. The generator's
    parameters get no gradient and do not move."""
    from aurl.models import losses as model_losses

    model, opt, scaler = stage.model, stage.disc_opt, stage.scaler
    n = len(micro)
    loss_sum = torch.zeros((), device=d.device)
    for i, ((batch, allowed), seed) in enumerate(zip(micro, seeds)):
        ids = batch["ids"]
        # spectral norm: one power iteration per step, in its first forward, however many
        # micro-batches or processes share the step (every other forward reads the vectors)
        model.discriminator.train(i == 0)
        with _replay(seed, d.device), autocast(precision, d.device):
            with torch.no_grad():
                out = model(
                    ids, attention_mask=batch["attention_mask"], start=batch.get("start"),
                    meter=batch.get("meter"), style=batch.get("style"),
                )  # fmt: skip
                hard = stage.config.loss.gan_fakes == "hard"
                fake = model_losses.soft_fakes(ids, out.logits, allowed, hard=hard)
            loss = model_losses.discriminator_loss(model, ids, fake, stage.config.loss.gan_loss) / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
    model.discriminator.eval()
    distributed.average_gradients(stage.disc_params, d)
    if scaler is not None:
        scaler.unscale_(opt)
    gnorm = float(grad_norm(stage.disc_params))
    loss_all = float(distributed.mean(loss_sum, d))
    # under fp16 an overflow leaves the gradients non-finite: scaler.step skips the update
    ok = math.isfinite(loss_all) and (math.isfinite(gnorm) or scaler is not None)
    if ok:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stage.disc_params, grad_clip)
        scaler.step(opt) if scaler is not None else opt.step()
    opt.zero_grad(set_to_none=True)
    return _DiscStep(loss=loss_all, own_loss=loss_sum, grad_norm=gnorm, ok=ok)


def _micro_batches(run: _Run, stage: _Stage) -> list[tuple[dict[str, Any], torch.Tensor | None]]:
    """The next ``grad_accum`` batches on the device, each with its grammar masks (or None),
    the state its windows start from (``start``: the musical time and grammar features their
    prefixes leave, :func:`aurl.data.window_state.window_start`) and the pieces' ``meter``."""
    from aurl.data.window_state import TokenTable, window_inputs, window_start
    from aurl.models.layers import Packing

    device = run.d.device
    model = stage.model
    features = model.time is not None or model.grammar_features is not None
    if (features or run.use_grammar) and run.prefixes is None:  # the train pieces, on the device
        run.prefixes = TokenTable(run.cache, run.cache.split_indices("train"), device)
        if features:  # the model's state every 1024 tokens: a long piece's windows scan less
            with torch.no_grad():
                run.prefixes.add_checkpoints(unwrap(model))
    out = []
    for _ in range(run.config.training.grad_accum):
        # a DataLoader draws its workers' base seed from the global torch RNG whenever it
        # starts an epoch; isolated here so that a resumed run, which starts one at a
        # different step, keeps the same dropout stream as an uninterrupted run
        with torch.random.fork_rng(devices=[]):
            next_batch = next(run.batches)
        batch: dict[str, Any] = {
            k: next_batch[k].to(device, non_blocking=True) for k in ("ids", "attention_mask")
        }
        lengths = next_batch["attention_mask"].sum(1)  # (B,) or (S,) counted on the host
        batch["tokens"] = int(lengths.sum())
        batch["token_sq"] = int((lengths**2).sum())
        batch["positions"] = next_batch["ids"].numel()
        if "pack_row" in next_batch:  # data.pack: the segments' places in the packed rows
            rows, width = run.config.data.batch_size, int(next_batch["pack_width"])
            batch["positions"] = rows * width
            batch["pack"] = Packing.plan(
                next_batch["pack_row"].to(device), next_batch["pack_col"].to(device),
                lengths.to(device), rows=rows, width=width, seg_len=next_batch["ids"].shape[1],
            )  # fmt: skip
        if "meter" in next_batch:
            batch["meter"] = next_batch["meter"].to(device, non_blocking=True)
        if run.row_styles is not None:  # the pieces' styles (the model drops some: dropout)
            style = run.row_styles[next_batch["index"].numpy()]
            batch["style"] = torch.from_numpy(style).to(device, non_blocking=True)
        # everything on the device, from one grammar scan of the window (no per-batch host work
        # but the loader's): the start state from the prefix, the features, the masks
        allowed = None
        if "fim_pos" in next_batch:  # FIM windows: features and masks over the time order
            if features:
                batch["start"] = window_start(model, next_batch, run.prefixes)
            carried = getattr(batch.get("start"), "grammar", None)
            batch["fim"], allowed = _fim_inputs(run, next_batch, carried, device)
        elif features:
            grammar = run.grammar if run.use_grammar else None
            batch["start"], allowed = window_inputs(model, next_batch, run.prefixes, grammar)
        elif run.use_grammar:
            allowed = grammar_masks(run.grammar, {**next_batch, "ids": batch["ids"]}, run.prefixes)
        out.append((batch, allowed))
    return out


def _fim_inputs(
    run: _Run, batch: dict[str, Any], carried: Any, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(source, pos)`` for the model's ``fim`` argument and the (B, T, V + 1) masks of a
    batch of FIM windows (:mod:`aurl.data.fim`), each from its window's start state."""
    from aurl.data.fim import fim_allowed
    from aurl.data.window_state import window_states

    source, pos = batch["fim_source"].to(device), batch["fim_pos"].to(device)
    state = carried[0] if carried is not None else window_states(run.grammar, batch, run.prefixes)
    allowed = fim_allowed(run.grammar, batch["ids"].to(device), source, pos,
                          batch["fim_middle"].to(device), state)  # fmt: skip
    return (source, pos), allowed


def _generator_backward(
    stage: _Stage, micro: list, loss_cfg: LossConfig, *, step: int, d: distributed.Dist,
    precision: str, seeds: list[int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Accumulate the generator's gradients over every micro-batch (each under its seed, when
    given); returns (this rank's objective, named losses), each the mean over the micro-batches
    and kept on the device (no sync per micro-batch). A discriminator is only read: its
    parameters are frozen inside the loss and get no gradient."""
    from aurl.models import losses as model_losses

    n = len(micro)
    parts: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=d.device)
    if stage.disc_opt is not None:
        stage.model.discriminator.eval()  # the vectors of this step's power iteration
    for i, (batch, allowed) in enumerate(micro):
        sync = i == n - 1 or not d.enabled
        with (
            contextlib.nullcontext() if sync else stage.train_model.no_sync(),
            _replay(seeds[i] if seeds is not None else None, d.device),
            autocast(precision, d.device),
        ):
            losses = model_losses.compute_losses(
                stage.train_model, batch, loss_cfg, step=step, allowed=allowed, disc=False
            )
            loss = losses["total"] / n
        (stage.scaler.scale(loss) if stage.scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
        for k, v in losses.items():
            if k != "total":
                parts[k] = parts.get(k, 0.0) + v.detach().float() / n
    if stage.disc_opt is not None:
        stage.model.discriminator.train()
    return loss_sum, parts


def _handle_anomaly(run: _Run, stage: _Stage, out: _Step) -> None:
    """A non-finite step: drop its gradients; ``skip`` goes on with the next batch, ``rollback``
    restores the last checkpoint's weights and optimizers with half the learning rate."""
    stage.model.zero_grad(set_to_none=True)
    if stage.scaler is not None:
        stage.scaler.update()
    if run.monitor:
        run.monitor.event(run.step, out.what, out.action, loss=out.loss, grad_norm=out.grad_norm)
    if out.action == "skip":
        run.step += 1
        return
    run.lr_scale *= 0.5
    good = ckpt.latest_checkpoint(run.run_dir)
    if good is not None:
        back = ckpt.load_checkpoint(good)
        back.load_weights(stage.model)
        for name, o in stage.optimizers.items():
            o.load_state_dict(back.train_state["optimizers"][name])
        run.step = back.step
        if run.monitor:
            run.monitor.event(
                run.step, out.what, "rolled_back", to=good.name, lr_scale=run.lr_scale
            )
    elif run.monitor:
        run.monitor.event(run.step, out.what, "lowered_lr", lr_scale=run.lr_scale)
    distributed.barrier(run.d)
    if run.step < stage.start:  # the last good checkpoint is from an earlier stage
        raise CheckpointError(
            f"training diverged at the start of stage {stage.index + 1}: lower training.lr"
        )


def _due_validation(run: _Run) -> bool:
    """Whether this step validates: every ``eval_every`` steps and at the end of the run."""
    t = run.config.training
    return bool(run.valid_set) and (run.step % t.eval_every == 0 or run.step == run.ends[-1])


def _save_due(run: _Run, stage: _Stage) -> bool:
    """Whether this step saves a checkpoint whatever else happens: every ``save_every`` steps
    and at the end of each stage (a stop saves too, see :func:`_train_stage`)."""
    return run.step % run.config.training.save_every == 0 or run.step == stage.end


def _validate(run: _Run, stage: _Stage, train_loss: float) -> dict[str, float] | None:
    """Validation at ``eval_every`` and at the end of the run (not of earlier stages: losses of
    another mode do not rank against this one's), with early stopping's bookkeeping; returns
    the metrics a checkpoint keeps, or None when it did not run."""
    if not _due_validation(run):
        return None
    t = run.config.training
    v = evaluate(stage.model, run.valid_set, stage.config, device=run.d.device, d=run.d,
                 meters=run.valid_meters, grammar=run.grammar,
                 styles=run.valid_styles)  # fmt: skip
    run.valid_loss = v["loss"]
    if run.best_valid is None or v["loss"] < run.best_valid - t.min_delta:
        run.best_valid, run.bad_evals = v["loss"], 0
    else:
        run.bad_evals += 1
    if run.monitor:
        run.monitor.scalars(run.step, "valid", v)
        run.monitor.line(f"step {run.step} valid loss {v['loss']:.3f} ppl {v['ppl']:.2f} "
                         f"bits/note {v['bits_per_note']:.3f}")  # fmt: skip
    return {"valid_loss": v["loss"], "train_loss": train_loss}


def _save(run: _Run, stage: _Stage, metrics: dict[str, float] | None) -> None:
    """A checkpoint of this step (rank 0), then pruning to the best ``keep_best`` + the last."""
    ckpt.save_checkpoint(
        run.run_dir, step=run.step, model=stage.model, config=stage.config,
        optimizers=stage.optimizers, scaler=stage.scaler, metrics=metrics,
        state={"stage": stage.index, "data": run.loader.state_dict(),
               "anomaly": run.detector.state_dict(), "lr_scale": run.lr_scale,
               "best_valid": run.best_valid, "bad_evals": run.bad_evals,
               **({"pending_validation": True, "owed_train_loss": run.owed_train_loss}
                  if run.pending_validation else {}),
               **({"finetune": run.finetune} if run.finetune else {})},
    )  # fmt: skip
    ckpt.prune_checkpoints(run.run_dir, run.config.training.keep_best)


def _finish(run: _Run, model: torch.nn.Module | None) -> TrainResult:
    """Export the best (else the last) checkpoint's weights beside the run, close the monitor."""
    distributed.barrier(run.d)
    lora = (run.finetune or {}).get("lora")
    if run.d.is_main and model is not None and lora and ckpt.list_checkpoints(run.run_dir):
        exported = _export_adapter(run)
        run.log(f"adapter in {exported} (from {ckpt.export_source(run.run_dir).name})")
    elif run.d.is_main and model is not None and ckpt.list_checkpoints(run.run_dir):
        # the weights alone, ready for ``aurl generate --checkpoint RUN/model``: the best
        # checkpoint by validation loss, else the last one
        exported = ckpt.export_weights(run.run_dir, run.run_dir / "model")
        run.log(f"model weights in {exported} (from {ckpt.export_source(run.run_dir).name})")
    if run.monitor:
        best = f" best valid {run.best_valid:.4f}" if run.best_valid is not None else ""
        run.monitor.line(
            f"done step {run.step} stopped {run.stopped} loss {run.last_loss:.4f}{best}"
        )
        run.monitor.close()
    if model is not None:  # the caller may pad otherwise
        model.set_right_padding(False)
    return TrainResult(
        run.step, run.last_loss, run.valid_loss, run.best_valid, run.stopped, run.run_dir, model
    )


def _open_finetune(config: Config, run_dir: Path, resume, tune: _Tune, plan) -> tuple[Any, Any]:
    """The base model of a new fine-tune run and what its checkpoints record, checked before
    any work; ``(None, None)`` for any other run (a resumed fine-tune reads its checkpoint)."""
    if tune.init_from is None:
        if tune.lora:
            raise ConfigError("--lora trains adapters on a base model: add --init-from BASE")
        return None, None
    from aurl.training.finetune import Base, check_fits, load_base, lora_info

    if resume is not None:
        raise ConfigError(
            "--init-from starts a new run from a model's weights, --resume goes on with a run: "
            "give one of them"
        )
    if ckpt.latest_checkpoint(run_dir) is not None:
        raise CheckpointError(
            f"{run_dir} already holds a run's checkpoints: --init-from starts a new run, so give "
            "a new --out folder; to go on with this run, run it again without --init-from"
        )
    if tune.lora and (len(plan) > 1 or plan[0][0] != "transformer"):
        raise ConfigError(
            "--lora adapts a transformer: set model.mode=transformer and no training.stages"
        )
    base = tune.init_from if isinstance(tune.init_from, Base) else load_base(tune.init_from)
    check_fits(config, base)
    lora = lora_info(tune.lora, tune.lora_alpha) if tune.lora else None
    return base, {"base": base.name, "base_sha256": base.sha256, "lora": lora}


def _export_adapter(run: _Run) -> Path:
    """A LoRA run's adapter folder, ``RUN/adapter``, from its best (else latest) checkpoint."""
    from safetensors.torch import load_file

    from aurl.models.lora import adapter_tensors, save_adapter

    source = ckpt.export_source(run.run_dir)
    ckpt.verify(source)
    tensors = adapter_tensors(load_file(str(source / "model.safetensors")))
    f = run.finetune
    return save_adapter(
        run.run_dir / "adapter", tensors, rank=f["lora"]["rank"], alpha=f["lora"]["alpha"],
        base_name=f["base"], base_sha256=f["base_sha256"],
    )  # fmt: skip


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
    from aurl.generation.generate import generate, prior_latents
    from aurl.training.monitor import sample_metrics

    was = model.training
    model.eval()
    gen = dataclasses.replace(cfg.generation, max_tokens=cfg.training.sample_tokens, seed=step)
    # generation seeds its own sampler; the training RNG streams must not move
    with torch.random.fork_rng(devices=[]):
        latents = prior_latents(unwrap(model), 1, step)  # a VAE decodes a prior draw
        ids = generate(unwrap(model), gen, num_samples=1, latents=latents)[0].ids
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
