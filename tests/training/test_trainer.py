"""The training loop end to end on real token caches, its schedules, and bad input."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

from aurl.cli import main
from aurl.config import load_config
from aurl.data.cache import prepare
from aurl.errors import CheckpointError, ConfigError, DataError
from aurl.training import trainer as trainer_module
from aurl.training.checkpoint import best_checkpoints, list_checkpoints, load_checkpoint
from aurl.training.monitor import AnomalyDetector
from aurl.training.trainer import check_precision, gan_schedule, lr_at, train

FIXTURE_MIDI = Path(__file__).parents[1] / "fixtures" / "midi"


def records(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_lr_schedule_exact_values():
    kw = dict(lr=1.0, warmup=4, total=14, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.25)  # linear warmup: (step + 1) / warmup
    assert lr_at(3, **kw) == pytest.approx(1.0)
    assert lr_at(4, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=1.0, warmup=0, total=10, min_ratio=0.0) == pytest.approx(1.0)


def test_gan_schedule_warmup_then_ramp():
    cfg = load_config(overrides=["training.disc_warmup_steps=10", "loss.adv_weight=0.1"])
    assert gan_schedule(cfg, 5).adv_weight == 0.0  # discriminator warm-up: no adversarial signal
    assert gan_schedule(cfg, 15).adv_weight == pytest.approx(0.05)
    assert gan_schedule(cfg, 25).adv_weight == pytest.approx(0.1)
    assert gan_schedule(cfg, 15).feature_matching_weight == pytest.approx(0.5)


def test_anomaly_detector_actions():
    det = AnomalyDetector(max_bad=3, spike_factor=3.0, warmup=3)
    assert [det.check(2.0, 1.0)[0] for _ in range(4)] == ["ok"] * 4
    assert det.check(float("nan"), 1.0) == ("skip", "nan_loss")
    assert det.check(2.0, float("inf")) == ("skip", "nan_grad")
    assert det.check(float("nan"), 1.0) == ("rollback", "nan_loss")  # third in a row
    assert det.check(7.0, 1.0) == ("spike", "loss_spike")  # 7 > 3 x running mean 2
    assert det.check(2.0, 10.0) == ("spike", "grad_spike")
    det.check(float("nan"), 1.0)
    det.check(2.0, 1.0)  # a good step resets the count: the next NaN only skips
    assert det.check(float("nan"), 1.0)[0] == "skip"


def test_tiny_run_loss_falls_and_is_logged(chorale_cache, tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(chorale_cache, "training.max_steps=40", "training.lr=3e-3",
                      "training.eval_every=40", "training.save_every=20")  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    train_recs = records(run, "train")
    first = train_recs[0]["loss"]
    last = sum(r["loss"] for r in train_recs[-5:]) / 5
    # untrained, the loss is about ln(#ids the grammar allows) ~ 6; 40 steps must take 2 nats off
    assert first > 5.5
    assert last < first - 2.0, (first, last)
    valid = records(run, "valid")
    assert [r["step"] for r in valid] == [40]
    assert valid[0]["loss"] < first - 1.5  # held-out chorales too
    assert valid[0]["ppl"] == pytest.approx(math.exp(valid[0]["loss"]))
    assert 0 < valid[0]["bits_per_note"] < 30
    assert result.best_valid_loss == pytest.approx(valid[0]["loss"])
    assert {"lr", "grad_norm", "tok_per_s", "step_s", "loss_ce"} <= set(train_recs[-1])
    log = (run / "train.log").read_text()
    assert re.search(r"^step 40 loss \d+\.\d{3} tok/s \S+ lr \d\.\de-\d\d", log, re.M)
    assert re.search(r"^step 40 valid loss \d\.\d{3} ppl [\d.]+ bits/note [\d.]+", log, re.M)
    assert any((run / "tb").iterdir())
    assert load_config(run / "config.yaml") == cfg  # the resolved config beside the run
    # the last checkpoint holds the final step and its validation loss
    last_ckpt = load_checkpoint(list_checkpoints(run)[-1])
    assert last_ckpt.step == 40
    assert last_ckpt.metrics["valid_loss"] == pytest.approx(valid[0]["loss"])


def test_cli_run_keeps_best_n_plus_last(fixture_cache, tmp_path, capsys):
    run = tmp_path / "run"
    code = main([
        "train", "--preset", "tiny", "--data", str(fixture_cache), "--out", str(run),
        "training.max_steps=6", "training.eval_every=3", "training.save_every=3",
        "training.keep_best=1", "training.lr=1e-2", "data.window=64",
    ])  # fmt: skip
    assert code == 0
    assert "step 6 loss" in capsys.readouterr().err  # plain log lines on stderr
    # the best checkpoint's weights alone, ready for aurl generate --checkpoint RUN/model
    from aurl.models import MusicTransformerVAEGAN

    exported = MusicTransformerVAEGAN.from_pretrained(run / "model")
    assert exported.config.d_model == 32
    kept = list_checkpoints(run)
    valid = {r["step"]: r["loss"] for r in records(run, "valid")}
    best_step = min(valid, key=valid.get)
    assert sorted(valid) == [3, 6]
    assert kept[-1].name == "step-0000006"
    assert {p.name for p in kept} == {"step-0000006", f"step-{best_step:07d}"}
    assert best_checkpoints(run, 1)[0].name == f"step-{best_step:07d}"


def test_stages_transformer_vae_vae_gan(fixture_cache, tmp_path, tiny_config, monkeypatch):
    from aurl.training import trainer

    # each stage's weights as it starts and as it ends (the real stage loop, watched)
    entries, exits = [], []
    real_stage = trainer._train_stage

    def watched(run, stage, *args, **kw):
        entries.append({k: v.clone() for k, v in stage.model.state_dict().items()})
        real_stage(run, stage, *args, **kw)
        exits.append({k: v.clone() for k, v in stage.model.state_dict().items()})

    monkeypatch.setattr(trainer, "_train_stage", watched)
    run = tmp_path / "run"
    cfg = tiny_config(
        fixture_cache, "training.stages=[[transformer, 2], [vae, 2], [vae_gan, 3]]",
        "training.eval_every=100", "training.save_every=100", "training.disc_warmup_steps=1",
        "loss.kl_anneal_steps=0",
    )  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    assert result.step == 7
    recs = {r["step"]: r for r in records(run, "train")}
    assert recs[2]["loss_kl"] == 0.0 and recs[4]["loss_kl"] > 0.0  # the VAE stage has a KL
    assert recs[7]["loss_disc"] > 0.0 and recs[7]["loss_adv"] != 0.0  # the GAN stage
    ckpts = [load_checkpoint(p) for p in list_checkpoints(run)]
    assert [(c.step, c.config.model.mode) for c in ckpts[-1:]] == [(7, "vae_gan")]
    assert result.model.discriminator is not None
    # stages 2 and 3 start from the weights the stage before ended with (not a fresh model):
    # every weight they share, the whole decoder
    assert len(entries) == len(exits) == 3
    for before, after in zip(exits, entries[1:]):
        shared = [k for k in before if k in after]
        assert "embed.weight" in shared and len(shared) > 0.5 * len(after)
        assert all(torch.equal(before[k], after[k]) for k in shared)
    assert not torch.equal(entries[0]["embed.weight"], exits[0]["embed.weight"])  # it trained
    new = [k for k in entries[2] if k not in exits[1]]  # the discriminator starts fresh
    assert new and all(k.startswith("discriminator.") for k in new)


def test_early_stopping(fixture_cache, tmp_path, tiny_config):
    cfg = tiny_config(fixture_cache, "training.max_steps=50", "training.eval_every=1",
                      "training.patience=1", "training.min_delta=100")  # fmt: skip
    result = train(cfg, tmp_path / "run", echo=lambda line: None)
    # the first evaluation sets the best; the second cannot beat it by 100 nats: stop
    assert (result.stopped, result.step) == ("early_stopping", 2)
    assert "step 2 stop early_stopping" in (tmp_path / "run" / "train.log").read_text()


def test_bad_input_errors_before_training(fixture_cache, tmp_path, capsys, tiny_config):
    with pytest.raises(DataError, match="--data"):
        train(tiny_config(""), tmp_path / "a", echo=lambda line: None)
    with pytest.raises(DataError, match="does not exist"):
        train(tiny_config(tmp_path / "nope"), tmp_path / "a", echo=lambda line: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a token cache"):
        train(tiny_config(empty), tmp_path / "a", echo=lambda line: None)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        check_precision("fp16", torch.device("mps"))
    # a cache tokenized with another vocabulary: the CLI says so in one line and exits 1
    other = tmp_path / "other"
    prepare(FIXTURE_MIDI, other, vocab_config=load_config(overrides=["vocab.velocity_bins=16"]).vocab,
            workers=1)  # fmt: skip
    code = main(["train", "--preset", "tiny", "--data", str(other), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "velocity_bins" in err
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_resume_with_incompatible_config_is_refused(fixture_cache, tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config(fixture_cache, "training.max_steps=2"), run, echo=lambda line: None)
    bigger = tiny_config(fixture_cache, "training.max_steps=4", "model.d_model=48")
    with pytest.raises(CheckpointError, match="model.d_model=32"):
        train(bigger, run, echo=lambda line: None)
    # a compatible change (more steps) resumes and goes on from step 2
    result = train(tiny_config(fixture_cache, "training.max_steps=4"), run, echo=lambda line: None)
    assert result.step == 4
    assert "resuming from" in (run / "train.log").read_text()


def test_bf16_autocast_on_cpu(fixture_cache, tmp_path, tiny_config):
    from torch.nn.modules.module import register_module_forward_hook

    seen = collections.Counter()  # (training mode, output dtype) of every linear layer run

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            seen[module.training, output.dtype] += 1

    handle = register_module_forward_hook(record)
    try:
        for precision in ("fp32", "bf16"):
            seen.clear()
            cfg = tiny_config(fixture_cache, "training.max_steps=2",
                              f"training.precision={precision}")  # fmt: skip
            result = train(cfg, tmp_path / precision, echo=lambda line: None)
            assert math.isfinite(result.train_loss)
            assert next(result.model.parameters()).dtype == torch.float32  # master weights
            if precision == "fp32":
                fp32 = dict(seen)
    finally:
        handle.remove()
    # the training steps' linears ran in bf16 under bf16 autocast, in fp32 without it
    steps = fp32[True, torch.float32]
    assert steps > 0 and (True, torch.bfloat16) not in fp32
    assert seen[True, torch.bfloat16] == steps and seen[True, torch.float32] == 0


def test_grammar_masks_batched_equal_one_state_per_row(chorale_cache, tiny_config):
    import dataclasses

    import numpy as np

    from aurl.data.cache import TokenCache
    from aurl.data.dataset import build_loader
    from aurl.data.grammar import Grammar, GrammarState
    from aurl.data.vocab import Vocab
    from aurl.training.trainer import grammar_masks

    cfg = tiny_config(chorale_cache, "data.batch_size=8", "data.window=128")
    cache, grammar = TokenCache(chorale_cache), Grammar(Vocab(), cfg.data.polyphony_cap)
    loader = iter(build_loader(cache, cfg.data, seed=3, augment=False))
    # a batch with windows from the start of a piece and from inside one
    batch = next(b for b in loader if (b["offset"] > 0).any() and (b["offset"] == 0).any())
    states = [
        grammar.state_after(torch.as_tensor(np.asarray(cache.tokens(r)[:o], dtype=np.int64))[None])
        if o else grammar.initial_state(1)
        for r, o in zip(batch["index"].tolist(), batch["offset"].tolist())
    ]  # fmt: skip
    fields = dataclasses.fields(GrammarState)
    state = GrammarState(
        **{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields}
    )
    expected = grammar.sequence_masks(batch["ids"], state)
    assert torch.equal(grammar_masks(grammar, batch, cache), expected)
    # without augmentation every real target is allowed by its window's masks
    ids, mask = batch["ids"], batch["attention_mask"]
    ok = expected[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    assert bool(ok[mask[:, 1:]].all())


def test_nan_steps_are_skipped_then_rolled_back(fixture_cache, tmp_path, tiny_config, monkeypatch):
    import aurl.models.losses as losses_module

    real = losses_module.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kw):  # the real losses; the 6th to 8th calls return NaN
        out = real(*args, **kw)
        calls["n"] += 1
        if 6 <= calls["n"] <= 8:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(losses_module, "compute_losses", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, "training.max_steps=10", "training.save_every=4",
                      "training.eval_every=100")  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    events = [(r["step"], r["what"], r["action"]) for r in records(run, "event")]
    # steps 5 and 6 (0-based: the 6th and 7th updates) skipped, the 3rd in a row rolls back to
    # the checkpoint of step 4 with half the learning rate, and training goes on to the end
    assert events == [(5, "nan_loss", "skip"), (6, "nan_loss", "skip"),
                      (7, "nan_loss", "rollback"), (4, "nan_loss", "rolled_back")]  # fmt: skip
    assert result.step == 10 and math.isfinite(result.train_loss)
    assert load_checkpoint(list_checkpoints(run)[-1]).state["lr_scale"] == 0.5


# --------------------------------------------------------------------------------------------
# vae_gan: alternating discriminator and generator steps
# --------------------------------------------------------------------------------------------


def _weights(model, disc):
    """The generator's (``disc`` False) or the discriminator's parameters, copied."""
    named = model.named_parameters()
    return {n: p.detach().clone() for n, p in named if n.startswith("discriminator.") == disc}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_vae_gan_step_is_a_discriminator_step_then_a_generator_step(fixture_cache, tiny_config):
    import copy

    from aurl.data.cache import TokenCache
    from aurl.data.dataset import build_loader
    from aurl.models import build_model
    from aurl.models.losses import compute_losses, discriminator_loss, soft_fakes
    from aurl.training import trainer as tr
    from aurl.training.distributed import Dist

    cfg = tiny_config(fixture_cache, "model.mode=vae_gan", "training.disc_warmup_steps=0",
                      "training.disc_lr=1e-2", "model.dropout=0.1")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    reference = copy.deepcopy(model)
    raw = next(iter(build_loader(TokenCache(fixture_cache), cfg.data, seed=0, augment=False)))
    batch = {"ids": raw["ids"], "attention_mask": raw["attention_mask"]}
    optimizers = {
        "model": tr.make_optimizer(model, cfg),
        "disc": tr.make_optimizer(model, cfg, disc=True),
    }
    stage = tr._Stage(index=0, mode="vae_gan", config=cfg, start=0, end=1, model=model,
                   train_model=model, optimizers=optimizers)  # fmt: skip
    d, cpu, clip = Dist(), torch.device("cpu"), cfg.training.grad_clip
    seeds = tr.micro_seeds(cfg.training.seed, 0, 1, d)
    gen0, disc0 = _weights(model, False), _weights(model, True)

    # (a) the discriminator's step: every discriminator weight moves, no generator weight does
    out = tr._discriminator_step(stage, [(batch, None)], seeds=seeds, d=d, precision="fp32",
                              grad_clip=clip)  # fmt: skip
    disc1 = _weights(model, True)
    assert out.ok and math.isfinite(out.loss) and out.grad_norm > 0
    assert _same(_weights(model, False), gen0)
    assert not any(torch.equal(disc1[k], disc0[k]) for k in disc0)
    # ... exactly as one AdamW step on the discriminator's hinge loss alone moves it, on fakes
    # sampled without gradient from the same random draws
    with tr._replay(seeds[0], cpu):
        with torch.no_grad():
            logits = reference(batch["ids"], attention_mask=batch["attention_mask"]).logits
            fake = soft_fakes(batch["ids"], logits)
        loss = discriminator_loss(reference, batch["ids"], fake)
    loss.backward()
    assert all(p.grad is None for p in reference.generator_parameters())
    torch.nn.utils.clip_grad_norm_(reference.discriminator.parameters(), clip)
    tr.make_optimizer(reference, cfg, disc=True).step()
    assert out.loss == loss.item()
    assert _same(_weights(reference, True), disc1)

    # (b) the generator's pass reads the updated discriminator and sends it no gradient
    loss_sum, parts = tr._generator_backward(stage, [(batch, None)], cfg.loss, step=0, d=d,
                                          precision="fp32", seeds=seeds)  # fmt: skip
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("discrim"))
    reference.discriminator.eval()  # this step's power iteration is done
    with tr._replay(seeds[0], cpu):
        expected = compute_losses(reference, batch, cfg.loss, step=0, disc=False)
    assert parts["adv"] == expected["adv"] and parts["fm"] == expected["fm"] != 0
    assert loss_sum == expected["total"]
    optimizers["model"].step()  # the generator's update leaves the discriminator alone
    assert _same(_weights(model, True), disc1) and not _same(_weights(model, False), gen0)


def test_vae_gan_training_alternates_the_two_updates(fixture_cache, tmp_path, tiny_config,
                                                     monkeypatch):  # fmt: skip
    from aurl.training import trainer

    seen = []  # per phase: (name, weights before, weights after, discriminator grads after)

    def watch(name, phase):
        def run(stage, *args, **kw):
            before = _weights(stage.model, False), _weights(stage.model, True)
            out = phase(stage, *args, **kw)
            after = _weights(stage.model, False), _weights(stage.model, True)
            grads = [p.grad for n, p in stage.model.named_parameters() if n.startswith("discrim")]
            seen.append((name, before, after, grads))
            return out

        return run

    monkeypatch.setattr(trainer, "_discriminator_step", watch("d", trainer._discriminator_step))
    monkeypatch.setattr(trainer, "_generator_backward", watch("g", trainer._generator_backward))
    cfg = tiny_config(fixture_cache, "model.mode=vae_gan", "training.max_steps=2",
                      "training.eval_every=100", "training.disc_warmup_steps=0")  # fmt: skip
    result = train(cfg, tmp_path / "run", echo=lambda line: None)
    assert [name for name, *_ in seen] == ["d", "g"] * 2
    for name, (gen0, disc0), (gen1, disc1), grads in seen:
        assert all(g is None for g in grads)  # cleared by its optimizer, or never sent
        assert _same(gen1, gen0)  # neither pass changes the generator itself
        if name == "d":  # the discriminator's update
            assert not any(torch.equal(disc1[k], disc0[k]) for k in disc0)
        else:  # the generator's pass only reads it
            assert _same(disc1, disc0)
    # between a generator pass and the next step (or the end): the generator's update, which
    # moves the generator and leaves the discriminator as it was
    nexts = [before for _, before, _, _ in seen[2::2]]
    nexts.append((_weights(result.model, False), _weights(result.model, True)))
    for (_, _, (gen1, disc1), _), (gen2, disc2) in zip(seen[1::2], nexts):
        assert not _same(gen2, gen1) and _same(disc2, disc1)


def test_tiny_vae_gan_run_learns(chorale_cache, tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(chorale_cache, "model.mode=vae_gan", "training.max_steps=16",
                      "training.lr=3e-3", "training.disc_lr=1e-3", "training.disc_warmup_steps=4",
                      "training.eval_every=100", "training.save_every=100")  # fmt: skip
    train(cfg, run, echo=lambda line: None)
    recs = records(run, "train")
    for r in recs:  # both players' losses are finite at every step
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_disc", "loss_adv", "loss_fm"))
        assert r["disc_grad_norm"] > 0
    first, last = recs[0], recs[-4:]
    # the generator's cross-entropy falls (untrained: ~6.2 nats) and the discriminator learns
    assert sum(r["loss_ce"] for r in last) / 4 < first["loss_ce"] - 1.0, (first, last)
    assert first["loss_disc"] == pytest.approx(2.0, abs=0.01)  # hinge: every score near 0
    assert sum(r["loss_disc"] for r in last) / 4 < first["loss_disc"] - 0.02
    log = (run / "train.log").read_text()
    assert re.search(r"^step 16 loss .* adv -?\d\.\d{3} fm \d\.\d{3} disc \d\.\d{3}", log, re.M)


def test_vae_gan_non_finite_discriminator_step_is_skipped(
    fixture_cache, tmp_path, tiny_config, monkeypatch
):
    import aurl.models.losses as losses_module

    real = losses_module.discriminator_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):  # the real loss; the 2nd call (step 2's) returns NaN
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(losses_module, "discriminator_loss", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, "model.mode=vae_gan", "training.max_steps=3",
                      "training.eval_every=100", "training.disc_warmup_steps=0")  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    # the whole step is dropped (neither network learns from it) and training goes on
    events = [(r["step"], r["what"], r["action"]) for r in records(run, "event")]
    assert events == [(1, "disc_nan_loss", "skip")]
    assert [r["step"] for r in records(run, "train")] == [1, 3]
    assert result.step == 3 and math.isfinite(result.train_loss)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_vae_gan_resume_is_bitwise_identical(fixture_cache, tmp_path, tiny_config, monkeypatch):
    from aurl.training import checkpoint

    # every random draw of the step in play: dropout, posterior samples, Gumbel noise,
    # augmentation; both optimizers, the discriminator's spectral-norm vectors
    cfg = tiny_config(
        fixture_cache, "model.mode=vae_gan", "training.max_steps=3", "training.save_every=2",
        "training.eval_every=100", "training.disc_warmup_steps=1", "training.grad_accum=2",
        "model.dropout=0.1", "data.augment.transpose_prob=0.5",
    )  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)

    original = checkpoint.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(run_dir, *, step, **kw):  # the process dies right after the save
        original(run_dir, step=step, **kw)
        raise Crash(f"crash after saving step {step}")

    run = tmp_path / "crashed"
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash, match="step 2"):
        train(cfg, run, echo=lambda line: None)
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    resumed = train(cfg, run, echo=lambda line: None)  # from step 2, in a fresh model
    assert resumed.step == straight.step == 3
    assert resumed.train_loss == straight.train_loss
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("discriminator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and spectral-norm vectors
    sa = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1]).train_state["optimizers"]
    sb = load_checkpoint(list_checkpoints(run)[-1]).train_state["optimizers"]
    for name in ("model", "disc"):
        for pa, pb in zip(sa[name]["state"].values(), sb[name]["state"].values(), strict=True):
            assert torch.equal(pa["exp_avg"], pb["exp_avg"])
            assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def test_fp16_with_a_grad_scaler_learns_and_resumes(
    chorale_cache, tmp_path, tiny_config, monkeypatch
):
    """fp16 autocast with a grad scaler: the CUDA recipe, run on the CPU (same code path). The
    loss falls, the scaler's state goes into the checkpoint, and a crashed run resumes to the
    same weights and scale as a straight one."""
    from aurl.training import checkpoint

    cfg = tiny_config(chorale_cache, "training.precision=fp16", "training.max_steps=24",
                      "training.lr=3e-3", "training.save_every=12", "training.eval_every=100")  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)
    recs = records(tmp_path / "straight", "train")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert sum(r["loss"] for r in recs[-4:]) / 4 < recs[0]["loss"] - 1.0
    scaler = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1]).train_state["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler

    original = checkpoint.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(run_dir, *, step, **kw):
        original(run_dir, step=step, **kw)
        raise Crash(f"crash after saving step {step}")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash, match="step 12"):
        train(cfg, tmp_path / "crashed", echo=lambda line: None)
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    resumed = train(cfg, tmp_path / "crashed", echo=lambda line: None)
    assert resumed.train_loss == straight.train_loss
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_scaler = load_checkpoint(list_checkpoints(tmp_path / "crashed")[-1]).train_state
    assert resumed_scaler["scaler"] == scaler


# --------------------------------------------------------------------------------------------
# time budget, sample monitoring, spikes
# --------------------------------------------------------------------------------------------


def test_time_budget_stops_and_saves(fixture_cache, tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, "training.max_steps=6", "training.max_minutes=1e-6",
                      "training.save_every=100", "training.eval_every=100")  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    # the budget is spent by the first step: stop there, with a checkpoint to resume from
    assert (result.stopped, result.step) == ("time_budget", 1)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001"]
    assert "step 1 stop time_budget" in (run / "train.log").read_text()


def test_samples_are_written_and_scored_during_training(fixture_cache, tmp_path, tiny_config):
    import symusic

    # dropout on: the training draws from torch's RNG, which sampling must leave alone
    common = ["training.max_steps=4", "training.eval_every=100", "training.save_every=100",
              "training.sample_tokens=24", "model.dropout=0.1"]  # fmt: skip
    quiet = lambda line: None  # noqa: E731
    plain = train(tiny_config(fixture_cache, *common), tmp_path / "plain", echo=quiet)
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, *common, "training.sample_every=2")
    result = train(cfg, run, echo=lambda line: None)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-0000002.mid", "step-0000004.mid",
    ]  # fmt: skip
    samples = records(run, "sample")
    assert [r["step"] for r in samples] == [2, 4]
    for r in samples:
        midi = symusic.Score(str(run / "samples" / f"step-{r['step']:07d}.mid"))
        assert r["notes"] == midi.note_num() > 0 and 0 < r["tokens"] <= 25
        assert r["grammar_valid"] == 1.0 and 0 <= r["scale_consistency"] <= 1
    log = (run / "train.log").read_text()
    assert re.search(r"^step 2 sample step-0000002\.mid tokens \d+ notes \d+ ", log, re.M)
    # sampling draws from its own generator: the training itself is unchanged
    assert result.train_loss == plain.train_loss
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 plain.model.state_dict().values()))  # fmt: skip


def test_a_loss_spike_is_flagged_and_the_step_kept(fixture_cache, tmp_path, tiny_config,
                                                   monkeypatch):  # fmt: skip
    import aurl.models.losses as losses_module

    real = losses_module.compute_losses
    calls = {"n": 0}

    def spiked(*args, **kw):  # the real losses; the 23rd call's total is 10x (after warm-up)
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 23:
            out["total"] = out["total"] * 10.0
        return out

    monkeypatch.setattr(losses_module, "compute_losses", spiked)
    run = tmp_path / "run"
    cfg = tiny_config(fixture_cache, "training.max_steps=24", "training.eval_every=100",
                      "training.save_every=100")  # fmt: skip
    result = train(cfg, run, echo=lambda line: None)
    # the detector's 20 warm-up steps passed: step 23 is flagged, not skipped nor rolled back
    events = [(r["step"], r["what"], r["action"]) for r in records(run, "event")]
    assert events == [(23, "loss_spike", "flagged")]
    steps = {r["step"]: r["loss"] for r in records(run, "train")}
    assert sorted(steps) == list(range(1, 25))  # every step was taken, the spiked one too
    assert steps[23] > 5 * steps[22]
    assert "step 23 anomaly loss_spike action flagged" in (run / "train.log").read_text()
    assert result.step == 24 and load_checkpoint(run).state["lr_scale"] == 1.0


@contextlib.contextmanager
def sigterm_during_step_2(monkeypatch):
    """Inside: ``train`` gets a SIGTERM during its step 2, raised in this thread (the C handler
    runs before ``raise_signal`` returns), so the stop check after that step sees it whatever
    the load; ``os.kill`` to the process may hand it to another thread, later."""
    real_step = trainer_module._train_step

    def step_then_sigterm(run, stage):
        out = real_step(run, stage)
        if run.step == 1:  # the step about to become step 2
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer_module, "_train_step", step_then_sigterm)
    try:
        yield
    finally:
        monkeypatch.setattr(trainer_module, "_train_step", real_step)


def test_sigterm_stops_before_validating_and_the_resumed_run_validates_first(
    fixture_cache, tmp_path, tiny_config, monkeypatch
):
    # step 2 validates; a SIGTERM during step 2 must stop the run right after that step (no
    # validation pass, which takes minutes on a real set), with a checkpoint that says the
    # validation is owed; the resumed run validates step 2 first and ends as one straight run
    cfg = tiny_config(fixture_cache, "training.max_steps=4", "training.eval_every=2",
                      "training.save_every=100", "model.dropout=0.1")  # fmt: skip
    straight_lines: list[str] = []
    straight = train(cfg, tmp_path / "straight", echo=straight_lines.append)

    run = tmp_path / "run"
    lines: list[str] = []
    with sigterm_during_step_2(monkeypatch):
        stopped = train(cfg, run, echo=lines.append)
    assert (stopped.stopped, stopped.step) == ("interrupted", 2)
    assert not any(" valid loss " in line for line in lines)  # the validation was skipped
    (saved,) = list_checkpoints(run)
    assert load_checkpoint(saved).state["pending_validation"] is True

    resumed_lines: list[str] = []
    resumed = train(cfg, run, echo=resumed_lines.append)
    valid = [line.split()[:2] for line in resumed_lines if " valid loss " in line]
    assert valid == [["step", "2"], ["step", "4"]]  # step 2's owed validation, then step 4's
    assert (resumed.step, resumed.stopped) == (4, "max_steps")
    assert resumed.best_valid_loss == straight.best_valid_loss
    assert resumed.train_loss == straight.train_loss  # the signal changed nothing else
    assert [line for line in straight_lines if " valid loss " in line] == [
        line for line in lines + resumed_lines if " valid loss " in line
    ]


@pytest.mark.parametrize(
    "save_every, saved", [(2, [2, 4, 6]), (4, [4, 6])], ids=["step-2-saves", "step-2-does-not"]
)
def test_an_owed_validation_saves_the_checkpoint_the_straight_run_saved(
    fixture_cache, tmp_path, tiny_config, monkeypatch, save_every, saved
):
    # stopped by a signal during step 2 (a validating step), then resumed: the run's
    # checkpoints, their metrics and the kept-best set are the straight run's. Where step 2
    # saves, the owed validation re-saves it with its metrics; where it does not, the stop's
    # checkpoint keeps no metrics and goes at the next save, as the straight run never had it
    cfg = tiny_config(fixture_cache, "training.max_steps=6", "training.eval_every=2",
                      f"training.save_every={save_every}", "training.keep_best=3",
                      "model.dropout=0.1")  # fmt: skip

    def kept(run):
        found = {p.name: load_checkpoint(p) for p in list_checkpoints(run)}
        metrics = {name: c.state["metrics"] for name, c in found.items()}
        state = {name: (c.state["best_valid"], c.state["bad_evals"], "pending_validation" in c.state)
                 for name, c in found.items()}  # fmt: skip
        return metrics, state, [p.name for p in best_checkpoints(run, 3)]

    train(cfg, tmp_path / "straight", echo=lambda line: None)
    run = tmp_path / "run"
    with sigterm_during_step_2(monkeypatch):
        assert train(cfg, run, echo=lambda line: None).stopped == "interrupted"
    train(cfg, run, echo=lambda line: None)
    straight = kept(tmp_path / "straight")
    assert list(straight[0]) == [f"step-{n:07d}" for n in saved] and all(straight[0].values())
    assert kept(run) == straight


def test_an_owed_validation_that_exhausts_patience_stops_the_resumed_run(
    fixture_cache, tmp_path, tiny_config, monkeypatch
):
    # the straight run stops early at step 2; stopped by a signal during step 2, the resumed
    # run's owed validation of step 2 must stop it there too, not one evaluation later
    cfg = tiny_config(fixture_cache, "training.max_steps=50", "training.eval_every=1",
                      "training.patience=1", "training.min_delta=100")  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)
    assert (straight.stopped, straight.step) == ("early_stopping", 2)

    with sigterm_during_step_2(monkeypatch):
        stopped = train(cfg, tmp_path / "run", echo=lambda line: None)
    assert (stopped.stopped, stopped.step) == ("interrupted", 2)
    resumed = train(cfg, tmp_path / "run", echo=lambda line: None)
    assert (resumed.stopped, resumed.step) == ("early_stopping", 2)
