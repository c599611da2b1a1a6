"""Checkpoints: hashes verified, pickles refused, a full disk leaves the last one intact,
averaging and export give loadable models."""

from __future__ import annotations

import json
import os
import resource
import signal

import pytest
import torch
from safetensors.torch import load_file

from aurl.cli import main
from aurl.errors import CheckpointError
from aurl.fileio import file_sha256
from aurl.models import MusicTransformerVAEGAN, build_model
from aurl.training.checkpoint import (
    average_checkpoints,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from aurl.training.trainer import train


@pytest.fixture(scope="module")
def run(fixture_cache, tmp_path_factory, tiny_config):
    """A 4-step run with checkpoints at steps 2 and 4 (both kept)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(fixture_cache, "training.max_steps=4", "training.save_every=2",
                      "training.eval_every=2", "training.keep_best=2")  # fmt: skip
    train(cfg, out, echo=lambda line: None)
    return out


def copy_checkpoint(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_checkpoint_files_and_hashes(run):
    paths = list_checkpoints(run)
    assert [p.name for p in paths] == ["step-0000002", "step-0000004"]
    manifest = json.loads((paths[1] / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert file_sha256(paths[1] / name) == digest
    c = load_checkpoint(run)  # a run folder means its latest checkpoint
    assert c.step == 4 and c.config.model.d_model == 32
    assert set(c.train_state) >= {"optimizers", "scaler", "torch_rng"}
    assert {"data", "rng", "lr_scale", "anomaly"} <= set(c.state)


def test_cli_list_shows_every_checkpoint_with_its_rank(run, tmp_path, capsys):
    valid = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "valid":
            valid[record["step"]] = record["loss"]
    assert sorted(valid) == [2, 4]
    better, worse = sorted(valid, key=valid.get)
    assert main(["checkpoint", "list", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rank = {better: "  best #1", worse: "  best #2"}
    assert lines == [f"step-{s:07d}  valid_loss {valid[s]:.4f}{rank[s]}" for s in (2, 4)]
    # a folder without checkpoints: said so, exit 1
    assert main(["checkpoint", "list", str(tmp_path)]) == 1
    assert capsys.readouterr().out == f"{tmp_path}: no checkpoints\n"


def test_corrupt_file_is_detected(run, tmp_path):
    bad = copy_checkpoint(list_checkpoints(run)[-1], tmp_path / "step-0000004")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(bad)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['AURL_TEST_MARKER']}",))


def test_pickled_object_is_refused_without_running(run, tmp_path, monkeypatch):
    bad = copy_checkpoint(list_checkpoints(run)[-1], tmp_path / "step-0000004")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("AURL_TEST_MARKER", str(marker))
    torch.save({"optimizers": _Payload()}, bad / "train_state.pt")
    # even with a matching hash (an attacker can rewrite the manifest) nothing is executed
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["sha256"]["train_state.pt"] = file_sha256(bad / "train_state.pt")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_disk_full_keeps_previous_checkpoint(run, tmp_path):
    # a copy of the run whose next save fails: writes over 64 kB fail as on a full disk
    (tmp_path / "checkpoints").mkdir()
    prev = copy_checkpoint(list_checkpoints(run)[-1], tmp_path / "checkpoints" / "step-0000004")
    c = load_checkpoint(prev)
    model = build_model(c.config)
    c.load_weights(model)
    opt = torch.optim.AdamW(model.parameters())
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError, match="step-0000004 is intact"):
            save_checkpoint(
                tmp_path, step=6, model=model, config=c.config, optimizers={"model": opt}
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]  # no debris
    assert load_checkpoint(tmp_path).step == 4  # still verifies and loads


def test_average_and_export(run, tmp_path):
    paths = list_checkpoints(run)
    out = average_checkpoints(paths, tmp_path / "avg")
    a, b = (load_file(str(p / "model.safetensors")) for p in paths)
    avg = MusicTransformerVAEGAN.from_pretrained(out)
    state = avg.state_dict()
    for k in a:
        torch.testing.assert_close(state[k], (a[k].double() + b[k].double()).div(2).float())
    # CLI: average the best 2 by validation loss, export the weights alone (bf16 halves the file)
    assert (
        main(["checkpoint", "average", str(run), "--best", "2", "--out", str(tmp_path / "c")]) == 0
    )
    assert main(["checkpoint", "export", str(paths[-1]), "--out", str(tmp_path / "e")]) == 0
    assert main(["checkpoint", "export", str(paths[-1]), "--out", str(tmp_path / "h"),
                 "--dtype", "bfloat16"]) == 0  # fmt: skip
    full = MusicTransformerVAEGAN.from_pretrained(tmp_path / "e")
    c = load_checkpoint(paths[-1])
    ref = build_model(c.config).eval()
    c.load_weights(ref)
    ids = torch.tensor([[0, 744, 758, 714, 35, 47, 211, 123]])
    torch.testing.assert_close(full(ids).logits, ref(ids).logits, rtol=0, atol=0)
    half = MusicTransformerVAEGAN.from_pretrained(tmp_path / "h")
    torch.testing.assert_close(half(ids).logits, ref(ids).logits, rtol=0.05, atol=0.05)
    size = (tmp_path / "h" / "model.safetensors").stat().st_size
    assert size < 0.6 * (tmp_path / "e" / "model.safetensors").stat().st_size
    # the exported folders record the training window; `aurl evaluate` scores in windows of it
    from aurl.cli.evaluate import load_model

    for folder in ("avg", "c", "e", "h"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["window"] == (
            c.config.data.window
        )
    assert load_model(str(tmp_path / "e"), "cpu")[2] == c.config.data.window
