"""The report without a model, and ``aurl evaluate`` end to end on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.cli import main
from aurl.config import VocabConfig, load_config
from aurl.data.cache import prepare
from aurl.data.notes import make_notes, notes_from_file
from aurl.evaluation.report import evaluate_sets, read_training_curves, write_report
from aurl.models import build_model


def test_report_from_two_sets_without_a_model(tmp_path: Path, fixtures_dir: Path) -> None:
    reference = [notes_from_file(p) for p in sorted((fixtures_dir / "midi").glob("bach*.mid"))]
    generated = [
        make_notes(onset=np.arange(16) / 2, duration=0.5, pitch=60 + (np.arange(16) * 7) % 12),
        make_notes(onset=np.arange(8), duration=1, pitch=[60, 64, 67, 72] * 2),
        make_notes(onset=[], duration=[], pitch=[]),  # an empty sample: metrics NaN, kept
    ]
    results, gen, ref = evaluate_sets(generated, reference)
    assert results["pieces"] == {"generated": 3, "reference": 4}
    assert results["generated"]["pitch_range"]["defined"] == 2
    # sample 1 spans C..B (11 semitones), sample 2 C4..C5 (12)
    assert results["generated"]["pitch_range"]["mean"] == pytest.approx(11.5)
    assert np.isfinite(results["distances"]["frechet_distance"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 10, "kind": "train", "loss": 3.0}\n{"step": 20, "kind": "train", "loss": 2.5}\n'
        '{"step": 20, "kind": "valid", "loss": 2.7}\n{"step": 30, "kind": "tr'  # cut by a crash
    )
    assert read_training_curves(run) == {"train": [(10, 3.0), (20, 2.5)], "valid": [(20, 2.7)]}
    report = write_report(
        tmp_path / "out", results, generated_features=gen, reference_features=ref,
        samples=generated, run_dir=run, max_rolls=2,
    )  # fmt: skip
    text = report.read_text()
    assert "| pitch_range | 11.500" in text
    for png in ("pitch_classes", "metrics", "distances", "sample_0", "sample_1", "training"):
        assert (tmp_path / "out" / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in text
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())  # strict JSON: NaN -> null
    assert data["generated"]["pitch_range"]["mean"] == pytest.approx(11.5)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    build_model(load_config(preset="tiny")).save_pretrained(folder)
    return folder


def test_evaluate_command_end_to_end(tmp_path: Path, fixtures_dir: Path, tiny_model_dir, capsys):
    data = tmp_path / "midi"
    shutil.copytree(fixtures_dir / "midi", data)
    (data / "broken.mid").write_bytes(b"MThd this is not a MIDI file")
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(tiny_model_dir), "--data", str(data)]
    args += ["--split", "train", "--samples", "2", "--max-tokens", "48", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped broken.mid" in err  # reported, not fatal
    data_json = json.loads((out / "metrics.json").read_text())
    like = data_json["likelihood"]
    assert set(like) == {"model", "model, grammar-masked", "4-gram (Kneser-Ney)"}
    model_bpn = like["model"]["bits_per_note"]
    assert like["model, grammar-masked"]["bits_per_note"] <= model_bpn
    # an untrained model is near uniform over 774 ids: about log2(774) bits per token
    per_token = like["model"]["bits_per_token"]
    assert 8.0 < per_token < 11.0
    assert data_json["pieces"]["generated"] == 2
    assert (out / "report.md").is_file() and len(list((out / "samples").glob("*.mid"))) == 2


def test_evaluate_command_errors(tmp_path: Path, fixtures_dir: Path, tiny_model_dir, capsys):
    base = ["evaluate", "--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(base + ["--data", str(empty), "--samples", "0"]) == 1
    assert "no MIDI files" in capsys.readouterr().err
    assert main(base + ["--data", str(tmp_path / "missing"), "--samples", "0"]) == 1
    assert "neither a token cache nor a folder" in capsys.readouterr().err
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(fixtures_dir / "midi" / "bach_bwv66.6.mid", one)  # hashes into train
    assert main(base + ["--data", str(one), "--split", "test", "--samples", "0"]) == 1
    err = capsys.readouterr().err
    assert "split 'test'" in err and "has no files" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other_vocab"
    prepare(one, other, vocab_config=VocabConfig(velocity_bins=16), workers=1)
    assert main(base + ["--data", str(other), "--split", "train", "--samples", "0"]) == 1
    assert "another vocabulary" in capsys.readouterr().err


def test_evaluate_without_a_shipped_model_fails_in_one_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import aurl.cli.generate as cli_generate

    monkeypatch.setattr(cli_generate, "SHIPPED", tmp_path / "pretrained")  # an empty install
    rc = main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: no shipped model") and "\n" not in err


def test_evaluate_a_training_run_folder(tmp_path: Path, fixtures_dir: Path) -> None:
    from aurl.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = load_config(preset="tiny")
    model = build_model(config)
    run = tmp_path / "run"
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run, step=5, model=model, config=config, optimizers={"model": opt})
    (run / "metrics.jsonl").write_text('{"step": 5, "kind": "train", "loss": 6.0}\n')
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(run), "--data", str(fixtures_dir / "midi")]
    assert main(args + ["--split", "train", "--samples", "0", "--out", str(out)]) == 0
    assert (out / "plots" / "training.png").is_file()  # curves from the run folder
    assert "Training curves" in (out / "report.md").read_text()
    summary = json.loads((out / "metrics.json").read_text())["reference"]
    assert summary["polyphony"]["defined"] > 0  # the split is described even without samples
    resolved = load_config(out / "config.yaml")  # the settings travel with the report
    assert resolved.model == config.model and resolved.vocab == config.vocab
