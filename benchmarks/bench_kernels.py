"""Is the int8 / int4 decoder step at the ceiling its kernels allow? Each kernel of the step
alone, at the model's sizes, against one thread's read bandwidth and against the whole graph.

One run, one thread (onnxruntime with 1 intra-op thread, spinning off, sequential, every graph
optimization on, as ``OnnxEngine`` builds its session), side by side, the CPU named in every
row and the load average printed. Every time is CPU time (``process_time``: what other jobs
on shared cores inflate least), the minimum over ``--rounds``, the configurations rotating
round by round.

1. One thread's read bandwidth: ``bench_onnx.memory_bandwidth`` (the sum of a 100 MB int64
   array, wall clock: the bound the earlier passes used) and the same sum in CPU time over
   100 MB (DRAM), 26 MB (the int8 step's weights), 8 MB and 4 MB (in the L3).
2. Each weight matrix of the step (the shapes and counts read from the fp32 export: the q|k|v
   projection, the attention's output projection, the two feed-forward matrices, the head,
   the two 88-wide input projections) as a graph of independent copies of one node, each with
   its own random weights, all fed the same one-token input (1, 1, K): fp32 ``MatMul``; int8
   ``com.microsoft.DynamicQuantizeMatMul`` (what onnxruntime fuses the int8 export's
   ``DynamicQuantizeLinear`` + ``MatMulInteger`` + scales + bias into: int8 weights per output
   channel, an fp32 scale, an int8 zero point and an fp32 bias per output); 4-bit
   ``com.microsoft.MatMulNBits`` (symmetric, blocks of 32, ``accuracy_level`` 4, fp32 bias:
   ``aurl export --int4``); and, not exported, for comparison: 8-bit ``MatMulNBits``; the int8
   product in two other forms onnxruntime does not fuse, each copy quantizing its own input
   with ``DynamicQuantizeLinear``: the GEMV form (:func:`gemv_nodes`: ``MatMulInteger``
   without zero points, B not prepacked, so M = 1 reaches MLAS's u8 x s8 matrix-vector
   kernel; A's zero point corrected by the weights' column sums) and the unfused form
   (:func:`unfused_nodes`: a prepacked ``MatMulInteger`` with A's zero point, scales after);
   and the two MLAS kernels alone, a bare u8 x s8 ``MatMulInteger`` without zero points, B
   not prepacked (the GEMV) and prepacked (the packed GEMM), int32 out. Three
   sets of copies: as many as fill 4 MB (they stay in the L3 between calls: the kernel's own
   compute ceiling), 8 (the layers, as the brief of this bench asked: larger than L1 / L2, in
   the L3 only where 8 copies fit in what this VM gets of it) and enough to fill 3x the L3
   (streamed from DRAM every call, as the whole step's working set is). Reported: CPU time
   per node, GB/s of the bytes it reads (as stored in the graph), and that rate against a
   numpy read of as many bytes as all the copies, timed right after it in every round.
   GroupQueryAttention likewise (the export's node, 512 cached tokens by default: keys and
   values read per layer), with two variants the export does not make: ``scale`` 1 (q scaled
   beforehand: MLAS's M=1 path) and 2 KV heads for the 8 query heads (grouped-query
   attention, a model change: a quarter of the cache's bytes).
3. The whole graph's step at ``--cached`` tokens (fp32, int8 and int4 exports of ``--shape``,
   the engine's own session, its KV cache bound in place, capacity 1040 or the context if
   shorter; and the int8 export rewritten into each of the two forms above, ``int8-gemv``
   with prepacking off and ``int8-unfused``: :func:`form_graph`): CPU time per step, the bytes it reads (weights + KV cache) and the fraction of
   the read bound; against it the sum of its kernels alone (count x time per node) plus the
   graph without its kernels (the int4 graph with every kernel replaced by a Slice or a Pad:
   the step's own work outside its kernels, with the session's run and every node's
   dispatch). Last, onnxruntime's profiler splits the step by operator, each beside its time
   alone.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels.py [--shape full|shipped]
      [--rounds 5] [--cached 512] [--quick] [--exports DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_onnx  # noqa: E402  (the helpers: exports, bandwidth, bytes per token, profiler)

KINDS = ("fp32", "int8", "int4")  # the exports: the graph's step of each
# nbits8: 8-bit MatMulNBits, the int8 kernel the export does not use; gemv: the int8 product in
# the form that reaches MLAS's matrix-vector kernel (:func:`gemv_nodes`); mmi-gemv / mmi-packed:
# a bare u8 x s8 MatMulInteger without zero points, B not prepacked (MLAS's GEMV) / prepacked
# (its packed GEMM): the two kernels alone, int32 out; unfused: the int8 product as a prepacked
# MatMulInteger with A's zero point and its scales in separate nodes (:func:`unfused_nodes`)
KERNELS = (*KINDS, "nbits8", "gemv", "mmi-gemv", "mmi-packed", "unfused")
UNPACKED = ("gemv", "mmi-gemv")  # kernels whose sessions run with prepacking off
FORMS = {"gemv": "int8-gemv", "unfused": "int8-unfused"}  # the int8 step rewritten per form
STEPS = (*KINDS, *FORMS.values())  # the whole steps timed
STEP_KERNEL = {**{k: k for k in KINDS}, **{step: form for form, step in FORMS.items()}}
OPS = {"fp32": "MatMul fp32", "int8": "DynamicQuantizeMatMul int8 (the int8 export's)",
       "int4": "MatMulNBits 4-bit (the int4 export's)", "nbits8": "MatMulNBits 8-bit (not used)",
       "gemv": "int8, the GEMV form (zero points 0, B not prepacked; not used)",
       "mmi-gemv": "MatMulInteger u8 x s8 alone, B not prepacked (MLAS's GEMV kernel)",
       "mmi-packed": "MatMulInteger u8 x s8 alone, B prepacked (MLAS's packed GEMM kernel)",
       "unfused": "int8, MatMulInteger prepacked with scales after (not used)",
       "attention": "GroupQueryAttention (the export's)",
       "attention-scale1": "GroupQueryAttention, scale 1 (q scaled before)",
       "attention-kv2": "GroupQueryAttention, 2 KV heads (a model change, not exported)"}  # fmt: skip
NBITS = {"int4": 4, "nbits8": 8}
INT4_BLOCK = 32
CAPACITY = 1040  # the KV cache's capacity, as bench_onnx's decode of 1024 tokens binds it
NAMES = {  # row names of the matrices, by the module the export names their MatMul after
    "qkv": "q|k|v projection", "proj": "attention output", "fc": "feed-forward in",
    "proj_1": "feed-forward out", "head": "head", "sounding": "input projections (sounding, age)",
}  # fmt: skip


def l3_bytes() -> int:
    """The last-level cache's size (sysfs; 32 MB where it cannot be read)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


class Reader:
    """One thread's read rate over arrays of any size: the sum of an int64 array (the read of
    ``bench_onnx.memory_bandwidth``, timed here in CPU time as the kernels are), over the
    first ``nbytes`` of one buffer kept for the run (grown when asked for more), touched once
    before the timed sums."""

    def __init__(self) -> None:
        self.buf = np.ones(0, dtype=np.int64)

    def rate(self, nbytes: int, repeats: int = 5) -> float:
        """GB/s of the best of ``repeats`` sums of ``nbytes``."""
        if nbytes > self.buf.nbytes:
            self.buf = np.ones(nbytes // 8 + 1, dtype=np.int64)
        a = self.buf[: nbytes // 8]
        a.sum()
        best = math.inf
        for _ in range(repeats):
            t = time.process_time()  # CPU time, as the kernels are timed
            a.sum()
            best = min(best, time.process_time() - t)
        return a.nbytes / best / 1e9


def session_options(ort: Any, prepack: bool = True) -> Any:
    """``OnnxEngine``'s session settings at one thread, with the pool's spinning off;
    ``prepack`` False: constant weights are not prepacked (``session.disable_prepacking``), the
    one way a MatMulInteger on a constant B reaches MLAS's matrix-vector kernel (its packed-B
    driver has none: ``MlasGemmQuantPackedOperation`` in ``onnxruntime/core/mlas/lib/qgemm.h``)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def weight_bytes(kind: str, K: int, N: int) -> int:
    """Bytes one node's constants take in the graph: fp32 weights; int8 weights with an fp32
    scale, an int8 zero point and an fp32 bias per output; the GEMV form's int8 weights with an
    int32 column sum, an fp32 scale and an fp32 bias per output (unfused: without the column
    sum); the bare MatMulIntegers' int8
    weights; 4- or 8-bit weights (int4, nbits8) with an fp32 scale per block of 32 inputs and
    an fp32 bias per output."""
    if kind == "fp32":
        return 4 * K * N
    if kind == "int8":
        return K * N + 9 * N
    if kind == "gemv":
        return K * N + 12 * N
    if kind == "unfused":
        return K * N + 8 * N
    if kind.startswith("mmi"):
        return K * N
    blocks = -(-K // INT4_BLOCK)
    return N * blocks * (INT4_BLOCK * NBITS[kind] // 8) + 4 * N * blocks + 4 * N


def gemv_nodes(name: str, xq: str, xs: str, xz: str, w: str, colsum: str, scale: str,
               out: str) -> list[Any]:  # fmt: skip
    """The int8 product x @ W in the form that reaches MLAS's u8 x s8 matrix-vector kernel
    (``MlasGemmQuantOperation``'s GEMV, taken only at M = 1 with both zero points 0 and no
    output processor): ``xq``, ``xs``, ``xz`` are ``DynamicQuantizeLinear``'s outputs (x = xs
    (xq - xz)), ``w`` the int8 (K, N) weights (zero point 0), ``colsum`` their int32 column
    sums, ``scale`` the per-column fp32 scale. Since x @ W = xs scale (xq @ w - xz colsum(w)),
    ``MatMulInteger`` gets no zero point and the correction and scales are separate nodes; the
    correction, in int32 between the MatMulInteger and its Cast, also keeps onnxruntime's
    MatMulIntegerToFloat fusion off it (that fusion matches Mul(Cast(MatMulInteger), Mul), and
    its fused kernel has an output processor). ``out``: (1, 1, N) fp32, before any bias."""
    from onnx import TensorProto, helper

    p = name
    return [
        helper.make_node("MatMulInteger", [xq, w], [f"{p}_acc"], name=f"{p}_gemv"),
        helper.make_node("Cast", [xz], [f"{p}_zp"], to=TensorProto.INT32),
        helper.make_node("Mul", [f"{p}_zp", colsum], [f"{p}_corr"]),
        helper.make_node("Sub", [f"{p}_acc", f"{p}_corr"], [f"{p}_int"]),
        helper.make_node("Cast", [f"{p}_int"], [f"{p}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_f", scale], [f"{p}_w"]),
        helper.make_node("Mul", [f"{p}_w", xs], [out]),
    ]


def unfused_nodes(name: str, xq: str, xs: str, xz: str, w: str, scale: str, out: str) -> list[Any]:
    """The int8 product x @ W as a ``MatMulInteger`` with A's zero point (``xq``, ``xs``,
    ``xz`` from ``DynamicQuantizeLinear``; ``w`` int8 with zero point 0) that onnxruntime
    prepacks but does not fuse, its per-column ``scale`` and A's scale applied by two Muls
    after its Cast (Mul(Mul(Cast, scale), xs): the MatMulIntegerToFloat fusion looks for
    Mul(Cast(MatMulInteger), Mul(...)), so no output processor is attached). ``out``: (1, 1, N)
    fp32, before any bias."""
    from onnx import TensorProto, helper

    p = name
    return [
        helper.make_node("MatMulInteger", [xq, w, xz], [f"{p}_acc"], name=f"{p}_packed"),
        helper.make_node("Cast", [f"{p}_acc"], [f"{p}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_f", scale], [f"{p}_w"]),
        helper.make_node("Mul", [f"{p}_w", xs], [out]),
    ]


def matmul_model(kind: str, K: int, N: int, copies: int, seed: int = 0) -> bytes:
    """A graph of ``copies`` independent nodes of ``kind`` (fp32 ``MatMul``, int8
    ``DynamicQuantizeMatMul``, int4 / nbits8 ``MatMulNBits`` of 4 / 8 bits, ``gemv`` /
    ``unfused``: the int8 product as :func:`gemv_nodes` / :func:`unfused_nodes` plus its bias,
    ``mmi-gemv`` / ``mmi-packed``: a bare ``MatMulInteger``), each with its own random (K, N)
    weights, all reading the input ``x`` (1, 1, K; uint8 for the bare MatMulIntegers) but the
    ``FORMS``' copies, each of which reads
    its own input ``x{i}`` (bound to the same array: the optimizer would otherwise merge their
    quantizations into one, which the step's products on distinct inputs cannot share);
    outputs ``y0``... (1, 1, N), int32 for the bare MatMulIntegers. Serialized."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for i in range(copies):
        if kind == "fp32":
            w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        elif kind == "int8":
            inits += [
                numpy_helper.from_array(rng.integers(-64, 64, (K, N), dtype=np.int8), f"w{i}"),
                numpy_helper.from_array(rng.uniform(1e-3, 2e-3, N).astype(np.float32), f"s{i}"),
                numpy_helper.from_array(np.zeros(N, np.int8), f"z{i}"),
                numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}"),
            ]  # fmt: skip
            nodes.append(helper.make_node(
                "DynamicQuantizeMatMul", ["x", f"w{i}", f"s{i}", f"z{i}", f"b{i}"], [f"y{i}"],
                domain="com.microsoft",
            ))  # fmt: skip
        elif kind in FORMS:
            w = rng.integers(-64, 64, (K, N), dtype=np.int8)
            inits += [
                numpy_helper.from_array(w, f"w{i}"),
                numpy_helper.from_array(rng.uniform(1e-3, 2e-3, N).astype(np.float32), f"s{i}"),
                numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}"),
            ]  # fmt: skip
            q = [f"x{i}_q", f"x{i}_s", f"x{i}_z"]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [f"x{i}"], q))
            if kind == "gemv":
                inits.append(numpy_helper.from_array(w.sum(0, dtype=np.int32), f"c{i}"))
                nodes += gemv_nodes(f"n{i}", *q, f"w{i}", f"c{i}", f"s{i}", f"n{i}_y")
            else:
                nodes += unfused_nodes(f"n{i}", *q, f"w{i}", f"s{i}", f"n{i}_y")
            nodes.append(helper.make_node("Add", [f"n{i}_y", f"b{i}"], [f"y{i}"]))
        elif kind.startswith("mmi"):
            inits.append(numpy_helper.from_array(rng.integers(-64, 64, (K, N), dtype=np.int8),
                                                 f"w{i}"))  # fmt: skip
            nodes.append(helper.make_node("MatMulInteger", ["x", f"w{i}"], [f"y{i}"]))
        else:
            bits, blocks = NBITS[kind], -(-K // INT4_BLOCK)
            packed = rng.integers(0, 256, (N, blocks, INT4_BLOCK * bits // 8), dtype=np.uint8)
            inits += [
                numpy_helper.from_array(packed, f"w{i}"),
                numpy_helper.from_array(rng.uniform(1e-3, 2e-3, (N, blocks)).astype(np.float32),
                                        f"s{i}"),
                numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), f"b{i}"),
            ]  # fmt: skip
            nodes.append(helper.make_node(
                "MatMulNBits", ["x", f"w{i}", f"s{i}", "", "", f"b{i}"], [f"y{i}"],
                domain="com.microsoft", K=K, N=N, bits=bits, block_size=INT4_BLOCK,
                accuracy_level=4,
            ))  # fmt: skip
        out_type = TensorProto.INT32 if kind.startswith("mmi") else TensorProto.FLOAT
        outs.append(helper.make_tensor_value_info(f"y{i}", out_type, [1, 1, N]))
    if kind in FORMS:
        ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, K])
               for i in range(copies)]  # fmt: skip
    else:
        in_type = TensorProto.UINT8 if kind.startswith("mmi") else TensorProto.FLOAT
        ins = [helper.make_tensor_value_info("x", in_type, [1, 1, K])]
    graph = helper.make_graph(nodes, kind, ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])  # fmt: skip
    return model.SerializeToString()


def attention_model(layers: int, heads: int, head_dim: int, max_len: int,
                    scale: float | None = None, kv_heads: int | None = None) -> bytes:  # fmt: skip
    """A graph of ``layers`` GroupQueryAttention nodes as the export makes them (q|k|v packed
    in ``query``, rotary inside; ``kv_heads`` None: ``kv_num_heads`` = ``num_heads``, as
    exported; ``scale`` None: the default 1/sqrt(head_dim), as exported), each with its own
    past / present cache ``pk{i}`` / ``pv{i}`` (1, kv_heads, capacity, head_dim), all fed the
    same q|k|v ``qkv`` (1, 1, (heads + 2 kv_heads) * head_dim). Serialized."""
    from onnx import TensorProto, helper, numpy_helper

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv_heads = kv_heads or heads
    angle = np.arange(max_len)[:, None] * 10000.0 ** (-np.arange(head_dim // 2) / (head_dim // 2))
    inits = [numpy_helper.from_array(np.cos(angle).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angle).astype(np.float32), "sin")]  # fmt: skip
    width = (heads + 2 * kv_heads) * head_dim
    ins = [helper.make_tensor_value_info("qkv", f32, [1, 1, width]),
           helper.make_tensor_value_info("seqlens_k", i32, [1]),
           helper.make_tensor_value_info("total", i32, [])]  # fmt: skip
    nodes, outs = [], []
    attrs = {} if scale is None else {"scale": scale}
    cache = [1, kv_heads, "capacity", head_dim]
    for i in range(layers):
        ins += [helper.make_tensor_value_info(f"pk{i}", f32, cache),
                helper.make_tensor_value_info(f"pv{i}", f32, cache)]  # fmt: skip
        outs += [helper.make_tensor_value_info(n, f32, None) for n in (f"y{i}", f"k{i}", f"v{i}")]
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", f"pk{i}", f"pv{i}", "seqlens_k", "total", "cos", "sin"],
            [f"y{i}", f"k{i}", f"v{i}"], domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, **attrs,
        ))  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, "attention", ins, outs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    return model.SerializeToString()


@dataclass
class Kernel:
    """One session of ``copies`` nodes bound to preallocated inputs and outputs; ``run(n)``
    calls it ``n`` times and returns CPU seconds per node call."""

    io: Any
    session: Any
    copies: int
    nbytes: int  # bytes each node reads (weights, or keys and values)

    def run(self, calls: int) -> float:
        c0 = time.process_time()
        for _ in range(calls):
            self.session.run_with_iobinding(self.io)
        return (time.process_time() - c0) / (calls * self.copies)


def kernel_options(ort: Any, kind: str) -> Any:
    """The session settings of a :func:`matmul_model` of ``kind``: prepacking off for the
    kinds in ``UNPACKED``."""
    return session_options(ort, prepack=kind not in UNPACKED)


def matmul_kernel(ort: Any, kind: str, K: int, N: int, copies: int) -> Kernel:
    """The session of :func:`matmul_model` (:func:`kernel_options`), its inputs (one array)
    and outputs bound once."""
    sess = ort.InferenceSession(matmul_model(kind, K, N, copies), kernel_options(ort, kind),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    io = sess.io_binding()
    rng = np.random.default_rng(1)
    if kind.startswith("mmi"):
        x = rng.integers(0, 256, (1, 1, K), dtype=np.uint8)
    else:
        x = rng.standard_normal((1, 1, K)).astype(np.float32)
    for name in sess.get_inputs():
        io.bind_cpu_input(name.name, x)
    keep = [x]
    for i in range(copies):
        y = np.empty((1, 1, N), np.int32 if kind.startswith("mmi") else np.float32)
        keep.append(y)
        io.bind_ortvalue_output(f"y{i}", ort.OrtValue.ortvalue_from_numpy(y))
    kernel = Kernel(io, sess, copies, weight_bytes(kind, K, N))
    kernel.keep = keep  # type: ignore[attr-defined]  # the bound buffers live with it
    sess.run_with_iobinding(io)
    return kernel


def attention_kernel(ort: Any, layers: int, heads: int, head_dim: int, max_len: int,
                     cached: int, scale: float | None = None,
                     kv_heads: int | None = None) -> Kernel:  # fmt: skip
    """The session of :func:`attention_model` at ``cached`` tokens: each layer's random cache
    (capacity 1040, or ``max_len`` if shorter) bound as both past and present (in place, as
    the engine binds it)."""
    kv_heads = kv_heads or heads
    blob = attention_model(layers, heads, head_dim, max_len, scale, kv_heads)
    sess = ort.InferenceSession(blob, session_options(ort), providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    rng = np.random.default_rng(2)
    width = (heads + 2 * kv_heads) * head_dim
    feeds = {"qkv": rng.standard_normal((1, 1, width)).astype(np.float32),
             "seqlens_k": np.array([cached], np.int32), "total": np.array(cached + 1, np.int32)}  # fmt: skip
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    keep = list(feeds.values())
    for i in range(layers):
        for kv in "kv":
            c = rng.standard_normal((1, kv_heads, min(CAPACITY, max_len), head_dim))
            c = c.astype(np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(c)
            keep += [c, value]
            io.bind_ortvalue_input(f"p{kv}{i}", value)
            io.bind_ortvalue_output(f"{kv}{i}", value)
        io.bind_output(f"y{i}")
    kernel = Kernel(io, sess, layers, 2 * kv_heads * (cached + 1) * head_dim * 4)
    kernel.keep = keep  # type: ignore[attr-defined]
    sess.run_with_iobinding(io)
    return kernel


def graph_shapes(fp32_graph: Path) -> Counter:
    """(K, N) of every MatMul with a constant weight in the fp32 export, with its count."""
    import onnx

    model = onnx.load(str(fp32_graph))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return Counter(
        inits[n.input[1]] for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
    )  # fmt: skip


def shape_names(fp32_graph: Path) -> dict[tuple[int, int], str]:
    """A row name for each (K, N): the module the export named its first MatMul of that shape
    after (``/qkv/MatMul``: the q|k|v projection)."""
    import onnx

    model = onnx.load(str(fp32_graph))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    names: dict[tuple[int, int], str] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            module = n.name.strip("/").split("/")[0]
            names.setdefault(inits[n.input[1]], NAMES.get(module, module))
    return names


def form_graph(int8_graph: Path, form: str) -> bytes:
    """The int8 export's graph with each of its quantized products in ``form`` (a key of
    ``FORMS``): the ``MatMulInteger`` (A's and B's zero points), ``Cast`` and scale ``Mul``
    nodes that ``quantize_dynamic`` writes (and onnxruntime fuses with the
    ``DynamicQuantizeLinear`` before them into ``DynamicQuantizeMatMul``) replaced by
    :func:`gemv_nodes` (the weights' int32 column sums added) or :func:`unfused_nodes` on the
    same ``DynamicQuantizeLinear`` outputs and weights; the bias ``Add`` after each product is
    kept. Same inputs and outputs. Serialized.

    Raises:
        ValueError: a product whose weights have a nonzero zero point (both forms drop it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_graph))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replaced: dict[int, list[Any]] = {}  # id of a node -> the nodes in its place
    for n in g.node:
        if n.op_type != "MatMulInteger":
            continue
        xq, w, xz, wz = n.input
        if numpy_helper.to_array(inits[wz]).any():
            raise ValueError(f"{int8_graph}: {n.name} has nonzero weight zero points")
        (cast,) = consumers[n.output[0]]
        (mul,) = consumers[cast.output[0]]
        scales = made[next(i for i in mul.input if i != cast.output[0])]  # A's x B's scales
        w_scale = next(i for i in scales.input if i in inits)
        xs = next(i for i in scales.input if i != w_scale)
        if form == "gemv":
            colsum = f"{w}_colsum"
            q = numpy_helper.to_array(inits[w])
            g.initializer.append(numpy_helper.from_array(q.sum(0, dtype=np.int32), colsum))
            replaced[id(n)] = gemv_nodes(n.name, xq, xs, xz, w, colsum, w_scale, mul.output[0])
        else:
            replaced[id(n)] = unfused_nodes(n.name, xq, xs, xz, w, w_scale, mul.output[0])
        replaced.update({id(cast): [], id(mul): [], id(scales): []})
    nodes = [m for n in g.node for m in replaced.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]  # the weights' zero points go
    del g.initializer[:]
    g.initializer.extend(kept)
    return model.SerializeToString()


def write_form_export(int8: Path, out: Path, form: str) -> None:
    """``out``: the int8 export folder ``int8`` with its graph in ``form``
    (:func:`form_graph`), its ``config.json`` as is."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((int8 / "config.json").read_text())
    decoder = json.loads((int8 / "config.json").read_text())["graphs"]["decoder"]
    (out / decoder).write_bytes(form_graph(int8 / decoder, form))


def rest_model(int4_graph: Path) -> bytes:
    """The int4 export's graph without its kernels: every ``MatMulNBits`` (K -> N) replaced by
    a node as cheap as an Add that makes the same shape (``Slice`` of its input when N <= K,
    ``Pad`` with zeros when N > K), the bias ``Add`` after it dropped (the real graph fuses it
    into the kernel or into ``FastGelu``), every ``GroupQueryAttention`` by a ``Slice`` of its
    q rows, and the KV cache's inputs and outputs removed. What is left is the step's own work
    outside its kernels: the input tables and features, the norms, the residual adds, the
    activations, the session's run and its dispatch of every node. Serialized."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(int4_graph))
    g = model.graph
    consts = {t.name for t in g.initializer}  # and what Identity / Constant nodes make of them
    consts |= {n.output[0] for n in g.node if n.op_type == "Constant"}
    consts |= {n.output[0] for n in g.node if n.op_type == "Identity" and n.input[0] in consts}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    past = next(vi for vi in g.input if vi.name.startswith("past_key"))
    dims = past.type.tensor_type.shape.dim
    width = dims[1].dim_value * dims[3].dim_value  # heads x head_dim: the attention's output
    nodes, extra, dropped = [], [], set()

    def cut(x: str, out: str, n: int) -> Any:  # the first n of the last axis of x
        extra.extend(numpy_helper.from_array(np.array([v], np.int64), f"{out}_{k}")
                     for k, v in (("s", 0), ("e", n), ("a", 2)))  # fmt: skip
        return helper.make_node("Slice", [x, f"{out}_s", f"{out}_e", f"{out}_a"], [out])

    for n in g.node:
        if id(n) in dropped:
            continue
        if n.op_type == "MatMulNBits":
            a, out = attrs(n), n.output[0]
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type == "Add" and (set(after[0].input) & consts):
                dropped.add(id(after[0]))
                out = after[0].output[0]
            K, N = a["K"], a["N"]
            if N <= K:
                nodes.append(cut(n.input[0], out, N))
            else:
                pads = np.array([0, 0, 0, 0, 0, N - K], np.int64)
                extra.append(numpy_helper.from_array(pads, f"{out}_p"))
                nodes.append(helper.make_node("Pad", [n.input[0], f"{out}_p"], [out]))
        elif n.op_type == "GroupQueryAttention":
            nodes.append(cut(n.input[0], n.output[0], width))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used] + extra
    del g.initializer[:]
    g.initializer.extend(kept)
    keep_in = [vi for vi in g.input if not vi.name.startswith("past_")]
    del g.input[:]
    g.input.extend(keep_in)
    keep_out = [vi for vi in g.output if not vi.name.startswith("present_")]
    del g.output[:]
    g.output.extend(keep_out)
    return model.SerializeToString()


class Rest:
    """A session of :func:`rest_model`, fed the inputs of ``graph`` (a :class:`Graph` of the
    int4 export: the same features at the same position); ``run(n)`` as :class:`Graph`'s."""

    def __init__(self, ort: Any, graph: Graph) -> None:
        self.session = ort.InferenceSession(rest_model(graph.engine.folder / "decoder.onnx"),
                                            session_options(ort),
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.io = self.session.io_binding()
        wanted = {i.name for i in self.session.get_inputs()}
        for name, value in graph.state.inputs.items():
            if name in wanted:
                self.io.bind_cpu_input(name, value)
        self.logits = np.empty((1, 1, graph.engine.vocab.size), np.float32)
        self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.session.run_with_iobinding(self.io)

    def run(self, calls: int) -> float:
        return bound_run(self.session, self.io, calls)


def bound_run(session: Any, io: Any, calls: int) -> float:
    """CPU seconds per call of ``session`` on its bound inputs and outputs ``io``."""
    c0 = time.process_time()
    for _ in range(calls):
        session.run_with_iobinding(io)
    return (time.process_time() - c0) / calls


class Graph:
    """The engine's session of one export, its KV cache (capacity 1040 or the model's context
    if shorter; random values) bound in place at ``cached`` tokens; ``run(n)`` returns CPU
    seconds per step of one token. ``prepack`` False: the session is built again with
    prepacking off (:func:`session_options`; the engine has no such setting)."""

    def __init__(self, folder: Path, cached: int, prepack: bool = True) -> None:
        from aurl.engines.onnx_engine import OnnxEngine, import_onnxruntime

        self.engine = OnnxEngine(folder, threads=1)
        if not prepack:
            ort = import_onnxruntime()
            path = self.engine.folder / self.engine.meta["graphs"]["decoder"]
            self.engine.session = ort.InferenceSession(
                str(path), session_options(ort, prepack=False), providers=["CPUExecutionProvider"]
            )  # fmt: skip
            self.engine.io = self.engine.session.io_binding()
        capacity = min(CAPACITY, self.engine.config.max_seq_len)
        state = self.engine.init_state(1, capacity=capacity)
        rng = np.random.default_rng(3)
        for c in state.cache:
            c[...] = rng.standard_normal(c.shape, dtype=np.float32)
        self.engine.step(np.zeros((1, 1), np.int64), state)  # binds the state's buffers
        state.inputs["seqlens_k"][:] = cached
        state.inputs["total_sequence_length"][()] = cached + 1
        self.state, self.session, self.io = state, self.engine.session, self.engine.io
        self.session.run_with_iobinding(self.io)

    def run(self, calls: int) -> float:
        return bound_run(self.session, self.io, calls)


def calls_for(nbytes: int, target: int) -> int:
    """Calls of a session reading ``nbytes`` that read about ``target`` bytes in all."""
    return max(2, -(-target // nbytes))


Slot = tuple[str, Any, str]  # (kernel kind, (K, N) or "attention", where: a key of WHERE)
WALL = "100 MB, wall clock (bench_onnx.memory_bandwidth: the earlier passes' bound)"
L3_SET = 4 << 20  # bytes of copies that stay in the L3 between calls (numpy reads them at L3 rate)
WHERE = {"L3": "copies of 4 MB in all (in the L3)", "8": "8 copies (the layers)",
         "DRAM": "copies over 3x the L3 (from DRAM)"}  # fmt: skip


def measure_kernels(ort: Any, shapes: Counter, dims: tuple[int, int, int, int], cached: int,
                    rounds: int, big: int, target: int, reader: Reader) -> tuple[dict, dict, dict]:  # fmt: skip
    """Section 2: every kernel of the step alone, block by block (one matrix shape's sessions
    alive at a time, then the attention's), each configuration followed by a numpy read of
    as many bytes, the order rotating round by round. Returns the best CPU seconds per node,
    the best numpy GB/s of the same bytes, and the bytes one node reads, by slot."""
    L, H, hd, max_len = dims
    best: dict[Slot, float] = {}
    ref: dict[Slot, float] = {}
    nbytes: dict[Slot, int] = {}

    def copies(each: int, layers: int) -> dict[str, int]:
        return {"L3": max(1, L3_SET // each), "8": layers, "DRAM": max(layers, -(-big // each))}

    for block in (*shapes, "attention"):
        kernels: dict[Slot, Kernel] = {}
        if block == "attention":
            variants = {"attention": (None, H), "attention-scale1": (1.0, H),
                        "attention-kv2": (None, 2)}  # fmt: skip
            for kind, (scale, kv_heads) in variants.items():
                per_layer = 2 * kv_heads * (cached + 1) * hd * 4
                for where, n in copies(per_layer, L).items():
                    kernels[kind, block, where] = attention_kernel(
                        ort, n, H, hd, max_len, cached, scale, kv_heads)  # fmt: skip
        else:
            for kind in KERNELS:
                for where, n in copies(weight_bytes(kind, *block), 8).items():
                    kernels[kind, block, where] = matmul_kernel(ort, kind, *block, n)
        keys = list(kernels)
        for r in range(rounds):
            for slot in keys[r % len(keys) :] + keys[: r % len(keys)]:
                k = kernels[slot]
                total = k.copies * k.nbytes
                best[slot] = min(best.get(slot, math.inf), k.run(calls_for(total, target)))
                ref[slot] = max(ref.get(slot, 0.0), reader.rate(total, repeats=3))
                nbytes[slot] = k.nbytes
        del kernels
    return best, ref, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["full", "shipped"], default="full")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cached", type=int, default=512, help="cached tokens of the step")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds, copies over 1.5x the L3, fewer calls (a look, not a measure)")  # fmt: skip
    ap.add_argument("--exports", help="a folder for the fp32 / int8 / int4 exports of --shape, "
                    "written there if missing, reused if present (default: a temporary one)")  # fmt: skip
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    l3 = l3_bytes()
    big = int((1.5 if args.quick else 3) * l3)  # bytes of copies that stream from DRAM
    target = (64 if args.quick else 256) << 20  # bytes read per timing

    from aurl.engines.cpu import cpu_summary
    from aurl.engines.onnx_engine import import_onnxruntime

    ort = import_onnxruntime()
    ort.set_default_logger_severity(3)  # the rest graph's pruned initializers are no news
    cpu, reader = cpu_summary(), Reader()
    print(f"# bench_kernels: --shape {args.shape}, {args.cached} cached tokens, {rounds} rounds, "
          f"L3 {l3 >> 20} MB, copies streamed from DRAM: over {big >> 20} MB; onnxruntime "
          f"{ort.__version__}; load average {bench_onnx.loadavg()} before")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.exports or tmp)
        if not all((folder / kind / "config.json").is_file() for kind in KINDS):
            t0 = time.perf_counter()
            bench_onnx.prepare(args.shape, folder, int4=True)
            print(f"# exports written in {time.perf_counter() - t0:.0f} s")
        meta = json.loads((folder / "int8" / "config.json").read_text())
        dims = (meta["n_layers"], meta["n_heads"], meta["head_dim"], meta["model"]["max_seq_len"])
        decoder = meta["graphs"]["decoder"]
        shapes = graph_shapes(folder / "fp32" / decoder)
        names = shape_names(folder / "fp32" / decoder)

        read: dict[str, float] = {}

        def bandwidth() -> None:  # section 1, once per round of the graphs
            r, _copy = bench_onnx.memory_bandwidth()
            read[WALL] = max(read.get(WALL, 0.0), r)
            for label, size in (("100 MB (DRAM)", 100_000_000),
                                ("26 MB (the int8 weights' size)", 26_000_000),
                                ("8 MB", 8 << 20), ("4 MB", 4 << 20)):  # fmt: skip
                read[label] = max(read.get(label, 0.0), reader.rate(size, repeats=10))

        t0 = time.perf_counter()
        best, ref, nbytes = measure_kernels(ort, shapes, dims, args.cached, rounds, big, target,
                                            reader)  # fmt: skip
        print(f"# kernels measured in {time.perf_counter() - t0:.0f} s; load average "
              f"{bench_onnx.loadavg()}")  # fmt: skip

        # 3: the whole graph's step, the three exports and the graph without its kernels
        # alternating round by round
        for form, step in FORMS.items():
            if not (folder / step / "config.json").is_file():
                write_form_export(folder / "int8", folder / step, form)
        graphs: dict[str, Any] = {kind: Graph(folder / kind, args.cached) for kind in KINDS}
        for form, step in FORMS.items():
            graphs[step] = Graph(folder / step, args.cached, prepack=form not in UNPACKED)
        graphs["rest"] = Rest(ort, graphs["int4"])
        step: dict[str, float] = {}
        order = list(graphs)
        for r in range(rounds):
            bandwidth()
            for kind in order[r % len(order) :] + order[: r % len(order)]:
                calls = 32 if kind != "rest" else 256
                step[kind] = min(step.get(kind, math.inf), graphs[kind].run(calls))
        del graphs
        ids = np.random.default_rng(0).integers(0, meta["vocab_size"], args.cached + 40)
        shares = {k: bench_onnx.op_shares(folder / k, ids, args.cached, 1) for k in KINDS}
        weights = {k: bench_onnx.bytes_per_token(folder / k / decoder) for k in STEPS}

    print(f"# load average {bench_onnx.loadavg()} after")
    report(Result(args.cached, dims, cpu, read, best, ref, nbytes, shapes, names, step, shares,
                  weights))  # fmt: skip
    return 0


@dataclass
class Result:
    """What one run measured (see :func:`main`)."""

    cached: int
    dims: tuple[int, int, int, int]  # layers, heads, head_dim, max_seq_len
    cpu: str
    read: dict[str, float]  # numpy read GB/s by array size
    best: dict[Slot, float]  # CPU seconds per node alone
    ref: dict[Slot, float]  # numpy read GB/s of as many bytes as the slot's copies
    nbytes: dict[Slot, int]  # bytes one node reads
    shapes: Counter  # (K, N) -> MatMuls of that shape in the step
    names: dict[tuple[int, int], str]
    step: dict[str, float]  # CPU seconds per step of each export, and of "rest"
    shares: dict[str, dict[str, float]]  # the profiler's share by operator, by export
    weights: dict[str, int]  # bytes of constants each export's step reads

    def kernels_alone(self, kind: str, where: str) -> tuple[float, float]:
        """Seconds per step of the graph ``kind``'s (one of ``STEPS``) MatMuls alone and of its
        attention alone (every node of the step: count x time per node)."""
        mm = sum(c * self.best[STEP_KERNEL[kind], s, where] for s, c in self.shapes.items())
        return mm, self.dims[0] * self.best["attention", "attention", where]


def report(res: Result) -> None:
    """The three tables (markdown rows)."""
    L, H, hd, _ = res.dims
    cpu, dram = res.cpu, res.read["100 MB (DRAM)"]
    print("\n1. One thread's read bandwidth (numpy sum of an int64 array, best of every round; "
          "CPU time but the first row)\n")  # fmt: skip
    print("| array | GB/s | CPU |")
    print("|---|---|---|")
    for label, rate in res.read.items():
        print(f"| {label} | {rate:.1f} | {cpu} |")

    print("\n2. Each kernel alone, one token (M=1): CPU time per node (min of every round), the "
          "GB/s of the bytes it reads (weights as stored in the graph; keys and values) and "
          "that rate against a numpy read of as many bytes as all its copies, measured right "
          "after it in each round\n")  # fmt: skip
    print(f"| kernel | K x N | in the step | reads | {' | '.join(WHERE.values())} | CPU |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(k, s) for k in KERNELS for s in res.shapes] + [
        ("attention", "attention"), ("attention-scale1", "attention"),
        ("attention-kv2", "attention")]  # fmt: skip
    for kind, shape in rows:
        b = res.nbytes[kind, shape, "DRAM"]
        if shape == "attention":
            what, kxn, count = f"{OPS[kind]}, {res.cached} cached", f"{H} heads x {hd}", L
            if kind != "attention":
                count = "-"
            if kind == "attention-kv2":
                kxn = f"{H} q / 2 KV heads x {hd}"
        else:
            what, kxn = f"{OPS[kind]}: {res.names[shape]}", f"{shape[0]}x{shape[1]}"
            count = res.shapes[shape] if kind in KINDS else "-"
        cells = []
        for where in WHERE:
            t, r = res.best[kind, shape, where], res.ref[kind, shape, where]
            cells.append(f"{t * 1e6:.1f} us ({b / t / 1e9:.1f} GB/s, {b / t / 1e9 / r:.0%})")
        print(f"| {what} | {kxn} | {count} | {b / 1e6:.3f} MB | {' | '.join(cells)} | {cpu} |")

    kv = 2 * L * H * (res.cached + 1) * hd * 4
    rest = res.step["rest"]
    print(f"\n3. The whole step at {res.cached} cached tokens (the engine's session, CPU time per "
          "step, min of every round; int8-gemv / int8-unfused: the int8 export in the GEMV "
          "form, prepacking off / its products prepacked and unfused) against its bytes and against its kernels alone (count x "
          "time per node, from DRAM / in the L3) plus the graph without its kernels (the int4 "
          f"graph, every kernel replaced by a Slice or Pad: {rest * 1e3:.3f} ms)\n")  # fmt: skip
    print("| graph | step | reads (weights + KV) | at the DRAM read rate | of that bound | "
          "MatMuls alone | attention alone | kernels + the rest | step / (kernels + rest) | "
          "CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in STEPS:
        bound = (res.weights[kind] + kv) / (dram * 1e9)
        mmd, atd = res.kernels_alone(kind, "DRAM")
        mm3, at3 = res.kernels_alone(kind, "L3")
        t = res.step[kind]
        print(f"| {kind} | {t * 1e3:.3f} ms | {res.weights[kind] / 1e6:.1f} + {kv / 1e6:.1f} MB | "
              f"{bound * 1e3:.3f} ms | {bound / t:.0%} | {mmd * 1e3:.3f} / {mm3 * 1e3:.3f} ms | "
              f"{atd * 1e3:.3f} / {at3 * 1e3:.3f} ms | {(mmd + atd + rest) * 1e3:.3f} / "
              f"{(mm3 + at3 + rest) * 1e3:.3f} ms | {t / (mmd + atd + rest):.2f}x / "
              f"{t / (mm3 + at3 + rest):.2f}x | {cpu} |")  # fmt: skip

    print(f"\nInside the graph: onnxruntime's profiler (32 steps at {res.cached} cached tokens), "
          "each operator's share of the kernels' time times the step above, beside the same "
          "kernels alone (from DRAM / in the L3)\n")  # fmt: skip
    print("| graph | operator | share | in the graph | alone |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        mmd, atd = res.kernels_alone(kind, "DRAM")
        mm3, at3 = res.kernels_alone(kind, "L3")
        alone = {"MatMul": (mmd, mm3), "DynamicQuantizeMatMul": (mmd, mm3),
                 "MatMulNBits": (mmd, mm3), "GroupQueryAttention": (atd, at3)}  # fmt: skip
        ranked = sorted(res.shares[kind].items(), key=lambda x: -x[1])
        for name, share in ranked:
            if name in alone:
                a = alone[name]
                print(f"| {kind} | {name} | {share:.1%} | {share * res.step[kind] * 1e3:.3f} ms "
                      f"| {a[0] * 1e3:.3f} / {a[1] * 1e3:.3f} ms |")  # fmt: skip
        others = [(n, x) for n, x in ranked if n not in alone]
        share = sum(x for _, x in others)
        text = ", ".join(f"{n} {x:.1%}" for n, x in others)
        print(
            f"| {kind} | the rest ({text}) | {share:.1%} | "
            f"{share * res.step[kind] * 1e3:.3f} ms | {rest * 1e3:.3f} ms (no kernels) |"
        )


if __name__ == "__main__":
    sys.exit(main())
