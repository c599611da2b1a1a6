"""``aurl generate`` end to end with a tiny saved model: files, names, summaries, errors."""

from __future__ import annotations

import collections
import json

import pytest
import symusic
import torch

import aurl.cli.generate as cli_generate
from aurl.cli import main
from aurl.config import GenerationConfig, load_config
from aurl.data.grammar import Grammar
from aurl.data.notes import notes_from_file
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Vocab
from aurl.models import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    build_model(load_config(preset="tiny")).save_pretrained(folder)
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_files_and_summaries(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "pieces"
    args = ["--checkpoint", str(checkpoint), "--num-samples", "2", "--seconds", "8"]
    args += ["--seed", "3", "--format", "mid,musicxml,png", "--key", "G major", "--out", str(out)]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sample_seed3.yaml"] + [
        f"sample_seed3_{i:03d}.{ext}" for i in range(2) for ext in ("mid", "musicxml", "png")
    ]
    resolved = load_config(out / "sample_seed3.yaml")  # the settings travel with the pieces
    first = (out / "sample_seed3.yaml").read_text().splitlines()[0]
    assert first == "# aurl generate " + " ".join(args).replace("G major", "'G major'")
    assert resolved.generation.key == "G major" and resolved.generation.seed == 3
    for i in range(2):
        assert symusic.Score(str(out / f"sample_seed3_{i:03d}.mid")).note_num() > 0
        assert (out / f"sample_seed3_{i:03d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<score-partwise" in (out / f"sample_seed3_{i:03d}.musicxml").read_bytes()
        assert f"wrote {out / f'sample_seed3_{i:03d}.mid'}" in stdout
    summaries = [line for line in stdout.splitlines() if line.startswith("sample_seed3_")]
    assert len(summaries) == 2
    assert all(" notes, " in s and " s, " in s and "key " in s for s in summaries)

    # no overwrite without --force; --force rewrites the same bytes (same seed, same options)
    before = (out / "sample_seed3_000.mid").read_bytes()
    args[args.index("mid,musicxml,png")] = "mid"  # the MIDI alone is enough to compare
    code, _, err = run(capsys, *args)
    assert code == 2 and "already exist" in err and "--force" in err
    assert err.count("\n") == 1  # one line
    code, _, err = run(capsys, *args, "--force")
    assert code == 0, err
    assert (out / "sample_seed3_000.mid").read_bytes() == before


def test_primer_continuation_in_the_primers_key(checkpoint, tmp_path, capsys, fixtures_dir):
    primer = fixtures_dir / "midi" / "bach_bwv269.mid"
    code, stdout, err = run(
        capsys, "--checkpoint", str(checkpoint), "--primer", str(primer), "--primer-seconds",
        "3", "--max-tokens", "32", "--key", "primer", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "key of the primer: " in stdout and "(asked " in stdout
    assert symusic.Score(str(tmp_path / "sample_seed0_000.mid")).note_num() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--key", "Q major"], "unknown key"),
        (["--pitch-range", "61", "61", "--key", "C major"], "no note can be played"),
        (["--tempo", "fast"], "--tempo"),
        (["--format", "mid,mp3"], "--format"),
        (["--variations", "x.mid"], "VAE model"),
        (["--key", "primer"], "needs --primer"),
    ],
)
def test_bad_options_fail_with_one_line(checkpoint, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--checkpoint", str(checkpoint), "--out", str(out), *extra)
    assert code in (1, 2)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())  # nothing generated


def test_primer_that_is_not_midi(checkpoint, tmp_path, capsys) -> None:
    bad = tmp_path / "primer.mid"
    bad.write_bytes(b"RIFF not a midi file")
    code, _, err = run(capsys, "--checkpoint", str(checkpoint), "--primer", str(bad), "--out",
                       str(tmp_path / "o"))  # fmt: skip
    assert code == 1 and err.startswith("error: ") and "primer.mid" in err


def test_checkpoint_with_another_vocabulary(checkpoint, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    meta = json.loads((checkpoint / "config.json").read_text())
    meta["vocab"]["pitch_max"] = 100  # fewer ids than the weights hold
    (other / "config.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "--checkpoint", str(other), "--out", str(tmp_path / "o"))
    assert code == 1 and err.startswith("error: ") and "embed.weight" in err


def test_without_a_shipped_model(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_generate, "SHIPPED", tmp_path / "pretrained")
    code, _, err = run(capsys, "--out", str(tmp_path / "o"))
    assert code == 1 and "no shipped model" in err and "--checkpoint" in err


@pytest.mark.parametrize("bf16", [True, False], ids=["cpu-with-bf16", "cpu-without-bf16"])
def test_int8_generation_gives_valid_pieces(
    checkpoint, tmp_path, capsys, playable, monkeypatch, bf16
) -> None:
    """``--int8`` runs int8 weights on either CPU path: PyTorch's Int8Linear where the CPU has
    bf16 instructions, onnxruntime's integer graphs where it has not (aurl.engines.cpu)."""
    from torch.nn.modules.module import register_module_forward_hook

    from aurl.engines import cpu
    from aurl.models.quantize import Int8Linear

    monkeypatch.setattr(cpu, "has_bf16", lambda: bf16)  # which CPU this is, not what runs
    if not bf16:  # the int8 graphs, exported before the hook listens (export traces torch)
        from aurl.engines.shipped import ensure_shipped_onnx

        ensure_shipped_onnx(checkpoint, precision="int8", log=lambda _: None)

    ran = collections.Counter()  # the layers that computed, by the dtype of their weights

    def record(module, args, output):
        if isinstance(module, Int8Linear):
            ran["int8", module.weight_int8.dtype] += 1
        elif isinstance(module, torch.nn.Linear):
            ran["linear", module.weight.dtype] += 1

    out = tmp_path / "int8"
    # --engine torch: the torch path's --int8 (the default, auto, would run the native step)
    args = ["--checkpoint", str(checkpoint), "--engine", "torch", "--num-samples", "3",
            "--max-tokens", "64"]  # fmt: skip
    handle = register_module_forward_hook(record)
    try:
        code, stdout, err = run(capsys, *args, "--int8", "--out", str(out))
    finally:
        handle.remove()
    assert code == 0, err
    if bf16:
        # the model that generated held int8 weights: its backbone and head ran as Int8Linear,
        # and no fp32 linear ran (the small grammar-feature linears stay in fp32 by design)
        assert ran["int8", torch.int8] > 0
        assert {k for k in ran if k[0] == "linear"} <= {("linear", torch.float32)}
        assert ran["linear", torch.float32] < ran["int8", torch.int8]
    else:  # no torch linear computed a token; the graphs that did multiply in integers
        import onnx

        from aurl.engines.shipped import shipped_onnx_folder

        assert "int8 runs on onnxruntime" in stdout and not ran
        graph = onnx.load(str(shipped_onnx_folder(checkpoint, precision="int8") / "decoder.onnx"))
        ops = {node.op_type for node in graph.graph.node}
        assert "MatMulInteger" in ops or "QLinearMatMul" in ops, sorted(ops)
    cap = GenerationConfig().polyphony_cap
    grammar = Grammar(Vocab(), cap)
    for i in range(3):
        path = out / f"sample_seed0_{i:03d}.mid"
        playable(notes_from_file(path), polyphony_cap=cap)  # the notes as written to the file
        ids = Tokenizer().encode_file(path)
        assert grammar.count_violations(torch.as_tensor(ids)[None]) == 0


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory, fixtures_dir):
    """A tiny vae-mode model trained for 3 steps by ``aurl train`` on the fixture files."""
    from aurl.data.cache import prepare

    root = tmp_path_factory.mktemp("vae_run")
    prepare(fixtures_dir / "midi", root / "cache", workers=1)
    assert main([
        "train", "--preset", "tiny", "--data", str(root / "cache"), "--out", str(root / "run"),
        "model.mode=vae", "training.max_steps=3", "training.eval_every=3", "data.window=64",
        "data.batch_size=4", "training.sample_every=0", "training.log_every=3",
    ]) == 0  # fmt: skip
    return root / "run" / "model"


def test_interpolate_from_the_cli(vae_checkpoint, tmp_path, capsys, fixtures_dir, playable):
    a, b = fixtures_dir / "midi" / "bach_bwv66.6.mid", fixtures_dir / "midi" / "bach_bwv269.mid"

    def path(first, second, steps: int) -> list[bytes]:
        out = tmp_path / f"{first.stem}-{second.stem}-{steps}"
        code, stdout, err = run(
            capsys, "--checkpoint", str(vae_checkpoint), "--interpolate", str(first),
            str(second), "--steps", str(steps), "--temperature", "0", "--max-tokens", "32",
            "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
        files = sorted(out.glob("*.mid"))
        assert [f.name for f in files] == [f"sample_seed0_{i:03d}.mid" for i in range(steps)]
        for f in files:
            playable(notes_from_file(f), polyphony_cap=GenerationConfig().polyphony_cap)
        return [f.read_bytes() for f in files]

    c = fixtures_dir / "midi" / "bach_bwv347.mid"
    three, two, other = path(a, b, 3), path(a, b, 2), path(a, c, 2)
    # greedy decoding from the path's latents: the first piece is A's whatever the end, the
    # last is B's whatever the number of steps
    assert three[0] == two[0] == other[0] and three[-1] == two[-1]
    assert two[-1] != other[-1] and two[0] != two[-1]  # A, B and C give different pieces
