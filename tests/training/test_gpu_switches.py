"""The training switches a GPU run uses, checked on the CPU: MFU in the log (formula and value),
causal attention without a mask for right-padded batches (the flash path), ``training.compile``
with the tiny preset, fused AdamW (on CUDA only)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from aurl.config import ModelConfig
from aurl.models.model import MusicTransformerVAEGAN
from aurl.training import mfu
from aurl.training.trainer import make_optimizer, train


def records(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def test_flops_per_token_and_mfu_exact_values() -> None:
    # 6 N + 12 L d T with N 1000, L 2, d 32, T 128: 6000 + 98304
    assert mfu.flops_per_token(1000, 2, 32, 128) == 104304.0
    # 104304 FLOPs x 1e6 tokens/s on a 989 TFLOP/s device
    assert mfu.mfu(1e6, 104304.0, 989.0) == pytest.approx(104304e6 / 989e12, rel=1e-12)
    assert mfu.peak_tflops(torch.device("cpu")) is None
    assert mfu.peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_mfu_is_logged_from_the_configured_peak(fixture_cache, tmp_path, tiny_config) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, "training.max_steps=3", "training.peak_tflops=0.001")
    result = train(cfg, run, echo=lambda line: None)
    rec = records(run, "train")[-1]
    model = result.model
    n = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("discriminator"))
    per_token = 6 * n + 12 * cfg.model.n_layers * cfg.model.d_model * cfg.data.window
    assert rec["mfu"] == pytest.approx(per_token * rec["tok_per_s"] / 1e9, rel=1e-9)
    log = (run / "train.log").read_text()
    assert re.search(r"^step 3 loss \S+ tok/s \S+ mfu \d+\.\d%", log, re.M)
    plain = tmp_path / "plain"  # no peak known (the CPU; a GPU has its own): no MFU
    plain_cfg = tiny_config(fixture_cache, "training.max_steps=1", "training.device=cpu")
    train(plain_cfg, plain, echo=lambda line: None)
    assert "mfu" not in records(plain, "train")[-1]


def test_right_padded_batches_attend_without_a_mask() -> None:
    """Causal attention ignores right padding: the logits at real positions are those of the
    masked pass, and the mask SDPA gets is None (its causal kernel)."""
    torch.manual_seed(0)
    model = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0))
    model.eval()
    ids = torch.randint(4, 700, (3, 40))
    real = torch.arange(40)[None, :] < torch.tensor([40, 25, 7])[:, None]  # right padding
    masks = []
    hook = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return hook(*args, **kwargs)

    with torch.no_grad():
        masked = model(ids, attention_mask=real).logits
        model.set_right_padding(True)
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            fast = model(ids, attention_mask=real).logits
        finally:
            torch.nn.functional.scaled_dot_product_attention = hook
            model.set_right_padding(False)
    assert masks and all(m is None for m in masks)
    torch.testing.assert_close(fast[real], masked[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast[~real], masked[~real])  # padded positions: not the same


def test_training_compile_with_the_tiny_preset(
    fixture_cache, tmp_path, tiny_config, monkeypatch
) -> None:
    """``training.compile=true`` trains through torch.compile (TorchDynamo traces the model);
    the backend here is aot_eager, which runs the traced forward and backward graphs without
    generating C++ (inductor's code generation takes minutes on a loaded CPU; a GPU run uses
    it, see benchmarks/bench_gpu.py)."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # pragma: no cover - builds of torch without dynamo
        pytest.skip("torch.compile is unavailable in this build of torch")
    calls = []
    real_compile = torch.compile

    def compile_aot_eager(module, **kwargs):
        calls.append(type(module).__name__)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    losses = {}
    for flag in ("false", "true"):
        cfg = tiny_config(fixture_cache, "training.max_steps=2", f"training.compile={flag}")
        run = tmp_path / flag
        train(cfg, run, echo=lambda line: None)
        losses[flag] = [r["loss"] for r in records(run, "train")]
    assert calls == ["MusicTransformerVAEGAN"]  # only the run with the flag compiled
    # the compiled model computes the same losses, to float rounding
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is for CUDA parameters")
def test_adamw_is_fused_on_cuda(tiny_config, fixture_cache) -> None:
    cfg = tiny_config(fixture_cache)
    model = MusicTransformerVAEGAN(cfg.model).cuda()
    assert make_optimizer(model, cfg).defaults["fused"]
    assert not make_optimizer(model.cpu(), cfg).defaults["fused"]


def test_training_on_the_gpu_path_gives_the_same_losses(
    fixture_cache, tmp_path, tiny_config, monkeypatch
) -> None:
    """The trainer with the dense grammar scan (what it runs on a GPU), here on the CPU, on
    augmented windows cut from the middle of real pieces: the same losses, step by step, as
    with the CPU's per-family scan."""
    from aurl.data.grammar import Grammar

    overrides = ("training.max_steps=3", "data.augment.transpose_prob=1",
                 "data.augment.velocity_prob=1")  # fmt: skip
    losses = {}
    for dense in (False, True):
        monkeypatch.setattr(Grammar, "dense", dense)
        run = tmp_path / str(dense)
        train(tiny_config(fixture_cache, *overrides), run, echo=lambda line: None)
        losses[dense] = [
            (r["loss"], r["loss_ce"], r["loss_grammar"]) for r in records(run, "train")
        ]
    assert len(losses[True]) == 3 and losses[True] == losses[False]
