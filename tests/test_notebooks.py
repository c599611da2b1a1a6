"""The notebooks in notebooks/ run top to bottom and compute what they say they compute.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (the interpreter running
the tests), in a temporary folder, with torch on one thread (tiny models: more threads only
contend for the CPU). The last cell of every notebook prints a JSON summary of its numbers;
the tests read it back from the executed outputs and check it against the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 240  # per cell; the whole notebook is bounded by the test timeout
NAMES = ["01_explore_corpus", "02_train_and_inspect", "03_evaluate_generations"]


def execute(name: str, folder: Path, monkeypatch, **env: str):
    """Run notebook ``name`` in ``folder``; return it executed and its summary (last cell)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    # the kernel imports aurl from this checkout, whatever else is installed
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT / "src"), path) if p))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )  # fmt: skip
    client.execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(
        o["text"] for o in last.outputs if o["output_type"] == "stream" and o["name"] == "stdout"
    )
    return nb, json.loads(text.strip().splitlines()[-1])


def images(nb) -> int:
    """Figures the notebook drew (PNG or SVG outputs)."""
    return sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o["output_type"] == "display_data"
        and ({"image/png", "image/svg+xml"} & set(o.get("data", {})))
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_carry_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2  # it explains


@pytest.mark.timeout(300)
def test_explore_corpus(tmp_path, monkeypatch):
    from aurl.data.corpus import BUNDLED_DIR, read_manifest

    nb, s = execute(NAMES[0], tmp_path, monkeypatch)
    manifest = read_manifest(BUNDLED_DIR / "bach-chorales")
    assert s["pieces"] == s["manifest_pieces"] == len(manifest["files"])
    assert s["notes"] > 50 * s["pieces"]
    # the keys of the two quartet movements, as their scores have them
    assert s["classical_keys"] == {
        "haydn_op74no1_mvt2.mid": "G major",  # Op. 74 No. 1, ii: Andantino grazioso, G major
        "mozart_k155_mvt1.mid": "D major",  # K. 155 (String Quartet No. 2 in D), i
    }
    assert set(s["modes"]) == {"major", "minor"}
    assert s["step_share"] > 0.6  # chorale voices move mostly by step
    bach = s["styles"]["Bach chorales"]["cadence kinds"]
    assert max(bach, key=bach.get) == "authentic"
    assert images(nb) >= 4


@pytest.mark.timeout(300)
def test_train_and_inspect(tmp_path, monkeypatch):
    nb, s = execute(NAMES[1], tmp_path, monkeypatch)
    assert s["steps"] == 24
    assert s["last_train_loss"] < s["first_train_loss"] - 0.1  # it learns
    assert len(s["valid_losses"]) == 3 and s["valid_losses"][-1] < s["valid_losses"][0]
    assert s["attention_blocks"] == 2 and s["attention_shape"] == [2, 64, 64]
    assert s["attention_row_sums_max_error"] < 1e-5
    assert s["interpolation_points"] == 5
    assert s["decoded_pieces"] == 3 and min(s["decoded_notes"]) > 0
    assert (tmp_path / "aurl-notebook-02" / "run" / "metrics.jsonl").is_file()
    assert (tmp_path / "aurl-notebook-02" / "halfway.mid").is_file()
    assert images(nb) >= 4


@pytest.mark.timeout(300)
def test_evaluate_generations(tmp_path, monkeypatch):
    from scipy.stats import beta

    from aurl.serve import listen

    # a listening database written through the server's own store: (model, Bach side, answer)
    store = listen.Store(tmp_path / "listen.sqlite")
    answers = {"chorales": "AAAAAABBBB", "tiny": "ABAB"}  # the listener's choices
    truth = {"chorales": "AAAAAAAAAB", "tiny": "BBBB"}  # where Bach really was
    for model in answers:
        for choice, bach in zip(answers[model], truth[model]):
            trial = store.add_trial(model, "bach_bwv10.7.mid", bach, 16.0, seed=0)
            store.answer(trial, choice, listener="test")
    store.close()

    nb, s = execute(NAMES[2], tmp_path, monkeypatch, AURL_LISTEN_DB=str(tmp_path / "listen.sqlite"))
    assert s["generated"] == 4 and min(s["generated_notes"]) > 0
    assert s["reference"] == 24
    assert all(0.0 <= v <= 1.0 for v in s["overlap_area"].values())
    assert (tmp_path / "aurl-notebook-03" / "sample_0.mid").is_file()
    rows = {r["model"]: r for r in s["listening"]}
    assert set(rows) == {"chorales", "tiny"}
    for model, k, n in (("chorales", 7, 10), ("tiny", 2, 4)):
        r = rows[model]
        assert (r["correct"], r["answers"]) == (k, n) and r["accuracy"] == pytest.approx(k / n)
        # the exact Clopper-Pearson 95% interval
        assert r["ci_low"] == pytest.approx(beta.ppf(0.025, k, n - k + 1), abs=1e-9)
        assert r["ci_high"] == pytest.approx(beta.ppf(0.975, k + 1, n - k), abs=1e-9)
    assert images(nb) >= 2
