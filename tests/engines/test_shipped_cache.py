"""The cached ONNX export of a model folder (what `aurl generate --engine onnx` uses for the
shipped model): keyed by the weights' bytes, written once, reused by runs that never import
torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from aurl.engines.shipped import ensure_shipped_onnx, shipped_onnx_folder

SRC = Path(__file__).resolve().parents[2] / "src"


def _model(tiny_model, tmp_path: Path) -> Path:
    return tiny_model.save_pretrained(tmp_path / "model")


def test_changed_weights_get_a_new_folder(tiny_model, tmp_path, monkeypatch) -> None:
    """Retrained weights of the same size and the same time stamp (what a size and mtime key
    would miss) name another cache folder; unchanged files name the same one."""
    monkeypatch.setenv("AURL_CACHE", str(tmp_path / "cache"))
    folder = _model(tiny_model, tmp_path)
    first = shipped_onnx_folder(folder)
    assert shipped_onnx_folder(folder) == first
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert shipped_onnx_folder(folder) != first
    second = shipped_onnx_folder(folder)
    assert shipped_onnx_folder(folder, precision="int8") == second.with_name(second.name + "-int8")
    assert shipped_onnx_folder(folder, precision="int4") == second.with_name(second.name + "-int4")


def test_export_is_written_once_and_reused_without_torch(tiny_model, tmp_path, monkeypatch) -> None:
    """The first call writes the export (with torch); a fresh process then finds it, generates
    from it and never imports torch."""
    cache = tmp_path / "cache"
    folder = _model(tiny_model, tmp_path)
    said: list[str] = []
    # monkeypatch restores the session's cache (tests/conftest.py) afterwards: deleting the
    # variable sent every later test of the session to the user's ~/.cache/aurl
    monkeypatch.setenv("AURL_CACHE", str(cache))
    export = ensure_shipped_onnx(folder, log=said.append)
    assert said and "wrote the ONNX export" in said[0]
    assert ensure_shipped_onnx(folder, log=said.append) == export and len(said) == 1
    monkeypatch.undo()
    assert export.parent == cache / "onnx"
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from aurl.config import GenerationConfig\n"
        "from aurl.engines.onnx_engine import OnnxEngine\n"
        "from aurl.engines.shipped import ensure_shipped_onnx\n"
        "from aurl.generation.generate import generate\n"
        f"folder = ensure_shipped_onnx(Path({str(folder)!r}), log=print)\n"
        "piece = generate(OnnxEngine(folder), GenerationConfig(max_tokens=32, seed=1))[0]\n"
        "print(folder, len(piece.ids) > 8, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "AURL_CACHE": str(cache), "PYTHONPATH": str(SRC)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [f"{export} True False"]
    shutil.rmtree(cache)


def test_engine_onnx_int8_takes_the_shipped_models_int8_export(tmp_path, capsys) -> None:
    """`aurl generate --engine onnx --int8` with no --checkpoint: the shipped model's int8
    graphs (exported once to the cache), not a refusal; with --checkpoint EXPORT, --int8 is
    still refused in one line (an export's precision is the export's)."""
    import onnx

    from aurl.cli import main
    from aurl.shipped import shipped_model

    out = tmp_path / "o"
    args = ["generate", "--engine", "onnx", "--int8", "--max-tokens", "32", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.mid"))) == 1
    folder = shipped_onnx_folder(shipped_model(), precision="int8")
    ops = {node.op_type for node in onnx.load(str(folder / "decoder.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, sorted(ops)
    capsys.readouterr()
    again = [*args[:4], "--checkpoint", str(folder), *args[4:6], "--out", str(tmp_path / "p")]
    assert main(again) != 0
    assert "--engine onnx does not support --int8:" in capsys.readouterr().err


# the weights' MatMul of each precision (int8: MatMulInteger after DynamicQuantizeLinear, or
# fused where onnxruntime's optimizer ran first)
OPS = {
    "fp32": {"MatMul"},
    "int8": {"MatMulInteger", "DynamicQuantizeMatMul"},
    "int4": {"MatMulNBits"},
}


@pytest.mark.parametrize(
    "flags, extra, weights",
    [
        (None, [], "default"),  # this machine's CPU decides
        (frozenset(), [], "fp32"),  # no integer dot products: fp32 graphs
        (frozenset({"avx2"}), [], "int4"),  # integer dot products: int4 graphs
        (frozenset({"avx2"}), ["--fp32"], "fp32"),  # fp32 asked for
        (frozenset({"avx2"}), ["--int8"], "int8"),  # int8 asked for
        (frozenset(), ["--int4"], "int4"),  # int4 asked for
    ],
    ids=["this-cpu", "no-dot-products", "avx2", "--fp32", "--int8", "--int4"],
)
def test_engine_onnx_precision_follows_the_cpu_and_the_flags(
    monkeypatch, tmp_path, flags, extra, weights
) -> None:
    """`aurl generate --engine onnx` without --checkpoint takes the shipped model's int4 export
    where the CPU has integer dot products (AVX2, VNNI, ARM dotprod), the fp32 export elsewhere;
    --fp32, --int8 and --int4 decide over the CPU. The engine built reads the graphs it says,
    from the cache folder of that precision."""
    from aurl.cli import build_parser
    from aurl.cli.generate import onnx_engine
    from aurl.engines import cpu
    from aurl.shipped import shipped_model

    if flags is not None:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    if weights == "default":
        weights = "int4" if cpu.onnx_int8_pays() else "fp32"
    argv = ["generate", "--engine", "onnx", *extra, "--out", str(tmp_path)]
    engine = onnx_engine(build_parser(argv).parse_args(argv))
    assert engine.weights == weights
    assert engine.folder == shipped_onnx_folder(shipped_model(), precision=weights)
    assert engine.folder.name.endswith("" if weights == "fp32" else f"-{weights}")
    ops = {n.op_type for n in onnx.load(str(engine.folder / "decoder.onnx")).graph.node}
    others = set().union(*(OPS[w] for w in OPS if w not in ("fp32", weights)))
    assert ops & OPS[weights] and not ops & others, sorted(ops)


def test_engine_onnx_on_this_avx2_machine_reads_the_int4_folder(tmp_path, capsys) -> None:
    """This machine (AVX2): `aurl generate --engine onnx` with no precision flag decodes on the
    shipped model's int4 graphs, `--int8` on the int8 ones, `--fp32` on the fp32 ones: the
    whole command, each run's settings file naming the graphs it decoded on."""
    from aurl.cli import main
    from aurl.engines import cpu
    from aurl.shipped import shipped_model

    if "avx2" not in cpu.cpu_flags():
        pytest.skip("the default on a CPU without AVX2 is the test above's")
    for flag, weights in ((None, "int4"), ("--int8", "int8"), ("--fp32", "fp32")):
        out = tmp_path / str(flag)
        argv = ["generate", "--engine", "onnx", "--max-tokens", "24", "--out", str(out)]
        assert main(argv + ([flag] if flag else [])) == 0, capsys.readouterr().err
        folder = shipped_onnx_folder(shipped_model(), precision=weights)
        header = (out / "sample_seed0.yaml").read_text().splitlines()[1]
        assert header == f"# engine: onnx, {weights} graphs in {folder}", header


def test_fp32_with_an_export_folder_is_one_line(tiny_export, tmp_path, capsys) -> None:
    """An export's precision is its own: --fp32 (like --int8) with --checkpoint EXPORT is
    refused in one line naming the flag."""
    from aurl.cli import main

    argv = ["generate", "--engine", "onnx", "--checkpoint", str(tiny_export), "--fp32"]
    assert main([*argv, "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "--engine onnx does not support --fp32:" in err[0], err


def test_the_weights_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch) -> None:
    """The cache key's hash of the weights is remembered under the file's stat: a later run
    reads it back (a digest planted in the memo comes back, so the file was not read); one bit
    rewritten with the size and time stamp restored changes the stat (its ctime) and is hashed
    again; a file written just now is not remembered at all (file times advance in ticks)."""
    import json
    import time

    from aurl.engines import shipped
    from aurl.fileio import file_sha256

    monkeypatch.setenv("AURL_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 4096)
    want = file_sha256(weights)
    memo = tmp_path / "cache" / "onnx" / "digests.json"
    assert shipped.weights_digest(weights) == want
    assert not memo.exists()  # written less than SETTLED_NS ago: not remembered
    monkeypatch.setattr(shipped, "SETTLED_NS", 0)
    assert shipped.weights_digest(weights) == want
    known = json.loads(memo.read_text())
    assert known[str(weights.resolve())]["sha256"] == want
    known[str(weights.resolve())]["sha256"] = "planted"
    memo.write_text(json.dumps(known))
    assert shipped.weights_digest(weights) == "planted"
    time.sleep(0.05)  # past the file clock's tick
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert shipped.weights_digest(weights) == file_sha256(weights) != want


def test_a_damaged_cached_export_says_to_remove_it(tiny_model, tmp_path, monkeypatch) -> None:
    """A cached export damaged on disk (its graph cut short) is refused in one line that says
    which cache folder to remove: the user never wrote that export, so "export the model
    again" alone told them nothing they could do."""
    from aurl.engines.shipped import load_shipped_onnx
    from aurl.errors import CheckpointError

    monkeypatch.setenv("AURL_CACHE", str(tmp_path / "cache"))
    folder = _model(tiny_model, tmp_path)
    export = ensure_shipped_onnx(folder, log=lambda _: None)
    graph = export / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"remove {export} and run again") as e:
        load_shipped_onnx(folder, log=lambda _: None)
    assert len(str(e.value).splitlines()) == 1
