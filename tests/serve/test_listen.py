"""The listening test: trials are blind and of equal length, answers survive a restart, and the
results carry exact binomial intervals."""

from __future__ import annotations

import pytest

from aurl.serve.listen import Store, binomial_interval, results, results_svg
from tests.serve.conftest import make_client


def test_clopper_pearson_interval_exact_values():
    # hand-checked against the Beta quantiles (R: binom.test(5, 10)$conf.int)
    assert binomial_interval(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert binomial_interval(0, 10) == pytest.approx((0.0, 0.308497), abs=1e-6)
    assert binomial_interval(10, 10) == pytest.approx((0.691503, 1.0), abs=1e-6)


def test_trial_answer_and_results_survive_a_restart(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}) as c:
        t = c.post("/api/listen/trial", json={}).json()
        assert set(t) == {"trial", "model", "bpm", "beats", "velocity", "a", "b"}
        assert t["beats"] % 4 == 0 and t["a"] and t["b"]
        for side in (t["a"], t["b"]):  # both cut to the same length, from their first note
            assert min(o for _, o, _ in side) == 0
            assert max(o + d for _, o, d in side) <= t["beats"] + 1e-6
        r = c.post("/api/listen/answer", json={"trial": t["trial"], "choice": "B"},
                   headers={"x-listener": "ann"})  # fmt: skip
        assert r.status_code == 200 and r.json()["correct"] == (r.json()["bach"] == "B")
        again = c.post("/api/listen/answer", json={"trial": t["trial"], "choice": "A"})
        assert again.status_code == 409 and again.json()["field"] == "trial"
    with make_client(tmp_path, {"tiny": tiny}) as c:  # a new server on the same database
        rows = c.get("/api/listen/results").json()
        assert [(x["model"], x["answers"]) for x in rows] == [("tiny", 1)]
        page = c.get("/listen/results").text
        assert "<svg" in page and "tiny (n=1)" in page


def test_store_keeps_one_row_per_answer(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    ids = [store.add_trial("m", "bach_x.mid", side, 16.0, 1) for side in "AABB"]
    for trial, choice in zip(ids, "AABA"):
        store.answer(trial, choice, "x")
    store.close()
    rows = results(Store(tmp_path / "db.sqlite"))
    assert rows[0]["answers"] == 4 and rows[0]["correct"] == 3 and rows[0]["accuracy"] == 0.75
    assert results_svg(rows).count('class="bar"') == 1
