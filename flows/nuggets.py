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
  5. Keep ``GS >= threshold`` (the paper reports 0.5 to 0.9) or the top m (the paper's best: the top
     1%, the default here).

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
- Lengths: an anchor's prompt and answer are cut to ``max_length`` tokens (the answer's end first),
  and so is each demonstration; an anchor with no answer token left is not used.
- The authors' code runs each demonstration once and passes its attention keys/values to every
  anchor; here every (candidate, anchor) pair is one sequence of the batched loss engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.settings import settings
from sft_select.storage import BatchResult, Outcome, Signal, fingerprint
from sft_select.storage.signals import Compute
from sft_select.tasks.backends.lm import Encoded, answer_losses, encode_many, render
from sft_select.tasks.backends.models import load_causal_lm, model_identity
from sft_select.tasks.cluster import cluster_kmeans
from sft_select.tasks.core import DatasetRef, get_store, signal_task
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.lm_loss import Precision, by_length
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget, select

NuggetsTemplate = Literal["alpaca", "none"]
SEPARATOR = "\n\n"  # between the demonstration and the anchor's prompt


@dataclass(frozen=True)
class Anchors:
    """The anchors, ready to be scored against: each one's zero-shot sequence (prompt, answer), its
    prompt's ids without the tokenizer's leading special tokens (what follows a demonstration), and
    its zero-shot loss ``s_zs``. Anchors with no answer token within ``max_length`` are left out."""

    uids: list[str]
    zero_shot: list[Encoded]
    continuation: list[tuple[int, ...]]
    losses: np.ndarray


def prepare_anchors(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *,
                    template: NuggetsTemplate = "alpaca", max_length: int = 512, token_budget: int = 8192,
                    bf16: bool = False) -> Anchors:
    """Tokenise the anchors (canonical rows with ``uid``) and compute their zero-shot losses."""
    texts = [render(row, tokenizer, template) for row in rows]
    encoded = [e.truncate(max_length) for e in encode_many(tokenizer, [c for c, _ in texts], [a for _, a in texts])]
    keep = [i for i, e in enumerate(encoded) if e.answer]
    continuation = tokenizer([texts[i][0] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
    zero_shot = [encoded[i] for i in keep]
    return Anchors(uids=[rows[i]["uid"] for i in keep], zero_shot=zero_shot,
                   continuation=[tuple(c) for c in continuation],
                   losses=answer_losses(model, zero_shot, token_budget=token_budget, bf16=bf16))


def demonstrations(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, template: NuggetsTemplate = "alpaca",
                   max_length: int = 512) -> list[tuple[int, ...]]:
    """Each candidate written out in full (prompt, answer, blank line), at most ``max_length`` ids."""
    texts = [context + answer + SEPARATOR for context, answer in (render(row, tokenizer, template) for row in rows)]
    return [tuple(ids[:max_length]) for ids in tokenizer(texts)["input_ids"]]


def one_shot_losses(model: Any, demos: Sequence[tuple[int, ...]], anchors: Anchors, *, token_budget: int = 8192,
                    bf16: bool = False) -> np.ndarray:
    """``s_os(j | c)`` for every demonstration (rows) and anchor (columns): the anchor's zero-shot
    answer ids after the demonstration and the anchor's prompt, all pairs in one batched pass."""
    items = [Encoded(demo + cont, zs.answer) for demo in demos for cont, zs in zip(anchors.continuation,
                                                                                  anchors.zero_shot)]
    return answer_losses(model, items, token_budget=token_budget, bf16=bf16).reshape(len(demos), len(anchors.uids))


def golden_score_signal(model: str, anchor_uids: Sequence[str], *, template: NuggetsTemplate = "alpaca",
                        max_length: int = 512, precision: Precision = "float32") -> Signal:
    """``golden_score`` of a candidate against one anchor set (its fingerprint is a parameter).
    Reads ``messages``, ``instruction``, ``input``; writes one float in [0, 1]."""
    return Signal("golden_score", {"model": model_identity(model), "template": template, "max_length": max_length,
                                   "precision": precision, "anchors": fingerprint(list(anchor_uids)),
                                   "n_anchors": len(set(anchor_uids))}, version="1", kind="float")


def build_golden_score(signal: Signal, anchors: pl.DataFrame, token_budget: int = 8192) -> Compute:
    """The batch function of a ``golden_score`` signal: loads the model, computes the anchors'
    zero-shot losses once, then scores batches of candidates against every anchor."""
    p = signal.params
    if fingerprint(anchors["uid"]) != p["anchors"]:
        raise ValueError("these anchors are not the ones the golden_score signal was defined with")
    model, tokenizer = load_causal_lm(p["model"])
    fmt, speed = {"template": p["template"], "max_length": p["max_length"]}, {
        "token_budget": token_budget, "bf16": p["precision"] == "bfloat16"}
    prepared = prepare_anchors(model, tokenizer, anchors.to_dicts(), **fmt, **speed)
    if not prepared.uids:
        raise ValueError(f"no anchor has an answer token within max_length={p['max_length']}")
    anchor_tokens = sum(len(c) + len(z.answer) for c, z in zip(prepared.continuation, prepared.zero_shot))

    def compute(batch: pl.DataFrame) -> BatchResult:
        demos = demonstrations(tokenizer, batch.to_dicts(), **fmt)
        one_shot = one_shot_losses(model, demos, prepared, **speed)
        wins = one_shot < prepared.losses[None, :]
        outcomes = [Outcome(value=float(w.mean()),
                            raw=json.dumps({"anchors_improved": int(w.sum()), "anchors": len(prepared.uids),
                                            "mean_loss_change": round(float((o - prepared.losses).mean()), 6)}))
                    for w, o in zip(wins, one_shot)]
        tokens = sum(len(d) * len(prepared.uids) + anchor_tokens for d in demos)
        return BatchResult(outcomes, {"prompt_tokens": float(tokens)})

    return compute


class NuggetsParams(MethodParams):
    budget: float | None = Field(0.01, description="Keep at most this many of the best: a count (>= 1) or a "
                                                   "fraction (< 1; the paper's top 1%); empty: no cap.")
    threshold: float | None = Field(None, ge=0, le=1, description="Keep golden scores >= this (the paper reports "
                                                                  "0.5 to 0.9); empty: no threshold.")
    anchors: int = Field(100, ge=1, description="k-means clusters; the example nearest each centroid is an anchor.")
    encoder: str | None = Field(None, description="Embedding model of the clustering; empty: the configured "
                                                  "sentence encoder.")
    pooling: Literal["sentence", "mean"] = Field(
        "sentence", description="sentence: a sentence encoder; mean: mean-pooled hidden states of a causal LM "
                                "named in encoder (the authors' form).")
    field: Literal["prompt", "full"] = Field("full", description="Text embedded for the clustering.")
    model: str | None = Field(None, description="Causal LM that scores; empty: the configured local model.")
    template: NuggetsTemplate = Field("alpaca", description="Prompt format of demonstrations and anchors.")
    max_length: int = Field(512, ge=16, description="Tokens of an anchor (prompt + answer) and of a demonstration.")
    precision: Precision = Field("float32", description="bfloat16 runs the losses under bf16 autocast.")
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
                                 precision=params.precision)
    golden_score = signal_task("golden_score", partial(build_golden_score, anchors=anchors),
                               batch_size=params.batch_size, order_by=by_length)
    scored = golden_score(signal, dataset)
    scores = get_store().signals.values(signal, dataset.read(["uid"])["uid"], alias="score")

    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    selection = select(scores, m=m, threshold=params.threshold, label="golden score")
    bins = (scores.drop_nulls("score").group_by(bin=(pl.col("score") * 10).floor().clip(0, 9) / 10)
            .len("examples").sort("bin"))
    publish_table("nuggets-golden-scores",
                  [{"golden score": f"[{b:.1f}, {b + 0.1:.1f}{']' if b >= 0.9 else ')'}", "examples": n}
                   for b, n in bins.iter_rows()],
                  f"golden scores against {len(anchor_uids)} anchors on {dataset.name}@{dataset.version}")
    print(f"nuggets: {selection.height} of {dataset.rows} kept; {len(anchor_uids)} anchors; "
          f"{scored.computed} scored now, {scored.reused} reused, {scored.errors} errors")
    return finish("nuggets", params, dataset, selection, [embedded, scored])
