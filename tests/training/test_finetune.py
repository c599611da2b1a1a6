"""Fine-tuning: ``train(init_from=...)`` starts from a model's weights, ``lora=`` trains adapters
only, the adapter folder round-trips and refuses another base; the CLI commands of the README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurl.cli import main
from aurl.config import load_config
from aurl.errors import CheckpointError, ConfigError
from aurl.models import build_model
from aurl.models.lora import add_lora, apply_adapter, file_sha256, read_adapter
from aurl.models.pretrained import fill_tied, load_pretrained
from aurl.training.checkpoint import latest_checkpoint
from aurl.training.finetune import finetune_config, load_base
from aurl.training.trainer import train

FIXTURE_MIDI = Path(__file__).parents[1] / "fixtures" / "midi"


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, fixture_cache, tiny_config) -> Path:
    """A tiny model with weights of its own (seed 123: not what a run's seed 0 would build)."""
    torch.manual_seed(123)
    folder = tmp_path_factory.mktemp("base") / "model"
    build_model(tiny_config(fixture_cache)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, fixture_cache, tiny_config) -> Path:
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("other") / "model"
    build_model(tiny_config(fixture_cache)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, fixture_cache, tiny_config, base_dir) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    train(_lora_config(fixture_cache, tiny_config), run, init_from=str(base_dir), lora=4,
          echo=lambda line: None)  # fmt: skip
    return run


def _lora_config(cache, tiny_config):
    return tiny_config(cache, "training.max_steps=4", "training.lr=3e-2", "training.save_every=2",
                       "training.eval_every=2")  # fmt: skip


def _first_batch_losses(model, cfg, run_dir) -> tuple[float, float]:
    """The training objective on the first batch a fresh run of ``cfg`` draws (the trainer's
    own batch and grammar masks) of ``model`` and of the model that run builds from scratch."""
    from aurl.models.losses import compute_losses
    from aurl.training import distributed, trainer

    d = distributed.init("cpu")
    run = trainer._open_run(cfg, run_dir, None, lambda line: None, d, trainer._Tune())
    stage = trainer._build_stage(run, 0, "transformer", None)
    (batch, allowed), = trainer._micro_batches(run, stage)  # fmt: skip
    out = []
    for m in (model, stage.model):
        m.train()
        with torch.no_grad():
            out.append(float(compute_losses(m, batch, cfg.loss, step=0, allowed=allowed)["total"]))
    return out[0], out[1]


def test_init_from_starts_from_the_base_weights(fixture_cache, tiny_config, base_dir, tmp_path):
    cfg = tiny_config(fixture_cache, "training.max_steps=1")
    train(cfg, tmp_path / "tuned", init_from=str(base_dir), echo=lambda line: None)
    tuned_loss = _records(tmp_path / "tuned", "train")[0]["loss"]  # step 1: before the update
    base_loss, scratch_loss = _first_batch_losses(load_pretrained(base_dir), cfg, tmp_path / "p")
    assert tuned_loss == pytest.approx(base_loss, abs=1e-5)
    assert abs(scratch_loss - base_loss) > 1e-3  # the test tells the two starts apart
    # a new run: its own schedule from step 0 (warmup), its own checkpoints
    assert [r["step"] for r in _records(tmp_path / "tuned", "train")] == [1]
    assert latest_checkpoint(tmp_path / "tuned").name == "step-0000001"


def test_lora_trains_only_the_adapters(lora_run, base_dir):
    state = load_file(str(latest_checkpoint(lora_run) / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    frozen = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert set(frozen) == set(base)
    for k, v in base.items():
        assert torch.equal(frozen[k], v), k  # bitwise unchanged
    lora_b = [v for k, v in state.items() if ".lora_B." in k]
    assert len(lora_b) == 8 and all(v.abs().max() > 0 for v in lora_b)  # they learned
    info, tensors = read_adapter(lora_run / "adapter")
    assert (info.rank, info.alpha) == (4, 8.0)
    assert info.base_sha256 == file_sha256(base_dir / "model.safetensors")
    assert info.base_name == str(base_dir)
    n_adapter = sum(v.numel() for v in tensors.values())
    n_base = sum(v.numel() for v in base.values())
    assert n_adapter == 2 * 4 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)  # 2 blocks
    assert n_adapter / n_base < 0.1


def test_adapter_merged_equals_peft_unmerged(lora_run, base_dir, fixture_cache):
    from aurl.data.cache import TokenCache

    ids = torch.as_tensor(TokenCache(fixture_cache).tokens(0)[:100].astype("int64"))[None]
    peft_model = add_lora(load_pretrained(base_dir), 4, 8.0)
    ckpt = load_file(str(latest_checkpoint(lora_run) / "model.safetensors"))
    peft_model.load_state_dict(fill_tied(ckpt, peft_model.state_dict()))
    merged = apply_adapter(load_pretrained(base_dir), lora_run / "adapter",
                           base_dir / "model.safetensors")  # fmt: skip
    plain = load_pretrained(base_dir)
    with torch.no_grad():
        a = peft_model.eval()(ids).logits
        b = merged(ids).logits
        c = plain(ids).logits
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-3  # the adapter does change the model


def test_adapter_refuses_another_base(lora_run, other_base):
    with pytest.raises(CheckpointError, match="was trained on .* pass the adapter's base"):
        apply_adapter(load_pretrained(other_base), lora_run / "adapter",
                      other_base / "model.safetensors")  # fmt: skip


def test_lora_run_resumes_bitwise(fixture_cache, tiny_config, lora_run, tmp_path):
    import shutil

    straight = json.loads((latest_checkpoint(lora_run) / "state.json").read_text())
    # as if killed after step 2: the run goes on from its step-2 checkpoint, no --init-from
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    shutil.rmtree(run / "adapter")
    assert latest_checkpoint(run).name == "step-0000002"
    resumed = train(_lora_config(fixture_cache, tiny_config), run, echo=lambda x: None)
    assert resumed.step == 4
    assert resumed.train_loss == straight["metrics"]["train_loss"]  # bitwise
    a = load_file(str(lora_run / "adapter" / "adapter.safetensors"))
    b = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_fine_tune_requests_are_refused(fixture_cache, tiny_config, base_dir, tmp_path):
    cfg = tiny_config(fixture_cache, "training.max_steps=1")
    train(cfg, tmp_path / "run", echo=lambda line: None)
    with pytest.raises(CheckpointError, match="already holds a run's checkpoints"):
        train(cfg, tmp_path / "run", init_from=str(base_dir), echo=lambda line: None)
    with pytest.raises(ConfigError, match="give one of them"):
        train(cfg, tmp_path / "new", init_from=str(base_dir), resume=tmp_path / "run",
              echo=lambda line: None)  # fmt: skip
    with pytest.raises(ConfigError, match="add --init-from"):
        train(cfg, tmp_path / "new", lora=4, echo=lambda line: None)
    with pytest.raises(CheckpointError, match="no such folder and no shipped model"):
        load_base("no-such-model")
    base = load_base(str(base_dir))
    # a run folder (or checkpoint) is a base too: its best, else latest, checkpoint, verified
    from_run = load_base(tmp_path / "run")
    assert from_run.name.endswith("step-0000001") and from_run.model.d_model == 32
    assert from_run.sha256 == file_sha256(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    # the base's shape wins over the preset's; an explicit contrary override is an error
    small = load_config(preset="small")
    assert finetune_config(small, base).model.d_model == 32
    wide = load_config(preset="tiny", overrides=["model.d_model=64"])
    with pytest.raises(
        ConfigError, match=r"model.d_model=64: the base model .* has model.d_model=32"
    ):
        finetune_config(wide, base, ["model.d_model"])
    assert finetune_config(wide, base, ["model.dropout"]).model.d_model == 32
    # a library caller who skips finetune_config gets the key named
    with pytest.raises(ConfigError, match="model.d_model: the run's config says 64"):
        train(tiny_config(fixture_cache, "model.d_model=64"), tmp_path / "x",
              init_from=base, echo=lambda line: None)  # fmt: skip


def test_readme_commands(tmp_path, capsys):
    """The README's "Train on your own MIDI folder" commands, on a fixture folder with the tiny
    preset's data and training settings (the base is the shipped model, as in the README)."""
    cache, run, full = tmp_path / "my-cache", tmp_path / "my-run", tmp_path / "my-full"
    fast = ["--preset", "tiny", "training.max_steps=2", "training.eval_batches=1",
            "data.window=64", "data.batch_size=2", "training.sample_every=0"]  # fmt: skip
    assert main(["data", "prepare", str(FIXTURE_MIDI), "--out", str(cache)]) == 0
    assert main(["train", "--init-from", "shipped", "--lora", "8", "--data", str(cache),
                 "--out", str(run), *fast]) == 0  # fmt: skip
    assert (run / "adapter" / "adapter.json").is_file()
    pieces = tmp_path / "my-pieces"
    assert main(["generate", "--adapter", str(run / "adapter"), "--num-samples", "1",
                 "--max-tokens", "32", "--out", str(pieces)]) == 0  # fmt: skip
    assert list(pieces.glob("*.mid"))
    assert main(["evaluate", "--adapter", str(run / "adapter"), "--data", str(cache),
                 "--samples", "0", "--split", "valid",  # the fixtures: no test file
            "--out", str(tmp_path / "my-eval")]) == 0  # fmt: skip
    assert main(["train", "--init-from", "shipped", "--data", str(cache), "--out", str(full),
                 *fast]) == 0  # fmt: skip
    full_pieces = tmp_path / "my-full-pieces"
    assert main(["generate", "--checkpoint", str(full / "model"), "--num-samples", "1",
                 "--max-tokens", "32", "--out", str(full_pieces)]) == 0  # fmt: skip
    assert list(full_pieces.glob("*.mid"))
    capsys.readouterr()
    # the adapter on another base, and a new run into a used folder: one clear line each
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(run / "adapter"),
                "--checkpoint",
                str(full / "model"),
                "--max-tokens",
                "8",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "was trained on chorales" in err[-1]
    code = main(["train", "--init-from", "shipped", "--lora", "8", "--data", str(cache),
                 "--out", str(run), *fast])  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "without --init-from" in err[-1]


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [("rank", True, "rank is True"), ("rank", 4.5, "rank is 4.5"), ("rank", "4", "rank is '4'"),
     ("alpha", False, "alpha is False"), ("alpha", "8", "alpha is '8'")],
)  # fmt: skip
def test_adapter_metadata_of_the_wrong_type_is_refused(lora_run, tmp_path, key, value, words):
    """JSON true / 4.5 / "4" as the rank (or a boolean alpha) is a damaged adapter, not rank 1."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in (lora_run / "adapter").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    meta = json.loads((folder / "adapter.json").read_text())
    meta[key] = value
    (folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"adapter.json is damaged.*{words}"):
        read_adapter(folder)


def test_a_boolean_training_window_is_not_a_window(base_dir, tmp_path):
    """``"window": true`` in a model folder's config reads as no window, not a window of 1."""
    from aurl.models.pretrained import trained_window

    folder = tmp_path / "model"
    folder.mkdir()
    meta = json.loads((base_dir / "config.json").read_text())
    for window, expected in ((True, None), (64, 64)):
        meta["window"] = window
        (folder / "config.json").write_text(json.dumps(meta))
        assert trained_window(folder) == expected


@pytest.mark.parametrize(
    "argv, says",
    [
        (["checkpoint", "export", "{run}", "--out", "{out}"], "is a checkpoint of a LoRA fine-tune"),
        (["checkpoint", "average", "{run}", "--out", "{out}"], "is a checkpoint of a LoRA fine-tune"),
        (["evaluate", "--checkpoint", "{run}", "--data", "{cache}", "--samples", "0", "--out",
          "{out}"], "is a checkpoint of a LoRA fine-tune"),
        (["generate", "--checkpoint", "{run}", "--out", "{out}"], "is a training run, not a model"),
    ],
    ids=["export", "average", "evaluate", "generate"],
)  # fmt: skip
def test_a_lora_run_where_a_model_belongs_names_its_adapter(lora_run, fixture_cache, tmp_path,
                                                           capsys, argv, says):  # fmt: skip
    """A LoRA run's checkpoints hold the adapters in the wrapped model: where a plain model's
    weights are wanted, the one line names the adapter folder to give instead (it was "weights
    do not fit this model" from the strict load)."""
    out = tmp_path / "out"
    argv = [a.format(run=lora_run, out=out, cache=fixture_cache) for a in argv]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert f"--adapter {lora_run / 'adapter'}" in lines[0]
    assert not out.exists()
