"""InstructMining: MTLD and KNN-6 on hand-computed cases; the least-squares fit recovers known
coefficients and ranks by them; the flow end to end on a tiny randomly initialised Llama (random
subsets fine-tuned and evaluated, the rule fitted and used, nothing trained twice)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from tiny_lm import WORDS, build_tiny_llama

from sft_select.flows.instructmining import (InsignificantFit, InstructMiningParams, check_fit, fit_rule,
                                             instructmining, predict, spread_draws)
from sft_select.settings import settings
from sft_select.storage import BatchResult, Outcome, Signal, make_example, read_examples
from sft_select.storage.examples import frame
from sft_select.tasks.embed import embed_signal, load_vectors
from sft_select.tasks.finetune import Recipe
from sft_select.tasks.indicators import knn_distance, mtld, text_indicators, words
from sft_select.tasks.lm_loss import lm_loss_signal


def test_mtld_on_hand_cases():
    # forward a b a | b: TTR 1, 1, 2/3 <= 0.72 closes a factor at the third word; the rest "b" has TTR 1
    # and adds (1 - 1) / 0.28 = 0 -> 4 words / 1 factor; the backward pass b a b | a is the same
    assert mtld("a b a b") == pytest.approx(4.0)
    # no word repeats: TTR never leaves 1, one factor by convention -> MTLD = the word count
    assert mtld("one two three four five") == pytest.approx(5.0)
    # forward "a a": TTR 1/1, then 1/2 <= 0.72: one factor, nothing left -> 2 / 1
    assert mtld("a a") == pytest.approx(2.0)
    # forward a b c a | d: TTR 1, 1, 1, 3/4, 4/5 -> no factor closes; partial (1 - 0.8) / 0.28
    # backward d a c b a: TTR 1, 1, 1, 1, 4/5 -> the same partial
    assert mtld("a b c a d") == pytest.approx(5 / ((1 - 0.8) / 0.28))
    assert math.isnan(mtld("  ")) and mtld("A a") == mtld("a a")  # empty; case-folded
    assert words("Don't stop, it's 3 o'clock!") == ["don't", "stop", "it's", "3", "o'clock"]


def test_knn_distance_on_hand_cases():
    line = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)  # points on a line
    # KNN-2: 0 -> {1, 3}: 2.0; 1 -> {0, 3}: 1.5; 3 -> {1, 0} (2, 3): 2.5; 7 -> {3, 1}: (4 + 6) / 2
    assert knn_distance(line, 2).tolist() == pytest.approx([2.0, 1.5, 2.5, 5.0])
    # KNN-6 of 7 points: each point's six neighbours are all the others
    pts = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    full = np.linalg.norm(pts[:, None] - pts[None], axis=2).sum(axis=1) / 6
    assert knn_distance(pts, 6) == pytest.approx(full, rel=1e-5)
    # an exact duplicate is a neighbour at distance 0, and a row is never its own neighbour
    dup = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    assert knn_distance(dup, 1).tolist() == pytest.approx([0.0, 0.0, 5.0])
    with pytest.raises(ValueError):
        knn_distance(pts, 7)


def test_fit_recovers_known_coefficients_and_ranks_by_them():
    rng = np.random.default_rng(0)
    names = ["reward", "length", "knn"]
    beta = np.array([-0.15, 8e-4, -0.9])
    means = rng.normal(size=(25, 3)) * [1.0, 100.0, 0.2] + [0.0, 200.0, 1.0]
    log_loss = 1.07 + means @ beta
    rule = fit_rule(means, log_loss, names)
    assert rule.intercept == pytest.approx(1.07, abs=1e-9)
    assert [rule.coefficients[n] for n in names] == pytest.approx(beta.tolist(), abs=1e-9)
    assert rule.r2 == pytest.approx(1.0) and rule.subsets == 25

    noisy = fit_rule(means, log_loss + rng.normal(scale=0.01, size=25), names)
    assert [noisy.coefficients[n] for n in names] == pytest.approx(beta.tolist(), rel=0.1, abs=2e-4)
    assert 0.9 < noisy.r2 < 1.0 and noisy.adj_r2 < noisy.r2

    examples = pl.DataFrame({"reward": [3.0, 0.0, 0.0], "length": [100.0, 100.0, 900.0], "knn": [1.0, 1.0, 1.0]})
    predicted = predict(rule, examples)
    assert predicted.tolist() == pytest.approx((1.07 + examples.to_numpy() @ beta).tolist())
    assert np.argsort(predicted).tolist() == [0, 1, 2]  # high reward first, long answers last
    with pytest.raises(ValueError, match="subsets"):
        fit_rule(means[:4], log_loss[:4], names)


def test_the_fit_reports_intervals_and_an_insignificant_fit_is_refused_or_warned():
    rng = np.random.default_rng(1)
    names = ["reward", "length", "knn"]
    beta = np.array([-0.15, 8e-4, -0.9])
    means = rng.normal(size=(25, 3)) * [1.0, 100.0, 0.2] + [0.0, 200.0, 1.0]
    good = fit_rule(means, 1.07 + means @ beta + rng.normal(scale=0.01, size=25), names)
    assert good.p_value < 1e-6 and check_fit(good, 0.05, "refuse") is None
    for n, b in zip(names, beta):  # the 95% intervals hold the true coefficients and are not degenerate
        low, high = good.intervals[n]
        assert low < b < high and high - low > 0

    # loss independent of the indicators: the F-test sees no better than chance
    noise = fit_rule(means, rng.normal(scale=0.05, size=25), names)
    assert noise.p_value > 0.05
    with pytest.raises(InsignificantFit, match="not better than chance"):
        check_fit(noise, 0.05, "refuse")
    assert "p = " in check_fit(noise, 0.05, "warn")
    low, high = noise.intervals["reward"]
    assert low < 0 < high  # an interval that straddles zero says the same


def test_subsets_are_drawn_with_spread_not_iid():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3))
    draws = spread_draws(z, 40, 20, np.random.default_rng(0))
    assert all(len(d) == 40 and len(set(d)) == 40 for d in draws)
    iid = [rng.choice(400, 40, replace=False) for _ in range(20)]
    spread = np.stack([z[d].mean(axis=0) for d in draws]).std(axis=0)
    flat = np.stack([z[d].mean(axis=0) for d in iid]).std(axis=0)
    assert (spread > 2 * flat).all()  # every indicator's subset means span far more than i.i.d. draws give


def test_text_indicators_count_words():
    ex = frame([make_example([{"role": "user", "content": "Name two fruits."},
                              {"role": "assistant", "content": "Apple and pear, apple."}])])
    row = text_indicators(ex).row(0, named=True)
    assert (row["input_length"], row["output_length"]) == (3.0, 4.0)
    assert row["mtld"] == pytest.approx(mtld("apple and pear apple"))


# -- the flow ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def toy_pool():
    rows = []
    for i, w in enumerate(WORDS * 2):
        times = 1 + i % 4
        answer = "Sure: " + ", ".join([w] * times) + "." if i < 12 else f"{w.title()} is a fruit; I like {w} a lot."
        rows.append(make_example([{"role": "user", "content": f"Say {w} {times} times." if i < 12
                                   else f"Tell me about {w}."}, {"role": "assistant", "content": answer}]))
    return frame(rows)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_flow_fits_the_rule_on_random_subsets_and_ranks_by_it(store, tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    settings.cache_clear()
    store.datasets.register("toy", toy_pool())
    recipe = Recipe(max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, save_steps=100)
    params = InstructMiningParams(dataset="toy", budget=5, indicators=["output_length", "mtld", "perplexity"],
                                  perplexity_model=tiny_base, subsets=5, subset_size=4, heldout=4, base=tiny_base,
                                  recipe=recipe, seed=0, on_insignificant="warn")  # 5 tiny subsets: no real fit
    with pytest.raises(InsignificantFit):  # refused by default: the ranking would be noise
        instructmining(params.model_copy(update={"on_insignificant": "refuse"}))
    ref = instructmining(params)

    chosen = store.selections.read(ref.selection_id)
    assert chosen.height == 5 and chosen["score"].to_list() == sorted(chosen["score"].to_list())  # lowest first
    assert chosen["reason"][0].startswith("predicted log eval loss")
    finetuned = settings().model_cache / "finetuned"
    models = sorted(p.name for p in finetuned.iterdir() if p.is_dir())
    assert len(models) == 5  # one per random subset
    evaluations = store.catalog.query("SELECT DISTINCT model FROM evaluations WHERE suite = 'reference_loss'")
    assert evaluations.height == 5

    # the scores are the fitted linear rule of the indicators: an exact linear function of them
    pool = store.datasets.read("toy")
    ind = text_indicators(pool).join(chosen.select("uid", "score"), on="uid", how="inner")
    ppl = store.signals.values(lm_loss_signal(tiny_base, template="alpaca", max_length=512), ind["uid"],
                              alias="loss")
    ind = ind.join(ppl, on="uid").with_columns(perplexity=pl.col("loss").exp())
    design = np.column_stack([np.ones(ind.height), ind.select("output_length", "mtld", "perplexity").to_numpy()])
    _, residual, *_ = np.linalg.lstsq(design, ind["score"].to_numpy(), rcond=None)
    assert float(residual.sum()) < 1e-12
    (held_file,) = (store.home / "derived" / "heldout").glob("*.parquet")
    held = set(read_examples(held_file).examples["uid"])
    assert len(held) == 4 and held <= set(pool["uid"]) and not held & set(chosen["uid"])  # never selected

    # a size sweep reuses the five subset models and trains only the top-n candidates
    swept = instructmining(params.model_copy(update={"sweep": [2, 3]}))
    assert len([p for p in finetuned.iterdir() if p.is_dir()]) == 7
    assert store.selections.read(swept.selection_id).height in (2, 3)


@pytest.mark.usefixtures("prefect_api")
def test_paper_rule_needs_a_reward_signal_and_applies_the_published_coefficients(store):
    pool = toy_pool()
    store.datasets.register("toy", pool)
    with pytest.raises(ValueError, match="reward term"):
        instructmining(InstructMiningParams(dataset="toy", rule="paper", budget=5))

    # a reward signal stored by some other step (the project computes none yet): any per-example float
    reward = Signal("reward", {"model": "test-reward"}, kind="float")
    values = {u: float(i % 5) - 2.0 for i, u in enumerate(pool["uid"])}
    store.signals.fill(reward, pool, lambda b: BatchResult([Outcome(value=values[u]) for u in b["uid"]], {}))
    with pytest.raises(ValueError, match="KNN-6"):
        instructmining(InstructMiningParams(dataset="toy", rule="paper", reward_signal=reward.id, knn=5))
    ref = instructmining(InstructMiningParams(dataset="toy", rule="paper", reward_signal=reward.id, budget=5))

    chosen = store.selections.read(ref.selection_id)
    have, vectors = load_vectors(embed_signal(None, field="full"), pool["uid"])
    knn = dict(zip(have, knn_distance(vectors, 6)))
    ind = text_indicators(pool).join(chosen.select("uid", "score"), on="uid")
    expected = [1.0694 - 0.1498 * values[u] + 8.257e-5 * n - 0.9350 * knn[u]
                for u, n in zip(ind["uid"], ind["output_length"])]
    assert chosen.height == 5 and ind["score"].to_list() == pytest.approx(expected, abs=1e-6)
    everyone = sorted(1.0694 - 0.1498 * values[u] + 8.257e-5 * n - 0.9350 * knn[u]
                      for u, n in zip(*text_indicators(pool).select("uid", "output_length")))
    assert chosen["score"].to_list() == pytest.approx(everyone[:5], abs=1e-6)  # the lowest predicted loss first
    assert store.catalog.query("SELECT count(*) FROM evaluations").item() == 0  # nothing fine-tuned or evaluated
