"""``aurl checkpoint list | average | export`` on damaged run folders: each once escaped as a
traceback or hung (docs/design.md, "Hostile inputs, session 19 (commands)"); the checkpoints
here are hand-edited with their manifest re-signed, as a hostile one would be."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from aurl.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder of three checkpoints of a tiny model, each with a validation loss."""
    import torch

    from aurl.config import Config, ModelConfig
    from aurl.models import build_model
    from aurl.training.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("run") / "run"
    model_config = dataclasses.replace(ModelConfig(), d_model=32, n_layers=1, n_heads=2,
                                       max_seq_len=64)  # fmt: skip
    config = dataclasses.replace(Config(), model=model_config)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters())
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
        save_checkpoint(d, step=step, model=model, config=config, optimizers={"model": opt},
                        metrics={"valid_loss": loss})  # fmt: skip
    return d


def _resign(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["sha256"]:
        manifest["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _state(change):
    def edit(ck: Path) -> None:
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps(change(state)))
        _resign(ck)

    return edit


def _weights(change):
    def edit(ck: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = change(load_file(str(ck / "model.safetensors")))
        save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
        _resign(ck)

    return edit


def _cut(ck: Path) -> None:
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _resign(ck)


def _grow(tensors):
    import torch

    name = next(iter(tensors))
    return {**tensors, name: torch.zeros(*(n + 1 for n in tensors[name].shape))}


# damage of the newest checkpoint (or of all three) -> per action (exit code, the line's words)
# before: AttributeError (state.json a list, metrics a list),
# TypeError (a loss "low"), SafetensorError (weights cut short, manifest re-signed),
# RuntimeError (a tensor of another shape)
CASES = {
    "state.json a list": (_state(lambda s: [1, 2]), True,
                          {"list": (0, None), "export": (1, "state.json is damaged")}),
    "metrics a list": (_state(lambda s: {**s, "metrics": [1]}), True,
                       {"list": (0, None), "average": (1, "none with a validation loss")}),
    "loss a word": (_state(lambda s: {**s, "metrics": {"valid_loss": "low"}}), True,
                    {"list": (0, None), "average": (1, "none with a validation loss")}),
    "weights cut short": (_cut, False, {"export": (1, "model.safetensors cannot be read"),
                                        "average": (1, "model.safetensors cannot be read")}),
    "a tensor of another shape": (_weights(_grow), False,
                                  {"average": (1, "holds other weights (names or shapes)")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_is_one_line_or_is_read_around(case, run, tmp_path, capsys) -> None:
    damage, every, actions = CASES[case]
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    checkpoints = sorted((folder / "checkpoints").iterdir())
    for ck in checkpoints if every else checkpoints[-1:]:
        damage(ck)
    argvs = {"list": ["checkpoint", "list", str(folder)],
             "average": ["checkpoint", "average", str(folder), "--out", str(tmp_path / "avg")],
             "export": ["checkpoint", "export", str(folder), "--out", str(tmp_path / "exp")]}  # fmt: skip
    for action, (code, words) in actions.items():
        assert main(argvs[action]) == code, (action, capsys.readouterr().err)
        err = capsys.readouterr().err
        if words is None:
            assert err == "", (action, err)
        else:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
@pytest.mark.parametrize("action", ["list", "export"])
def test_a_state_json_that_is_a_fifo_does_not_block(action, run, tmp_path) -> None:
    """The listing read each checkpoint's ``state.json`` for its loss unverified: a FIFO there
    blocked ``list``, ``average`` and ``export`` (of a run) for ever. Now a checkpoint whose
    state is no regular file has no metrics; export takes the best of the others."""
    import subprocess
    import sys

    folder = Path(shutil.copytree(run, tmp_path / "run"))
    newest = sorted((folder / "checkpoints").iterdir())[-1]
    (newest / "state.json").unlink()
    os.mkfifo(newest / "state.json")
    argv = {"list": ["checkpoint", "list", str(folder)],
            "export": ["checkpoint", "export", str(folder), "--out", str(tmp_path / "exp")]}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "aurl", *argv[action]], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert ("step-0000002" if action == "list" else "exported") in done.stdout
