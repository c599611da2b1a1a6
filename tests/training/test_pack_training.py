"""Training on packed rows (``data.pack``): a tiny run learns and logs the rows' real share, an
interrupted run resumes bitwise, two gloo processes equal one process with two micro-batches,
the settings packing cannot serve are refused before a run folder is written, and MFU's
attention context is each window's own length."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurl.config import DataConfig
from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import build_loader
from aurl.data.grammar import Grammar
from aurl.data.window_state import TokenTable, window_inputs
from aurl.errors import ConfigError
from aurl.models import build_model
from aurl.models.layers import Block
from aurl.models.losses import compute_losses
from aurl.training import mfu
from aurl.training import trainer as trainer_module
from aurl.training.checkpoint import list_checkpoints
from aurl.training.trainer import seed_everything, train
from tests.training.conftest import train_single_threaded

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
# whole chorales are one window each at 1024, one to three to a row
PACK = ["data.pack=true", "data.window=1024", "data.batch_size=2", "training.lr=3e-3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 bundled chorales (about 20 packed batches of 2 x 1024 an epoch)."""
    src = tmp_path_factory.mktemp("midi")
    for name in sorted(p.name for p in CHORALES.glob("*.mid"))[:80]:
        shutil.copy(CHORALES / name, src / name)
    out = tmp_path_factory.mktemp("cache") / "chorales"
    prepare(src, out, data_config=DataConfig(valid_fraction=0.1, test_fraction=0.0), workers=1)
    return out


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def sigterm_after_step(monkeypatch, n: int):
    """A SIGTERM during step ``n`` (the trainer stops after it, with a checkpoint)."""
    real_step = trainer_module._train_step

    def step_then_sigterm(run, stage):
        out = real_step(run, stage)
        if run.step == n - 1:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer_module, "_train_step", step_then_sigterm)


def test_packed_run_learns_and_resumes_bitwise(cache, tmp_path, tiny_config, monkeypatch):
    # dropout and augmentation on: their random streams must resume exactly too
    cfg = tiny_config(cache, *PACK, "training.max_steps=12", "training.eval_every=4",
                      "training.save_every=100", "model.dropout=0.1",
                      "data.augment.transpose_prob=0.5", "data.augment.velocity_prob=0.5",
                      "training.eval_batches=4")  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)
    valid = {r["step"]: r["loss"] for r in records(tmp_path / "straight", "valid")}
    assert sorted(valid) == [4, 8, 12]
    assert valid[12] < valid[4] - 0.3, valid  # held-out chorales (measured 5.787 -> 5.263)
    # real tokens / (2 rows x 1024), per step: measured 0.63-0.98, mean 0.750 (whole chorales
    # of 300-1000 tokens fill rows of 1024 less well than rows of 2048)
    fill = [r["fill"] for r in records(tmp_path / "straight", "train")]
    assert all(0.5 < f <= 1.0 for f in fill) and sum(fill) / len(fill) > 0.7, fill

    run = tmp_path / "run"
    sigterm_after_step(monkeypatch, 6)
    assert train(cfg, run, echo=lambda line: None).stopped == "interrupted"
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000006"]
    resumed = train(cfg, run, echo=lambda line: None)
    assert resumed.step == straight.step == 12
    assert resumed.train_loss == straight.train_loss  # bitwise
    a = load_file(str(list_checkpoints(tmp_path / "straight")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_packed_steps_score_each_segment_as_an_unpacked_row(cache, tmp_path, tiny_config):
    # the trainer's packed steps (start states from the prefixes, grammar masks, the packing
    # plan) have the loss an unpacked forward of their segments has at the same weights (lr 0:
    # the initial ones at every step)
    cfg = tiny_config(cache, *PACK, "data.window=2048", "training.max_steps=3", "training.lr=0",
                      "model.dropout=0",
                      "data.augment.transpose_prob=1", "data.augment.velocity_prob=1")  # fmt: skip
    seen: list[tuple[int, ...]] = []  # the shapes the training blocks ran over

    def spy(module, args, out):  # noqa: ANN001, ANN202 - a forward hook
        if isinstance(module, Block) and module.training:  # validation runs in eval mode
            seen.append(tuple(args[0].shape))

    hook = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        train(cfg, tmp_path / "run", echo=lambda line: None)
    finally:
        hook.remove()
    logged = [r["loss"] for r in records(tmp_path / "run", "train")]
    # the blocks ran over the packed rows, not over one row per segment
    assert seen and all(shape[0] == cfg.data.batch_size for shape in seen), seen

    seed_everything(cfg.training.seed)  # the trainer's initial weights
    model = build_model(cfg)
    model.set_right_padding(True)
    table = TokenTable(TokenCache(cache), TokenCache(cache).split_indices("train"), "cpu")
    grammar = Grammar(model.vocab, cfg.data.polyphony_cap)
    stream = iter(build_loader(cache, cfg.data, seed=cfg.training.seed, vocab_config=cfg.vocab))
    segments = 0
    for step_loss in logged:
        batch = next(stream)
        segments += len(batch["ids"])
        start, allowed = window_inputs(model, batch, table, grammar)
        rows = {k: batch[k] for k in ("ids", "attention_mask", "meter")}
        loss = compute_losses(model, {**rows, "start": start}, cfg.loss, step=0, allowed=allowed)
        assert loss["total"].item() == pytest.approx(step_loss, rel=1e-6, abs=0)
    assert len(logged) == 3 and segments > 2 * 3 * cfg.data.batch_size  # several to a row


@pytest.mark.parametrize(
    "settings",
    [
        ["model.mode=vae"],
        ["model.attention=local"],
        ["data.curriculum=[[0, 512]]"],
        ["data.fim_rate=0.5", "model.fim=true"],
        ["data.anticipation_rate=0.5", "model.anticipation=2"],
    ],  # fmt: skip
    ids=lambda s: s[0].split("=")[0],
)
def test_settings_packing_cannot_serve_are_refused(settings, cache, tmp_path, tiny_config):
    cfg = tiny_config(cache, *PACK, *settings)
    with pytest.raises(ConfigError, match=r"data\.pack=true .* set data\.pack=false") as err:
        train(cfg, tmp_path / "run", echo=lambda line: None)
    assert settings[0].split("=")[0] in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run began


def test_attention_context_is_each_windows_own_length() -> None:
    # windows of 3 and 5 real tokens: 3 x 3 + 5 x 5 score pairs over 8 tokens
    assert mfu.attention_context(3**2 + 5**2, 3 + 5) == 34 / 8
    assert mfu.attention_context(0, 0) == 0.0
    assert mfu.flops_per_token(1000, 2, 32, 34 / 8) == 6000 + 12 * 2 * 32 * 4.25


WORKER = """
import os, sys
from safetensors.torch import save_file
from aurl.config import load_config
from aurl.training.trainer import train
result = train(load_config(sys.argv[1]), sys.argv[2], echo=lambda line: None)
state = {k: v.contiguous() for k, v in result.model.state_dict().items() if k != "head.weight"}
save_file(state, os.path.join(sys.argv[2], "rank%s.safetensors" % os.environ["RANK"]))
"""


def test_two_gloo_processes_equal_one_with_two_micro_batches(cache, tmp_path, tiny_config):
    # rank r takes packed batches r, r + 2, ... of each epoch: one process with two micro-batches
    # per step sees the same batches (5 steps: 10 of the epoch's ~20)
    common = [*PACK, "training.max_steps=5", "training.eval_every=100", "model.dropout=0"]
    ddp_cfg = tiny_config(cache, *common, "training.grad_accum=1")
    ref_cfg = tiny_config(cache, *common, "training.grad_accum=2")
    (tmp_path / "ddp.yaml").write_text(ddp_cfg.to_yaml())
    (tmp_path / "worker.py").write_text(WORKER)
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path / "ddp.yaml"), str(ddp)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    ref = train_single_threaded(ref_cfg, tmp_path / "ref")  # as each worker runs
    a = {r["step"]: r["loss"] for r in records(ddp, "train")}
    b = {r["step"]: r["loss"] for r in records(tmp_path / "ref", "train")}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:  # the same loss, up to float summation order
        assert abs(a[step] - b[step]) < 1e-4 * abs(b[step]), (step, a[step], b[step])
    ref_state = ref.model.state_dict()
    for k, v in r0.items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=1e-5, msg=k)
