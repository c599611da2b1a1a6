"""Decoding without launch overhead: a static KV cache and one CUDA graph per generated token.

A model of a few million parameters needs microseconds of arithmetic per token, but the eager
step launches a few hundred small kernels and reads results back on the host (~5 ms per token
on an H200, whatever the batch). Here the whole per-token work is one function of fixed-shape
tensors that lives on the device:

1. the model's step: embedding, musical time, grammar features (:meth:`Grammar.advance` on
   torch tensors has no host synchronisation), every block over the *whole* preallocated KV
   cache under a mask of the filled positions (the position is a device tensor, so shapes never
   change), the head;
2. the grammar mask of the next id (:meth:`Grammar.allowed`, the same rules as every other
   path) and the sampling filters (:mod:`aurl.generation.sampling`: temperature, top-k);
3. a draw by the Gumbel-max trick (``argmax(logits + Gumbel noise)`` is a sample of
   ``softmax(logits)``; Gumbel 1954, as used by Jang et al. 2017), written into the output
   buffer and fed back as the next input.

On CUDA that function is captured once in a CUDA graph (:class:`torch.cuda.CUDAGraph`) and
replayed once per token: one launch, no host synchronisation until the tokens are read at the
end. Elsewhere (the CPU) the same function runs eagerly, which is what the tests hold equal to
:meth:`MusicTransformerVAEGAN.step`; a graph asked for on the CPU is an error.

What it does not do (then use :mod:`aurl.generation.generate`): windowed attention, VAE
latents, the musical constraints of :mod:`aurl.generation.constraints` (key, density, ...),
stopping early at END (rows that end go on with PAD, as the grammar allows, and are cut on the
host at the end).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aurl.data.grammar import Grammar, GrammarState
from aurl.data.vocab import END, PAD
from aurl.generation.sampling import apply_temperature, top_k_filter
from aurl.models.layers import apply_rotary
from aurl.models.model import DecodeState, MusicTransformerVAEGAN


@dataclass(frozen=True)
class GraphedOptions:
    """What the captured step draws with."""

    temperature: float = 1.0
    top_k: int = 0  # 0: all ids
    # fuse the step's many small kernels with torch.compile (inductor) before the capture: the
    # model's step, the grammar's advance and mask and the filters, not the draw's noise (the
    # eager torch.rand, which a CUDA graph replays with fresh numbers each time)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": traced, unfused)


class StaticDecoder:
    """Token-by-token decoding of ``model`` from a primed ``state`` with fixed shapes.

    Args:
        model: a full-attention model without VAE latents, in eval mode.
        state: a :class:`DecodeState` after the prompt (``model.init_state`` and
            ``model.step``); its KV cache becomes the static cache (taken over, not copied).
        grammar: the grammar whose masks the draws obey (None: no mask).
        options: sampling options.
        graphs: capture the step in a CUDA graph (default: on CUDA); True on the CPU raises.

    Raises:
        ValueError: what the model or the state has that a static step cannot do, or a
            graph asked for off CUDA.
    """

    def __init__(
        self,
        model: MusicTransformerVAEGAN,
        state: DecodeState,
        *,
        grammar: Grammar | None = None,
        options: GraphedOptions | None = None,
        graphs: bool | None = None,
    ) -> None:
        if model.window is not None or model.summary_len:
            raise ValueError("static decoding needs model.attention=full (windowed: generate.py)")
        if state.latents is not None or state.key_mask is not None:
            raise ValueError(
                "static decoding has no VAE latents or padded prompts: use generate.py"
            )
        device = state.k[0].device
        graphs = device.type == "cuda" if graphs is None else graphs
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device (the state is on {device.type})")
        self.model, self.grammar = model, grammar
        self.options = options or GraphedOptions()
        self.graphs, self.device = graphs, device
        self.B, self.capacity = state.k[0].shape[0], state.capacity
        self.k, self.v = state.k, state.v  # per layer (B, H, capacity, hd)
        self.start = state.pos
        self.pos = torch.full((1,), state.pos, dtype=torch.long, device=device)
        self.host_pos = state.pos
        self.ticks = _clone(state.ticks)
        self.tempo = _clone(state.tempo)
        self.meter = state.meter
        self.style = model._style(state.style)  # (B, 1, D) or None: fixed for the whole decode
        self.carry = None  # the grammar features' (state, onsets), static buffers
        if state.grammar is not None:
            self.carry = (_clone_state(state.grammar[0]), state.grammar[1].clone())
        self.mask_state = None  # the grammar's state for the masks (static buffers)
        if grammar is not None:
            if self.carry is None:
                raise ValueError("a grammar mask needs the state the prompt left: a model "
                                 "with grammar features (model.grammar_features)")  # fmt: skip
            self.mask_state = _clone_state(self.carry[0])
        cos, sin = model.rotary.tables(0, self.capacity)  # (capacity, 1, 1, hd)
        self.cos, self.sin = cos, sin
        self.keys = torch.arange(self.capacity, device=device)  # (capacity,)
        self.ids = torch.full((self.B, 1), PAD, dtype=torch.long, device=device)  # next input
        self.logits = torch.zeros(self.B, model.vocab.size, device=device)
        self.drawn = torch.full((self.B,), PAD, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._scores = self._masked_logits
        if self.options.compile:
            self._scores = torch.compile(self._masked_logits, fullgraph=True, dynamic=False,
                                         backend=self.options.compile_backend)  # fmt: skip

    # -- the step ------------------------------------------------------------------------------

    def logits_of(self, ids: Tensor) -> Tensor:
        """Feed ``ids`` (B, 1) at the current position: (B, V) logits, the caches and the
        musical / grammar-feature state advanced in place (fixed shapes throughout)."""
        m = self.model
        time_emb = gram_emb = None
        if m.time is not None:
            time_emb, ticks, tempo = m.time(ids, self.ticks, self.tempo, self.meter)
            self.ticks.copy_(ticks)
            self.tempo.copy_(tempo)
        if m.grammar_features is not None:
            gram_emb, (gstate, onset) = m.grammar_features.advance(ids, self.carry)
            _copy_state(self.carry[0], gstate)
            self.carry[1].copy_(onset)
        x = m._input(ids, None, time_emb, gram_emb, self.style)  # (B, 1, D)
        cos = self.cos.index_select(0, self.pos)  # (1, 1, 1, hd)
        sin = self.sin.index_select(0, self.pos)
        see = (self.keys <= self.pos)[None, None, None, :]  # (1, 1, 1, capacity)
        for block, k_cache, v_cache in zip(m.blocks, self.k, self.v):
            x = _block_step(block, x, cos, sin, k_cache, v_cache, self.pos, see)
        self.pos += 1
        return m._logits(x)[0][:, 0]  # (B, V)

    def _masked_logits(self) -> Tensor:
        """The logits of ``self.ids`` (kept in ``self.logits``), masked by the grammar, tempered
        and top-k filtered: everything of a token but the draw (what ``compile`` fuses)."""
        logits = self.logits_of(self.ids)
        self.logits.copy_(logits)
        if self.grammar is not None:
            self.mask_state = _advance_into(self.grammar, self.mask_state, self.ids[:, 0])
            logits = logits.masked_fill(~self.grammar.allowed(self.mask_state), float("-inf"))
        if self.options.temperature == 0:
            return logits
        return top_k_filter(apply_temperature(logits, self.options.temperature),
                            self.options.top_k)  # fmt: skip

    def _draw(self) -> None:
        """One token: logits of ``self.ids``, masked, filtered, drawn; fed back as input."""
        logits = self._scores()
        if self.options.temperature == 0:
            drawn = logits.argmax(-1)
        else:
            u = torch.rand(logits.shape, device=logits.device).clamp_(1e-20, 1.0)
            drawn = (logits.float() - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max
        self.drawn.copy_(drawn)
        self.ids.copy_(drawn[:, None])

    def capture(self) -> None:
        """Capture :meth:`_draw` in a CUDA graph (once; :meth:`generate` does it when needed),
        after a warm-up on a side stream whose writes to the small state are undone (its KV
        writes land at the position the first replay overwrites). Nothing without graphs."""
        if not self.graphs or self.graph is not None:
            return
        saved = self._small_state()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._draw()
                self._restore(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._draw()
        self._restore(saved)

    def _small_state(self) -> list[tuple[Tensor, Tensor]]:
        bufs = [self.pos, self.ids, self.drawn, self.logits]
        bufs += [t for t in (self.ticks, self.tempo) if t is not None]
        for s in (self.carry[0] if self.carry else None, self.mask_state):
            if s is not None:
                bufs += [getattr(s, f.name) for f in dataclasses.fields(s)]
        if self.carry is not None:
            bufs.append(self.carry[1])
        return [(b, b.clone()) for b in bufs]

    @staticmethod
    def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
        for buf, value in saved:
            buf.copy_(value)

    # -- the loop ------------------------------------------------------------------------------

    def generate(self, first: Tensor, n: int, *, seed: int | None = None) -> Tensor:
        """``n`` tokens per row after feeding ``first`` (B,) (the prompt's last token, which
        the primed state has not yet seen). Returns (B, n) ids on the device; rows that reach
        END go on with PAD. One graph replay per token on CUDA; no host sync until the end."""
        if self.host_pos + n > self.capacity:
            raise ValueError(
                f"{n} tokens from position {self.host_pos} exceed the static cache's "
                f"{self.capacity} positions: init_state(capacity=...) for a longer one"
            )
        if seed is not None:
            torch.manual_seed(seed)
        if n:
            self.capture()
        self.ids.copy_(first.reshape(-1, 1))
        out = torch.empty(self.B, n, dtype=torch.long, device=self.device)
        for i in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._draw()
            out[:, i] = self.drawn
        self.host_pos += n
        return out


def _block_step(block, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                pos: Tensor, see: Tensor) -> Tensor:  # fmt: skip
    """:class:`aurl.models.layers.Block` for one position at device index ``pos`` over the
    whole static cache (``see`` (1, 1, 1, capacity): the filled positions)."""
    attn = block.attn
    h = block.norm1(x)  # (B, 1, D)
    B = h.shape[0]
    qkv = attn.qkv(h).view(B, 1, 3, attn.n_heads, attn.head_dim)  # (B, 1, 3, H, hd)
    qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, 1, 2, H, hd)
    q = qk[:, :, 0].transpose(1, 2)  # (B, H, 1, hd)
    k_cache.index_copy_(2, pos, qk[:, :, 1].transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, pos, qkv[:, :, 2].transpose(1, 2).to(v_cache.dtype))
    y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=see)
    x = x + attn._out(y, h)
    return x + block.ff(block.norm2(x))


def _clone(t: Tensor | None) -> Tensor | None:
    return t.clone() if t is not None else None


def _clone_state(s: GrammarState) -> GrammarState:
    return GrammarState(**{f.name: getattr(s, f.name).clone() for f in dataclasses.fields(s)})


def _copy_state(dst: GrammarState, src: GrammarState) -> None:
    for f in dataclasses.fields(dst):
        getattr(dst, f.name).copy_(getattr(src, f.name))


def _advance_into(grammar: Grammar, state: GrammarState, ids: Tensor) -> GrammarState:
    """``state`` advanced by ``ids`` (B,), written into its own tensors (static buffers)."""
    _copy_state(state, grammar.advance(state, ids))
    return state


def cut_at_end(ids: Tensor) -> list[list[int]]:
    """Each row of generated ids up to and including its first END (host lists)."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(END) + 1] if END in row else row)
    return rows
