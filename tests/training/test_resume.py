"""Exact resumption: N steps, kill -9, resume for N more == 2N steps in one go (bitwise, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aurl.training.checkpoint import list_checkpoints, load_checkpoint
from aurl.training.trainer import train

N = 4

# Runs the same training in a child process whose save at step N blocks after the checkpoint is
# complete (and announces it), so that the parent's SIGKILL lands at a known point.
CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads({threads})
from aurl.config import load_config
from aurl.training import checkpoint, trainer
original = checkpoint.save_checkpoint
def save_then_hang(run_dir, *, step, **kw):
    path = original(run_dir, step=step, **kw)
    if step == {n}:
        Path("{marker}").touch()
        time.sleep(600)
    return path
checkpoint.save_checkpoint = save_then_hang
trainer.train(load_config("{config}"), "{run}", echo=lambda line: None)
"""


def test_kill_9_then_resume_is_bitwise_identical(fixture_cache, tmp_path, tiny_config):
    # dropout and augmentation on: their RNG streams must resume exactly too
    cfg = tiny_config(
        fixture_cache, f"training.max_steps={2 * N}", f"training.save_every={N}",
        "training.eval_every=100", "model.dropout=0.1", "data.augment.transpose_prob=0.5",
        "data.augment.velocity_prob=0.5",
    )  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)

    run, marker = tmp_path / "killed", tmp_path / "saved"
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    code = CHILD.format(threads=torch.get_num_threads(), n=N, marker=marker,
                        config=tmp_path / "cfg.yaml", run=run)  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached its checkpoint"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert [p.name for p in list_checkpoints(run)] == [f"step-{N:07d}"]

    resumed = train(cfg, run, echo=lambda line: None)  # picks up step N from the folder
    assert resumed.step == straight.step == 2 * N
    assert resumed.train_loss == straight.train_loss  # bitwise
    a = load_file(str(list_checkpoints(tmp_path / "straight")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer moments too
    sa = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1]).train_state["optimizers"]
    sb = load_checkpoint(list_checkpoints(run)[-1]).train_state["optimizers"]
    for pa, pb in zip(sa["model"]["state"].values(), sb["model"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])


# The same training in a child process whose checkpoint write at step {n} dies half way: the
# optimizer state file is half written when the process SIGKILLs itself (no cleanup runs).
CHILD_DIES_MID_WRITE = """
import os, signal
import torch
torch.set_num_threads({threads})
from aurl.config import load_config
from aurl.training import trainer
real_save = torch.save
def save_half_then_die(obj, path, *args, **kw):
    real_save(obj, path, *args, **kw)
    if "step-{step:07d}" in str(path):
        size = os.path.getsize(path)
        os.truncate(path, size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
trainer.train(load_config("{config}"), "{run}", echo=lambda line: None)
"""


@pytest.mark.timeout(600)  # three short runs, one in a fresh interpreter: slow on a busy machine
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(
    fixture_cache, tmp_path, tiny_config
):
    cfg = tiny_config(fixture_cache, "training.max_steps=4", "training.save_every=2",
                      "training.eval_every=100", "model.dropout=0.1")  # fmt: skip
    straight = train(cfg, tmp_path / "straight", echo=lambda line: None)

    run = tmp_path / "killed"
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    code = CHILD_DIES_MID_WRITE.format(threads=torch.get_num_threads(), step=4,
                                       config=tmp_path / "cfg.yaml", run=run)  # fmt: skip
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    # the half-written checkpoint is debris beside the complete one, never listed
    root = run / "checkpoints"
    debris = [p for p in root.iterdir() if p.name.startswith(".step-0000004.tmp-")]
    assert len(debris) == 1 and not (debris[0] / "manifest.json").exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]

    resumed = train(cfg, run, echo=lambda line: None)  # from step 2, the last complete one
    assert "resuming from" in (run / "train.log").read_text()
    assert "step-0000002" in (run / "train.log").read_text().split("resuming from")[1]
    assert resumed.step == straight.step == 4
    assert resumed.train_loss == straight.train_loss  # bitwise: the half write played no part
    a = load_file(str(list_checkpoints(tmp_path / "straight")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(run).step == 4  # the new step-4 checkpoint verifies
    assert not debris[0].exists()  # and the debris of the killed process is gone
