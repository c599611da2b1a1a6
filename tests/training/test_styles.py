"""Style labels from the corpus manifests into the cache, the trainer and ``aurl generate
--style``, on a folder of two real corpora: 8 bundled chorales and 4 Palestrina movements."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.cli import main
from aurl.config import load_config
from aurl.data import corpora
from aurl.data.cache import TokenCache, prepare
from aurl.data.corpus import _corpus_root
from aurl.data.tokenizer import Tokenizer
from aurl.errors import ConfigError, DataError
from aurl.models import build_model
from aurl.training.trainer import seed_everything, train

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
PALESTRINA = ("Agnus_17", "Sanctus_93", "Sanctus_39", "Kyrie_II_03")  # 3 train, 1 valid


def make_mix(folder: Path, chorales: int = 8) -> Path:
    """``folder/chorale`` (bundled chorales and their manifest entries) and
    ``folder/palestrina`` (converted from music21), each with its manifest."""
    bundled = json.loads((CHORALES / "manifest.json").read_text())
    entries = bundled["files"][:chorales]
    (folder / "chorale").mkdir(parents=True)
    for e in entries:
        shutil.copyfile(CHORALES / e["file"], folder / "chorale" / e["file"])
    manifest = {**bundled, "files": entries, "skipped": []}
    (folder / "chorale" / "manifest.json").write_text(json.dumps(manifest))
    root = folder.parent / "m21"
    (root / "palestrina").mkdir(parents=True)
    for stem in PALESTRINA:
        rel = f"palestrina/{stem}.krn"
        shutil.copyfile(_corpus_root() / rel, root / rel)
    corpora.build_palestrina(folder / "palestrina", root=root, workers=1)
    return folder


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> Path:
    return make_mix(tmp_path_factory.mktemp("styles") / "mix")


@pytest.fixture(scope="module")
def mix_cache(mix, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("styles") / "cache"
    prepare(mix, out, workers=1)
    return out


def test_the_cache_keeps_each_files_style(mix_cache):
    cache = TokenCache(mix_cache)
    assert cache.style_names == ["chorale", "palestrina"]
    names = [cache.style_names[s] for s in cache.styles]
    assert names == [cache.relpath(i).split("/")[0] for i in range(len(cache))]
    ids = cache.model_styles(("palestrina", "folk", "chorale"))
    assert [("palestrina", "folk", "chorale")[i] for i in ids] == names
    with pytest.raises(DataError, match="has style 'palestrina', which model.styles"):
        cache.model_styles(("chorale",))


def test_styles_follow_the_manifest_without_tokenizing_again(mix, tmp_path):
    folder = tmp_path / "mix"
    shutil.copytree(mix, folder)
    out = tmp_path / "cache"
    prepare(folder, out, workers=1)
    path = folder / "palestrina" / "manifest.json"
    manifest = json.loads(path.read_text())
    for e in manifest["files"]:
        e["style"] = "renaissance"
    path.write_text(json.dumps(manifest))
    report = prepare(folder, out, workers=1)
    assert report.tokenized == 0
    cache = TokenCache(out)
    assert cache.style_names == ["chorale", "renaissance"]
    assert sorted(set(np.array(cache.style_names)[cache.styles])) == ["chorale", "renaissance"]


def test_part_caches_merge_with_their_styles(mix, tmp_path):
    from aurl.data.cache import merge_caches

    folder = tmp_path / "mix"
    shutil.copytree(mix, folder)
    out = tmp_path / "cache"
    prepare(folder, out, workers=1, shard=(0, 2))
    # the second part is prepared after the palestrina label changed: its style list differs
    path = folder / "palestrina" / "manifest.json"
    manifest = json.loads(path.read_text())
    for e in manifest["files"]:
        e["style"] = "a-cappella"
    path.write_text(json.dumps(manifest))
    prepare(folder, out, workers=1, shard=(1, 2))
    parts = sorted((out / "parts").iterdir())
    expect = {}
    for part in parts:
        c = TokenCache(part)
        expect.update({c.relpath(i): c.style_names[c.styles[i]] for i in range(len(c))})
    # part 0's list is [chorale, palestrina], part 1's [a-cappella, chorale]: ids must be remapped
    assert set(expect.values()) == {"chorale", "palestrina", "a-cappella"}
    merge_caches(parts, out)
    cache = TokenCache(out)
    assert {cache.relpath(i): cache.style_names[cache.styles[i]] for i in range(len(cache))} == (
        expect
    )
    prepare(folder, out, workers=1)  # and prepare relabels every row from today's manifests
    cache = TokenCache(out)
    names = [cache.style_names[s] for s in cache.styles]
    assert names == [
        "a-cappella" if cache.relpath(i).startswith("palestrina/") else "chorale"
        for i in range(len(cache))
    ]


def test_an_index_from_before_styles_reads_as_unlabelled(mix_cache, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(mix_cache, old)
    with np.load(old / "index.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "style"}
    meta = json.loads(str(arrays["meta"]))
    meta.pop("styles")
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(old / "index.npz", **arrays)
    cache = TokenCache(old)
    assert (cache.styles == -1).all() and cache.style_names == []
    with pytest.raises(DataError, match="no style labels.*aurl data prepare"):
        cache.model_styles(("chorale", "palestrina"))


@pytest.fixture(scope="module")
def trained(mix_cache, tmp_path_factory, tiny_config):
    """A tiny style model, 60 steps on the mix with every window's style (no dropout), and
    its style table before training."""
    overrides = ["model.styles=[chorale,palestrina]", "model.style_dropout=0",
                 "training.max_steps=60", "training.lr=3e-3", "training.eval_every=60"]  # fmt: skip
    cfg = tiny_config(mix_cache, *overrides)
    seed_everything(cfg.training.seed)
    initial = build_model(cfg).style.table.weight.detach().clone()
    result = train(cfg, tmp_path_factory.mktemp("styles") / "run", echo=lambda line: None)
    return result.model.eval(), initial


def test_a_style_model_trains_on_the_styles_of_its_pieces(trained, mix_cache, tmp_path,
                                                           tiny_config):  # fmt: skip
    model, initial = trained
    moved = (model.style.table.weight.detach().cpu() - initial).abs().amax(dim=1)
    # chorale and palestrina windows were trained with their style (Adam moves a row with a
    # gradient ~lr a step; weight decay alone would move it by ~lr * 0.1 * |w| a step)
    assert moved[0] > 1e-2 and moved[1] > 1e-2, moved
    with pytest.raises(DataError, match="which model.styles"):
        train(tiny_config(mix_cache, "model.styles=[chorale]", "training.max_steps=1"),
              tmp_path / "bad", echo=lambda line: None)  # fmt: skip


def test_the_likelihoods_of_a_trained_style_model_tell_the_styles_apart(trained, mix_cache):
    from aurl.evaluation.style import classify_style

    model, _ = trained
    cache = TokenCache(mix_cache)
    right = 0
    for i in range(len(cache)):
        guess = classify_style(model, np.asarray(cache.tokens(i)), window=64, max_tokens=320)
        assert sum(guess.probabilities.values()) == pytest.approx(1.0)
        # scored under the grammar, as trained (unmasked, the never-trained logits of forbidden
        # ids cost this model ~15 bits per note and drown the styles' difference)
        assert max(guess.bits_per_note.values()) < 12
        truth = cache.relpath(i).split("/")[0]
        right += guess.style == truth
        if cache.relpath(i).endswith("Kyrie_II_03.mid"):  # held out (its mass is in valid)
            assert guess.style == "palestrina" and guess.probabilities["palestrina"] > 0.75
            assert guess.bits_per_note["palestrina"] < guess.bits_per_note["chorale"]
    # (measured: 10 of 12; two valid chorales in the modal tonus peregrinus read as palestrina)
    assert right >= 9, right


def test_cli_analyze_style(trained, mix, tmp_path, capsys):
    model, _ = trained
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    piece = mix / "palestrina" / "palestrina_Kyrie_II_03.mid"
    out = tmp_path / "report"
    assert main(["analyze", str(piece), "--out", str(out), "--no-plots", "--style",
                 "--checkpoint", str(folder)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert (
        "palestrina_Kyrie_II_03.mid: style palestrina 0.9" in text
        or "style palestrina 1.00" in text
    )
    result = json.loads((out / "analysis.json").read_text())
    assert result["style"]["style"] == "palestrina"
    assert set(result["style"]["probabilities"]) == {"chorale", "palestrina"}
    # without --style no model is loaded; a model without styles is refused in one line
    plain = tmp_path / "plain"
    torch.manual_seed(0)
    build_model(load_config(preset="tiny")).save_pretrained(plain)
    assert main(["analyze", str(piece), "--out", str(tmp_path / "r2"), "--no-plots",
                 "--style", "--checkpoint", str(plain)]) != 0  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "trained without styles" in err and "\n" not in err
    assert main(["analyze", str(piece), "--out", str(tmp_path / "r3"), "--no-plots",
                 "--checkpoint", str(plain)]) != 0  # fmt: skip
    assert "add --style" in capsys.readouterr().err


def test_cli_analyze_style_uses_the_classifier_shipped_beside_the_model(trained, mix, tmp_path,
                                                                       capsys):  # fmt: skip
    from aurl.analysis.style import CLASSIFIER_FILE, Logistic, StyleClassifier
    from aurl.evaluation.metrics import SCALAR_METRICS

    model, _ = trained
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    # a classifier that ignores every feature and says chorale 0.88 (bias log 0.88/0.12): the
    # likelihoods alone say palestrina for this Kyrie (test above), so the line tells who spoke
    names = ("bits:chorale", "bits:palestrina", *SCALAR_METRICS)
    f = len(names)
    bias = np.log([0.88, 0.12])
    clf = StyleClassifier(("chorale", "palestrina"), names,
                          Logistic(np.zeros(f), np.ones(f), np.zeros((f, 2)), bias), 320)  # fmt: skip
    (folder / CLASSIFIER_FILE).write_text(json.dumps(clf.to_dict()))
    piece = mix / "palestrina" / "palestrina_Kyrie_II_03.mid"
    args = ["analyze", str(piece), "--no-plots", "--style", "--checkpoint", str(folder)]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert "style chorale 0.88 (palestrina 0.12)" in capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "analysis.json").read_text())
    bits = result["style"]["bits_per_note"]
    assert bits["palestrina"] < bits["chorale"] < 12  # the likelihoods are still reported
    # one fitted for other styles is refused in one line that says what to do
    other = StyleClassifier(("chorale", "folk"), clf.features, clf.logistic, 320)
    (folder / CLASSIFIER_FILE).write_text(json.dumps(other.to_dict()))
    assert main([*args, "--out", str(tmp_path / "r2")]) != 0
    err = capsys.readouterr().err.strip()
    assert "fitted for styles ['chorale', 'folk']" in err and "refit" in err and "\n" not in err


@pytest.fixture(scope="module")
def style_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(load_config(preset="tiny", overrides=["model.styles=[chorale,folk]"]))
    with torch.no_grad():  # an untrained model's small table would hardly move a sample
        model.style.table.weight.normal_(0.0, 1.0)
    folder = tmp_path_factory.mktemp("styles") / "model"
    model.save_pretrained(folder)
    return folder


def test_cli_style_changes_what_is_generated(style_model, tmp_path, capsys):
    tok = Tokenizer()
    pieces = {}
    for style in ("chorale", "folk"):
        out = tmp_path / style
        args = ["generate", "--checkpoint", str(style_model), "--max-tokens", "120", "--seed", "3"]
        assert main([*args, "--style", style, "--out", str(out)]) == 0, capsys.readouterr().err
        (mid,) = out.glob("*.mid")
        pieces[style] = tok.encode_file(mid)
        assert f"style: {style}" in next(out.glob("*.yaml")).read_text()
    assert not np.array_equal(pieces["chorale"], pieces["folk"])


def test_cli_unknown_style_and_a_model_without_styles_say_so_in_one_line(
    style_model, tmp_path, capsys
):
    args = ["generate", "--max-tokens", "20", "--out", str(tmp_path / "x")]
    assert main([*args, "--checkpoint", str(style_model), "--style", "jazz"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown style; this model knows chorale, folk" in err and "\n" not in err
    torch.manual_seed(0)
    plain = tmp_path / "plain"
    build_model(load_config(preset="tiny")).save_pretrained(plain)
    assert main([*args, "--checkpoint", str(plain), "--style", "folk"]) != 0
    err = capsys.readouterr().err.strip()
    assert "trained without styles" in err and "\n" not in err


def test_style_repeat_draws_a_style_n_times_an_epoch(mix_cache):
    """``data.style_repeat`` multiplies the windows of one style's training pieces in an epoch
    (the others and the validation split as they were); a style the cache lacks, or a count
    below 1, is one clear error."""
    from aurl.config import DataConfig
    from aurl.data.dataset import WindowDataset, build_loader
    from aurl.errors import ConfigError

    cache = TokenCache(mix_cache)
    plain = WindowDataset(cache, "train", window=64)
    more = WindowDataset(cache, "train", window=64, style_repeat=(("palestrina", 3),))
    styles = (
        cache.styles[plain.pieces[plain.slot_piece]],
        cache.styles[more.pieces[more.slot_piece]],
    )
    pal = cache.style_names.index("palestrina")
    assert (styles[1] == pal).sum() == 3 * (styles[0] == pal).sum() > 0
    assert (styles[1] != pal).sum() == (styles[0] != pal).sum() > 0
    data = DataConfig(window=64, batch_size=4, style_repeat=(("palestrina", 3),))
    valid = build_loader(cache, data, split="valid", augment=False)
    assert len(valid.dataset) == len(WindowDataset(cache, "valid", window=64))
    with pytest.raises(ConfigError, match=r"no style 'folk'; its styles are \['chorale', 'pal"):
        WindowDataset(cache, "train", window=64, style_repeat=(("folk", 2),))
    with pytest.raises(ConfigError, match="palestrina 0; give a count from 1 to 1000"):
        WindowDataset(cache, "train", window=64, style_repeat=(("palestrina", 0),))
    with pytest.raises(ConfigError, match="palestrina 1000000000; give a count from 1 to 1000"):
        WindowDataset(cache, "train", window=64, style_repeat=(("palestrina", 10**9),))
    for bad, says in (
        ("[[palestrina, 1000000000]]", "palestrina 1000000000; give a count"),
        ("[[palestrina, 2], [palestrina, 3]]", "palestrina is listed twice"),
    ):
        with pytest.raises(ConfigError, match=says):  # at the config, before a run starts
            load_config(preset="tiny", overrides=[f"data.style_repeat={bad}"])


def test_a_fine_tune_teaches_styles_to_a_model_without_them(mix_cache, tmp_path, tiny_config):
    """``--init-from BASE model.styles=[...]`` on a base trained without styles: the run's model
    starts computing exactly what the base computes (the new table is zero, i.e. "no style"
    for every style), then learns each style's vector; a base that has styles keeps its own."""
    from aurl.models.pretrained import load_pretrained
    from aurl.training.finetune import finetune_config, load_base, load_base_weights

    torch.manual_seed(123)
    build_model(tiny_config(mix_cache)).save_pretrained(tmp_path / "base")
    base = load_base(tmp_path / "base")
    assert base.model.styles == ()
    asked = tiny_config(
        mix_cache,
        "model.styles=[chorale,palestrina]",
        "model.style_dropout=0",
        "training.max_steps=6",
        "training.lr=3e-3",
        "training.eval_every=6",
    )
    cfg = finetune_config(asked, base, ["model.styles", "model.style_dropout"])
    assert cfg.model.styles == ("chorale", "palestrina") and cfg.model.d_model == 32
    model = build_model(cfg).eval()
    assert load_base_weights(model, base) == ["style.table.weight"]
    reference = load_pretrained(tmp_path / "base").eval()
    ids = torch.tensor(np.array(TokenCache(mix_cache).tokens(0)[:64]), dtype=torch.long)[None]
    with torch.no_grad():
        want = reference(ids).logits
        for s in (0, 1, -1):
            got = model(ids, style=torch.tensor([s])).logits
            assert torch.equal(got, want), s
    result = train(cfg, tmp_path / "run", init_from=base, echo=lambda line: None)
    table = result.model.style.table.weight.detach().cpu()
    assert table.abs().amax(dim=1).min() > 1e-3, table.abs().amax(dim=1)  # both styles learned
    # the base's other keys stay the base's: a contrary override is still refused
    with pytest.raises(ConfigError, match="model.d_model=64: the base model"):
        finetune_config(tiny_config(mix_cache, "model.d_model=64"), base, ["model.d_model"])
    # a base with styles keeps them: another list is a contradiction
    styled = load_base(tmp_path / "run")
    other = tiny_config(mix_cache, "model.styles=[chorale]")
    with pytest.raises(ConfigError, match="model.styles=.*the base model .* has model.styles"):
        finetune_config(other, styled, ["model.styles"])


def test_cli_evaluate_scores_a_split_under_a_style(trained, mix_cache, tmp_path, capsys):
    """``aurl evaluate --style NAME`` scores every piece under that style, ``--style each``
    each piece under its own label from the cache: the numbers are the likelihood scorer's with
    those style ids, and they differ from each other and from no style."""
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences

    model, _ = trained
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    bits = {}
    for style in ("chorale", "palestrina", "each", None):
        out = tmp_path / f"eval-{style}"
        argv = ["evaluate", "--checkpoint", str(folder), "--data", str(mix_cache), "--split",
                "valid", "--samples", "0", "--out", str(out), "--window", "64"]  # fmt: skip
        assert main(argv + (["--style", style] if style else [])) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["info"]["style"] == (style or "none")
        bits[style] = metrics["likelihood"]["model, grammar-masked"]["bits_per_note"]
    assert len(set(bits.values())) == 4, bits
    cache = TokenCache(mix_cache)
    rows = cache.split_indices("valid")
    own = [int(s) for s in cache.model_styles(model.config.styles)[rows]]
    assert sorted(set(own)) == [0, 1]  # the valid split has both styles: 'each' is a mix
    for style, ids in (("each", own), ("palestrina", [1] * len(rows)), (None, None)):
        direct = score_sequences(
            model, [np.asarray(cache.tokens(int(r)), np.int64) for r in rows], window=64,
            grammar=Grammar(model.vocab, 16), meters=[cache.meters[int(r)] for r in rows],
            styles=ids,
        )  # fmt: skip
        assert bits[style] == pytest.approx(direct.bits_per_note, abs=1e-9), style
    # bad requests: one line each
    for extra, words in (
        (["--style", "folk"], "unknown style; this model knows chorale, palestrina"),
        (["--style", "each", "--task", "harmonize"], "takes none"),
    ):
        assert main(["evaluate", "--checkpoint", str(folder), "--data", str(mix_cache),
                     "--out", str(tmp_path / "bad"), "--samples", "0", "--split", "valid",
                     *extra]) != 0  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
