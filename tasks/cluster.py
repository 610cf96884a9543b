"""Clustering and coverage on embeddings: k-means (faiss) and k-center greedy (numpy).

k-center greedy (Sener & Savarese 2018, "Active Learning for Convolutional Neural Networks: A
Core-Set Approach"): with chosen set ``S``,

    min_dist[i] = min_{c in S} ||x_i - x_c||                     (euclidean)
    repeat:  u = argmax_i min_dist[i];  S += {u};  min_dist[i] = min(min_dist[i], ||x_i - x_u||)

starting from the given seeds, or from one point drawn by a seeded generator. Ties go to the
lowest index. The covering radius of ``S`` is ``max_i min_dist[i]``; greedy is a 2-approximation of
the smallest possible radius. One pass over the pool per step, as a float32 matrix-vector product
``||x_i - x_u||^2 = ||x_i||^2 - 2 x_i.x_u + ||x_u||^2`` into a preallocated buffer and an in-place
minimum (squared distances throughout; the square root only for what is reported). The seeds'
distances are one blocked matrix product. Rows whose float32 distance is within rounding error of
the maximum are compared again in float64 against every chosen row, so the choice is the one exact
arithmetic makes (the same as a float64 textbook loop), not an accident of rounding.

DEITA's repr filter (Liu et al. 2023, "What Makes Good Data for Alignment?"), with rows taken in a
given order (best score first), accepted set ``S`` and threshold tau:

    for i in order:  accept i  unless  max_{s in S} cos(x_i, x_s) > tau;   stop when |S| = m

(:func:`repr_filter`, exact in float64: rows are compared a block at a time with everything accepted
before the block, then one by one with what the block itself accepted). :func:`nearest_neighbour_filter`
is distilabel's ``DeitaFiltering`` rule, a different one kept as a named variant: take rows in order
and keep those whose cosine distance ``1 - cos`` to their nearest neighbour in the whole pool is at
least a threshold, to m.

The Prefect tasks read vectors from an ``embed`` signal; their results are derived results
(``store.derived``), keyed on content: the signal id (a hash of the embedding's parameters), the
dataset fingerprint (a hash of its uids), how many of those uids have a vector, and the
parameters; never on a path.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.context import TaskRunContext
from pydantic import BaseModel

from sft_select.storage import Signal
from sft_select.storage.signals import canonical_json
from sft_select.tasks.signal_task import DatasetRef, get_store
from sft_select.tasks.derived import derived_cache_key
from sft_select.tasks.embed import load_vectors

log = logging.getLogger("sft_select")
VERSION = "1"
_BLOCK = 8192  # rows per block of the seeds' distance matrix
# Squared distances in float32 are off by about sqrt(d) * eps32 * ||x||^2 (measured: up to 1x that on
# 100k x 384); rows within this many times that of the maximum are compared again in float64.
_F32_SLACK = 32 * float(np.finfo(np.float32).eps)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, d) matrix of vectors, got shape {x.shape}")
    return x


def kmeans_plusplus(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the greedy form of scikit-learn):
    the first centre uniformly at random; then, for each next centre, ``2 + floor(ln k)``
    candidates drawn with probability proportional to their squared distance to the nearest centre
    so far, keeping the candidate that lowers the total squared distance most. Returns the row
    indices of the ``k`` initial centres."""
    x = _as_matrix(vectors)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    sq = np.einsum("ij,ij->i", x, x)

    def dist2(rows: np.ndarray) -> np.ndarray:  # (len(rows), n) squared distances, clipped at 0
        d2 = x[rows] @ x.T
        d2 *= -2.0
        d2 += sq[rows, None]
        d2 += sq[None, :]
        return np.maximum(d2, 0.0, out=d2)

    chosen = [int(rng.integers(n))]
    min_d2 = dist2(np.asarray(chosen))[0]
    for _ in range(1, k):
        total = float(min_d2.sum(dtype=np.float64))
        if total <= 0.0:  # fewer distinct rows than k: take rows not chosen yet
            chosen.append(int(np.setdiff1d(np.arange(n), chosen)[0]))
            continue
        cdf = np.cumsum(min_d2, dtype=np.float64)
        candidates = np.minimum(np.searchsorted(cdf, rng.random(trials) * total, side="right"), n - 1)
        options = np.minimum(min_d2[None, :], dist2(candidates))
        best = int(np.argmin(options.sum(axis=1, dtype=np.float64)))
        chosen.append(int(candidates[best]))
        min_d2 = options[best]
    return np.asarray(chosen, dtype=np.int64)


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on all rows (faiss), from a k-means++ seeding drawn with ``seed``.
    Returns ``(centroids (k, d) float32, assignment (n,) int64)``."""
    import faiss

    x = _as_matrix(vectors)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of vectors ({x.shape[0]}), got {k}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False,
                      max_points_per_centroid=max(256, -(-x.shape[0] // k)))  # use every row, no subsampling
    km.train(x, init_centroids=x[kmeans_plusplus(x, k, seed)])
    _, assignment = km.index.search(x, 1)
    return km.centroids.copy(), assignment[:, 0].astype(np.int64)


def nearest(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query row, the index of the nearest vector (euclidean; exact search)."""
    import faiss

    x, q = _as_matrix(vectors), _as_matrix(queries)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, found = index.search(q, 1)
    return found[:, 0].astype(np.int64)


def _update_with_seeds(x: np.ndarray, sq: np.ndarray, min_d2: np.ndarray, seeds: np.ndarray) -> None:
    """``min_d2 = min(min_d2, min_s ||x - x_s||^2)`` over all seeds, one block of rows at a time."""
    s, s_sq = x[seeds], sq[seeds]
    for start in range(0, x.shape[0], _BLOCK):
        block = slice(start, start + _BLOCK)
        d2 = x[block] @ s.T
        d2 *= -2.0
        d2 += sq[block, None]
        d2 += s_sq[None, :]
        np.minimum(min_d2[block], d2.min(axis=1), out=min_d2[block])


def kcenter_greedy(vectors: np.ndarray, m: int, seeds: list[int] | np.ndarray | None = None, seed: int = 0,
                   *, return_distances: bool = False):
    """Choose ``m`` rows of ``vectors`` by k-center greedy; returns ``(order, radius)``.

    ``order`` (int64, length ``m``) starts with ``seeds`` in their given order (or one row drawn
    with ``seed`` when there are none), then the greedy picks. ``radius`` is the covering radius of
    the whole choice: every row lies within ``radius`` of a chosen row. With
    ``return_distances=True`` also ``distances``: for each greedy pick, its distance to the rows
    chosen before it (the radius just before it was added); NaN for the seeds and the random start.
    """
    x = _as_matrix(vectors)
    n = x.shape[0]
    seeds = np.asarray([] if seeds is None else seeds, dtype=np.int64)
    if len(np.unique(seeds)) != len(seeds) or (len(seeds) and (seeds.min() < 0 or seeds.max() >= n)):
        raise ValueError(f"seeds must be distinct row indices in [0, {n})")
    if not max(1, len(seeds)) <= m <= n:
        raise ValueError(f"m must be between the number of seeds ({len(seeds)}, at least 1) and {n}, got {m}")
    if len(seeds) == 0:
        seeds = np.asarray([np.random.default_rng(seed).integers(n)], dtype=np.int64)

    sq = np.einsum("ij,ij->i", x, x)
    min_d2 = np.full(n, np.inf, dtype=np.float32)
    _update_with_seeds(x, sq, min_d2, seeds)
    order = np.empty(m, dtype=np.int64)
    distances = np.full(m, np.nan)
    order[: len(seeds)] = seeds
    chosen = np.empty((m, x.shape[1]), dtype=np.float64)  # exact copies of the chosen rows, for near-ties
    chosen[: len(seeds)] = x[seeds]
    chosen_sq = np.einsum("ij,ij->i", chosen[: len(seeds)], chosen[: len(seeds)])
    chosen_sq = np.concatenate([chosen_sq, np.empty(m - len(seeds))])
    min_d2[seeds] = -np.inf  # chosen rows are never chosen again
    slack = _F32_SLACK * np.sqrt(x.shape[1]) * float(sq.max())
    d2 = np.empty(n, dtype=np.float32)
    for t in range(len(seeds), m):
        u = int(np.argmax(min_d2))
        near = np.flatnonzero(min_d2 >= min_d2[u] - slack)
        if len(near) > 1:  # within float32 error of the maximum: decide in float64, ties to the lowest index
            rows = near.astype(np.int64)
            exact = x[rows].astype(np.float64) @ chosen[:t].T
            exact *= -2.0
            exact += np.einsum("ij,ij->i", x[rows], x[rows], dtype=np.float64)[:, None]
            exact += chosen_sq[None, :t]
            best = exact.min(axis=1)
            u = int(rows[np.argmax(best)])
            distances[t] = np.sqrt(max(float(best.max()), 0.0))
        else:
            distances[t] = np.sqrt(max(float(min_d2[u]), 0.0))
        order[t] = u
        chosen[t] = x[u]
        chosen_sq[t] = chosen[t] @ chosen[t]
        np.dot(x, x[u], out=d2)
        d2 *= -2.0
        d2 += sq
        d2 += sq[u]
        np.minimum(min_d2, d2, out=min_d2)
        min_d2[u] = -np.inf
    radius = float(np.sqrt(max(float(min_d2.max()), 0.0))) if m < n else 0.0
    return (order, radius, distances) if return_distances else (order, radius)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 in float64 (a zero row stays zero: cosine 0 with everything)."""
    x = np.asarray(vectors, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def _walk(n: int, order: np.ndarray | list[int], m: int) -> np.ndarray:
    order = np.asarray(order, dtype=np.int64)
    if len(order) and (order.min() < 0 or order.max() >= n or len(np.unique(order)) != len(order)):
        raise ValueError(f"order must list distinct row indices in [0, {n})")
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}")
    return order


def repr_filter(vectors: np.ndarray, order: np.ndarray | list[int], m: int, tau: float = 0.9,
                *, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """DEITA's repr filter: walk ``order`` (row indices, best first) and accept a row unless its
    cosine similarity to a row accepted before it exceeds ``tau``; stop when ``m`` are accepted (or
    the order is exhausted, so fewer may come back). Returns ``(accepted, similarity)``: the
    accepted rows in acceptance order, and for each its largest cosine similarity to the rows
    accepted before it (NaN for the first)."""
    x = _as_matrix(vectors)
    order = _walk(x.shape[0], order, m)
    accepted = np.empty(min(m, len(order)), dtype=np.int64)
    similarity = np.full(len(accepted), np.nan)
    chosen = np.empty((len(accepted), x.shape[1]), dtype=np.float64)  # the accepted rows, unit length
    k = 0
    for start in range(0, len(order), block):
        if k == len(accepted):
            break
        rows = order[start:start + block]
        c = unit_rows(x[rows])
        before = (c @ chosen[:k].T).max(axis=1) if k else np.full(len(rows), -np.inf)  # vs accepted before the block
        k0 = k
        for j, row in enumerate(rows):
            if before[j] > tau:
                continue
            best = max(before[j], float((chosen[k0:k] @ c[j]).max())) if k > k0 else before[j]
            if best > tau:
                continue
            accepted[k], chosen[k] = row, c[j]
            similarity[k] = best if k else np.nan
            k += 1
            if k == len(accepted):
                break
    return accepted[:k], similarity[:k]


def nearest_neighbour_distances(vectors: np.ndarray) -> np.ndarray:
    """For each row, the cosine distance ``1 - cos`` to its nearest other row (exact, float64)."""
    u = unit_rows(_as_matrix(vectors))
    out = np.empty(u.shape[0])
    block = max(1, 2**25 // u.shape[0])  # rows of similarities at a time: at most 256 MiB
    for start in range(0, u.shape[0], block):
        sims = u[start:start + block] @ u.T
        sims[np.arange(sims.shape[0]), np.arange(start, start + sims.shape[0])] = -np.inf  # not itself
        out[start:start + block] = 1.0 - sims.max(axis=1)
    return out


def nearest_neighbour_filter(vectors: np.ndarray, order: np.ndarray | list[int], m: int,
                             min_distance: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """distilabel's ``DeitaFiltering`` rule: walk ``order`` and keep a row when its cosine distance
    to its nearest neighbour in the whole pool is at least ``min_distance``; stop at ``m``. Returns
    ``(kept, distance)``. Unlike :func:`repr_filter` a row's fate does not depend on what was kept
    before it: two near-duplicates are both dropped, even when neither has been kept."""
    x = _as_matrix(vectors)
    order = _walk(x.shape[0], order, m)
    distance = nearest_neighbour_distances(x)[order]
    keep = np.flatnonzero(distance >= min_distance)[:m]
    return order[keep], distance[keep]


# -- Prefect tasks ---------------------------------------------------------------------------------------


class Clusters(BaseModel):
    """k-means of a dataset's embeddings. ``anchors[j]``: the uid nearest centroid ``j``;
    ``path``: Parquet with ``uid, cluster, distance`` (to its centroid), under the store's home."""

    signal_id: str
    fingerprint: str
    k: int
    seed: int
    rows: int
    missing: int
    anchors: list[str]
    sizes: list[int]
    inertia: float
    path: str

    def assignment(self) -> pl.DataFrame:
        return pl.read_parquet(get_store().home / self.path)


class KCenter(BaseModel):
    """A k-center greedy choice: ``uids`` in pick order (seeds first), ``distances`` of the greedy
    picks to the set chosen before them (None for seeds), and the final covering ``radius``."""

    signal_id: str
    fingerprint: str
    uids: list[str]
    distances: list[float | None]
    seeds: int
    radius: float
    missing: int


def vector_inputs(signal: Signal, dataset: DatasetRef, **params: Any) -> dict[str, Any]:
    """What a result over a dataset's vectors depends on, as content: the signal id, the dataset
    fingerprint, how many of its examples have a vector now, and the parameters (never a path)."""
    have = get_store().signals.status(signal).filter(pl.col("ok"))
    present = dataset.read(["uid"]).join(have, on="uid", how="semi").height
    return {"signal": signal.id, "dataset": dataset.fingerprint, "present": present, **params}


def _kmeans_inputs(signal: Signal, dataset: DatasetRef, k: int, seed: int = 0, niter: int = 20) -> dict[str, Any]:
    return vector_inputs(signal, dataset, k=k, seed=seed, niter=niter)


def _kcenter_inputs(signal: Signal, dataset: DatasetRef, m: int, seed_uids: list[str] | None = None,
                    seed: int = 0, within: list[str] | None = None) -> dict[str, Any]:
    ordered = hashlib.sha256(canonical_json(seed_uids or []).encode()).hexdigest()[:32]  # seeds' order matters
    inputs = vector_inputs(signal, dataset, m=m, seed_uids=ordered, seed=seed)
    if within is not None:  # a subset of the pool: its content (the sorted uids), not its order
        inputs["within"] = hashlib.sha256(canonical_json(sorted(set(within))).encode()).hexdigest()[:32]
    return inputs


def _kmeans_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return derived_cache_key("kmeans", _kmeans_inputs(**parameters), version=VERSION)


def _kcenter_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return derived_cache_key("kcenter", _kcenter_inputs(**parameters), version=VERSION, fmt="json")


def dataset_vectors(signal: Signal, dataset: DatasetRef,
                    within: list[str] | None = None) -> tuple[list[str], np.ndarray, int]:
    wanted = dataset.read(["uid"])["uid"].sort()  # content order, not file order
    if within is not None:
        wanted = wanted.filter(wanted.is_in(list(set(within))))
    uids, x = load_vectors(signal, wanted)
    if not uids:
        raise ValueError(f"no vectors of {signal.id} for {dataset.name}@{dataset.version}: fill the signal first")
    missing = len(wanted) - len(uids)
    if missing:
        log.warning("%s: %d examples of %s have no vector and are left out", signal.id, missing, dataset.name)
    return uids, x, missing


@task(name="kmeans", cache_key_fn=_kmeans_key, persist_result=True, result_serializer="json")
def cluster_kmeans(signal: Signal, dataset: DatasetRef, k: int, seed: int = 0, niter: int = 20) -> Clusters:
    """k-means of the dataset's ``signal`` vectors; the assignment is a derived result (Parquet)."""

    def compute() -> tuple[pl.DataFrame, dict[str, Any]]:
        uids, x, missing = dataset_vectors(signal, dataset)
        used = min(k, len(uids))
        centroids, assignment = kmeans(x, used, seed=seed, niter=niter)
        distance = np.linalg.norm(x - centroids[assignment], axis=1)
        frame = pl.DataFrame({"uid": uids, "cluster": assignment.astype(np.int32),
                              "distance": distance.astype(np.float32)})
        return frame, {"k": used, "missing": missing, "anchors": [uids[i] for i in nearest(x, centroids)],
                       "sizes": np.bincount(assignment, minlength=used).tolist(),
                       "inertia": float((distance**2).sum())}

    found = get_store().derived.get_or_compute("kmeans", _kmeans_inputs(signal, dataset, k, seed, niter), compute,
                                               version=VERSION)
    return Clusters(signal_id=signal.id, fingerprint=dataset.fingerprint, seed=seed, rows=found.rows,
                    path=str(found.path.relative_to(get_store().home)), **found.meta)


@task(name="kcenter-greedy", cache_key_fn=_kcenter_key, persist_result=True, result_serializer="json")
def select_kcenter(signal: Signal, dataset: DatasetRef, m: int, seed_uids: list[str] | None = None,
                   seed: int = 0, within: list[str] | None = None) -> KCenter:
    """k-center greedy over the dataset's ``signal`` vectors, from ``seed_uids`` (those without a
    vector are skipped) or one seeded-random example, until ``m`` are chosen. ``within`` restricts
    the pool to those uids (e.g. the examples a method's filter let through)."""

    def compute() -> dict[str, Any]:
        uids, x, missing = dataset_vectors(signal, dataset, within)
        row = {u: i for i, u in enumerate(uids)}
        seeds = list(dict.fromkeys(row[u] for u in (seed_uids or []) if u in row))
        order, radius, distances = kcenter_greedy(x, min(m, len(uids)), seeds or None, seed, return_distances=True)
        return {"uids": [uids[i] for i in order], "distances": [None if np.isnan(d) else float(d) for d in distances],
                "seeds": len(seeds), "radius": radius, "missing": missing}

    inputs = _kcenter_inputs(signal, dataset, m, seed_uids, seed, within)
    found = get_store().derived.get_or_compute("kcenter", inputs, compute, version=VERSION, fmt="json")
    return KCenter(signal_id=signal.id, fingerprint=dataset.fingerprint, **found.read())


class ReprChoice(BaseModel):
    """A walk of DEITA's diversity filter over a dataset's vectors in a given order: the accepted
    ``uids`` in acceptance order with, for each, ``values``: its largest cosine similarity to those
    accepted before it (``rule="repr"``; None for the first) or its cosine distance to its nearest
    neighbour in the pool (``rule="nearest_neighbour"``); ``walked``: how far into the order the walk
    went; ``missing``: examples of the order without a vector (skipped)."""

    signal_id: str
    rule: str
    threshold: float
    uids: list[str]
    values: list[float | None]
    walked: int
    missing: int


def _repr_inputs(signal: Signal, dataset: DatasetRef, order: list[str], m: int, threshold: float,
                 rule: str) -> dict[str, Any]:
    ordered = hashlib.sha256(canonical_json(order).encode()).hexdigest()[:32]  # the order is an input
    return vector_inputs(signal, dataset, order=ordered, m=m, threshold=threshold, rule=rule)


def _repr_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return derived_cache_key("repr-filter", _repr_inputs(**parameters), version=VERSION, fmt="json")


@task(name="repr-filter", cache_key_fn=_repr_key, persist_result=True, result_serializer="json")
def select_repr(signal: Signal, dataset: DatasetRef, order: list[str], m: int, threshold: float = 0.9,
                rule: str = "repr") -> ReprChoice:
    """Walk ``order`` (uids of the dataset, best first) over the ``signal`` vectors with
    :func:`repr_filter` (``rule="repr"``, ``threshold`` = tau, a cosine similarity) or
    :func:`nearest_neighbour_filter` (``rule="nearest_neighbour"``, ``threshold`` = the least cosine
    distance to the nearest neighbour in the dataset), to ``m`` examples."""
    if rule not in ("repr", "nearest_neighbour"):
        raise ValueError(f"unknown rule {rule!r}: repr or nearest_neighbour")

    def compute() -> dict[str, Any]:
        uids, x, _ = dataset_vectors(signal, dataset)
        row = {u: i for i, u in enumerate(uids)}
        walk = np.asarray([row[u] for u in order if u in row], dtype=np.int64)
        if rule == "repr":
            chosen, values = repr_filter(x, walk, m, threshold)
        else:  # the nearest neighbour is sought among every example of the dataset with a vector
            chosen, values = nearest_neighbour_filter(x, walk, m, threshold)
        position = {int(r): i for i, r in enumerate(walk)}
        return {"uids": [uids[i] for i in chosen], "values": [None if np.isnan(v) else float(v) for v in values],
                "walked": position[int(chosen[-1])] + 1 if len(chosen) == m else len(walk),
                "missing": len(order) - len(walk)}

    found = get_store().derived.get_or_compute("repr-filter", _repr_inputs(signal, dataset, order, m, threshold, rule),
                                               compute, version=VERSION, fmt="json")
    return ReprChoice(signal_id=signal.id, rule=rule, threshold=threshold, **found.read())
