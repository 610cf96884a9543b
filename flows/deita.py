"""DEITA (Liu et al. 2023, "What Makes Good Data for Alignment? A Comprehensive Study of Automatic
Data Selection in Instruction Tuning").

Score-first, diversity-aware selection::

    for every example x and every exchange t of it (user turn q_t, its answer r_t, judged alone):
        c_t = sum_k k * p(k | complexity prompt of q_t)        k = 1..6, p renormalised over "1".."6"
        q_t = sum_k k * p(k | quality prompt of q_t, r_t)      (the first generated token's distribution)
    evol(x) = sum_t c_t * q_t                                 # the "evol score"
    S = []
    for x in the pool by evol(x), highest first:              # the repr filter
        e_x = last-layer hidden state of the last token of x, under a causal LM
        if max_{s in S} cos(e_x, e_s) <= tau:  S = S + [x]    # tau = 0.9
        if |S| = m: stop

Paper: complexity and quality scorers are LLaMA-1-13B models fine-tuned on ChatGPT's 1-6 scores of
Evol-Instruct variants; embeddings from a causal LM's last token (the authors' code: Mistral-7B, the
conversation in a chat template, 2,048 tokens); tau = 0.9; m = 6,000 from a pool of about 306,000
(58k ShareGPT + 105k UltraChat + 143k WizardLM; the deita-6k-v0 data card), i.e. 1.96% of the pool.
Paper result: 6k selected, MT-Bench 7.22 against 5.89 for 10k random (Mistral-7B).

Defaults here: ``budget`` = 6,000 / 306,000 of the pool (the paper's m as the share of its pool it
kept; a count may be given instead); ``tau`` = 0.9; embeddings: the last token of the whole
conversation in the embedding model's own chat template (ending on its end-of-turn token, as the
authors' template ends on ``</s>``), last layer, 2,048 tokens, from ``encoder`` (the local SmolLM2 by
default; any causal LM, or ``pooling="sentence"`` for a sentence encoder). Ties of the evol score go
to the lower uid.

Judges (``judge``, and ``quality_judge`` when the two scores come from two models):
- ``prompts="rubric"`` (default): our own wording of the paper's scales for an instruction-following
  judge (``tasks/prompts.py``): complexity along the in-depth evolving directions (constraints,
  deepening, concretizing, reasoning steps, complicated input); quality along the Evol-Quality ones
  (helpfulness, relevance, depth, creativity, detail); the judge answers with one digit.
- ``prompts="scorer"``: the input format of the released scorers (hkust-nlp/deita-complexity-scorer and
  deita-quality-scorer), sent as one raw prompt. Through the local backend (``local:<folder or hub
  id>``) a model without a chat template gets it as it is, with its start token, as the authors'
  code; through an OpenAI-compatible server (vLLM), serve each scorer with a pass-through chat
  template (``--chat-template`` holding ``{{ bos_token }}{{ messages[0]['content'] }}``).

Multi-turn data (lima_1k's ``history``) keeps its turns: each exchange is scored alone, as the
authors' pipeline does. The two signals are stored per exchange, keyed by the exchange's own content
id (a single-turn example without a system turn is its own exchange, so its scores sit under its
own uid); the evol score is summed per example when selecting. An example with a turn whose score
failed has no evol score and is not selected (counted as failed).

Deviations: the judges are any backend (a 135M local judge by default, far weaker than the paper's
13B scorers). The local backend returns the log-probs of all six label tokens whatever their rank,
so its expected score is the authors' (softmax over the six label logits); an OpenAI-compatible
server returns its top 20 (OpenAI's maximum), and a label outside them counts as probability 0 (the
authors' code returned 3.0 when one was missing, and on any failure: here a failure is stored as an
error with the raw answer). The system turn is left out of the scored exchanges and included in the
embedded conversation. tau = 0.9 belongs to the paper's 7B-13B embeddings: a small model's
last-token states are strongly anisotropic (SmolLM2 on the demo pool: median pairwise cosine 0.93),
so at 0.9 the filter keeps few and a selection may fall short of m; raise ``tau`` or use a sentence
encoder there. ``diversity="distilabel"`` is distilabel's
``DeitaFiltering`` rule instead of the paper's: keep, by evol score, the examples whose cosine
distance to their nearest neighbour in the whole pool is >= ``nn_distance`` (0.9), a different and
much stricter rule.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage import Signal
from sft_select.storage.examples import exchanges
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.cluster import select_repr
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.judge import llm_signal, score_exchanges_with_llm
from sft_select.tasks.prompts import DEITA
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef, get_store

PAPER_M, PAPER_POOL = 6_000, 306_000  # deita-6k-v0: 6k of 58k ShareGPT + 105k UltraChat + 143k WizardLM
PAPER_SHARE = PAPER_M / PAPER_POOL
PAPER_TAU = 0.9


def evol_scores(examples: pl.DataFrame, complexity: Signal, quality: Signal) -> pl.DataFrame:
    """``uid, score, turns``: the evol score sum_t c_t * q_t of each example over its exchanges, read
    from the two per-exchange signals; null when a turn lacks either score."""
    turns = exchanges(examples).select("example", "turn", "uid")
    store = get_store()
    c = store.signals.values(complexity, turns["uid"].unique(), alias="c")
    q = store.signals.values(quality, turns["uid"].unique(), alias="q")
    scored = turns.join(c, on="uid", how="left").join(q, on="uid", how="left")
    per_example = scored.group_by("example").agg(
        score=(pl.col("c") * pl.col("q")).sum(), turns=pl.len(),
        complete=(pl.col("c").is_not_null() & pl.col("q").is_not_null()).all())
    return (examples.select("uid").join(per_example, left_on="uid", right_on="example", how="left",
                                        maintain_order="left")
            .select("uid", pl.when(pl.col("complete")).then(pl.col("score")).alias("score"), "turns"))


class DeitaParams(MethodParams):
    budget: float | None = Field(
        PAPER_SHARE, description="m: a count (>= 1) or a fraction of the pool (< 1); default the paper's 6,000 of "
                                 "its 306,000-example pool (1.96%).")
    judge: str | None = Field(
        None, description="LLM backend of both scores: 'openai:<model>' (OPENAI_BASE_URL, any compatible server), "
                          "'local', 'local:<model folder or hub id>'; empty: the configured default.")
    quality_judge: str | None = Field(
        None, description="Backend of the quality score when it is another model (the released quality scorer); "
                          "empty: the same as judge.")
    prompts: Literal["rubric", "scorer"] = Field(
        "rubric", description="'rubric': our wording of the paper's 1-6 scales for an instruction-following judge; "
                              "'scorer': the input format of the released DEITA scorer models.")
    tau: float = Field(PAPER_TAU, ge=-1.0, le=1.0,
                       description="Repr filter: an example is skipped when its cosine similarity to one already "
                                   "chosen exceeds tau.")
    diversity: Literal["repr", "distilabel"] = Field(
        "repr", description="'repr': the paper's repr filter; 'distilabel': distilabel's DeitaFiltering rule "
                            "(keep examples whose nearest neighbour in the pool is at least nn_distance away).")
    nn_distance: float = Field(0.9, ge=0.0, le=2.0,
                               description="diversity='distilabel' only: the least cosine distance to the nearest "
                                           "neighbour in the pool.")
    encoder: str | None = Field(
        None, description="Embedding model: a causal LM (embedded name, folder or hub id) with pooling 'last' "
                          "(the paper's) or 'mean', or a sentence encoder with pooling 'sentence'; empty: the local "
                          "causal LM, or the configured sentence encoder.")
    pooling: Literal["last", "mean", "sentence"] = Field("last", description="How an example becomes one vector.")
    field: Literal["chat", "full", "prompt", "output"] | None = Field(
        None, description="What is embedded; empty: the whole conversation in the model's chat template ('chat') "
                          "for a causal LM, its plain text ('full') for a sentence encoder.")
    max_tokens: int | None = Field(
        None, ge=8, description="Texts are truncated to this many tokens before embedding; empty: 2,048 for a causal "
                                "LM (the authors'), 256 for a sentence encoder.")
    batch_size: int = Field(32, description="Exchanges per durable batch of scores.")


@flow(name="deita", log_prints=True)
def deita(params: DeitaParams) -> SelectionRef:
    """Score every exchange's complexity and quality (expected 1-6 scores), rank by the evol score
    sum_t c_t * q_t, and walk that ranking with the repr filter to m."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    judge = get_llm(params.judge)
    quality_judge = get_llm(params.quality_judge) if params.quality_judge else judge
    complexity = llm_signal(DEITA["complexity", params.prompts], judge)
    quality = llm_signal(DEITA["quality", params.prompts], quality_judge)
    # the selection records the judges actually used
    params = params.model_copy(update={"judge": judge.name, "quality_judge": quality_judge.name})

    # 1. complexity and quality of every exchange, each an expected score over "1".."6"
    scored = [score_exchanges_with_llm(complexity, dataset, batch_size=params.batch_size),
              score_exchanges_with_llm(quality, dataset, batch_size=params.batch_size)]
    # 2. evol score = sum over turns of complexity x quality
    evol = evol_scores(dataset.read(["uid", "messages", "source"]), complexity, quality)
    ranked = evol.filter(pl.col("score").is_not_null()).sort(["score", "uid"], descending=[True, False])

    # 3. the repr filter: walk the ranking, skip what is too close to an example already chosen
    m = resolve_budget(params.budget, dataset.rows)
    field = params.field or ("full" if params.pooling == "sentence" else "chat")
    max_tokens = params.max_tokens or (256 if params.pooling == "sentence" else 2048)
    embedding = embed_signal(params.encoder, field=field, max_tokens=max_tokens, pooling=params.pooling)
    embedded = embed(embedding, dataset)
    repr_rule = params.diversity == "repr"
    chosen = select_repr(embedding, dataset, ranked["uid"].to_list(), m,
                         params.tau if repr_rule else params.nn_distance, "repr" if repr_rule else "nearest_neighbour")

    score = dict(zip(ranked["uid"], ranked["score"]))
    rank = {u: i + 1 for i, u in enumerate(ranked["uid"])}
    turns = dict(zip(evol["uid"], evol["turns"]))

    def reason(uid: str, value: float | None) -> str:
        why = f"evol score {score[uid]:.4f} over {turns[uid]} turn{'s' * (turns[uid] != 1)}, rank {rank[uid]}"
        if not repr_rule:
            return f"{why}; nearest neighbour at cosine distance {value:.4f} >= {params.nn_distance}"
        return why + ("" if value is None else f"; cosine {value:.4f} <= {params.tau} to those chosen before")

    selection = pl.DataFrame({"uid": chosen.uids, "score": [score[u] for u in chosen.uids],
                              "reason": [reason(u, v) for u, v in zip(chosen.uids, chosen.values)]},
                             schema={"uid": pl.String, "score": pl.Float64, "reason": pl.String})
    failed = evol.height - ranked.height
    publish_table("deita-evol-scores", histogram_rows(evol["score"], missing="no evol score (a turn failed)"),
                  f"evol scores (complexity x quality, summed over turns) on {dataset.name}@{dataset.version}")
    print(f"deita: {selection.height} of {dataset.rows} examples (m = {m}); the {params.diversity} filter walked "
          f"{chosen.walked} of {ranked.height} ranked examples; {sum(r.computed for r in scored)} exchange scores "
          f"computed now, {sum(r.reused for r in scored)} reused; {failed} examples without an evol score")
    return finish("deita", params, dataset, selection, [*scored, embedded], failed=failed)
