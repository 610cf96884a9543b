"""DQ, dataset quantization (Zhou et al. 2023, "Dataset Quantization"; its instruction-tuning
experiment selects from Alpaca).

1. Embed every example: instruction, input and output together.
2. Bin generation: split the pool into ``k`` non-overlapping bins of size N/k, one after another.
   Bin b is filled greedily from ``D_b``, the examples no earlier bin took, by the GraphCut gain

       g(x) = lambda * sum_{j in D_b} s(j, x) - 2 * sum_{i in S} s(i, x),     s(i, x) = <e_i, e_x>

   where ``S`` is the bin so far; each step adds ``argmax_{x in D_b \\ S} g(x)``. The first term
   favours examples that represent what remains, the second keeps a bin from holding near-copies.
3. Bin sampling: draw n/k examples uniformly at random from every bin (n = the budget), so the
   selection covers every bin, from the most representative to the most peculiar.

Speed: with a dot-product similarity both sums are dot products with sums of vectors,
``sum_{j in D} s(j, x) = <e_x, sum_{j in D} e_j>``, and adding ``u`` to ``S`` lowers every gain by
``2 <e_x, e_u>``. So each pick is one float32 matrix-vector product over the examples a bin may
take, accumulated in float64: O(N^2 d / 2) in all and no N x N similarity matrix (the public code
fills one per bin).

Defaults: ratio (budget) 0.1, ``k = 10``, ``lambda = 1``, as in the public code's defaults; the
released Alpaca subsets were made with ``k = 5``.

Deviations: the paper embeds with OpenAI's text-embedding-ada-002; the default here is the sentence
encoder of ``settings().encoder`` (all-MiniLM-L6-v2, unit vectors, so ``s`` is the cosine). ``D_b``
is fixed while bin b fills, as in the public code (its column sums are computed once per bin).
When N is not a multiple of k the first ``N mod k`` bins hold one more example (the public code
leaves the remainder out of every bin), and when n is not a multiple of k the first ``n mod k`` bins
give one more (the public code draws ``int(n / k)`` from each and so returns fewer than n). Within
an example's bin, ties in the gain go to the lowest index (examples in uid order). Examples whose
embedding failed are in no bin and never chosen.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
from prefect import flow, task
from prefect.context import TaskRunContext
from threadpoolctl import threadpool_limits
from pydantic import BaseModel, Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage import Signal
from sft_select.tasks.cluster import dataset_vectors, vector_inputs
from sft_select.tasks.signal_task import DatasetRef, get_store
from sft_select.tasks.derived import derived_cache_key
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget

VERSION = "1"


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one, the larger ones first."""
    return [total // parts + (1 if b < total % parts else 0) for b in range(parts)]


def graphcut_bins(vectors: np.ndarray, k: int, lam: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DQ's bin generation. Returns, per row: its bin (0..k-1), its pick order within the bin, and
    the GraphCut gain it had when it was picked."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of vectors ({n}), got {k}")
    bins, picks, gains = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float64)
    remaining = np.arange(n)
    # A matrix-vector product is bound by memory, not arithmetic: more BLAS threads only spin (8x slower
    # measured on a busy 2-core machine), so the loop runs on one.
    with threadpool_limits(1, user_api="blas"):
        for b, size in enumerate(split_sizes(n, k)):
            remaining = _fill_bin(x, remaining, size, lam, b, bins, picks, gains)
    return bins, picks, gains


def _fill_bin(x: np.ndarray, remaining: np.ndarray, size: int, lam: float, b: int, bins: np.ndarray,
              picks: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Fill bin ``b`` greedily from the rows ``remaining`` (D_b); returns the rows left after it."""
    rows = x[remaining]
    # lambda * sum_{j in D_b} s(j, x) for every x, through the sum of D_b's vectors
    gain = lam * (rows @ rows.sum(axis=0, dtype=np.float64).astype(np.float32)).astype(np.float64)
    taken = np.zeros(len(remaining), dtype=bool)
    for t in range(size):
        u = int(np.argmax(gain))  # ties: the lowest index
        bins[remaining[u]], picks[remaining[u]], gains[remaining[u]] = b, t, gain[u]
        taken[u] = True
        gain -= 2.0 * (rows @ rows[u])  # u joins S: every gain drops by 2 s(u, x)
        gain[taken] = -np.inf
    return remaining[~taken]


def sample_bins(bins: np.ndarray, n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform draws without replacement: ``n/k`` row indices from every bin (the first ``n mod k``
    bins give one more), each bin's draw in its random order."""
    rng = np.random.default_rng(seed)
    draws = []
    for b, quota in enumerate(split_sizes(n, k)):
        members = np.flatnonzero(bins == b)
        if quota > len(members):
            raise ValueError(f"bin {b} holds {len(members)} examples, fewer than the {quota} to draw")
        draws.append(rng.choice(members, quota, replace=False))
    return draws


class Bins(BaseModel):
    """DQ's bins of a dataset's embeddings: ``path`` is Parquet with ``uid, bin, pick, gain`` under
    the store's home."""

    signal_id: str
    fingerprint: str
    k: int
    lam: float
    rows: int
    missing: int
    sizes: list[int]
    path: str

    def assignment(self) -> pl.DataFrame:
        return pl.read_parquet(get_store().home / self.path)


def _bins_inputs(signal: Signal, dataset: DatasetRef, k: int, lam: float = 1.0) -> dict[str, Any]:
    return vector_inputs(signal, dataset, k=k, lam=lam)


def _bins_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    return derived_cache_key("dq-bins", _bins_inputs(**parameters), version=VERSION)


@task(name="dq-bins", cache_key_fn=_bins_key, persist_result=True, result_serializer="json")
def quantize_bins(signal: Signal, dataset: DatasetRef, k: int, lam: float = 1.0) -> Bins:
    """Bin generation over the dataset's ``signal`` vectors (examples in uid order); the bins are a
    derived result (Parquet)."""

    def compute() -> tuple[pl.DataFrame, dict[str, Any]]:
        uids, x, missing = dataset_vectors(signal, dataset)
        used = min(k, len(uids))
        bins, picks, gains = graphcut_bins(x, used, lam)
        frame = pl.DataFrame({"uid": uids, "bin": bins.astype(np.int32), "pick": picks.astype(np.int32),
                              "gain": gains})
        return frame, {"k": used, "missing": missing, "sizes": np.bincount(bins, minlength=used).tolist()}

    found = get_store().derived.get_or_compute("dq-bins", _bins_inputs(signal, dataset, k, lam), compute,
                                               version=VERSION)
    return Bins(signal_id=signal.id, fingerprint=dataset.fingerprint, lam=lam, rows=found.rows,
                path=str(found.path.relative_to(get_store().home)), **found.meta)


class DQParams(MethodParams):
    bins: int = Field(10, ge=1, description="k, the number of bins (the released Alpaca subsets used 5).")
    lam: float = Field(1.0, description="lambda of the GraphCut gain: weight of representing what remains.")
    encoder: str | None = Field(None, description="Sentence encoder (name or local folder); the configured default "
                                                  "when empty. A causal LM with pooling 'mean'.")
    pooling: Literal["sentence", "mean"] = Field("sentence", description="'sentence' encoder, or mean-pooled "
                                                                          "hidden states of a causal LM.")
    max_tokens: int = Field(256, ge=8, description="Texts are truncated to this many tokens before embedding.")


@flow(name="dq", log_prints=True)
def dq(params: DQParams) -> SelectionRef:
    """Dataset quantization: k GraphCut bins in sequence, then n/k uniform draws from every bin."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    signal = embed_signal(params.encoder, field="full", max_tokens=params.max_tokens, pooling=params.pooling)

    embedded = embed(signal, dataset)
    bins = quantize_bins(signal, dataset, params.bins, params.lam)
    m = min(resolve_budget(params.budget, dataset.rows), bins.rows)
    table = bins.assignment()
    draws = sample_bins(table["bin"].to_numpy(), m, bins.k, seed=params.seed)

    # round-robin over the bins, so that any prefix of the selection is spread over them too
    order = [d[j] for j in range(max(len(d) for d in draws)) for d in draws if j < len(d)]
    chosen = table[np.asarray(order, dtype=np.int64)]
    selection = chosen.select(
        "uid", pl.col("gain").alias("score"),
        pl.format("bin {}/{} (pick {} of {}, GraphCut gain {}), drawn uniformly", pl.col("bin") + 1, pl.lit(bins.k),
                  pl.col("pick") + 1, pl.col("bin").replace_strict(list(range(bins.k)), bins.sizes),
                  pl.col("gain").round(3)).alias("reason"))
    publish_table("dq-bins", [{"bin": b + 1, "examples": s, "drawn": len(d)}
                              for b, (s, d) in enumerate(zip(bins.sizes, draws))],
                  f"DQ bins of {dataset.name}@{dataset.version} (k={bins.k}, lambda={bins.lam})")
    print(f"dq: {selection.height} of {dataset.rows} examples, {m // bins.k}-{-(-m // bins.k)} from each of "
          f"{bins.k} bins" + (f"; {bins.missing} examples without an embedding left out" if bins.missing else ""))
    return finish("dq", params, dataset, selection, [embedded])
