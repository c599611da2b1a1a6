"""Typed, frozen configuration for every layer of Aurl.

One dataclass per concern with its defaults in code. YAML files and ``key=value`` overrides only
change fields; an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
naming the key and what is allowed, before any work starts.

A YAML file may name another file to inherit from with ``base: other.yaml`` (relative to the
file); presets are small YAML files shipped in ``aurl/configs/`` (``tiny``, ``small``, ``full``).

This module imports no layer of Aurl (only the leaves ``aurl.errors`` and ``aurl.fileio``);
every layer imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aurl.errors import ConfigError
from aurl.fileio import atomic_write_text

PRESET_DIR = Path(__file__).parent / "configs"
# a config is a few hundred bytes; PyYAML reads ~5 MB a second, in Python
MAX_CONFIG_BYTES = 2**20
# a value as an error line shows it: a YAML alias bomb (9 lists of 9 of ... 9**9 strings, a
# few hundred bytes of file) is shown in its first items, never expanded (repr of the whole
# took minutes and gigabytes)
_shown = reprlib.Repr()
_shown.maxlevel, _shown.maxstring, _shown.maxother, _shown.maxlong = 2, 60, 60, 40
_shown.maxlist = _shown.maxtuple = _shown.maxdict = _shown.maxset = 4


def _num(default: Any, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A numeric field whose value must lie in ``[lo, hi]`` (either bound optional)."""
    return field(default=default, metadata={"range": (lo, hi), **kw})


# --------------------------------------------------------------------------------------------
# Concerns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabConfig:
    """The event vocabulary. Defaults give the design's 774 tokens; counts keep their order."""

    time_unit: Literal["beat", "seconds"] = "beat"
    steps_per_beat: int = _num(32, 1, 960)  # beat mode: one TIME_SHIFT step = 1/32 beat
    step_seconds: float = _num(0.015625, 1e-4, 1.0)  # seconds mode: 15.625 ms per step
    max_shift_steps: int = _num(512, 1, 4096)
    pitch_min: int = _num(21, 0, 127)
    pitch_max: int = _num(108, 0, 127)
    velocity_bins: int = _num(32, 1, 127)
    tempo_bins: int = _num(32, 1, 256)
    tempo_min: float = _num(60.0, 1.0, 1000.0)
    tempo_max: float = _num(200.0, 1.0, 1000.0)
    num_instruments: int = _num(16, 1, 16)  # General MIDI program families (program // 8)

    def __post_init__(self) -> None:
        if self.pitch_max < self.pitch_min:
            raise ConfigError(
                f"vocab.pitch_max ({self.pitch_max}) is below vocab.pitch_min "
                f"({self.pitch_min}): set pitch_min <= pitch_max"
            )
        if self.tempo_max <= self.tempo_min:
            raise ConfigError(
                f"vocab.tempo_max ({self.tempo_max}) must exceed vocab.tempo_min ({self.tempo_min})"
            )


@dataclass(frozen=True)
class AugmentConfig:
    """Batch-time augmentation on token arrays; each transform fires with its probability."""

    transpose_prob: float = _num(0.5, 0.0, 1.0)
    transpose_max: int = _num(6, 0, 24)  # semitones, either way; notes kept in range
    stretch_prob: float = _num(0.0, 0.0, 1.0)
    stretch_min: float = _num(0.9, 0.1, 10.0)
    stretch_max: float = _num(1.1, 0.1, 10.0)
    velocity_prob: float = _num(0.3, 0.0, 1.0)
    velocity_min: float = _num(0.8, 0.0, 10.0)
    velocity_max: float = _num(1.2, 0.0, 10.0)
    instrument_prob: float = _num(0.0, 0.0, 1.0)
    jitter_prob: float = _num(0.0, 0.0, 1.0)
    jitter_steps: int = _num(1, 0, 64)


MAX_STYLE_REPEAT = 1000  # data.style_repeat's largest count


@dataclass(frozen=True)
class DataConfig:
    """Reading, repairing, splitting, caching and batching."""

    corpus: str = "bach-chorales"
    cache: str = ""  # token cache folder (``aurl data prepare`` output)
    out_of_range: Literal["fold", "drop"] = "fold"  # pitches outside the vocab's range
    drums: Literal["drop", "keep"] = "drop"  # keep: drum notes go to their own family id
    max_events_per_file: int = _num(2_000_000, 1)  # refuse bigger files: bounded time/memory
    max_file_bytes: int = _num(64 * 1024 * 1024, 1)
    valid_fraction: float = _num(0.1, 0.0, 0.5)
    test_fraction: float = _num(0.1, 0.0, 0.5)
    polyphony_cap: int = _num(16, 1, 128)
    window: int = _num(512, 8, 65536)
    # curriculum: (step, window) pairs; the window grows at each listed step. Empty: fixed window.
    curriculum: tuple[tuple[int, int], ...] = ()
    batch_size: int = _num(16, 1, 65536)
    num_workers: int = _num(0, 0, 256)
    length_grouped: bool = True
    # several windows back to back in each batch row (block-diagonal attention, each window from
    # its own start state; PAD only at a row's end): rows of data.window tokens that are mostly
    # real tokens instead of one short piece and padding (aurl.data.dataset). Transformer mode;
    # not with FIM, anticipation or a curriculum. Replaces length_grouped's sorting
    pack: bool = False
    # (style, n) pairs: a training piece of that style (the cache's manifest label) is drawn n
    # times an epoch, e.g. [[chorale, 8]] so the chorales are not 3.5% of `all`. Empty: once each
    style_repeat: tuple[tuple[str, int], ...] = ()
    # share of training windows cut into prefix / middle / suffix and reordered
    # [SUF] suffix [PRE] prefix [MID] middle [EOM] (aurl.data.fim; needs model.fim). 0: none
    fim_rate: float = _num(0.0, 0.0, 1.0)
    # share of training windows whose top line's NOTE_ONs are copied, as control ids,
    # model.anticipation beats ahead of their time (aurl.data.anticipation). 0: none
    anticipation_rate: float = _num(0.0, 0.0, 1.0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.style_repeat]
        for name, n in self.style_repeat:
            if not 1 <= n <= MAX_STYLE_REPEAT:  # an epoch's slots are materialised: bounded
                raise ConfigError(
                    f"data.style_repeat: {name} {n}; give a count from 1 to {MAX_STYLE_REPEAT}"
                )
            if names.count(name) > 1:
                raise ConfigError(f"data.style_repeat: {name} is listed twice; give it once")


@dataclass(frozen=True)
class ModelConfig:
    """MusicTransformerVAEGAN: backbone, attention variant, VAE and discriminator."""

    mode: Literal["transformer", "vae", "vae_gan"] = "transformer"
    d_model: int = _num(256, 8, 16384)
    n_layers: int = _num(4, 1, 256)
    n_heads: int = _num(4, 1, 256)
    ff_mult: int = _num(4, 1, 16)
    dropout: float = _num(0.1, 0.0, 0.9)
    max_seq_len: int = _num(2048, 8, 1_000_000)
    attention: Literal["full", "local", "hierarchical"] = "full"
    local_window: int = _num(256, 1, 1_000_000)
    global_tokens: int = _num(64, 0, 1_000_000)
    # hierarchical: mean-pooled keys/values of each complete segment of this many tokens that
    # begins before a query's window (0: window plus global tokens only)
    summary_len: int = _num(64, 0, 1_000_000)
    musical_position: bool = True  # beat/bar embedding derived from the ids
    grammar_features: bool = True  # sounding-pitch state fed to the model
    # bars follow each piece's time signature (cache index, ``--meter``); off: 4/4 (old models)
    meter: bool = False
    # style conditioning (aurl.models.style): the style names, in id order (empty: none), and
    # the chance a training sequence's style is dropped so the model also runs without one
    styles: tuple[str, ...] = ()
    style_dropout: float = _num(0.1, 0.0, 1.0)
    # fill-in-the-middle sentinel rows (ids 774-777 beyond the music ids, aurl.data.fim):
    # the model can infill knowing the suffix (train with data.fim_rate > 0)
    fim: bool = False
    # anticipation: > 0 gives control rows (ids from 778, one per pitch, aurl.data.anticipation)
    # and says how many beats ahead the melody's NOTE_ONs come (train with
    # data.anticipation_rate > 0); 0: none
    anticipation: float = _num(0.0, 0.0, 64.0)
    # VAE
    latent_dim: int = _num(128, 1, 4096)
    latent_levels: int = _num(3, 1, 3)
    segment_len: int = _num(64, 4, 65536)
    encoder_layers: int = _num(2, 1, 64)
    # VAE word dropout (Bowman et al. 2016): in training, this share of the decoder's input ids
    # is replaced by UNK and those positions get the previous position's musical-time and
    # grammar features (the state after a token gives it away), so the decoder must lean on
    # the latent for what it cannot see; 0: off (models before the key)
    decoder_token_dropout: float = _num(0.0, 0.0, 1.0)
    # the latent conditioner's projection starts at zero, so the decoder starts as a plain
    # transformer instead of under prior-scale noise (z ~ N(0, I) projected to ~5x a token
    # embedding's norm) and the latent's say grows as it earns it; off: GPT-2 init as before
    latent_zero_init: bool = False
    # GAN discriminator
    disc_d_model: int = _num(128, 8, 4096)
    disc_layers: int = _num(2, 1, 64)
    disc_scales: tuple[int, ...] = (32, 128, 0)  # window lengths; 0 = the whole sequence

    def __post_init__(self) -> None:
        # rotary positions rotate pairs of a head's dimensions: the head width must be even
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                f"({self.n_heads}) into an even head width: change one of them"
            )
        if len(set(self.styles)) != len(self.styles) or not all(self.styles):
            raise ConfigError(
                f"model.styles {list(self.styles)}: style names must be distinct and non-empty"
            )


@dataclass(frozen=True)
class LossConfig:
    """Weights of the named losses and their schedules."""

    label_smoothing: float = _num(0.0, 0.0, 0.5)
    grammar_masked: bool = True  # score over the grammar-allowed ids only
    grammar_weight: float = _num(0.0, 0.0)
    kl_weight: float = _num(1.0, 0.0)  # beta
    kl_anneal_steps: int = _num(2000, 0)
    free_bits: float = _num(0.25, 0.0)
    # what the free_bits floor applies to: each latent group (one unit's vector of a level:
    # the global code, one segment's, one fine unit's) or each latent dimension
    free_bits_per: Literal["group", "dim"] = "group"
    adv_weight: float = _num(0.1, 0.0)
    feature_matching_weight: float = _num(1.0, 0.0)
    # vae_gan: fakes as straight-through hard Gumbel samples (one-hot forward, soft gradient)
    # or soft Gumbel-softmax samples; the adversarial objective, hinge or non-saturating
    gan_fakes: Literal["hard", "soft"] = "hard"
    gan_loss: Literal["hinge", "non_saturating"] = "hinge"
    auto_balance: bool = False  # learned uncertainty weighting


@dataclass(frozen=True)
class TrainingConfig:
    """The explicit training loop."""

    lr: float = _num(3e-4, 0.0, 10.0)
    min_lr_ratio: float = _num(0.1, 0.0, 1.0)
    weight_decay: float = _num(0.1, 0.0, 10.0)
    beta1: float = _num(0.9, 0.0, 1.0)
    beta2: float = _num(0.95, 0.0, 1.0)
    warmup_steps: int = _num(200, 0)
    max_steps: int = _num(5000, 1)
    grad_accum: int = _num(1, 1, 4096)
    grad_clip: float = _num(1.0, 0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = _num(0, 0, 2**63 - 1)  # torch's and numpy's generators take 64 bits
    device: str = "auto"
    eval_every: int = _num(250, 1)
    eval_batches: int = _num(50, 1)
    save_every: int = _num(250, 1)
    keep_best: int = _num(3, 0)
    sample_every: int = _num(1000, 0)  # 0 disables sample monitoring
    sample_tokens: int = _num(256, 1)
    log_every: int = _num(10, 1)
    patience: int = _num(0, 0)  # early stopping after this many evaluations; 0: never
    min_delta: float = _num(0.0, 0.0)
    max_minutes: float = _num(0.0, 0.0)  # wall-clock budget; 0: none
    disc_warmup_steps: int = _num(500, 0)
    disc_lr: float = _num(1e-4, 0.0, 10.0)
    # multi-stage: (mode, steps) pairs run in order, each starting from the last
    stages: tuple[tuple[str, int], ...] = ()
    # the device's dense bf16 TFLOP/s for the MFU in the log; 0: from aurl.training.mfu's table
    peak_tflops: float = _num(0.0, 0.0)


# a piece of at most an hour (--seconds; ~1M tokens at the chorales' density)
MAX_SECONDS = 3600.0
# below it, logits / temperature overflow float32 to inf and the softmax gives NaN; 0 is greedy
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and musical constraints."""

    max_tokens: int = _num(1024, 1)
    min_tokens: int = _num(0, 0)  # END not before this many generated tokens
    seconds: float = _num(0.0, 0.0, MAX_SECONDS)  # 0: no limit in seconds
    temperature: float = _num(1.0, 0.0, 100.0)  # 0: greedy; else >= MIN_TEMPERATURE
    top_k: int = _num(0, 0)
    top_p: float = _num(1.0, 0.0, 1.0)
    min_p: float = _num(0.0, 0.0, 1.0)
    repetition_penalty: float = _num(1.0, 0.01, 100.0)  # divides logits: 0 would be inf
    beam: int = _num(1, 1, 256)
    key: str = ""  # e.g. "D minor"; empty: no key constraint
    key_strictness: float = _num(1.0, 0.0, 1.0)  # 1: out-of-key NOTE_ONs masked
    pitch_low: int = _num(21, 0, 127)
    pitch_high: int = _num(108, 0, 127)
    tempo: float = _num(0.0, 0.0, 1000.0)  # 0: free
    tempo_range: tuple[float, ...] = ()  # (low, high) BPM; empty: free
    instruments: tuple[int, ...] = ()  # allowed GM families; empty: all
    density: float = _num(0.0, 0.0)  # target notes per beat; 0: free
    polyphony_cap: int = _num(8, 1, 128)
    window: int = _num(512, 8)
    window_overlap: int = _num(128, 0)
    seed: int = _num(0, 0, 2**63 - 1)  # torch's and numpy's generators take 64 bits
    meter: str = ""  # time signature the bars follow, e.g. "3/4" (meter models); "": 4/4
    style: str = ""  # one of the model's model.styles (style models); "": no style
    # no NOTE_ON moving in parallel fifths / octaves with a lower voice (voice writing, e.g.
    # `aurl generate --voices 4`; aurl.generation.voice_leading)
    voice_leading: bool = False
    voices: int = _num(0, 0, 16)  # the voices the piece is written in (voice leading reads a
    # full chord by rank); 0: unknown
    # a note more than an octave above the note under it (the lowest excepted) gets
    # log(1 - spacing): upper voices within an octave, as four-part writing keeps them (0: off)
    spacing: float = _num(0.0, 0.0, 0.999)
    # with voices SATB's (2-4): a note outside the range of the voice of its rank from the
    # bottom gets log(1 - ranges) (0: off)
    ranges: float = _num(0.0, 0.0, 0.999)

    def __post_init__(self) -> None:
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"generation.temperature: {self.temperature!r} is too small to sample with: "
                f"give 0 (greedy) or at least {MIN_TEMPERATURE}"
            )


@dataclass(frozen=True)
class Config:
    """Everything, nested by concern. Travels inside every checkpoint and output folder."""

    vocab: VocabConfig = field(default_factory=VocabConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        """``yaml.safe_dump(self.to_dict(), sort_keys=False)``, written without importing
        PyYAML where every value is simple (:func:`dump_simple_yaml`: a config's usual case,
        ~30 ms of a cold start saved), else by PyYAML."""
        data = self.to_dict()
        text = dump_simple_yaml(data)
        if text is None:
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        return text


# strings PyYAML writes plain (unquoted) and reads back as the same string: a letter first,
# then letters, digits and ``_ . - /`` or inner single spaces, none of YAML 1.1's bool or null
# words, short enough never to be folded; or a meter such as 6/8
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*(?: [A-Za-z0-9_./-]+)*|[0-9]+/[0-9]+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORDS = frozenset(
    f(w) for w in ("yes", "no", "true", "false", "on", "off", "null") for f in (str.lower, str.title, str.upper)
)  # fmt: skip


def _simple_scalar(value: Any) -> str | None:
    """``value`` as PyYAML's safe dumper writes it, or None outside the simple cases."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    if type(value) is float:
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value).lower()
        return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text
    if type(value) is str:
        if value == "":
            return "''"
        if len(value) <= 40 and value not in _WORDS and _PLAIN.fullmatch(value):
            return value
    return None


def dump_simple_yaml(data: dict[str, Any], indent: str = "") -> str | None:
    """The text ``yaml.safe_dump(data, sort_keys=False)`` gives for a mapping of identifier
    keys whose values are simple scalars (:func:`_simple_scalar`), lists of them or such
    mappings again; None for anything else (the caller then asks PyYAML). Held equal to
    PyYAML's output on every preset and the shipped models' configs by the tests."""
    lines = []
    for key, value in data.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key in _WORDS:
            return None
        if isinstance(value, dict):
            if not value:
                lines.append(f"{indent}{key}: {{}}\n")
                continue
            inner = dump_simple_yaml(value, indent + "  ")
            if inner is None:
                return None
            lines.append(f"{indent}{key}:\n{inner}")
        elif isinstance(value, list):
            if not value:
                lines.append(f"{indent}{key}: []\n")
                continue
            items = [_simple_scalar(v) for v in value]
            if None in items:
                return None
            lines.append(f"{indent}{key}:\n" + "".join(f"{indent}- {v}\n" for v in items))
        else:
            text = _simple_scalar(value)
            if text is None:
                return None
            lines.append(f"{indent}{key}: {text}\n")
    return "".join(lines) if lines or indent else "{}\n"


# --------------------------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (JSON/YAML-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not ...)
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's own type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {_shown.repr(value)} is not allowed; choose one of {list(allowed)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: {_shown.repr(value)} is not allowed")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_shown.repr(value)}")
        if len(args) == 2 and args[1] is ...:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{key}: expected {len(args)} items ({_type_name(tp)}), got "
                f"{_shown.repr(value)}"
            )
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_shown.repr(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {_shown.repr(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every range check; inf overflows later
                raise ConfigError(
                    f"{key}: {_shown.repr(value)} is not a finite number: give a number"
                )
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_shown.repr(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_shown.repr(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {tp.__name__} fields, got {_shown.repr(value)}"
            )
        return build(tp, value, prefix=key)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - a coding error


def build(cls: type, values: dict[str, Any] | None = None, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial, nested) dict, validating every key."""
    if values is not None and not isinstance(values, dict):  # e.g. a damaged file's list
        raise ConfigError(
            f"{prefix or cls.__name__}: expected a mapping of keys, got {type(values).__name__} "
            f"{_shown.repr(values)}"
        )
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(
                f"unknown config key {_shown.repr(key)}; known keys here: "
                f"{', '.join(sorted(names))}"
            )
        coerced = _coerce(key, value, hints[name])
        lo, hi = names[name].metadata.get("range", (None, None))
        if lo is not None and coerced < lo or hi is not None and coerced > hi:
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"{key}: {coerced!r} is out of range; allowed {bounds}")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML, resolving ``base:`` inheritance (relative to the file)."""
    import os

    from aurl.fileio import not_a_file

    path = Path(path)
    try:  # stat only: opening a FIFO or a device (base: /dev/zero) could block or never end
        why = not_a_file(path)
        size = os.stat(path).st_size if why is None else 0
    except (OSError, ValueError) as e:  # a symlink loop; a NUL in the name
        why = f"cannot be read ({getattr(e, 'strerror', None) or e})"
    if why is not None:
        raise ConfigError(f"config file {path} {why}: give a YAML file")
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size:,} bytes, over the {MAX_CONFIG_BYTES:,} "
                          "a config may have: give a YAML file of config keys")  # fmt: skip
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply: give a YAML file of "
                          "config keys") from None  # fmt: skip
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: give a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}): check it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base: {_shown.repr(base)}: give a file name or "
                          "a preset name")  # fmt: skip
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file() and (PRESET_DIR / f"{base}.yaml").is_file():
        base_path = PRESET_DIR / f"{base}.yaml"
    return _merge(read_yaml(base_path, _seen + (path.resolve(),)), data)


def parse_override(item: str) -> dict[str, Any]:
    """``"training.lr=3e-4"`` -> ``{"training": {"lr": 0.0003}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key; use section.key=value")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: > 4,300 digits
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults, then the preset, then the YAML file, then ``key=value`` overrides."""
    merged: dict[str, Any] = {}
    if preset is not None:  # '' is no preset's name: it ran as if none were given
        preset_path = PRESET_DIR / f"{preset}.yaml"
        if not preset_path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; choose one of {preset_names()}")
        merged = _merge(merged, read_yaml(preset_path))
    if path is not None:
        merged = _merge(merged, read_yaml(path))
    for item in overrides:
        merged = _merge(merged, parse_override(item))
    return build(Config, merged)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return build(Config, values)


def write_config(config: Config, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside an output folder's contents, atomically."""
    text = config.to_yaml() if name.endswith((".yaml", ".yml")) else json.dumps(config.to_dict())
    return atomic_write_text(Path(folder) / name, text)
