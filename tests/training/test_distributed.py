"""DDP for real: two processes with gloo on the CPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from aurl.training.trainer import train

STEPS = 5

WORKER = """
import os, sys
import torch
from safetensors.torch import save_file
from aurl.config import load_config
from aurl.training.trainer import train
result = train(load_config(sys.argv[1]), sys.argv[2], echo=lambda line: None)
state = {k: v.contiguous() for k, v in result.model.state_dict().items() if k != "head.weight"}
save_file(state, os.path.join(sys.argv[2], "rank%s.safetensors" % os.environ["RANK"]))
"""


def losses(run):
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def test_two_process_gloo_matches_one_process(fixture_cache, tmp_path, tiny_config):
    # DDP: 2 ranks x batch 4. Reference: 1 process x batch 4 x 2 accumulated micro-batches, which
    # sees the same 8 windows per step (rank r takes batches r, r + 2, ... of each epoch's order)
    common = [f"training.max_steps={STEPS}", "training.eval_every=100", "training.lr=3e-3"]
    ddp_cfg = tiny_config(fixture_cache, *common)
    ref_cfg = tiny_config(fixture_cache, *common, "training.grad_accum=2")
    (tmp_path / "ddp.yaml").write_text(ddp_cfg.to_yaml())
    (tmp_path / "worker.py").write_text(WORKER)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path / "ddp.yaml"), str(ddp)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    r0, r1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # identical parameters on both ranks

    ref = train(ref_cfg, tmp_path / "ref", echo=lambda line: None)
    a, b = losses(ddp), losses(tmp_path / "ref")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:  # the same loss, up to float summation order
        assert abs(a[step] - b[step]) < 1e-4 * abs(b[step]), (step, a[step], b[step])
    ref_state = ref.model.state_dict()
    for k, v in r0.items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=1e-5)
    # logging and checkpoints came from rank 0 only: one line per step, one checkpoint
    log = (ddp / "train.log").read_text()
    assert log.count(f"step {STEPS} loss") == 1 and "world 2" in log
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == [f"step-{STEPS:07d}"]
