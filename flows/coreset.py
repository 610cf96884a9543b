"""Coreset (Chen et al. 2023a, "Maybe Only 0.5% Data is Needed: A Preliminary Exploration of Low
Training Data Instruction Tuning").

1. Embed every example: mean-pooled sentence embeddings, L2-normalised.
2. k-means into ``clusters`` groups.
3. Start from the example nearest each cluster centre, then k-center greedy (Sener & Savarese
   2018) until ``m`` are chosen: each step adds the example farthest from everything chosen so far,

       u = argmax_i min_{c in S} ||x_i - x_c||.

The order of the selection is the pick order: the centre examples first, then the greedy picks;
a greedy pick's score is its distance to the set chosen before it (it decreases along the order),
the centre examples have none.

Deviations: the paper embeds with the last hidden state of the language model being tuned; the
default here is the sentence encoder of ``settings().encoder`` (all-MiniLM-L6-v2), and
``pooling="mean"`` with a causal LM in ``encoder`` gives the paper's form. The paper does not fix
the number of clusters; ``clusters`` (default 100, at most ``m``) is ours. Examples whose embedding
failed cannot be placed and are never chosen.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.cluster import cluster_kmeans, select_kcenter
from sft_select.tasks.signal_task import DatasetRef
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.select import resolve_budget


class CoresetParams(MethodParams):
    encoder: str | None = Field(None, description="Sentence encoder (name or local folder); the configured "
                                                  "default when empty. A causal LM with pooling 'mean'.")
    pooling: Literal["sentence", "mean"] = Field(
        "sentence", description="'sentence': a sentence-transformers encoder; 'mean': mean-pooled last hidden "
                                "states of a causal LM (the paper's form).")
    field: Literal["prompt", "output", "full"] = Field(
        "prompt", description="What is embedded: the prompt (instruction and input), the output, or both.")
    max_tokens: int = Field(256, ge=8, description="Texts are truncated to this many tokens before embedding.")
    clusters: int = Field(100, ge=1, description="k of k-means; the examples nearest the centres start the "
                                                 "k-center greedy (capped at the budget).")


@flow(name="coreset", log_prints=True)
def coreset(params: CoresetParams) -> SelectionRef:
    """Cover the embedding space: k-means centres, then k-center greedy to the budget."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    m = resolve_budget(params.budget, dataset.rows)
    signal = embed_signal(params.encoder, field=params.field, max_tokens=params.max_tokens, pooling=params.pooling)

    embedded = embed(signal, dataset)
    clusters = cluster_kmeans(signal, dataset, min(params.clusters, m), seed=params.seed)
    chosen = select_kcenter(signal, dataset, m, seed_uids=clusters.anchors, seed=params.seed)

    size: dict[str, int] = {}
    for u, s in zip(clusters.anchors, clusters.sizes):  # two centres may share their nearest example
        size[u] = size.get(u, 0) + s
    reasons = [
        f"nearest to a k-means centre (cluster of {size[u]})" if d is None
        else f"k-center pick {t - chosen.seeds + 1}: {d:.4f} from the chosen set"
        for t, (u, d) in enumerate(zip(chosen.uids, chosen.distances))
    ]
    selection = pl.DataFrame({"uid": chosen.uids, "score": chosen.distances, "reason": reasons},
                             schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})
    print(f"coreset: {chosen.seeds} cluster-centre examples + {len(chosen.uids) - chosen.seeds} k-center picks "
          f"of {dataset.rows}; covering radius {chosen.radius:.4f}"
          + (f"; {chosen.missing} examples without an embedding left out" if chosen.missing else ""))
    return finish("coreset", params, dataset, selection, [embedded])
