"""The static-cache step of :mod:`aurl.generation.graphed` (what a CUDA graph captures) equals
the model's own step on real chorales, batch 1 and batch N; its draws obey the grammar; the
graph itself runs only on CUDA (skipped here, refused on the CPU in one clear line)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from aurl.config import ModelConfig
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import PAD
from aurl.generation.graphed import GraphedOptions, StaticDecoder, cut_at_end
from aurl.models.model import MusicTransformerVAEGAN

MIDI = Path(__file__).parents[1] / "fixtures" / "midi"
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, meter=True)
PROMPT, FED = 24, 48  # prompt tokens, then tokens fed one by one


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    return MusicTransformerVAEGAN(TINY).eval()


@pytest.fixture(scope="module")
def chorales() -> torch.Tensor:
    """(3, PROMPT + FED) the opening tokens of three chorales."""
    tok = Tokenizer()
    rows = [tok.encode_file(MIDI / name)[: PROMPT + FED]
            for name in ("bach_bwv153.1.mid", "bach_bwv269.mid", "bach_bwv347.mid")]  # fmt: skip
    return torch.tensor([list(r) for r in rows], dtype=torch.long)


def primed(model, ids: torch.Tensor, capacity: int = 128):
    meter = torch.tensor([[4, 4]] * len(ids))
    state = model.init_state(len(ids), capacity=capacity, meter=meter)
    model.step(ids[:, : PROMPT - 1], state)  # the prompt but its last token
    return state


@pytest.mark.parametrize("rows", [1, 3])
def test_the_static_step_equals_the_models_step(model, chorales, rows) -> None:
    ids = chorales[:rows]
    dynamic, static = primed(model, ids), StaticDecoder(model, primed(model, ids), graphs=False)
    with torch.no_grad():
        for t in range(PROMPT - 1, PROMPT + FED):
            want = model.step(ids[:, t : t + 1], dynamic)[:, 0]  # (B, V)
            got = static.logits_of(ids[:, t : t + 1])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert int(static.pos) == dynamic.pos
    assert torch.equal(static.ticks, dynamic.ticks) and torch.equal(static.tempo, dynamic.tempo)
    for f in dataclasses.fields(dynamic.grammar[0]):  # the grammar features' state, bitwise
        assert torch.equal(getattr(static.carry[0], f.name), getattr(dynamic.grammar[0], f.name))
    assert torch.equal(static.carry[1], dynamic.grammar[1])


def test_a_style_model_decodes_in_its_style(chorales) -> None:
    """The static step adds the state's style vector as the model's own step does (a style
    model decoded unconditioned here before)."""
    torch.manual_seed(0)
    styled = MusicTransformerVAEGAN(dataclasses.replace(TINY, styles=("chorale", "folk"))).eval()
    with torch.no_grad():
        styled.style.table.weight.normal_()  # as after training: the styles differ
    ids = chorales[:2]
    style, meter = torch.tensor([0, 1]), torch.tensor([[4, 4]] * 2)

    def state():
        s = styled.init_state(2, capacity=128, meter=meter, style=style)
        styled.step(ids[:, : PROMPT - 1], s)
        return s

    dynamic, static = state(), StaticDecoder(styled, state(), graphs=False)
    with torch.no_grad():
        for t in range(PROMPT - 1, PROMPT + 8):
            want = styled.step(ids[:, t : t + 1], dynamic)[:, 0]
            torch.testing.assert_close(static.logits_of(ids[:, t : t + 1]), want,
                                       atol=2e-5, rtol=1e-5)  # fmt: skip


def test_draws_obey_the_grammar_and_the_seed(model, chorales) -> None:
    grammar = Grammar(model.vocab, polyphony_cap=8)
    ids = chorales[:, :PROMPT]
    outs = []
    for _ in range(2):
        dec = StaticDecoder(model, primed(model, ids), grammar=grammar, graphs=False,
                            options=GraphedOptions(temperature=1.0, top_k=40))  # fmt: skip
        with torch.no_grad():
            outs.append(dec.generate(ids[:, -1], 60, seed=7))
    assert torch.equal(outs[0], outs[1])  # same seed, same tokens
    whole = torch.cat([ids, outs[0]], dim=1)
    assert grammar.count_violations(whole) == 0  # every drawn id was allowed
    assert (outs[0] != PAD).any(1).all()
    assert all(len(r) <= 60 for r in cut_at_end(outs[0]))


def test_greedy_draws_take_the_masked_argmax(model, chorales) -> None:
    grammar = Grammar(model.vocab, polyphony_cap=8)
    ids = chorales[:1, :PROMPT]
    dec = StaticDecoder(model, primed(model, ids), grammar=grammar, graphs=False,
                        options=GraphedOptions(temperature=0.0))  # fmt: skip
    ref = primed(model, ids)
    with torch.no_grad():
        drawn = dec.generate(ids[:, -1], 10)
        gstate = grammar.state_after(ids)
        last = ids[:, -1:]
        for i in range(10):  # the reference: the model's step, the grammar's mask, argmax
            logits = model.step(last, ref)[:, 0]
            want = logits.masked_fill(~grammar.allowed(gstate), float("-inf")).argmax(-1)
            assert int(drawn[0, i]) == int(want[0])
            gstate = grammar.advance(gstate, want)
            last = want[:, None]


def test_graphs_are_refused_off_cuda_and_windowed_models(model, chorales) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticDecoder(model, primed(model, chorales[:1]), graphs=True)
    local = MusicTransformerVAEGAN(dataclasses.replace(TINY, attention="local", local_window=16))
    with pytest.raises(ValueError, match="model.attention=full"):
        StaticDecoder(local.eval(), primed(local.eval(), chorales[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_graph_replays_the_eager_step(model, chorales) -> None:  # pragma: no cover - GPU
    cuda = MusicTransformerVAEGAN(TINY).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    ids = chorales.cuda()
    grammar = Grammar(cuda.vocab, polyphony_cap=8)
    with torch.no_grad():
        eager = StaticDecoder(cuda, primed(cuda, ids), grammar=grammar, graphs=False,
                              options=GraphedOptions(temperature=0.0))  # fmt: skip
        graphed = StaticDecoder(cuda, primed(cuda, ids), grammar=grammar,
                                options=GraphedOptions(temperature=0.0))  # fmt: skip
        a = eager.generate(ids[:, PROMPT - 1], 40)
        b = graphed.generate(ids[:, PROMPT - 1], 40)
    assert graphed.graph is not None and torch.equal(a, b)


def test_the_captured_step_has_no_host_work(model, chorales) -> None:
    """What a CUDA graph needs: the model's step, the grammar's advance and mask and the draw
    trace (TorchDynamo) as one graph, with no data-dependent host work (grammar on its torch
    path, as on a GPU)."""
    dynamo = pytest.importorskip("torch._dynamo")
    grammar = Grammar(model.vocab, polyphony_cap=8)
    grammar.numpy_on_cpu = False
    features = model.grammar_features.grammar
    features.numpy_on_cpu = False
    try:
        dec = StaticDecoder(model, primed(model, chorales[:2]), grammar=grammar, graphs=False,
                            options=GraphedOptions(temperature=1.0, top_k=40))  # fmt: skip
        dec.ids.copy_(chorales[:2, PROMPT - 1 : PROMPT])
        dynamo.reset()
        with torch.no_grad():
            explained = dynamo.explain(dec._draw)()
    finally:
        del features.numpy_on_cpu
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_the_compiled_step_draws_what_the_eager_one_draws(model, chorales) -> None:
    """``GraphedOptions(compile=True)`` (inductor fuses the step before a CUDA graph captures
    it) changes no draw: greedy tokens equal, logits within float tolerance. On the CPU through
    the ``aot_eager`` backend: the same tracing and functionalised state updates that inductor
    compiles, without its minute of C++ code generation (the GPU test below uses inductor)."""
    grammar = Grammar(model.vocab, polyphony_cap=8)
    grammar.numpy_on_cpu = False  # the torch path, as on a GPU (the numpy one does not trace)
    features = model.grammar_features.grammar
    features.numpy_on_cpu = False
    ids = chorales[:2, :PROMPT]
    try:
        runs = []
        for fused in (False, True):
            dec = StaticDecoder(model, primed(model, ids), grammar=grammar, graphs=False,
                                options=GraphedOptions(temperature=0.0, compile=fused,
                                                       compile_backend="aot_eager"))  # fmt: skip
            with torch.no_grad():
                runs.append((dec.generate(ids[:, -1], 24), dec.logits.clone()))
    finally:
        del features.numpy_on_cpu
    (eager, eager_logits), (fused, fused_logits) = runs
    assert torch.equal(eager, fused)
    torch.testing.assert_close(fused_logits, eager_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_compiled_graph_draws_like_the_plain_graph(model, chorales) -> None:  # pragma: no cover - GPU
    """Inductor's kernels inside the captured graph: greedy draws equal the plain graph's; at
    temperature 1 a seed repeats its draws, another seed differs, and every draw is allowed."""
    cuda = MusicTransformerVAEGAN(TINY).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    ids = chorales.cuda()
    grammar = Grammar(cuda.vocab, polyphony_cap=8)

    def run(temperature: float, fused: bool, seed: int) -> torch.Tensor:
        dec = StaticDecoder(cuda, primed(cuda, ids), grammar=grammar,
                            options=GraphedOptions(temperature=temperature, compile=fused))  # fmt: skip
        with torch.no_grad():
            out = dec.generate(ids[:, PROMPT - 1], 40, seed=seed)
        assert dec.graph is not None
        return out

    assert torch.equal(run(0.0, False, 0), run(0.0, True, 0))
    a, b, c = run(1.0, True, 0), run(1.0, True, 0), run(1.0, True, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert grammar.count_violations(torch.cat([ids[:, :PROMPT], a], dim=1)) == 0
