"""The onnx engine: the same pieces as the torch engine, a loop without torch, and one clear line
for every bad folder or unsupported request."""

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
from aurl.config import GenerationConfig
from aurl.data.grammar import Grammar
from aurl.engines.onnx_engine import OnnxEngine
from aurl.errors import CheckpointError
from aurl.generation.generate import generate, make_masker

SRC = Path(__file__).resolve().parents[2] / "src"
PY = sys.executable


@pytest.mark.parametrize(
    "overrides",
    [
        {"key": "D minor", "key_strictness": 1.0, "pitch_low": 48, "pitch_high": 84},
        {"tempo": 100.0, "instruments": (0, 5), "density": 2.0},
        {"window": 24, "window_overlap": 8, "seconds": 6.0, "max_tokens": 1000},  # slides
    ],
)
def test_greedy_pieces_equal_the_torch_engine(tiny_model, tiny_export, overrides) -> None:
    """Greedy decoding under constraints gives the same ids on both engines (fp32 logits agree
    to ~1e-6, far below the gaps argmax sees), through the prefill, the step graph, the numpy
    masker and, with a small window, the sliding window's history."""
    cfg = GenerationConfig(**{"temperature": 0.0, "max_tokens": 96, "seed": 0, **overrides})
    want = generate(tiny_model, cfg, num_samples=2)
    engine = OnnxEngine(tiny_export)
    got = generate(engine, cfg, num_samples=2, masker=make_masker(engine.vocab, cfg, None))
    for a, b in zip(want, got):
        assert np.array_equal(a.ids, b.ids)


def test_sampled_pieces_are_valid_and_seeded(tiny_export) -> None:
    engine = OnnxEngine(tiny_export)
    cfg = GenerationConfig(max_tokens=80, top_p=0.9, repetition_penalty=1.2, seed=3)
    first = generate(engine, cfg, num_samples=3)
    again = generate(engine, cfg, num_samples=3)
    grammar = Grammar(engine.vocab, cfg.polyphony_cap)
    for a, b in zip(first, again):
        assert np.array_equal(a.ids, b.ids)
        assert grammar.count_violations(a.ids) == 0


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})},
    )  # fmt: skip


def test_cli_generation_never_imports_torch(tiny_export, tmp_path) -> None:
    """A whole `aurl generate --engine onnx` (constraints, a meter, sampling, MIDI export) in a
    fresh process: neither torch nor symusic (0.17 s of a cold start, only to write the MIDI
    file: :mod:`aurl.data.midi_write` writes it) is ever imported."""
    out = tmp_path / "pieces"
    code = (
        "import sys\nfrom aurl.cli import main\n"
        f"rc = main(['generate', '--engine', 'onnx', '--checkpoint', {str(tiny_export)!r}, "
        f"'--out', {str(out)!r}, '--max-tokens', '64', '--key', 'G major', '--num-samples', '2', "
        "'--meter', '3/4'])\n"
        "assert rc == 0\nprint('torch' in sys.modules, 'symusic' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"
    assert sorted(p.name for p in out.glob("*.mid")) == [
        "sample_seed0_000.mid",
        "sample_seed0_001.mid",
    ]
    assert "meter: 3/4" in (out / "sample_seed0.yaml").read_text()


def test_cli_midi_equals_the_symusic_writer(tiny_export, tmp_path, same_midi) -> None:
    """The files `aurl generate --engine onnx` writes without symusic hold what symusic writes
    for the same generated ids (the tiny model's pieces: many instruments, tempo changes,
    pedal), note for note, and the key found as its signature (``export.signed``)."""
    import json

    from aurl.cli import main
    from aurl.config import DataConfig, GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.generation.export import signed
    from aurl.generation.generate import generate

    engine = OnnxEngine(tiny_export)
    tokenizer = Tokenizer(engine.vocab.config, DataConfig())
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        args = ["generate", "--engine", "onnx", "--checkpoint", str(tiny_export), "--out"]
        assert main([*args, str(out), "--max-tokens", "200", "--seed", str(seed)]) == 0
        config = GenerationConfig(max_tokens=200, seed=seed)
        ids = generate(engine, config)[0].ids  # the CLI's piece: same engine, seed, settings
        data = tokenizer.decode_to_data(ids)
        assert len(data.tracks) > 1 and len(data.tempo_time) > 1, json.dumps(data.tracks)
        signed(data)
        same_midi((out / f"sample_seed{seed}_000.mid").read_bytes(), data.to_score().dumps_midi())


def test_missing_onnxruntime_is_one_line(tiny_export, tmp_path) -> None:
    code = (
        "import sys\nsys.modules['onnxruntime'] = None\nfrom aurl.cli import main\n"
        f"sys.exit(main(['generate', '--engine', 'onnx', '--checkpoint', {str(tiny_export)!r}, "
        f"'--out', {str(tmp_path)!r}]))\n"
    )
    r = _run(code)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install onnxruntime" in lines[0], r.stderr


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--beam", "3"], "--beam"),
        (["--int8"], "--int8"),
        (["--int4"], "--int4"),
        (["--fp32"], "--fp32"),
        (["--variations", "x.mid"], "--variations"),
        (["--device", "cuda"], "--device"),
        (["--interpolate", "a.mid", "b.mid"], "--interpolate"),
        (["--adapter", "lora"], "--adapter"),
        (["--style", "folk"], "--style"),
    ],
)
def test_unsupported_flags_name_the_flag(tiny_export, tmp_path, capsys, flags, name) -> None:
    args = ["generate", "--engine", "onnx", "--checkpoint", str(tiny_export)]
    assert main([*args, "--out", str(tmp_path), *flags]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--engine onnx does not support {name}:" in lines[0]


def _broken(tiny_export: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(version=99), "export version 99"),
        # an export from before the in-place cache graph (version 2): re-export, says how
        (lambda m: m.update(version=1), r"version 1, .*again \(aurl export --format onnx"),
        (lambda m: m["vocab"].update(velocity_bins=16), "vocabulary of 774 ids"),
        (lambda m: m.update(format="aurl-model"), "not an ONNX export"),
        (lambda m: m["inputs"].remove("bar_beats"), "take no bar_beats input"),
        # the sizes the engine makes its caches by: missing, text, absurd, another model's
        (lambda m: m.pop("n_layers"), "n_layers is None, its model config gives 2"),
        (lambda m: m.update(n_heads="x"), "n_heads is 'x', its model config gives 2"),
        (lambda m: m.update(n_layers=10**9), "n_layers is 1000000000, its model config gives 2"),
        (lambda m: m.update(head_dim=8, n_heads=4), "n_heads is 4, its model config gives 2"),
        (lambda m: m.update(graphs={}), "'graphs' names no 'decoder' file"),
        # a graph input config.json does not list is one nothing would bind
        (lambda m: m["inputs"].remove("family"), "takes the input 'family', which"),
    ],
)
def test_bad_export_folders_are_refused(tiny_export, tmp_path, change, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        OnnxEngine(_broken(tiny_export, tmp_path, change))


def test_nan_scales_and_a_short_rotary_table_are_refused(tiny_model, tmp_path) -> None:
    """An int8 export whose weight scales are NaN gave NaN logits that the sampler drew
    pieces from: refused at load. A config.json whose model.max_seq_len exceeds the graph's
    rotary table (512): onnxruntime's failure past it (a traceback) is a CheckpointError naming
    the graph (one line through the commands)."""
    import onnx
    from onnx import numpy_helper

    from aurl.models.onnx_export import export_onnx

    folder = export_onnx(tiny_model, tmp_path / "int8", int8=True)
    graph = onnx.load(str(folder / "decoder.onnx"))
    for init in graph.graph.initializer:
        if init.name.endswith("_scale"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.nan, init.name))
    onnx.save(graph, str(folder / "decoder.onnx"))
    with pytest.raises(CheckpointError, match="gives NaN or infinite logits for a first token"):
        OnnxEngine(folder)
    longer = lambda m: m["model"].update(max_seq_len=4096)  # noqa: E731
    folder = _broken(export_onnx(tiny_model, tmp_path / "fp32"), tmp_path, longer)
    engine = OnnxEngine(folder)
    with pytest.raises(CheckpointError, match=r"decoder.onnx failed at position 0 \(cos_cache"):
        engine.step(np.zeros((1, 520), np.int64), engine.init_state(1, capacity=600))
    state = engine.init_state(1, capacity=600)
    engine.step(np.zeros((1, 500), np.int64), state)
    with pytest.raises(CheckpointError, match=r"failed at position 512 \(cos_cache dimension 0"):
        for _ in range(20):
            engine.step(np.array([[5]]), state)


def test_a_model_folder_is_not_an_export(tmp_path, capsys) -> None:
    from aurl.cli.generate import SHIPPED

    args = ["generate", "--engine", "onnx", "--checkpoint", str(SHIPPED), "--out", str(tmp_path)]
    assert main(args) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is a model folder, not an ONNX export" in lines[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        OnnxEngine(tmp_path)


def test_int8_path_follows_the_cpu(tiny_model, tmp_path, capsys) -> None:
    """`aurl generate --int8` runs torch's int8 (bf16 activations) only where the CPU has bf16
    instructions; elsewhere onnxruntime's int8 graphs, and says so."""
    from aurl.engines.cpu import has_bf16

    folder = tiny_model.save_pretrained(tmp_path / "model")
    args = ["generate", "--checkpoint", str(folder), "--int8", "--max-tokens", "48"]
    assert main([*args, "--out", str(tmp_path / "pieces")]) == 0
    said = "no bf16 instructions, so int8 runs on onnxruntime" in capsys.readouterr().out
    assert said == (not has_bf16())
    assert (tmp_path / "pieces" / "sample_seed0_000.mid").is_file()


def test_states_interleave_and_reorder(tiny_export, fixtures_dir) -> None:
    """One engine, two decode states stepped in turn (each call rebinds the other's buffers),
    and a state reordered mid-piece: every logit equals one state decoding alone."""
    from aurl.data.tokenizer import Tokenizer

    engine = OnnxEngine(tiny_export)
    tok = Tokenizer(engine.vocab_config)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:2]
    ids = np.stack([np.asarray(tok.encode_file(p), dtype=np.int64)[:60] for p in files])

    def alone(rows: np.ndarray) -> np.ndarray:
        state = engine.init_state(len(rows), capacity=64)
        out = [engine.step(rows[:, :20], state)]
        out += [engine.step(rows[:, j : j + 1], state) for j in range(20, rows.shape[1])]
        return np.concatenate(out, axis=1)

    want = alone(ids)
    a, b = engine.init_state(2, capacity=64), engine.init_state(1, capacity=64)
    got_a = [engine.step(ids[:, :20], a)]
    got_b = [engine.step(ids[1:, :20], b)]
    for j in range(20, 40):
        got_a.append(engine.step(ids[:, j : j + 1], a))
        got_b.append(engine.step(ids[1:, j : j + 1], b))
    np.testing.assert_allclose(np.concatenate(got_a, 1), want[:, :40], atol=1e-5)
    np.testing.assert_allclose(np.concatenate(got_b, 1), want[1:, :40], atol=1e-5)
    a = engine.reorder(a, np.array([1, 0]))
    rest = [engine.step(ids[::-1, j : j + 1], a) for j in range(40, 60)]
    np.testing.assert_allclose(np.concatenate(rest, 1), want[::-1, 40:], atol=1e-5)


def test_the_cache_is_written_in_place(tiny_export, fixtures_dir) -> None:
    """Each step writes its keys and values into the state's own buffers (bound as both the
    graph's past input and its present output): the graph's present outputs are those buffers,
    after 30 tokens positions 0..29 hold exactly what one 30-token prefill writes, and the
    positions after them are still the zeros they were allocated with (nothing copied or
    cleared per step)."""
    from aurl.data.tokenizer import Tokenizer

    engine = OnnxEngine(tiny_export)
    path = sorted((fixtures_dir / "midi").glob("*.mid"))[0]
    ids = np.asarray(Tokenizer(engine.vocab_config).encode_file(path), dtype=np.int64)[None, :30]
    stepped = engine.init_state(1, capacity=48)
    engine.step(ids[:, :10], stepped)
    for j in range(10, 30):
        engine.step(ids[:, j : j + 1], stepped)
    outputs = {o.data_ptr() for o in engine.io.get_outputs()}  # logits, present key / value
    assert {c.ctypes.data for c in stepped.cache} <= outputs
    prefilled = engine.init_state(1, capacity=48)
    engine.step(ids, prefilled)
    for mine, want in zip(stepped.cache, prefilled.cache):  # (B, H, capacity, hd)
        assert np.abs(mine[:, :, :30]).min(axis=-1).max() > 0  # every position written
        np.testing.assert_allclose(mine[:, :, :30], want[:, :, :30], atol=1e-5)
        assert not mine[:, :, 30:].any()


def test_packed_graphs_equal_the_split_ones(
    tiny_model, tiny_export, tmp_path, monkeypatch, fixtures_dir
) -> None:
    """Version 3 graphs give each GroupQueryAttention its q|k|v projection packed (no Split
    node); a version 2 folder (q, k and v split before the attention, the same inputs and
    outputs) still loads, and both give the same logits on a prefill and 20 steps."""
    import onnx

    from aurl.models import onnx_export

    nodes = onnx.load(str(tiny_export / "decoder.onnx")).graph.node
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and all(list(n.input[1:3]) == ["", ""] for n in attention)
    assert not [n for n in nodes if n.op_type == "Split"]
    old = tmp_path / "v2"
    shutil.copytree(tiny_export, old)
    monkeypatch.setattr(onnx_export, "pack_qkv", lambda path: None)  # the version 2 graph
    onnx_export.export_graph(tiny_model, old / "decoder.onnx")
    meta = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**meta, "version": 2}))
    assert [n for n in onnx.load(str(old / "decoder.onnx")).graph.node if n.op_type == "Split"]
    from aurl.data.tokenizer import Tokenizer

    tok = Tokenizer(OnnxEngine(tiny_export).vocab_config)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:2]
    ids = np.stack([np.asarray(tok.encode_file(p), dtype=np.int64)[:40] for p in files])
    logits = []
    for folder in (tiny_export, old):
        engine = OnnxEngine(folder)
        state = engine.init_state(2, capacity=48)
        out = [engine.step(ids[:, :20], state)]
        out += [engine.step(ids[:, j : j + 1], state) for j in range(20, 40)]
        logits.append(np.concatenate(out, 1))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


def test_format_version_is_one_number(tiny_export) -> None:
    """The exporter, the engine that reads exports and the shipped model's cache key agree on
    the format version (a new graph layout bumps all three, so old exports and old caches are
    refused or bypassed, never decoded with the new engine)."""
    from aurl.engines import onnx_engine, shipped
    from aurl.models import onnx_export

    meta = json.loads((tiny_export / "config.json").read_text())
    assert (meta["format"], meta["version"]) == (onnx_export.FORMAT, onnx_export.VERSION)
    assert (onnx_engine.FORMAT, onnx_engine.VERSION) == (onnx_export.FORMAT, onnx_export.VERSION)
    assert shipped.EXPORT_VERSION == onnx_export.VERSION
    assert meta["graphs"] == {"decoder": "decoder.onnx"}


@pytest.mark.parametrize(
    "override, message",
    [
        # another vocabulary: the graph's logits have another size than config.json's vocab
        (
            "vocab.velocity_bins=16",
            r"exported with \d+ vocabulary ids \(logits\), its config.json gives 774",
        ),
        ("model.n_heads=4", "exported with 4 attention heads"),
        ("model.n_layers=3", "more layers than the 2"),
    ],
)
def test_a_graph_from_another_export_is_one_line(
    tiny_export, tmp_path, capsys, override, message
) -> None:
    """A decoder.onnx copied over from another model's export (another vocabulary or shape)
    beside this config.json: refused when the engine loads it, in one line through the CLI,
    not by onnxruntime mid-piece."""
    import torch

    from aurl.config import load_config
    from aurl.models import build_model
    from aurl.models.onnx_export import export_onnx

    torch.manual_seed(0)
    other = export_onnx(
        build_model(load_config(preset="tiny", overrides=[override])).eval(), tmp_path / "other"
    )
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_export, folder)
    shutil.copy(other / "decoder.onnx", folder / "decoder.onnx")
    with pytest.raises(CheckpointError, match=message):
        OnnxEngine(folder)
    args = ["generate", "--engine", "onnx", "--checkpoint", str(folder)]
    assert main([*args, "--out", str(tmp_path / "pieces")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the folder mixes exports; export the model again" in lines[0]


def test_a_graph_onnxruntime_cannot_load_is_one_line_and_nothing_on_stdout(
    tiny_export, tmp_path, capsys
) -> None:
    """A graph with a byte of an operator's name damaged (not UTF-8): onnxruntime's "fallback"
    to the same CPU provider printed a banner of four lines to stdout and failed again; now the
    one line on stderr is all."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    graph = bytearray((folder / "decoder.onnx").read_bytes())
    at = graph.find(b'"\x08Identity') + 5  # an op_type field's text
    graph[at] = 0xF9
    (folder / "decoder.onnx").write_bytes(bytes(graph))
    args = ["generate", "--engine", "onnx", "--checkpoint", str(folder), "--max-tokens", "16"]
    assert main([*args, "--out", str(tmp_path / "pieces")]) != 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "decoder.onnx cannot be loaded by onnxruntime" in err


def test_a_state_of_another_engine_is_refused(tiny_model, tiny_export, tmp_path) -> None:
    """A state made by an engine of a one-layer export, stepped by the two-layer one: only its
    two cache buffers were bound, the second layer's stayed bound to an earlier state's (or
    to memory freed since), and it ran on, silently wrong; now a ValueError."""
    import dataclasses

    import torch

    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.onnx_export import export_onnx

    torch.manual_seed(0)
    one = dataclasses.replace(tiny_model.config, n_layers=1)
    other = OnnxEngine(export_onnx(MusicTransformerVAEGAN(one, tiny_model.vocab_config).eval(),
                                   tmp_path / "one-layer"))  # fmt: skip
    engine = OnnxEngine(tiny_export)
    engine.step(np.zeros((1, 3), np.int64), engine.init_state(1, capacity=16))
    state = other.init_state(1, capacity=16)
    other.step(np.zeros((1, 3), np.int64), state)
    with pytest.raises(ValueError, match="a decode state made by another engine"):
        engine.step(np.array([[7]]), state)


def test_prefills_of_many_lengths_keep_no_logits(tiny_export) -> None:
    """Each prefill length's (B, T, V) logits buffer was kept for the engine's life (a
    composing run prefills pieces of every length: 125 prefills of 8 rows held 366 MB); now a
    prefill's logits are returned and only the last one is kept."""
    import tracemalloc

    engine = OnnxEngine(tiny_export)
    engine.step(np.zeros((8, 2), np.int64), engine.init_state(8, capacity=256))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for T in range(3, 120, 3):
            engine.step(np.zeros((8, T), np.int64), engine.init_state(8, capacity=256))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 8 * 120 * 774 * 4 * 2  # at most the last prefill's logits and some change
