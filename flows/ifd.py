"""IFD, the Instruction-Following Difficulty (Li et al. 2023a, "From Quantity to Quality: Boosting
LLM Performance with Self-Guided Data Selection for Instruction Tuning", Cherry LLM), with the
small-model variant of Li et al. 2024 ("Superfiltering: Weak-to-Strong Data Filtering for Fast
Instruction-Tuning").

With ``s(A|Q)`` the mean cross-entropy of the answer tokens after the instruction and ``s(A)`` that
of the same answer tokens with no instruction in front (the ``lm_loss`` signals, conditioned and
unconditioned)::

    IFD(Q, A) = s(A|Q) / s(A)                                    variant="cherry" (default)
    IFD(Q, A) = PPL(A|Q) / PPL(A) = exp(s(A|Q)) / exp(s(A))      variant="superfiltering"

IFD >= 1 means the instruction does not make the answer any easier to predict: such pairs are
dropped; among the rest the highest IFD (the hardest to follow) are kept.

Algorithm, ``variant="cherry"``:
  1. Learning from brief experience (``pre_experience``, on by default as in the paper; the
     authors' v2 data skips it): embed every instruction with the base model (mean-pooled last-layer
     hidden states), k-means into ``clusters`` (100); in each cluster take ``per_cluster`` (10)
     examples from the 25th-75th percentile band of the instruction perplexity
     ``exp(prompt_loss)``; fine-tune the base model briefly on them (fine-tune-seed-model).
     The brief fine-tune sees each example in the very prompt that step 2 scores with (the Alpaca
     prompt with its ``### Input:`` section where the record has an input).
  2. Evaluating based on experience: ``s(A|Q)`` with the Stanford Alpaca prompt, ``s(A)`` with the
     answer after a bare ``### Response:`` header, the same answer tokens counted in both (the loss
     engine keeps the first ``max_length - len(prompt)`` answer tokens in both conditions), by the
     pre-experienced model. An over-length example is scored on its truncated answer and stays a
     candidate: the authors' length check never fires in effect, so their code drops nothing for
     length.
  3. Drop IFD >= 1; of the remaining candidates keep the top ``m``, by default 6% of the candidates
     (their script's ``sample_rate`` 0.06 applied after the IFD filter; the released "5%" Alpaca
     subset has 3,111 rows).

``variant="superfiltering"``: step 2 with a small off-the-shelf model, no template (``instruction
\\n[input\\n]`` before the answer), the ratio of perplexities; keep IFD < 1, top m. ``s(A)`` is
the answer alone with its first token unscored, as in its code (GPT-2 puts nothing before a text;
a tokenizer that itself adds a neutral start such as Llama's ``<s>`` is scored from it). A chat
model's BOS is not neutral (SmolLM2's is ``<|im_start|>``): measured in review, starting there
agrees with the original at Spearman 0.95 but shares only 67% of its top 10%. Truncated answers are
scored as they are (as in its code).

Defaults follow the authors' scripts: Cherry ``max_length`` 512 and 6% of the IFD < 1 candidates,
Superfiltering ``max_length`` 1024 and 10% of the pool; a budget given as a fraction is of the pool.
Signals go through the store: the two losses are ``lm_loss`` signals (the response perplexity
InstructMining reads), the instruction perplexity a ``prompt_loss`` signal, the embeddings an
``embed`` signal, so no value is computed twice.

Deviations:
- The default model is the embedded SmolLM2-135M-Instruct for both variants (the papers use
  LLaMA-7B for Cherry and GPT-2 124M for Superfiltering; any causal LM may be named in ``model``).
- Pre-experience embeddings are of the plain prompt (instruction and input, up to 256 tokens), not
  of the Alpaca-wrapped prompt the authors' code embeds (the wrapper adds the same tokens to every
  text); the vectors are not normalised, as theirs. k-means is faiss's from a k-means++ seeding
  (theirs: scikit-learn).
- Within a cluster's band the ``per_cluster`` examples are evenly spaced in perplexity order (the
  authors' code steps evenly through the band in file order). A cluster smaller than
  ``per_cluster`` gives all its examples, and a band smaller than it all of the band, as theirs.
- The brief fine-tune is ``recipe`` (default: one epoch, LoRA, the Alpaca prompt as scored); the
  authors fine-tune all weights. Its duration is not given in the paper.
- Cherry's code drops IFD > 1 and keeps exactly 1; here IFD >= 1 is dropped in both variants (a
  ratio of exactly 1 does not occur in practice). An example with no answer token within
  ``max_length`` or an unconditioned loss of 0 has no IFD and is never chosen.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.settings import settings
from sft_select.storage import Signal, make_example
from sft_select.storage.examples import frame
from sft_select.tasks.backends.loss_engine import ALPACA_PREAMBLE_INPUT, Template
from sft_select.tasks.backends.models import FINETUNED
from sft_select.tasks.cluster import cluster_kmeans
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store
from sft_select.tasks.embed import embed, embed_signal
from sft_select.tasks.finetune import FinetunedRef, Recipe, finetune_task
from sft_select.tasks.lm_loss import Precision, lm_loss, lm_loss_signal, prompt_loss, prompt_loss_signal
from sft_select.tasks.report import publish_table
from sft_select.tasks.select import resolve_budget, select

Variant = Literal["cherry", "superfiltering"]
TEMPLATE: dict[str, Template] = {"cherry": "alpaca", "superfiltering": "none"}
MAX_LENGTH = {"cherry": 512, "superfiltering": 1024}
CHERRY_SAMPLE_RATE = 0.06  # of the IFD < 1 candidates (the authors' selection script's sample_rate)
SUPERFILTERING_BUDGET = 0.1  # of the pool
BRIEF_RECIPE = Recipe(epochs=1.0, template="alpaca")


# -- pre-experience sample, IFD table ---------------------------------------------------------------------------


def pre_experience_sample(frame: pl.DataFrame, per_cluster: int, low: float = 25.0,
                          high: float = 75.0) -> pl.DataFrame:
    """Cherry's pre-experience sample from ``uid, cluster, prompt_loss``: per cluster, the examples
    whose instruction perplexity lies between the cluster's ``low``-th and ``high``-th percentiles
    (linear interpolation, as numpy's), ``per_cluster`` of them evenly spaced in perplexity order.
    A cluster with fewer than ``per_cluster`` examples gives them all; a band with fewer, all of
    the band. Returns ``uid, cluster, prompt_loss``, by cluster, then perplexity."""
    chosen = []
    ordered = frame.drop_nulls("prompt_loss").sort("cluster", "prompt_loss", "uid")
    for _, group in ordered.group_by("cluster", maintain_order=True):
        if group.height < per_cluster:
            chosen.append(group)
            continue
        perplexity = np.exp(group["prompt_loss"].to_numpy())
        lo, hi = np.percentile(perplexity, [low, high])
        band = group.filter(pl.Series((perplexity >= lo) & (perplexity <= hi)))
        if band.height > per_cluster:
            band = band.select(pl.all().gather(np.round(np.linspace(0, band.height - 1, per_cluster)).astype(int)))
        chosen.append(band)
    schema = {"uid": pl.String, "cluster": pl.Int32, "prompt_loss": pl.Float64}
    return pl.concat(chosen).select(list(schema)) if chosen else pl.DataFrame(schema=schema)


def ifd_table(conditioned: Signal, unconditioned: Signal, uids: list[str], *,
              ratio: Literal["loss", "perplexity"] = "loss") -> pl.DataFrame:
    """``uid, s_cond, s_uncond, ifd, truncated`` from the two filled ``lm_loss`` signals:
    ``ifd = s_cond / s_uncond`` (``ratio="loss"``) or ``exp(s_cond - s_uncond)`` (``"perplexity"``);
    null where a loss is missing or ``s_uncond`` is 0. ``truncated``: the answer was cut at
    ``max_length`` (from the counts the loss signal keeps in ``raw``)."""
    store = get_store()
    counts = pl.Struct({"answer_tokens": pl.Int64, "answer_tokens_total": pl.Int64})
    cond = (store.signals.read(conditioned, uids).filter(pl.col("error").is_null())
            .select("uid", s_cond="value", n=pl.col("raw").str.json_decode(counts)))
    table = (pl.DataFrame({"uid": uids}, schema={"uid": pl.String})
             .join(cond, on="uid", how="left", maintain_order="left")
             .join(store.signals.values(unconditioned, uids, alias="s_uncond"), on="uid", how="left",
                   maintain_order="left"))
    s_cond, s_uncond = pl.col("s_cond"), pl.col("s_uncond")
    value = s_cond / s_uncond if ratio == "loss" else (s_cond - s_uncond).exp()
    return table.select(
        "uid", "s_cond", "s_uncond",
        ifd=pl.when(s_uncond != 0).then(value),
        truncated=pl.col("n").struct.field("answer_tokens") < pl.col("n").struct.field("answer_tokens_total"),
    )


def as_scored(examples: pl.DataFrame) -> pl.DataFrame:
    """The examples rewritten so that the Alpaca chat template of the fine-tune renders each one as
    the loss engine's Alpaca prompt followed by its answer: a record with an input gets the
    with-input preamble as its system turn and its ``### Input:`` section after the instruction (the
    canonical user turn folds the input in). Single-turn Alpaca records only; others are kept as
    they are. The rewritten conversations have new uids, hence their own fine-tune key."""
    rows = []
    for row in examples.to_dicts():
        if row["input"] and [m["role"] for m in row["messages"]] == ["user", "assistant"]:
            user = f"{row['instruction']}\n\n### Input:\n{row['input']}"
            row = make_example([{"role": "system", "content": ALPACA_PREAMBLE_INPUT},
                                {"role": "user", "content": user}, row["messages"][-1]],
                               source=row["source"], instruction=row["instruction"], input=row["input"])
        rows.append(row)
    return frame(rows) if rows else examples


# -- the flow ----------------------------------------------------------------------------------------------------


class IFDParams(MethodParams):
    budget: float | None = Field(
        None, description="How many to keep: a count (>= 1) or a fraction of the pool (< 1); empty: the variant's "
                          "paper default, 6% of the IFD < 1 candidates (cherry) or 10% of the pool "
                          "(superfiltering).")
    variant: Variant = Field(
        "cherry", description="cherry: loss ratio, Alpaca prompt, pre-experienced model, over-length items "
                              "scored on their truncated answer (Li et al. 2023a). superfiltering: perplexity ratio, no template, a small "
                              "off-the-shelf model (Li et al. 2024).")
    model: str | None = Field(None, description="Causal LM that scores (cherry: the base that is pre-experienced); "
                                                "empty: the configured local model (SFT_SELECT_LOCAL_LLM).")
    max_length: int | None = Field(None, ge=16, description="Tokens of prompt + answer; empty: 512 (cherry) or "
                                                            "1024 (superfiltering), the authors' scripts.")
    precision: Precision = Field("float32", description="bfloat16: the losses under bf16 autocast (where this CPU or GPU "
                                                         "runs bf16 fast); int8: dynamically quantised linear layers (CPU; "
                                                         "failed the validation on SmolLM2, docs/results.md).")
    pre_experience: bool = Field(True, description="cherry only: learn from brief experience first (the paper's "
                                                   "v1); off scores with the base model (their v2).")
    clusters: int = Field(100, ge=1, description="k-means clusters of the instruction embeddings (pre-experience).")
    per_cluster: int = Field(10, ge=1, description="Examples per cluster for the brief fine-tune.")
    percentiles: tuple[float, float] = Field(
        (25.0, 75.0), description="Band of instruction perplexity, per cluster, to sample from.")
    recipe: Recipe = Field(BRIEF_RECIPE, description="The brief fine-tune of the pre-experienced model.")
    batch_size: int = Field(64, ge=1, description="Examples per durable batch of losses.")


def brief_experience(dataset: DatasetRef, base: str, params: IFDParams) -> tuple[FinetunedRef, list[SignalRef]]:
    """Cherry's step 1: cluster the instructions, sample the middle perplexity band of each
    cluster, fine-tune ``base`` on the sample."""
    embedding = embed_signal(base, field="prompt", pooling="mean", normalize=False)
    perplexity = prompt_loss_signal(base, template="alpaca", max_length=params.max_length, precision=params.precision)
    refs = [embed(embedding, dataset), prompt_loss(perplexity, dataset, batch_size=params.batch_size)]
    clusters = cluster_kmeans(embedding, dataset, params.clusters, seed=params.seed)
    assignment = clusters.assignment()
    frame = assignment.join(get_store().signals.values(perplexity, assignment["uid"], alias="prompt_loss"), on="uid")
    sample = pre_experience_sample(frame, params.per_cluster, *params.percentiles)
    print(f"ifd: brief experience on {sample.height} examples from {clusters.k} clusters "
          f"(percentiles {params.percentiles[0]:g}-{params.percentiles[1]:g} of instruction perplexity)")
    examples = dataset.read().join(sample.select("uid"), on="uid", how="semi").sort("uid")
    if params.recipe.template == "alpaca":  # train on the very prompt that scoring uses
        examples = as_scored(examples)
    return finetune_task(examples, base, params.recipe), refs


@flow(name="ifd", log_prints=True)
def ifd(params: IFDParams) -> SelectionRef:
    """Score every example by IFD = s(A|Q) / s(A); drop IFD >= 1; keep the m highest."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    variant = params.variant
    params = params.model_copy(update={"model": params.model or settings().local_llm,
                                       "max_length": params.max_length or MAX_LENGTH[variant],
                                       "pre_experience": params.pre_experience and variant == "cherry"})

    signals: list[SignalRef] = []
    scorer = params.model
    if params.pre_experience:
        experienced, signals = brief_experience(dataset, params.model, params)
        scorer = FINETUNED + experienced.key  # the signal's identity is the model's content key, not its folder

    conditioned, unconditioned = (lm_loss_signal(scorer, conditioned=c, template=TEMPLATE[variant],
                                                 max_length=params.max_length, precision=params.precision)
                                  for c in (True, False))
    signals += [lm_loss(conditioned, dataset, batch_size=params.batch_size),
                lm_loss(unconditioned, dataset, batch_size=params.batch_size)]
    table = ifd_table(conditioned, unconditioned, dataset.read(["uid"])["uid"].to_list(),
                      ratio="loss" if variant == "cherry" else "perplexity")

    scored = table.filter(pl.col("ifd").is_not_null() & pl.col("ifd").is_not_nan())
    kept = scored.filter(pl.col("ifd") < 1)
    if params.budget is not None:
        m = resolve_budget(params.budget, dataset.rows)
    elif variant == "cherry":
        m = resolve_budget(CHERRY_SAMPLE_RATE, kept.height) if kept.height else 0
    else:
        m = resolve_budget(SUPERFILTERING_BUDGET, dataset.rows)
    params = params.model_copy(update={"budget": params.budget or m or None})  # the selection records the count
    selection = select(kept.select("uid", score="ifd"), m=m, label="IFD")

    counts = {"examples": table.height, "no IFD (no loss, or s(A) = 0)": table.height - scored.height,
              "over-length (scored on the truncated answer)": scored.filter(pl.col("truncated")).height,
              "IFD >= 1 (dropped)": scored.height - kept.height, "candidates (IFD < 1)": kept.height,
              "selected": selection.height}
    publish_table("ifd-filter", [{"step": k, "examples": v} for k, v in counts.items()],
                  f"IFD ({variant}, {scorer}) on {dataset.name}@{dataset.version}")
    print(f"ifd ({variant}): {selection.height} of {dataset.rows} kept; " + json.dumps(counts))
    return finish("ifd", params, dataset, selection, signals)
