"""DDP for real: two processes with gloo on the CPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import train_single_threaded

STEPS = 5

WORKER = """
import os, sys
import torch
from safetensors.torch import save_file
from aurl.config import load_config
from aurl.training import distributed
from aurl.training.trainer import train
# one launch, every mode: the process group joined by the first run stays for the next ones
# (torchrun's store does not take a second init after a destroy), left after the last
distributed.shutdown, leave = (lambda: None), distributed.shutdown
for config, run in zip(sys.argv[1::2], sys.argv[2::2]):
    result = train(load_config(config), run, echo=lambda line: None)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items() if k != "head.weight"}
    save_file(state, os.path.join(run, "rank%s.safetensors" % os.environ["RANK"]))
leave()
"""


def losses(run, key="loss"):
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in recs if r["kind"] == "train"}


# vae_gan: alternating discriminator / generator steps with the adversarial terms on from the
# second step, a discriminator that learns fast enough to matter, and every random draw of the
# step (posterior samples, Gumbel noise, dropout) in play
GAN = ["model.mode=vae_gan", "training.disc_warmup_steps=1", "training.disc_lr=3e-3",
       "model.dropout=0.1", "loss.kl_anneal_steps=0",
       # soft fakes: a hard sample is a discontinuous function of the logits, so the last-bit
       # differences of a split batch could flip a sampled id and the comparison would not hold
       "loss.gan_fakes=soft"]  # fmt: skip
MODES = {  # (overrides, micro-batches per rank)
    "transformer": ([], 1),
    "vae_gan": (GAN, 1),
    "vae_gan-accum": (GAN, 2),  # no_sync on the first micro-batch of each step
    # learned loss weights: used after the forward, averaged outside DDP
    "vae-auto_balance": (["model.mode=vae", "loss.auto_balance=true", "loss.kl_anneal_steps=0"], 1),
}


def configs(mode, cache, tiny_config):
    """(DDP config, reference config) of one mode. DDP: 2 ranks x batch 4 (x accum). Reference:
    1 process x batch 4 x 2 (x accum) micro-batches, which sees the same windows per step (rank r
    takes batches r, r + 2, ... of each epoch's order)."""
    overrides, accum = MODES[mode]
    common = [f"training.max_steps={STEPS}", "training.eval_every=100", "training.lr=3e-3",
              *overrides]  # fmt: skip
    return (tiny_config(cache, *common, f"training.grad_accum={accum}"),
            tiny_config(cache, *common, f"training.grad_accum={2 * accum}"))  # fmt: skip


@pytest.fixture(scope="module")
def ddp_runs(fixture_cache, tmp_path_factory, tiny_config) -> dict:
    """Every mode's DDP run, one after another in one ``torchrun`` launch of two gloo processes
    (the launch and its three torch imports cost more than the runs): ``{mode: run folder}``."""
    root = tmp_path_factory.mktemp("ddp")
    args = []
    for mode in MODES:
        (root / f"{mode}.yaml").write_text(configs(mode, fixture_cache, tiny_config)[0].to_yaml())
        args += [str(root / f"{mode}.yaml"), str(root / mode)]
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "worker.py"), *args],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {mode: root / mode for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_two_process_gloo_matches_one_process(mode, ddp_runs, fixture_cache, tmp_path,
                                              tiny_config):  # fmt: skip
    _, accum = MODES[mode]
    ref_cfg = configs(mode, fixture_cache, tiny_config)[1]
    ddp = ddp_runs[mode]
    r0, r1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
    # identical parameters (generator and discriminator) and buffers on both ranks
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    gan = mode.startswith("vae_gan")
    assert any(k.startswith("discriminator.") for k in r0) == gan

    ref = train_single_threaded(ref_cfg, tmp_path / "ref")  # as each worker runs
    # the generator's objective and cross-entropy, and the discriminator's loss: all ranks' means
    for key in ["loss", "loss_ce"] + (["loss_disc"] if gan else []):
        a, b = losses(ddp, key), losses(tmp_path / "ref", key)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        for step in a:  # the same loss, up to float summation order
            assert abs(a[step] - b[step]) < 1e-4 * abs(b[step]), (key, step, a[step], b[step])
    if gan:  # the discriminator learned (its hinge loss starts at 2: every score near 0)
        disc = losses(ddp, "loss_disc")
        assert disc[STEPS] < disc[1] - 0.01, disc
    ref_state = ref.model.state_dict()
    for k, v in r0.items():
        atol = 1e-5
        if accum > 1 and k.startswith("discriminator."):
            # 4 micro-batches' gradients summed as (a + c) + (b + d) here, ((a + b) + c) + d in
            # the reference: a discriminator channel whose gradient cancels to rounding noise
            # (~1e-10) gets Adam steps of ~1% of disc_lr in either run, of different sizes
            atol = 1e-3
        torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=atol, msg=k)
    # logging and checkpoints came from rank 0 only: one line per step, one checkpoint
    log = (ddp / "train.log").read_text()
    assert log.count(f"step {STEPS} loss") == 1 and "world 2" in log
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == [f"step-{STEPS:07d}"]
