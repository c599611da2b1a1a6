"""benchmarks/bench_kernels.py times the kernels it says it times: each one-node graph computes
x @ W of its own copy of the weights (fp32 MatMul, int8 DynamicQuantizeMatMul, 4- and 8-bit
MatMulNBits), its byte count is the graph's constants, and the graph without kernels keeps
every other node of an export and drops every kernel."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # bench_kernels imports bench_onnx beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_kernels"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def dequantized(kind: str, inits: dict[str, np.ndarray], i: int, K: int) -> np.ndarray:
    """Copy ``i``'s (K, N) weights as the kernel reads them, from the graph's constants."""
    w = inits[f"w{i}"]
    if kind == "fp32" or kind.startswith("mmi"):  # the bare MatMulIntegers: int8, exact
        return w
    if kind in ("gemv", "unfused"):  # per output channel, zero point 0
        return w.astype(np.float32) * inits[f"s{i}"]
    if kind == "int8":  # per output channel: (q - zero point) x scale
        return (w.astype(np.float32) - inits[f"z{i}"]) * inits[f"s{i}"]
    bits = {"int4": 4, "nbits8": 8}[kind]
    N, blocks, _ = w.shape
    # 4 bits: two weights a byte, the low nibble first
    q = np.stack([w & 0x0F, w >> 4], axis=-1).reshape(N, blocks, 32) if bits == 4 else w
    q = (q.astype(np.float32) - 2 ** (bits - 1)) * inits[f"s{i}"][:, :, None]
    return q.reshape(N, -1)[:, :K].T


@pytest.mark.parametrize(
    "kind", ["fp32", "int8", "int4", "nbits8", "gemv", "mmi-gemv", "mmi-packed", "unfused"]
)
def test_each_copy_is_its_own_matmul(bench, kind: str) -> None:
    """Three copies at K=64, N=96, in the session the bench times (prepacking off for the
    GEMV kinds): copy i's output is x @ W_i (+ bias) to the kernel's precision (int8 / 4-bit /
    8-bit / the GEMV form quantize x per call: ~1% of the output's scale; the bare
    MatMulIntegers exactly, on uint8 x), the copies differ, and weight_bytes counts every
    constant of a node."""
    import onnxruntime as ort

    K, N, copies = 64, 96, 3
    blob = bench.matmul_model(kind, K, N, copies)
    model = onnx.load_from_string(blob)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sum(a.nbytes for a in inits.values()) == copies * bench.weight_bytes(kind, K, N)
    sess = ort.InferenceSession(
        blob, bench.kernel_options(ort, kind), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(5)
    if kind.startswith("mmi"):
        x = rng.integers(0, 256, (1, 1, K), dtype=np.uint8)
    else:
        x = rng.standard_normal((1, 1, K)).astype(np.float32)
    ys = sess.run(None, {i.name: x for i in sess.get_inputs()})
    for i, y in enumerate(ys):
        if kind.startswith("mmi"):
            np.testing.assert_array_equal(y[0, 0], x[0, 0].astype(np.int32) @ inits[f"w{i}"])
            continue
        want = x[0, 0] @ dequantized(kind, inits, i, K) + inits.get(f"b{i}", 0.0)
        tol = 1e-5 if kind == "fp32" else 0.02
        assert np.abs(y[0, 0] - want).max() <= tol * np.abs(want).max(), (kind, i)
    assert not np.allclose(ys[0], ys[1])


def test_the_attention_writes_its_own_cache_in_place(bench) -> None:
    """Two layers at 5 cached tokens, each with its own buffers bound as past and present (as
    the engine binds them): a step writes the new key and value at position 5 of every
    buffer and leaves every other position as it was."""
    import onnxruntime as ort

    k = bench.attention_kernel(ort, 2, 2, 64, 32, cached=5)
    caches = [a for a in k.keep if isinstance(a, np.ndarray) and a.ndim == 4]
    assert len(caches) == 4 and len({id(c) for c in caches}) == 4  # k, v of 2 layers
    for c in caches:
        c[:, :, 5] = 0.0
    before = [c.copy() for c in caches]
    k.run(1)
    for c, b in zip(caches, before):
        assert np.abs(c[:, :, 5]).min() > 0  # written
        c[:, :, 5] = 0.0
        np.testing.assert_array_equal(c, b)  # nothing else moved
    assert k.nbytes == 2 * 2 * 6 * 64 * 4


def test_the_rest_keeps_the_graph_without_its_kernels(bench, tmp_path) -> None:
    """A tiny model's int4 export: the rest graph has no MatMulNBits, no GroupQueryAttention,
    no KV cache; every other operator of the export is still there (minus the bias Adds the
    kernels absorb), and it runs on the engine's inputs."""
    import onnxruntime as ort
    import torch

    from aurl.config import load_config
    from aurl.models import build_model
    from aurl.models.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny", overrides=["model.mode=transformer"])).eval()
    export_onnx(model, tmp_path / "int4", int4=True)
    graph = bench.Graph(tmp_path / "int4", cached=10)
    full = onnx.load(str(tmp_path / "int4" / "decoder.onnx"))
    rest = onnx.load_from_string(bench.rest_model(tmp_path / "int4" / "decoder.onnx"))
    ops, kept = (collections.Counter(n.op_type for n in g.graph.node) for g in (full, rest))
    assert kept["MatMulNBits"] == kept["GroupQueryAttention"] == 0
    assert kept["Slice"] + kept["Pad"] == ops["MatMulNBits"] + ops["GroupQueryAttention"]
    for op in ("LayerNormalization", "FastGelu", "Gather", "Log"):
        assert kept[op] == ops[op] > 0, op
    assert 0 < kept["Add"] < ops["Add"]
    assert not [i.name for i in rest.graph.input if i.name.startswith("past_")]
    r = bench.Rest(ort, graph)
    assert r.run(2) > 0 and np.isfinite(r.logits).all()


@pytest.mark.parametrize("form", ["gemv", "unfused"])
def test_the_forms_survive_the_optimizer(bench, tmp_path, form: str) -> None:
    """Each int8 form as onnxruntime runs it: after every graph optimization each product is
    still a MatMulInteger, none fused into MatMulIntegerToFloat or DynamicQuantizeMatMul
    (their output processor rules MLAS's GEMV out); the GEMV form's has two inputs (no zero
    point: MLAS tries its matrix-vector kernel only with both zero points 0) and its session
    has prepacking off (a prepacked B runs the packed GEMM, which has no GEMV); the unfused
    form's keeps A's zero point and its session prepacks."""
    import onnxruntime as ort

    key = "session.disable_prepacking"
    opts = bench.kernel_options(ort, form)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(bench.matmul_model(form, 64, 96, 2), opts,
                                providers=["CPUExecutionProvider"])  # fmt: skip
    if form == "gemv":
        assert sess.get_session_options().get_session_config_entry(key) == "1"
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            sess.get_session_options().get_session_config_entry(key)  # prepacked
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    assert ops["MatMulInteger"] == 2 and not ops["MatMulIntegerToFloat"]
    assert not ops["DynamicQuantizeMatMul"]
    inputs = {"gemv": 2, "unfused": 3}[form]
    assert all(
        len([i for i in n.input if i]) == inputs for n in nodes if n.op_type == "MatMulInteger"
    )
    assert ops["DynamicQuantizeLinear"] == 2  # each copy quantizes its own input


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> Path:
    """A tiny transformer's int8 export folder."""
    import torch

    from aurl.config import load_config
    from aurl.models import build_model
    from aurl.models.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny", overrides=["model.mode=transformer"])).eval()
    return export_onnx(model, tmp_path_factory.mktemp("tiny") / "int8", int8=True)


@pytest.mark.parametrize("form", ["gemv", "unfused"])
def test_each_form_computes_the_int8_graph(bench, tiny_int8, tmp_path, fixtures_dir, form) -> None:
    """A tiny model's int8 export in each form: every product is a MatMulInteger without the
    weights' zero points, as many as in the export, and its logits on a real token sequence,
    one token a step (M = 1) in the session the bench times (the GEMV form's with prepacking
    off, so the GEMV runs), equal the int8 export's: the same int32 sums, corrected and scaled
    in another order (float rounding only)."""
    from aurl.data.tokenizer import Tokenizer
    from aurl.engines.onnx_engine import OnnxEngine

    bench.write_form_export(tiny_int8, tmp_path / form, form)
    graphs = [onnx.load(str(f / "decoder.onnx")).graph for f in (tiny_int8, tmp_path / form)]
    products = [[n for n in g.node if n.op_type == "MatMulInteger"] for g in graphs]
    assert len(products[0]) == len(products[1]) > 0
    assert all(len(n.input) == {"gemv": 2, "unfused": 3}[form] for n in products[1])
    assert not [t for t in graphs[1].initializer if t.name.endswith("zero_point")]

    engine = OnnxEngine(tiny_int8)
    piece = fixtures_dir / "midi" / "bach_bwv66.6.mid"
    ids = np.asarray(Tokenizer(engine.vocab_config).encode_file(piece), np.int64)[None, :24]
    prepack = form not in bench.UNPACKED
    engines = [engine, bench.Graph(tmp_path / form, 3, prepack).engine]
    logits = []
    for engine in engines:
        state = engine.init_state(1, capacity=32)
        logits.append(np.concatenate([engine.step(ids[:, j : j + 1], state) for j in range(24)], 1))
    scale = np.abs(logits[0]).max()
    assert np.abs(logits[1] - logits[0]).max() <= 1e-5 * scale  # seen: 1.7e-7
