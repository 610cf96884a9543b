"""Nuggets (Li et al. 2023c, "One Shot Learning as Instruction Data Prospector for Large Language
Models").

An example is worth training on when, shown as a one-shot demonstration, it helps the model answer
many different tasks. Algorithm:

  1. Anchors (the paper's predefined task set): embed every example, k-means into ``anchors``
     (100) clusters, and take the example nearest each centroid.
  2. Zero-shot: for each anchor ``j``, ``s_zs(j) = s(A_j | Q_j)``, the mean cross-entropy of its
     answer tokens after its prompt.
  3. One-shot: for each candidate ``c`` (every example of the pool) and anchor ``j``,
     ``s_os(j | c) = s(A_j | c, Q_j)``: the same answer tokens, with ``c`` written out in full
     (prompt and answer, then a blank line) in front of anchor ``j``'s prompt.
  4. Golden score::

         GS(c) = (1 / |anchors|) * sum_j 1[ s_os(j | c) < s_zs(j) ]

     the fraction of anchors whose answer the demonstration makes more likely (comparing mean
     losses over the same tokens is comparing their summed log-likelihoods, as the authors do).
  5. Keep ``GS > threshold`` (strictly, as the authors' code; the paper reports 0.5 to 0.9) or the
     top m (the paper's best: the top 1%, the default here).

Cost: ``|anchors| x |pool|`` sequences. Each durable batch of ``batch_size`` candidates is scored
against every anchor in one pass of the loss engine (all pairs length-sorted into padded batches
under a token budget, logits only from the answer on). The golden score is a ``golden_score``
signal whose parameters include the anchor set's fingerprint (the hash of its sorted uids), so a
run with the same anchors reuses every score, and other anchors give another signal.

Deviations:
- Model: the embedded SmolLM2-135M-Instruct by default (the paper: LLaMA-7B); any causal LM in
  ``model``.
- Prompt: the Stanford Alpaca template, preamble included, for the demonstration and for the
  anchor (``template="none"``: instruction and input lines only). The authors' code writes
  ``Instruction:/Input:/Response:`` headers with no preamble.
- Anchor embeddings: a sentence encoder (all-MiniLM-L6-v2 by default) of the whole example
  (``field="full"``, instruction, input and response, as the authors' code embeds); their
  vectors are mean-pooled LLaMA hidden states (``pooling="mean"`` with a causal LM as ``encoder``
  gives that form). Two centroids may share their nearest example, leaving fewer anchors.
- Lengths: an anchor's prompt and answer are cut to ``anchor_max_length`` tokens (200, the authors'
  cut; the answer's end goes first, the prompt is kept whole), each demonstration to ``max_length``
  (512); an anchor with no answer token left is not used.
- The authors' code runs each demonstration once and passes its attention keys/values to every
  anchor; here every (candidate, anchor) pair is one sequence of the batched loss engine.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.settings import settings
from sft_select.tasks.cluster import cluster_kmeans
from sft_select.tasks.signal_task import DatasetRef, get_store, signal_task
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.golden_score import ANCHOR_MAX_LENGTH, NuggetsTemplate, build_golden_score, golden_score_signal
from sft_select.tasks.lm_loss import Precision, by_length
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget, select


class NuggetsParams(MethodParams):
    budget: float | None = Field(0.01, description="Keep at most this many of the best: a count (>= 1) or a "
                                                   "fraction (< 1; the paper's top 1%); empty: no cap.")
    threshold: float | None = Field(None, ge=0, le=1, description="Keep golden scores > this, strictly, as the "
                                                                  "authors' code (the paper reports 0.5 to 0.9); "
                                                                  "empty: no threshold.")
    anchors: int = Field(100, ge=1, description="k-means clusters; the example nearest each centroid is an anchor.")
    encoder: str | None = Field(None, description="Embedding model of the clustering; empty: the configured "
                                                  "sentence encoder.")
    pooling: Literal["sentence", "mean"] = Field(
        "sentence", description="sentence: a sentence encoder; mean: mean-pooled hidden states of a causal LM "
                                "named in encoder (the authors' form).")
    field: Literal["prompt", "full"] = Field("full", description="Text embedded for the clustering.")
    model: str | None = Field(None, description="Causal LM that scores; empty: the configured local model.")
    template: NuggetsTemplate = Field("alpaca", description="Prompt format of demonstrations and anchors.")
    max_length: int = Field(512, ge=16, description="Tokens of a demonstration (prompt + answer).")
    anchor_max_length: int = Field(ANCHOR_MAX_LENGTH, ge=16, description="Tokens of an anchor (prompt + answer; "
                                                                         "the authors' 200).")
    precision: Precision = Field("float32", description="bfloat16: the losses under bf16 autocast (where this CPU or GPU "
                                                         "runs bf16 fast); int8: dynamically quantised linear layers (CPU; "
                                                         "failed the validation on SmolLM2, docs/results.md).")
    batch_size: int = Field(16, ge=1, description="Candidates per durable batch (each scored against every anchor).")


@flow(name="nuggets", log_prints=True)
def nuggets(params: NuggetsParams) -> SelectionRef:
    """Score every example by the fraction of anchors it helps as a one-shot demonstration."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    params = params.model_copy(update={"model": params.model or settings().local_llm})
    embedding = embed_signal(params.encoder, field=params.field, pooling=params.pooling)
    embedded = embed(embedding, dataset)
    clusters = cluster_kmeans(embedding, dataset, min(params.anchors, dataset.rows), seed=params.seed)
    anchor_uids = sorted(set(clusters.anchors))
    anchors = dataset.read().join(pl.DataFrame({"uid": anchor_uids}), on="uid", how="semi").sort("uid")

    signal = golden_score_signal(params.model, anchor_uids, template=params.template, max_length=params.max_length,
                                 anchor_max_length=params.anchor_max_length, precision=params.precision)
    golden_score = signal_task("golden_score", partial(build_golden_score, anchors=anchors),
                               batch_size=params.batch_size, order_by=by_length)
    scored = golden_score(signal, dataset)
    scores = get_store().signals.values(signal, dataset.read(["uid"])["uid"], alias="score")

    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    selection = select(scores, m=m, threshold=params.threshold, strict=True, label="golden score")
    bins = (scores.drop_nulls("score").group_by(bin=(pl.col("score") * 10).floor().clip(0, 9) / 10)
            .len("examples").sort("bin"))
    publish_table("nuggets-golden-scores",
                  [{"golden score": f"[{b:.1f}, {b + 0.1:.1f}{']' if b >= 0.9 else ')'}", "examples": n}
                   for b, n in bins.iter_rows()],
                  f"golden scores against {len(anchor_uids)} anchors on {dataset.name}@{dataset.version}")
    print(f"nuggets: {selection.height} of {dataset.rows} kept; {len(anchor_uids)} anchors; "
          f"{scored.computed} scored now, {scored.reused} reused, {scored.errors} errors")
    return finish("nuggets", params, dataset, selection, [embedded, scored])
