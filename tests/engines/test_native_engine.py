"""The native engine (Aurl's own C decode step): the torch model's logits in fp32, int8 within the
issue's 0.02 bits/note, the portable kernels equal to the AVX2 ones, states that interleave and
reorder, a generation that never imports torch or onnxruntime, and one line for every bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aurl.cli import main
from aurl.cli.generate import SHIPPED
from aurl.config import GenerationConfig
from aurl.data.grammar import Grammar
from aurl.data.meter import read_meter
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind
from aurl.errors import CheckpointError, ConfigError
from aurl.generation.generate import generate, make_masker

native = pytest.importorskip("aurl.engines.native_engine")
NativeEngine = native.NativeEngine

SRC = Path(__file__).resolve().parents[2] / "src"
STYLES = SHIPPED / "styles"


def _log_probs(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _piece(engine, name: str = "bach_bwv269.mid", n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    f = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / name
    ids = np.asarray(Tokenizer(engine.vocab_config).encode_file(f), dtype=np.int64)[:n]
    return ids[None], np.array([read_meter(f)])


def _native_logits(engine, ids, meter, style=None, prefill: int = 200) -> np.ndarray:
    """Logits of ``ids`` through a prefill of ``prefill`` tokens, then one token per step."""
    s = engine.init_state(1, capacity=512, meter=meter, style=style)
    first = engine.step(ids[:, :prefill], s)
    rest = [engine.step(ids[:, j : j + 1], s) for j in range(prefill, ids.shape[1])]
    return np.concatenate([first, *rest], 1)


@pytest.mark.parametrize("folder, style", [(SHIPPED, None), (STYLES, 2)], ids=["default", "styles"])
def test_fp32_logits_equal_the_torch_model(folder, style) -> None:
    """A real chorale through the prefill and 100 single steps: the log-probs equal the torch
    model's to 1e-4 (measured 2e-5; the issue's bar for an engine in fp32), meter and style
    included (the style model with style 2 of its five)."""
    import torch

    from aurl.models.pretrained import load_pretrained

    model = load_pretrained(folder).float().eval()
    engine = NativeEngine(folder, weights="fp32")
    ids, meter = _piece(engine)
    kw = {} if style is None else {"style": torch.tensor([style])}
    with torch.no_grad():
        st = model.init_state(1, capacity=512, meter=torch.as_tensor(meter), **kw)
        want = [model.step(torch.as_tensor(ids[:, :200]), st)]
        want += [model.step(torch.as_tensor(ids[:, j : j + 1]), st) for j in range(200, 300)]
    want = torch.cat(want, 1).numpy()
    got = _native_logits(engine, ids, meter, None if style is None else np.array([style]))
    assert np.abs(_log_probs(got) - _log_probs(want)).max() < 1e-4


def _bits_per_note(engine) -> float:
    vocab = engine.vocab
    bits = notes = 0.0
    for f in sorted((Path(__file__).resolve().parents[1] / "fixtures" / "midi").glob("bach_*.mid")):
        ids, meter = _piece(engine, f.name, 512)
        z = engine.step(ids, engine.init_state(1, capacity=512, meter=meter))
        bits -= np.take_along_axis(_log_probs(z)[0, :-1], ids[0, 1:, None], 1).sum() / np.log(2)
        notes += int((vocab.kind[ids[0, 1:]] == Kind.NOTE_ON).sum())
    return bits / notes


def test_int8_bits_per_note_within_0_02_of_fp32() -> None:
    """The issue's bar for int8 weights: bits per note within 0.02 of fp32 (the shipped model on
    the four chorales of tests/fixtures; the whole test split is in BENCHMARKS.md)."""
    fp32 = _bits_per_note(NativeEngine(SHIPPED, weights="fp32"))
    int8 = _bits_per_note(NativeEngine(SHIPPED, weights="int8"))
    assert abs(int8 - fp32) < 0.02


@pytest.fixture
def best_kernels():
    """The kernels this process started with, restored after the test changes them."""
    before = native.kernels()
    yield before
    native.set_kernels(before)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_portable_kernels_equal_the_avx2_ones(weights, best_kernels) -> None:
    """What CPUs without AVX2 (and ARM) run gives the AVX2 kernels' logits: fp32 to 1e-4;
    int8 whose integer products are exact but whose activations round to int8 after GELUs
    computed two ways, to 0.002 bits per token over the four chorales."""
    if native.set_kernels("avx2") != "avx2":
        pytest.skip("this CPU has no AVX2: only the portable kernels run here")
    engine = NativeEngine(SHIPPED, weights=weights)
    ids, meter = _piece(engine, n=160)
    fast = _native_logits(engine, ids, meter, prefill=80)
    fast_bits = _bits_per_note(engine)
    assert native.set_kernels("portable") == "portable"
    slow = _native_logits(engine, ids, meter, prefill=80)
    slow_bits = _bits_per_note(engine)
    if weights == "fp32":
        assert np.abs(_log_probs(fast) - _log_probs(slow)).max() < 1e-4
    assert abs(fast_bits - slow_bits) < 0.002


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 9])
def test_vnni_kernels_equal_the_avx2_ones_bit_for_bit(rows, best_kernels) -> None:
    """The int8 products on AVX512-VNNI (four weight rows against four batch rows at a time,
    activations offset by 128 and each weight row's sum taken off) give the AVX2 kernel's exact
    integer sums, so the same logits bit for bit: the shipped model, a prefill and 40 single
    steps of ``rows`` rows of different real chorales (every remainder of the four-row blocks;
    the head's 774 rows leave two)."""
    if native.set_kernels("avx512vnni") != "avx512vnni":
        pytest.skip("this CPU has no AVX512-VNNI")
    engine = NativeEngine(SHIPPED)
    files = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "midi").glob("bach_*.mid"))
    pieces = [_piece(engine, files[i % len(files)].name, n=120 + 5 * i)[0] for i in range(rows)]
    ids = np.concatenate([p[:, -120:] for p in pieces])  # row i: chorale i % 4, its own window
    meter = np.array([read_meter(files[i % len(files)]) for i in range(rows)])
    got = {}
    for kernels in ("avx512vnni", "avx2"):
        assert native.set_kernels(kernels) == kernels
        s = engine.init_state(rows, capacity=256, meter=meter)
        got[kernels] = np.concatenate(
            [engine.step(ids[:, :80], s)] + [engine.step(ids[:, j : j + 1], s) for j in range(80, 120)],
            axis=1,
        )
    assert np.isfinite(got["avx2"]).all() and np.abs(got["avx2"]).max() > 1
    assert np.array_equal(got["avx512vnni"], got["avx2"])


@pytest.mark.parametrize("weights, rows", [("int8", 1), ("int8", 3), ("fp32", 2)])
def test_a_prefill_equals_one_token_steps_bit_for_bit(weights, rows) -> None:
    """A prefill (one C call per 64 tokens of every row, the rows' products batched) gives what
    the C step gives for the same input embeddings one token at a time, bit for bit: logits,
    caches and the steps after it. ``rows`` rows of different real chorales, 150 tokens after a
    first 10 (three calls, one of them short, from a position past 0), then 5 single steps.
    Against feeding the tokens one at a time through ``step`` (whose one-token embedding is
    summed in C, in another order than numpy's), fp32 log-probs agree to 1e-4 (int8 ones
    differ more: a last-bit difference can move an activation across an int8 step)."""
    engine = NativeEngine(SHIPPED, weights=weights)
    files = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "midi").glob("bach_*.mid"))
    ids = np.concatenate([_piece(engine, files[i].name, n=165)[0] for i in range(rows)])
    meter = np.array([read_meter(files[i]) for i in range(rows)])
    got = {}
    for way in ("prefill", "c steps", "steps"):
        s = engine.init_state(rows, capacity=256, meter=meter)
        first = engine.step(ids[:, :10], s)
        if way == "prefill":
            mid = engine.step(ids[:, 10:160], s)
        elif way == "c steps":  # the prefill's own inputs, one token per C step
            feed, s.features = engine.features(ids[:, 10:160], s.features)
            x = engine.embed_inputs(feed, s.style)
            mid = []
            for j in range(150):
                xj = np.ascontiguousarray(x[:, j])
                mid.append(engine._run(xj.ctypes.data, rows, s)[:, None].copy())
            mid = np.concatenate(mid, 1)
        else:
            mid = np.concatenate([engine.step(ids[:, j : j + 1], s) for j in range(10, 160)], 1)
        rest = [engine.step(ids[:, j : j + 1], s) for j in range(160, 165)]
        got[way] = (np.concatenate([first, mid, *rest], 1), s.keys[-1].copy(), s.pos)
    (a, ka, pa), (b, kb, pb) = got["prefill"], got["c steps"]
    assert pa == pb == 165 and np.abs(a).max() > 1
    assert np.array_equal(ka, kb)
    assert np.array_equal(a, b)
    if weights == "fp32":
        assert np.abs(_log_probs(a) - _log_probs(got["steps"][0])).max() < 1e-4


def test_half_cache_rounds_as_f16c(best_kernels) -> None:
    """The int8 engine keeps keys and values as half floats: the portable conversion rounds as
    the F16C instruction does (nearest even). Layer 0's keys and values of a prefill come from
    the same floats on both paths (exact int8 products, shared norm and rotary), so they must
    be equal bit for bit."""
    if native.set_kernels("avx2") != "avx2":
        pytest.skip("this CPU has no AVX2: only the portable kernels run here")
    engine = NativeEngine(SHIPPED)
    ids, meter = _piece(engine, n=200)
    caches = []
    for kernels in ("avx2", "portable"):
        native.set_kernels(kernels)
        s = engine.init_state(1, capacity=256, meter=meter)
        engine.step(ids, s)
        caches.append((s.keys[0][:, :, :200].copy(), s.values[0][:, :, :200].copy()))
    (k1, v1), (k2, v2) = caches
    assert k1.dtype == np.float16 and np.abs(k1).max() > 1
    assert np.array_equal(k1.view(np.uint16), k2.view(np.uint16))
    assert np.array_equal(v1.view(np.uint16), v2.view(np.uint16))


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tmp_path_factory) -> Path:
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("tiny-native") / "model")


@pytest.mark.parametrize(
    "overrides",
    [
        {"key": "D minor", "key_strictness": 1.0, "pitch_low": 48, "pitch_high": 84},
        {"tempo": 100.0, "instruments": (0, 5), "density": 2.0},
        {"window": 24, "window_overlap": 8, "seconds": 6.0, "max_tokens": 1000},  # slides
    ],
)
def test_greedy_pieces_equal_the_torch_engine(tiny_model, tiny_folder, overrides) -> None:
    """The tiny model (16-wide heads: the generic attention path), greedy under constraints,
    two rows: the same ids as the torch engine, through the prefill, the steps, the numpy
    masker and the sliding window."""
    cfg = GenerationConfig(**{"temperature": 0.0, "max_tokens": 96, "seed": 0, **overrides})
    want = generate(tiny_model, cfg, num_samples=2)
    engine = NativeEngine(tiny_folder, weights="fp32")
    got = generate(engine, cfg, num_samples=2, masker=make_masker(engine.vocab, cfg, None))
    for a, b in zip(want, got):
        assert np.array_equal(a.ids, b.ids)


def test_sampled_int8_pieces_are_valid_and_seeded() -> None:
    engine = NativeEngine(SHIPPED)
    cfg = GenerationConfig(max_tokens=120, top_p=0.9, seed=3)
    first = generate(engine, cfg, num_samples=3)
    again = generate(engine, cfg, num_samples=3)
    grammar = Grammar(engine.vocab, cfg.polyphony_cap)
    for a, b in zip(first, again):
        assert np.array_equal(a.ids, b.ids)
        assert grammar.count_violations(a.ids) == 0


def test_rows_states_and_reorder_are_independent() -> None:
    """Two rows in one batch, two states stepped in turn (sharing the engine's scratch), and
    the batch's rows swapped mid-piece (each row's cache, features and inputs follow it):
    every logit equals each piece decoded alone."""
    engine = NativeEngine(SHIPPED, weights="fp32")
    a, meter = _piece(engine, "bach_bwv269.mid", 90)
    b, _ = _piece(engine, "bach_bwv347.mid", 90)
    alone = [_native_logits(engine, x, meter, prefill=40)[0] for x in (a, b)]
    s = engine.init_state(2, capacity=512, meter=np.repeat(meter, 2, 0))
    s1, s2 = (engine.init_state(1, capacity=512, meter=meter) for _ in range(2))
    rows = [engine.step(np.concatenate([a, b])[:, :40], s)]
    one, two = [engine.step(a[:, :40], s1)], [engine.step(b[:, :40], s2)]
    order = [0, 1]  # which piece each row decodes
    for j in range(40, 90):
        if j == 60:
            s, order = engine.reorder(s, np.array([1, 0])), [1, 0]
        out = engine.step(np.concatenate([(a, b)[p] for p in order])[:, j : j + 1], s)
        rows.append(out[order])  # back in piece order
        one.append(engine.step(a[:, j : j + 1], s1))
        two.append(engine.step(b[:, j : j + 1], s2))
    rows = np.concatenate(rows, 1)
    for i, single in enumerate((one, two)):
        assert np.abs(rows[i] - alone[i]).max() < 1e-4
        assert np.abs(np.concatenate(single, 1)[0] - alone[i]).max() == 0


def test_reorder_writes_into_a_dead_states_caches_and_never_a_held_ones() -> None:
    """SMC resamples every few tokens: a reorder writes into the caches of a state nothing
    holds any more (fresh arrays cost a page fault per 4 KiB: about half of a reorder), never
    into those of a state still held. Three rows of one piece resampled through a chain of
    states while the first is kept: every row, and the kept state decoded on afterwards, give
    the piece's logits decoded alone."""
    import gc

    engine = NativeEngine(SHIPPED, weights="fp32")
    a, meter = _piece(engine, "bach_bwv269.mid", 80)
    alone = _native_logits(engine, a, meter, prefill=30)[0]
    kept = engine.init_state(3, capacity=512, meter=np.repeat(meter, 3, 0))
    engine.step(np.repeat(a[:, :30], 3, 0), kept)
    held = {id(k) for k in kept.keys + kept.values}
    s = engine.reorder(kept, np.array([2, 0, 1]))
    for j in range(30, 80):
        if j % 10 == 5:  # the state replaced here dies: its caches become the spare set
            s = engine.reorder(s, np.array([1, 1, 0]))
            gc.collect()
            assert not held & {id(k) for k in s.keys + s.values}, j
        out = engine.step(np.repeat(a[:, j : j + 1], 3, 0), s)
        assert np.abs(out[:, 0] - alone[j]).max() < 1e-4, j
    dropped = [id(k) for k in s.keys]
    s = engine.reorder(s, np.array([0, 1, 2]))  # s's old caches are now the spare set
    gc.collect()
    s = engine.reorder(s, np.array([2, 1, 0]))  # ... and are written into here
    assert [id(k) for k in s.keys] == dropped
    for j in range(30, 80):  # the kept state, untouched by every reorder since
        out = engine.step(np.repeat(a[:, j : j + 1], 3, 0), kept)
        assert np.abs(out[:, 0] - alone[j]).max() < 1e-4, j


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip


def test_cli_generation_never_imports_torch_or_onnxruntime(tmp_path) -> None:
    """`aurl generate --engine native` with a style (the shipped style model, taken by
    --style), a key and a meter, in a fresh process: MIDI files, and neither torch nor
    onnxruntime ever imported."""
    out = tmp_path / "pieces"
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"rc = main(['generate', '--engine', 'native', '--out', {str(out)!r}, '--max-tokens', "
        "'64', '--key', 'G major', '--num-samples', '2', '--meter', '3/4', '--style', 'folk'])\n"
        "assert rc == 0\nprint('torch' in sys.modules, 'onnxruntime' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"
    assert sorted(p.name for p in out.glob("*.mid")) == [
        "sample_seed0_000.mid", "sample_seed0_001.mid",
    ]  # fmt: skip


def test_missing_compiled_step_is_one_line(tmp_path) -> None:
    code = (
        "import sys\nsys.modules['aurl.engines._native'] = None\nfrom aurl.cli import main\n"
        f"sys.exit(main(['generate', '--engine', 'native', '--out', {str(tmp_path)!r}]))\n"
    )
    r = _run(code)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "install a C compiler" in lines[0], r.stderr


def test_threads_are_one_line_of_notice(tmp_path, capsys) -> None:
    args = ["generate", "--engine", "native", "--threads", "2", "--max-tokens", "16",
            "--voices", "0"]  # one free track: no line about the model's voices
    assert main([*args, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["--threads 2: the native engine decodes on one thread (one core's memory "
                     "bandwidth is what its step needs)"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--beam", "3"], "--beam"),
        (["--variations", "x.mid"], "--variations"),
        (["--interpolate", "a.mid", "b.mid"], "--interpolate"),
        (["--device", "cuda"], "--device"),
        (["--adapter", "lora"], "--adapter"),
    ],
)
def test_unsupported_flags_name_the_flag(tmp_path, capsys, flags, name) -> None:
    assert main(["generate", "--engine", "native", "--out", str(tmp_path), *flags]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--engine native does not support {name}:" in lines[0]


def _copy(tmp_path: Path, folder: Path = SHIPPED) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, out / name)
    return out


def _config(folder: Path, change) -> Path:
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def _nan_weight(folder: Path) -> None:
    """One NaN in a block's weights, written as safetensors by the format's own writer."""
    from safetensors.numpy import save_file

    from aurl.safetensors_io import read_arrays

    tensors = {k: v.copy() for k, v in read_arrays(folder / "model.safetensors").items()}
    tensors["blocks.1.ff.fc.weight"][3, 5] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))


def _tensors(folder: Path, change) -> None:
    """The weights rewritten after ``change(tensors)`` (a dict of numpy arrays) by the format's
    own writer."""
    from safetensors.numpy import save_file

    from aurl.safetensors_io import read_arrays

    tensors = {k: v.copy() for k, v in read_arrays(folder / "model.safetensors").items()}
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _narrow(name: str, cols: int):
    return lambda f: _tensors(f, lambda t: t.__setitem__(name, t[name][:, :cols].copy()))


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda f: _config(f, lambda m: m["model"].update(d_model=128)), CheckpointError,
         r"embed.weight is \[774, 256\], its config.json implies \[774, 128\]"),
        (lambda f: _config(f, lambda m: m["model"].update(n_layers=2)), CheckpointError,
         r"holds tensors its config.json does not use \(blocks.2.attn.proj.bias"),
        (lambda f: _config(f, lambda m: m["model"].update(mode="vae")), ConfigError,
         "model.mode 'transformer'"),
        (lambda f: _config(f, lambda m: m["model"].update(attention="local")), ConfigError,
         "model.attention 'full'"),
        (_nan_weight, CheckpointError, "blocks.1.ff.fc.weight holds NaN or infinite values"),
        # the input layer's tables, which the C embedding reads d_model floats a row of
        (_narrow("time.phase.weight", 128), CheckpointError,
         r"time.phase.weight is \[32, 128\], its config.json implies \[32, 256\]"),
        (_narrow("grammar_features.family.weight", 8), CheckpointError,
         r"family.weight is \[17, 8\], its config.json implies \[17, 256\]"),
        (lambda f: _tensors(f, lambda t: t.__setitem__("time.tempo.weight", t["time.tempo.weight"][:2].copy())),
         CheckpointError, r"time.tempo.weight is \[2, 256\], its config.json implies \[33, 256\]"),
        (lambda f: _tensors(f, lambda t: t.update({k: v.astype(np.int8) for k, v in t.items()})),
         CheckpointError, "embed.weight is stored as int8, the model needs floats"),
        (lambda f: _config(f, lambda m: m.update(format="aurl-onnx")), CheckpointError,
         "not an Aurl model folder"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04K\x01."), CheckpointError,
         "pickle"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:4000]),
         CheckpointError, "truncated or damaged"),
        (lambda f: (f / "config.json").write_text("{"), CheckpointError, "is damaged"),
        (lambda f: (f / "model.safetensors").unlink(), CheckpointError,
         "model.safetensors does not exist: --engine native reads a model folder"),
    ],
)  # fmt: skip
def test_bad_model_folders_are_refused(tmp_path, damage, error, message) -> None:
    folder = _copy(tmp_path)
    damage(folder)
    with pytest.raises(error, match=message):
        NativeEngine(folder)


def test_weights_too_large_for_float32_are_refused(tmp_path, capsys) -> None:
    """A row of 3e38 (finite, so past the NaN check) in a block's weights: every fp32 logit was
    NaN and `generate --engine native --fp32` wrote a piece drawn from them with exit 0; now
    the engine refuses the folder when it loads (one first token), in one line."""
    folder = _copy(tmp_path)
    _tensors(folder, lambda t: t["blocks.0.attn.qkv.weight"].__setitem__(0, 3e38))
    with pytest.raises(CheckpointError, match="logits for a first token are NaN or infinite"):
        NativeEngine(folder, weights="fp32")
    args = ["generate", "--engine", "native", "--fp32", "--checkpoint", str(folder)]
    assert main([*args, "--max-tokens", "16", "--out", str(tmp_path / "pieces")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "weights too large for float32" in lines[0]


def test_an_export_folder_is_one_line(tiny_export, tmp_path, capsys) -> None:
    args = ["generate", "--engine", "native", "--checkpoint", str(tiny_export)]
    assert main([*args, "--out", str(tmp_path)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is an ONNX export: --engine native reads a model folder" in lines[0]


def test_ids_outside_the_vocabulary_and_a_full_state_are_refused() -> None:
    engine = NativeEngine(SHIPPED)
    s = engine.init_state(1, capacity=4)
    with pytest.raises(ConfigError, match="id 774 is not one of the vocabulary's 774"):
        engine.step(np.array([[774]]), s)
    engine.step(np.array([[0, 5, 6, 7]]), s)
    with pytest.raises(ValueError, match="decode state is full"):
        engine.step(np.array([[5]]), s)
    with pytest.raises(ValueError, match="2 rows of ids for a state of 1 rows"):
        engine.step(np.array([[5], [6]]), engine.init_state(1, capacity=4))
    with pytest.raises(ConfigError, match="style id 9"):
        NativeEngine(STYLES).init_state(1, style=np.array([9]))


def test_harmonize_on_the_native_engine_keeps_the_melody_without_torch(tmp_path) -> None:
    """`aurl harmonize --engine native` (the shipped default, int8) in a fresh process: four
    parts whose soprano is the given melody note for note, and neither torch nor onnxruntime
    imported."""
    import symusic

    from aurl.data.notes import make_notes, notes_from_score
    from aurl.generation.compose import melody_kept, parts_score
    from aurl.generation.export import write_midi

    melody = make_notes(list(range(8)), 1, [67, 69, 71, 72, 74, 72, 71, 67])
    write_midi(parts_score([("Melody", melody)]), tmp_path / "m.mid")
    out = tmp_path / "out"
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"assert main(['harmonize', {str(tmp_path / 'm.mid')!r}, '--engine', 'native', "
        f"'--out', {str(out)!r}]) == 0\n"
        "print('torch' in sys.modules, 'onnxruntime' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"
    score = symusic.Score(str(out / "m_harmonized_seed0_000.mid"))
    assert sorted(t.name for t in score.tracks) == ["Alto", "Bass", "Soprano", "Tenor"]
    soprano = next(t for t in score.tracks if t.name == "Soprano")
    one = symusic.Score(score.tpq)
    one.tracks.append(soprano.copy())
    assert melody_kept(notes_from_score(one), melody) == 1.0


def test_an_install_without_a_c_compiler_goes_on(tmp_path) -> None:
    """The compiled step is an optional extension: `pip install .` with no working compiler
    installs the rest, and `--engine native` then says in one line what to do."""
    target = tmp_path / "site"
    root = SRC.parent
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(root)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CC": "/bin/false"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    engines = target / "aurl" / "engines"
    assert (engines / "native_engine.py").is_file() and not list(engines.glob("_native*.so"))
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"sys.exit(main(['generate', '--engine', 'native', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "install a C compiler" in lines[0], r.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.musical_position=false", "model.grammar_features=false", "model.meter=false"],
        ["model.meter=false", "model.n_layers=1"],
        ["model.d_model=64", "model.n_heads=1"],  # one 64-wide head: the AVX2 attention kernel
        ["model.d_model=96", "model.n_heads=3", "model.ff_mult=2"],  # 32-wide heads
        ["model.styles=[a,b,c]"],
    ],
    ids=["no-features", "no-meter-1-layer", "head-64", "heads-32", "styles"],
)
def test_fp32_logits_equal_the_torch_model_on_other_shapes(overrides, tmp_path) -> None:
    """Random models of other shapes and inputs (no musical time or grammar features, no meter,
    one layer, 64- and 32-wide heads, styles), saved as model folders: two rows through a
    prefill and single steps give the torch model's log-probs to 1e-4."""
    import torch

    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(1)
    cfg = load_config(preset="tiny", overrides=["model.mode=transformer", *overrides])
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharp attention: an initialized model's is nearly uniform
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    folder = model.save_pretrained(tmp_path / "model")
    engine = NativeEngine(folder, weights="fp32")
    ids = np.concatenate(
        [_piece(engine, n, 120)[0] for n in ("bach_bwv269.mid", "bach_bwv347.mid")]
    )
    style = np.array([2, -1]) if cfg.model.styles else None
    kw = {"style": torch.as_tensor(style)} if style is not None else {}
    with torch.no_grad():
        st = model.init_state(2, capacity=256, **kw)
        want = [model.step(torch.as_tensor(ids[:, :60]), st)]
        want += [model.step(torch.as_tensor(ids[:, j : j + 1]), st) for j in range(60, 120)]
    want = torch.cat(want, 1).numpy()
    s = engine.init_state(2, capacity=256, style=style)
    got = [engine.step(ids[:, :60], s)] + [
        engine.step(ids[:, j : j + 1], s) for j in range(60, 120)
    ]
    assert np.abs(_log_probs(np.concatenate(got, 1)) - _log_probs(want)).max() < 1e-4


def test_weights_larger_than_memory_are_refused_before_reading(tmp_path) -> None:
    """A (sparse) safetensors file whose header declares twice this machine's memory in
    float32: refused from the header, in one line, without reading the data."""
    import struct

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cols = 2 * memory // (4 * 774) + 1
    header = json.dumps(
        {
            "embed.weight": {
                "dtype": "F32",
                "shape": [774, cols],
                "data_offsets": [0, 774 * cols * 4],
            }
        }
    ).encode()
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(SHIPPED / "config.json", folder / "config.json")
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 774 * cols * 4)  # a hole: no data written
    with pytest.raises(CheckpointError, match="GiB of weights as float32, more than this machine"):
        NativeEngine(folder)


FUZZ = """
import json, random, shutil, sys
from pathlib import Path
import numpy as np
from aurl.engines.native_engine import NativeEngine
from aurl.errors import AurlError
src, folder = Path(sys.argv[1]), Path(sys.argv[2])
data = (src / "model.safetensors").read_bytes()
n = int.from_bytes(data[:8], "little")
rng = random.Random(0)
shutil.copy(src / "config.json", folder / "config.json")
outcomes = {"refused": 0, "ran": 0}
for i in range(40):
    b, mode = bytearray(data), i % 4
    if mode == 0:  # the header: letters and digits for others, so that it stays JSON (names,
        # dtypes, shapes and offsets change) or, now and then, any byte
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(8, 8 + n)
            if chr(b[j]).isalnum():
                b[j] = ord(rng.choice("0123456789FIUBabcdefghijklmnopqrstuvwxyz"))
            elif rng.random() < 0.2:
                b[j] = rng.randrange(256)
    elif mode == 1:
        b = b[: rng.randrange(len(b))]
    elif mode == 2:  # the weights' bytes: NaN, infinities, huge values
        for _ in range(rng.randint(1, 50)):
            b[rng.randrange(8 + n, len(b))] = rng.randrange(256)
    else:  # the header's length
        b[0:8] = rng.randrange(2**40).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(b))
    try:
        engine = NativeEngine(folder)
        state = engine.init_state(1, capacity=64)
        engine.step(np.array([[0, 5, 10]]), state)
        engine.step(np.array([[7]]), state)
        outcomes["ran"] += 1
    except AurlError:
        outcomes["refused"] += 1
print(json.dumps(outcomes))
"""


def test_damaged_weights_are_refused_or_run_never_crash(tmp_path) -> None:
    """40 damaged copies of the shipped weights (header bytes, truncations, weight bytes, the
    header's length), each loaded and stepped in a child process: every one is refused with an
    Aurl error or runs; none raises anything else or takes the process down."""
    r = subprocess.run(
        [sys.executable, "-c", FUZZ, str(SHIPPED), str(tmp_path)], capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    outcomes = json.loads(r.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] + outcomes["ran"] == 40 and outcomes["refused"] >= 20


def test_evaluate_task_on_the_native_engine(tmp_path, capsys) -> None:
    """`aurl evaluate --task harmonize` decodes on the native engine by default, as `aurl
    harmonize` does (and says so), keeping every melody note; `--engine` without `--task`, and
    `--int4` off the onnx engine, are one line each."""
    out = tmp_path / "eval"
    args = ["evaluate", "--task", "harmonize", "--limit", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert "decoding on the native (int8) engine" in capsys.readouterr().out
    rows = json.loads((out / "harmonize.json").read_text())["rows"]
    assert rows["forcing"]["melody_kept"] == rows["forcing+smc8"]["melody_kept"] == 1.0
    for argv, says in (
        (["evaluate", "--data", "d", "--engine", "native"], "--engine native chooses what decodes"),
        ([*args, "--engine", "native", "--int4"], "--int4 chooses the onnx engine's graphs"),
        ([*args, "--int4"], "--int4 chooses the onnx engine's graphs: add --engine onnx"),
    ):
        assert main([*argv, "--out", str(tmp_path / "x")]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0]


PORTABLE_CHECK = """
import sys
import numpy as np, torch
from aurl.data.meter import read_meter
from aurl.data.tokenizer import Tokenizer
from aurl.engines.native_engine import NativeEngine, kernels
from aurl.models.pretrained import load_pretrained
folder, midi = sys.argv[1], sys.argv[2]
model = load_pretrained(folder).float().eval()
engine = NativeEngine(folder, weights="fp32")
ids = np.asarray(Tokenizer(engine.vocab_config).encode_file(midi), dtype=np.int64)[None, :120]
meter = np.array([read_meter(midi)])
with torch.no_grad():
    want = model.step(torch.as_tensor(ids), model.init_state(1, capacity=256,
                      meter=torch.as_tensor(meter))).numpy()  # fmt: skip
s = engine.init_state(1, capacity=256, meter=meter)
got = np.concatenate([engine.step(ids[:, :60], s)] + [engine.step(ids[:, j : j + 1], s)
                     for j in range(60, 120)], 1)  # fmt: skip
lp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
print(kernels(), float(np.abs(lp(got) - lp(want)).max()))
"""


def test_the_portable_only_build_compiles_and_equals_the_torch_model(tmp_path) -> None:
    """What ARM gets: the step compiled without any x86 code (``AURL_PORTABLE_ONLY``), warning
    free, loaded through ``$AURL_NATIVE_LIBRARY`` in a child process: the shipped model's fp32
    log-probs equal the torch model's to 1e-4 on the portable kernels."""
    import shutil as sh
    import sysconfig

    cc = sh.which("gcc") or sh.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path / "native_portable.so"
    r = subprocess.run(
        [cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-fno-math-errno", "-DAURL_PORTABLE_ONLY",
         "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
         str(SRC / "aurl" / "engines" / "_native.c"), "-o", str(lib), "-lm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    midi = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / "bach_bwv269.mid"
    r = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHECK, str(SHIPPED), str(midi)], capture_output=True,
        text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC), "AURL_NATIVE_LIBRARY": str(lib)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    kernels, diff = r.stdout.split()
    assert kernels == "portable" and float(diff) < 1e-4


MISUSE = """
import ctypes, copy, json, sys
import numpy as np
from aurl.engines.native_engine import NativeEngine
folder = sys.argv[1]
int8, fp32 = NativeEngine(folder), NativeEngine(folder, weights="fp32")
out = {}
def refused(call):
    try:
        call()
    except ValueError as e:
        return str(e).split(":")[0]
    return "ran"
ids = np.array([[0, 5, 6], [0, 5, 6]])
s = int8.init_state(2, capacity=16)  # half-float caches stepped by fp32 code: overrun
out["fp32 engine, int8 state"] = refused(lambda: fp32.step(ids, s))
s = int8.init_state(1, capacity=8)
s.capacity = 200  # the C step would write past the 8 positions the caches hold
out["capacity changed"] = refused(lambda: [int8.step(np.array([[5]]), s) for _ in range(150)])
lib, m = int8.lib, int8.model
def bad(change):  # a copy of the model structure, one field wrong
    b = type(m).from_buffer_copy(m)
    change(b)
    return ctypes.byref(b)
x = np.zeros((2, 64, m.d), np.float32)
s = int8.init_state(2, capacity=64)
logits = np.zeros((2 * 64, m.vocab), np.float32)
floats, qbuf = int8._scratch_arrays(2 * 64, 64)
def prefill(model, B=2, T=64, kc=s.pointers[0]):
    return lib.aurl_prefill(model, B, T, x.ctypes.data, kc, s.pointers[1], 64, 0,
                            logits.ctypes.data, floats.ctypes.data, qbuf.ctypes.data)
for name, change in {
    "heads x 2": lambda b: setattr(b, "heads", 2 * m.heads),
    "head width 0": lambda b: setattr(b, "head_dim", 0),
    "layers 0": lambda b: setattr(b, "layers", 0),
    "vocab + 1": lambda b: setattr(b, "vocab", m.vocab + 1),
    "no head weights": lambda b: setattr(b.head, "w", None),
    "int8 head without scales": lambda b: setattr(b.head, "scale", None),
    "ff x 2": lambda b: setattr(b, "ff", 2 * m.ff),
    "rotary None": lambda b: setattr(b, "cos", None),
}.items():
    out[name] = prefill(bad(change))
out["rows x tokens past int32"] = lib.aurl_prefill(
    bad(lambda b: setattr(b, "rot_len", 2**31 - 1)), 2**16, 2**16, x.ctypes.data,
    s.pointers[0], s.pointers[1], 2**31 - 1, 0, logits.ctypes.data, floats.ctypes.data,
    qbuf.ctypes.data)
out["no key cache"] = prefill(ctypes.byref(m), kc=None)
out["scratch of 0 rows"] = lib.aurl_scratch_floats(ctypes.byref(m), 0, 8)
out["embedding without ids"] = lib.aurl_embed(ctypes.byref(m), ctypes.byref(int8.embedding), 1,
                                              *[None] * 10)
out["a good call"] = prefill(ctypes.byref(m))
print(json.dumps(out))
"""


def test_misuse_of_the_step_is_an_exception_never_a_crash() -> None:
    """What a bug elsewhere could hand the compiled step, in a child process (a crash would
    take it down): a state stepped by another engine (int8 caches of half floats under the
    fp32 engine: a heap overrun, abort), a state's capacity changed (a segfault), and the C
    entry points called with a model structure whose sizes disagree, tables missing, rows x
    tokens past int32, no caches or inputs: each a ValueError from the engine or -1 from the
    library, and a good call still 0."""
    r = _run(MISUSE.replace("sys.argv[1]", repr(str(SHIPPED))))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    refused = "a decode state made by another engine (or with its capacity changed)"
    assert out.pop("fp32 engine, int8 state") == out.pop("capacity changed") == refused
    assert out.pop("a good call") == 0
    assert out == dict.fromkeys(out, -1)


def test_a_build_of_another_version_is_refused(tmp_path) -> None:
    """The step is built in place and an update of the source does not rebuild it: a build
    whose structures differ (here the model's has one more field, as a build from before or
    after a change of the step would) was called with this module's layout and read the
    wrong fields; now refused at load with a ConfigError saying to rebuild it (--engine auto
    goes on without it)."""
    import shutil as sh
    import sysconfig

    cc = sh.which("gcc") or sh.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    source = (SRC / "aurl" / "engines" / "_native.c").read_text()
    fields = "    int32_t rot_len, kv_half; /* kv_half"
    assert fields in source
    other = source.replace(fields, "    int32_t rot_len, kv_half, added; /* kv_half")
    (tmp_path / "other.c").write_text(other)
    lib = tmp_path / "other.so"
    r = subprocess.run(
        [cc, "-O0", "-std=c11", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
         str(tmp_path / "other.c"), "-o", str(lib), "-lm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    code = (
        "from aurl.engines.native_engine import NativeEngine, native_where_it_runs\n"
        "from aurl.errors import ConfigError\n"
        f"assert native_where_it_runs({str(SHIPPED)!r}) is None\n"
        "try:\n"
        f"    NativeEngine({str(SHIPPED)!r})\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC), "AURL_NATIVE_LIBRARY": str(lib)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "was built from another version of Aurl" in r.stdout and "rebuild it" in r.stdout
