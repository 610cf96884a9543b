"""Instruction Backtranslation (Li et al. 2023, "Self-Alignment with Instruction Backtranslation", Humpback):
label unlabelled human-written texts with the instructions they answer, then keep the pairs the model
itself rates best, over two rounds of self-curation.

Given seed pairs (x, y) (the dataset) and unlabelled texts y' (``unlabelled``):

1. Backward model M_yx: fine-tune ``base`` on the seed pairs reversed, (y -> x), with
   fine-tune-seed-model (the text is the user turn, the instruction the answer).
2. Self-augmentation: for each text y', M_yx writes an instruction x'; the candidates
   A = {(x', y')} are stored as they are made, with their provenance (the text's content id, M_yx,
   the prompt), deduplicated against the seed and each other, and registered, after the seed rows,
   as the dataset ``output``.
3. Self-curation, round 1: M0, ``base`` fine-tuned on the seed pairs, rates every candidate on a 5-point
   rubric, its answer ending with "Score: N" (raw answer stored; an answer without a parseable score is a
   recorded failure and the pair is not kept). A(1) = the candidates scored ``keep_score`` (5, the top).
4. Round 2: M1, ``base`` fine-tuned on seed + A(1), rates the candidates again; A(2) = those scored 5.
   M1 is named by its content key in the round-2 rating signal (``local:finetuned:<key>``), so the
   rounds' ratings never mix and each round is cached: a killed run resumes at its round.
5. The selection is seed + A(2) (the paper trains its final model on it), on the dataset ``output``;
   ``compare`` or ``export`` take it from there.

Deviations: the paper's models are LLaMA-7B/33B/65B fully fine-tuned on 3,200 OpenAssistant seed pairs and
its texts are ClueWeb passages; here every fine-tune is fine-tune-seed-model (LoRA by default) from
``base`` with ``recipe``, and M_yx and M0 may instead be given as served models (``backward``,
``seed_model``: any LLM spec; a ``backward`` that was not fine-tuned for the task is prompted with
:data:`~sft_select.tasks.prompts.HUMPBACK_BACKWARD_PROMPTED`). Greedy decoding (temperature 0) for
both the instructions and the ratings, the rubric in our words to the paper's five levels, 256 tokens
for a rating. The paper keeps A5 in both rounds (``keep_score=5``); it does not deduplicate; here exact
and near duplicates of the seed (cosine > ``dedup_tau``) are dropped. The cost cap (``max_calls``,
``max_tokens``) covers every model call of the run (generation and ratings), not the fine-tunes. The
backward model reads at most ``text_chars`` characters of a text (2,000), in training and generation.
"""

from __future__ import annotations

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage.examples import frame, make_example, user_text
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.backends.models import FINETUNED
from sft_select.tasks.finetune import FINISHED, Recipe, finetune_key, finetune_task, finetuned_dir
from sft_select.tasks.generate import (CostCap, Generation, fill_capped, generate, read_texts, register_generation,
                                       requests, text_id)
from sft_select.tasks.judge import estimate_llm, llm_batch, llm_signal
from sft_select.tasks.prompts import HUMPBACK_BACKWARD, HUMPBACK_BACKWARD_PROMPTED, HUMPBACK_CURATION
from sft_select.tasks.report import publish_table
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store, planning

PAPER_KEEP_SCORE = 5
PAPER_ROUNDS = 2


class BacktranslationParams(MethodParams):
    budget: float | None = Field(None, description="At most this many rows (seed first, then curated); empty: "
                                                   "seed + every curated row, as the paper.")
    unlabelled: str | None = Field(None, description="The unlabelled texts: a .txt (blank-line separated), "
                                                     ".jsonl/.json file, or a registered dataset (its outputs).")
    limit: int | None = Field(None, ge=1, description="Use the first this many unlabelled texts.")
    base: str = Field("smollm2-135m-instruct", description="Base model of M_yx, M0 and M1.")
    recipe: Recipe = Field(Recipe(), description="How M_yx, M0 and M1 are fine-tuned (fine-tune-seed-model).")
    backward: str | None = Field(None, description="LLM spec of a served backward model; empty: fine-tune M_yx here.")
    backward_prompted: bool | None = Field(None, description="Prompt the backward model with an instruction to "
                                                             "write the request (default: only when `backward` is set).")
    text_chars: int | None = Field(2000, ge=1, description="Characters of a text the backward model reads, in "
                                                           "training and in self-augmentation (the pair keeps it "
                                                           "whole); empty: all.")
    seed_model: str | None = Field(None, description="LLM spec of a served M0 (the round-1 rater); empty: fine-tune "
                                                     "it here on the seed.")
    keep_score: int = Field(PAPER_KEEP_SCORE, ge=1, le=5, description="Keep pairs rated at least this (paper: 5).")
    rounds: int = Field(PAPER_ROUNDS, ge=1, le=2, description="Rounds of self-curation (paper: 2).")
    dedup_tau: float | None = Field(0.9, gt=0, le=1, description="Drop a candidate whose cosine similarity to a seed "
                                                                 "row or an earlier candidate exceeds this.")
    encoder: str | None = Field(None, description="Sentence encoder of the near-duplicate step.")
    max_calls: int | None = Field(None, ge=1, description="Cost cap: model calls this run may make.")
    max_tokens: int | None = Field(None, ge=1, description="Cost cap: tokens (prompt + completion) this run may use.")
    output: str | None = Field(None, description="Name of the generated dataset; default '<dataset>-backtranslation'.")
    batch_size: int = Field(16, ge=1, description="Requests per durable batch.")


def reversed_pairs(seed: pl.DataFrame, text_chars: int | None = None) -> pl.DataFrame:
    """The seed pairs backwards, (output -> instruction [+ input]): M_yx's training data; the output cut to
    ``text_chars`` characters (so that a long answer leaves room for the instruction to learn)."""
    return frame([make_example([{"role": "user", "content": r["output"][:text_chars]},
                                {"role": "assistant", "content": user_text(r["instruction"], r["input"])}],
                               source="backward")
                  for r in seed.iter_rows(named=True) if r["output"] and r["instruction"]])


def trained(examples: pl.DataFrame, base: str, recipe: Recipe) -> str:
    """The LLM spec of ``base`` fine-tuned on ``examples`` (``local:finetuned:<key>``); under a dry run,
    its name without training it (what the plan's signals are keyed on)."""
    key = finetune_key(examples.sort("uid"), base, recipe)
    if planning() is not None and not (finetuned_dir(key) / FINISHED).exists():
        return f"local:{FINETUNED}{key}"
    return f"local:{FINETUNED}{finetune_task(examples, base, recipe).key}"


def curate(candidates: pl.DataFrame, rater: str, keep_score: int, cap: CostCap,
           batch_size: int) -> tuple[pl.DataFrame, dict]:
    """Self-curation: ``rater`` scores every candidate with :data:`HUMPBACK_CURATION`; returns ``uid,
    score, error`` of each candidate and the round's counts (``kept``: score >= ``keep_score``)."""
    llm = get_llm(rater)
    signal = llm_signal(HUMPBACK_CURATION, llm)
    filled = fill_capped(signal, candidates, llm_batch(HUMPBACK_CURATION, llm), cap=cap, batch_size=batch_size,
                         estimate_rows=lambda rows: estimate_llm(signal, rows))
    stored = get_store().signals.read(signal, candidates["uid"])
    scores = candidates.select("uid").join(stored.select("uid", pl.col("value").alias("score"), "error"), on="uid",
                                           how="left", maintain_order="left")
    counts = {"rater": llm.name, "signal": signal.id, "rated": int(scores["score"].is_not_null().sum()),
              "parse_failures": int(scores["error"].str.starts_with("parse:").sum()),
              "unrated": int(scores["score"].is_null().sum()),
              "kept": int((scores["score"] >= keep_score).sum()), "stopped": filled["stopped"],
              "computed": filled["computed"], "reused": filled["reused"], "usage": filled["usage"]}
    return scores, counts


@flow(name="backtranslation", log_prints=True)
def backtranslation(params: BacktranslationParams) -> SelectionRef:
    """Write instructions for unlabelled texts with a backward model; keep the pairs the seed model rates
    5 of 5, then re-rate with the model fine-tuned on seed + kept (two rounds)."""
    if not params.unlabelled:
        raise ValueError("backtranslation needs `unlabelled`: a file of texts or a registered dataset (its outputs)")
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    seed = dataset.read()
    texts = read_texts(params.unlabelled)[: params.limit]
    cap = CostCap(params.max_calls, params.max_tokens)

    # 1. the backward model M_yx
    if params.backward:
        backward = params.backward
        prompted = True if params.backward_prompted is None else params.backward_prompted
    else:
        backward, prompted = trained(reversed_pairs(seed, params.text_chars), params.base, params.recipe), bool(params.backward_prompted)
    prompt = HUMPBACK_BACKWARD_PROMPTED if prompted else HUMPBACK_BACKWARD

    # 2. self-augmentation: an instruction for every text
    reqs = requests([{"text": t[: params.text_chars]} for t in texts], [[text_id(t)] for t in texts], [{"output": t} for t in texts])
    augmented: Generation = generate(reqs, prompt, backward, method="backtranslation", round=1, pool=seed,
                                     dedup_tau=params.dedup_tau, encoder=params.encoder, cap=cap,
                                     batch_size=params.batch_size)
    output = params.output or f"{params.dataset}-backtranslation"
    ref = register_generation(output, augmented, extra=seed)
    candidates = augmented.examples

    # 3-4. self-curation: M0 rates, then M1 (fine-tuned on seed + A(1)) rates again
    rater = params.seed_model or trained(seed, params.base, params.recipe)
    rounds, scores = [], None
    for r in range(1, params.rounds + 1):
        if cap.hit:
            break
        scores, counts = curate(candidates, rater, params.keep_score, cap, params.batch_size)
        rounds.append({"round": r, **counts})
        print(f"backtranslation round {r}: {counts['rated']} of {candidates.height} rated by {counts['rater']}, "
              f"{counts['parse_failures']} without a parseable score, {counts['kept']} kept (score >= "
              f"{params.keep_score})" + (f"; {counts['stopped']}" if counts["stopped"] else ""))
        if r < params.rounds and not cap.hit:
            kept = candidates.join(scores.filter(pl.col("score") >= params.keep_score), on="uid", how="semi")
            rater = trained(pl.concat([seed, kept]), params.base, params.recipe)  # M_r

    # 5. seed + the last round's curated pairs
    curated = (scores.filter(pl.col("score") >= params.keep_score) if scores is not None
               else pl.DataFrame(schema={"uid": pl.String, "score": pl.Float64}))
    last = len(rounds)
    selection = pl.concat([
        seed.select("uid", pl.lit(None, pl.Float64).alias("score"), pl.lit("seed data").alias("reason")),
        curated.select("uid", "score", pl.format("rated {} of 5 in round {}", pl.col("score"), pl.lit(last))
                       .alias("reason"))])
    if params.budget is not None:
        from sft_select.tasks.select import resolve_budget

        selection = selection.head(resolve_budget(params.budget, ref.rows))
    publish_table("backtranslation-rounds", [
        {"stage": "self-augmentation", "by": augmented.report["generator"], "requests": reqs.height,
         "made": augmented.report["generated"], "failures": augmented.report["errors"],
         "duplicates": augmented.report["exact_duplicates"] + augmented.report["near_duplicates"],
         "kept": augmented.report["kept"]},
        *[{"stage": f"self-curation round {c['round']}", "by": c["rater"], "requests": candidates.height,
           "made": c["rated"], "failures": c["parse_failures"], "duplicates": 0, "kept": c["kept"]} for c in rounds]],
        f"backtranslation of {len(texts)} texts with seed {dataset.name}@{dataset.version}")
    print(f"backtranslation: {len(texts)} texts -> {augmented.report['generated']} pairs -> {candidates.height} "
          f"after dropping duplicates -> {curated.height} curated; selection = {seed.height} seed + {curated.height}"
          + (f" ({cap.hit})" if cap.hit else ""))
    signals = [SignalRef(signal_id=augmented.signal.id, name=augmented.signal.name, fingerprint=ref.fingerprint,
                         rows=reqs.height, computed=augmented.report["computed"], reused=augmented.report["reused"],
                         errors=augmented.report["errors"], usage=augmented.report["usage"])]
    signals += [SignalRef(signal_id=c["signal"], name=HUMPBACK_CURATION.name, fingerprint=ref.fingerprint,
                          rows=candidates.height, computed=c["computed"], reused=c["reused"],
                          errors=c["parse_failures"], usage=c["usage"]) for c in rounds]
    params = params.model_copy(update={"output": output})
    return finish("backtranslation", params, ref, selection, signals, failed=0)


__all__ = ["BacktranslationParams", "backtranslation", "curate", "reversed_pairs", "trained"]
