"""InstructMining (Cao et al. 2023, "Instruction Mining: When Data Mining Meets Large Language Model
Finetuning").

1. Indicators ``I_1 .. I_p`` of every example (``tasks/indicators.py``): input and output length,
   response perplexity ``exp(s(A|Q))`` (the shared ``lm_loss`` signal: with the defaults, Alpaca
   template and 512 tokens, the very values IFD's Cherry variant reads for the base model),
   MTLD of the response, KNN-i (mean distance to the i = 6 nearest examples in a sentence-embedding
   space) and, where a judge is configured, a quality score (the reward slot) and UniEval's
   naturalness, coherence and understandability.
2. Quality of a subset S: the eval loss ``L(S)`` of the base model fine-tuned on S, measured on
   held-out reference answers.
3. Fit, by least squares over K random subsets ``S_1 .. S_K`` of one size,

       log L(S_k) = beta_0 + sum_i beta_i * mean_{x in S_k} I_i(x) + eps_k

   and publish the coefficients with the fit's R^2 (and adjusted R^2) as artifacts.
4. Rank every example by the rule, ``beta_0 + sum_i beta_i * I_i(x)`` (its predicted log loss, the
   lowest first) and keep the m best.
5. Optionally (``sweep``), fine-tune and evaluate the top-n for every n of a grid and keep the n
   with the lowest eval loss: the paper searched the size with BlendSearch (2,532 of 100,000) after
   observing double descent in the loss against the size.

Deviations: the paper fits on LLaMA-2-7B fine-tunes of many subsets drawn from several datasets and
evaluates on its own held-out sets; here the base model, recipe, subset count and size are
parameters, the subsets come from the one pool, and (without ``eval_file``) ``heldout`` examples
of the pool, never selected, are the reference answers. Without a reward model offline, the reward
indicator is a judge's 0-100 quality score, and the UniEval dimensions are judge ratings (1-5);
without a judge they are left out. Lengths are counted in words. The paper pruned indicators by
their significance in the fit; here ``indicators`` picks them. The size search is a grid, not
BlendSearch. Examples missing an indicator (a failed signal) are neither drawn nor ranked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import BaseModel, Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.core import DatasetRef, SignalRef, get_store
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.indicators import (LabelSettings, knn_distance, reference_suite, subset_quality,
                                         text_indicators)
from sft_select.tasks.llm import llm_signal, score_with_llm
from sft_select.tasks.lm_loss import lm_loss, lm_loss_signal
from sft_select.tasks.prompts import INDICATORS
from sft_select.tasks.report import publish_markdown, publish_table
from sft_select.tasks.select import resolve_budget, select

Indicator = Literal["input_length", "output_length", "perplexity", "mtld", "knn", "quality", "naturalness",
                    "coherence", "understandability"]
TEXT = ("input_length", "output_length", "mtld")
JUDGED = ("quality", "naturalness", "coherence", "understandability")
DEFAULT = ["input_length", "output_length", "perplexity", "mtld", "knn"]


class Rule(BaseModel):
    """A fitted rule: ``log L = intercept + sum_i coefficients[i] * indicator_i``."""

    indicators: list[str]
    intercept: float
    coefficients: dict[str, float]
    r2: float
    adj_r2: float
    residual_std: float
    subsets: int


def fit_rule(means: np.ndarray, log_loss: np.ndarray, names: list[str]) -> Rule:
    """Ordinary least squares with an intercept: one row of indicator means per subset, its log eval
    loss as the target. Needs more subsets than indicators + 1 (so that the fit can be judged)."""
    x, y = np.asarray(means, dtype=np.float64), np.asarray(log_loss, dtype=np.float64)
    k, p = x.shape
    if k <= p + 1:
        raise ValueError(f"{k} subsets cannot fit {p} indicators and an intercept: use at least {p + 2}")
    design = np.column_stack([np.ones(k), x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    ss_res = float(((y - design @ beta) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return Rule(indicators=list(names), intercept=float(beta[0]),
                coefficients={n: float(b) for n, b in zip(names, beta[1:])}, r2=r2,
                adj_r2=1.0 - (1.0 - r2) * (k - 1) / (k - p - 1), residual_std=math.sqrt(ss_res / (k - p - 1)),
                subsets=k)


def predict(rule: Rule, indicators: pl.DataFrame) -> np.ndarray:
    """The rule's predicted log eval loss for each row of an indicator table."""
    x = indicators.select(rule.indicators).to_numpy().astype(np.float64)
    return rule.intercept + x @ np.asarray([rule.coefficients[n] for n in rule.indicators])


class InstructMiningParams(LabelSettings, MethodParams):
    indicators: list[Indicator] | None = Field(
        None, description="Indicators of the rule; empty: lengths, perplexity, MTLD and KNN, plus the judge-scored "
                          "ones when a judge is set.")
    judge: str | None = Field(None, description="LLM backend of the judge-scored indicators ('local', "
                                                "'openai:<model>'); empty: those are left out.")
    encoder: str | None = Field(None, description="Sentence encoder of KNN; the configured default when empty.")
    knn: int = Field(6, ge=1, description="i of KNN-i: neighbours whose mean distance is the indicator.")
    perplexity_model: str | None = Field(None, description="Model of the response perplexity (the shared lm_loss "
                                                           "signal); the configured local LLM when empty.")
    perplexity_template: Literal["chat", "alpaca", "none"] = Field(
        "alpaca", description="Prompt template of it (the default, with the length, is IFD's Cherry scoring, so "
                              "the two methods share the values).")
    perplexity_max_length: int = Field(512, ge=16, description="Tokens of prompt + answer of it.")
    subsets: int = Field(20, ge=3, description="K: random subsets fine-tuned and evaluated to fit the rule.")
    subset_size: int = Field(100, ge=1, description="Examples per random subset (at most half of the examples "
                                                    "that can be drawn).")
    sweep: list[float] | None = Field(
        None, description="Subset sizes (counts or fractions) to try with the rule; the size with the lowest eval "
                          "loss wins and the budget is ignored. Empty: keep the budget.")


def indicator_table(params: InstructMiningParams, dataset: DatasetRef,
                    pool: pl.DataFrame) -> tuple[pl.DataFrame, list[SignalRef]]:
    """``uid`` and one column per chosen indicator (null where a signal failed), and the signals filled."""
    names = list(params.indicators or DEFAULT + (list(JUDGED) if params.judge else []))
    if params.judge is None and set(names) & set(JUDGED):
        raise ValueError(f"indicators {sorted(set(names) & set(JUDGED))} are judge-scored: set `judge`")
    store, uids = get_store(), pool["uid"]
    table, signals = text_indicators(pool), []
    if "perplexity" in names:
        signal = lm_loss_signal(params.perplexity_model, conditioned=True, template=params.perplexity_template,
                                max_length=params.perplexity_max_length)
        signals.append(lm_loss(signal, dataset))
        loss = store.signals.values(signal, uids, alias="lm_loss")
        table = table.join(loss.select("uid", perplexity=pl.col("lm_loss").exp()), on="uid", how="left")
    if "knn" in names:
        signal = embed_signal(params.encoder, field="full")
        signals.append(embed(signal, dataset))
        have, vectors = load_vectors(signal, uids)
        knn = pl.DataFrame({"uid": have, "knn": knn_distance(vectors, params.knn)}, schema={"uid": pl.String,
                                                                                          "knn": pl.Float64})
        table = table.join(knn, on="uid", how="left")
    for name in (n for n in names if n in JUDGED):
        signal = llm_signal(INDICATORS[name], params.judge)
        signals.append(score_with_llm(signal, dataset))
        table = table.join(store.signals.values(signal, uids, alias=name), on="uid", how="left")
    return table.select("uid", *names), signals


@flow(name="instructmining", log_prints=True)
def instructmining(params: InstructMiningParams) -> SelectionRef:
    """Fit a linear rule from indicators to eval loss on random subsets; keep the examples it rates best."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read().sort("uid")
    table, signals = indicator_table(params, dataset, pool)
    names = table.columns[1:]
    complete = table.drop_nulls()

    # held-out reference answers: a file, or part of the pool (then never drawn nor selected)
    suite, held = reference_suite(pool, params.eval_file, params.heldout, params.seed)
    complete = complete.filter(~pl.col("uid").is_in(pl.Series(list(held), dtype=pl.String)))
    size = min(params.subset_size, complete.height // 2)
    if size < params.subset_size:
        print(f"instructmining: subsets of {size} (half of the {complete.height} examples that can be drawn)")

    rng = np.random.default_rng(params.seed)
    draws = [np.sort(rng.choice(complete.height, size, replace=False)) for _ in range(params.subsets)]
    rows = pool.join(complete, on="uid", how="inner", maintain_order="left")  # examples and indicators
    quality = subset_quality({f"random-{k + 1}": rows[d].select(pool.columns) for k, d in enumerate(draws)},
                             params.base, params.recipe, suite)
    means = np.stack([rows[d].select(names).to_numpy().mean(axis=0) for d in draws])
    log_loss = np.log([q.loss for q in quality])
    rule = fit_rule(means, log_loss, names)

    spread = {n: float(complete[n].std() or 0.0) for n in names}
    publish_table("instructmining-rule", [{"term": "intercept", "coefficient": rule.intercept}] + [
        {"term": n, "coefficient": rule.coefficients[n], "pool_std": spread[n],
         "effect_of_1_std": rule.coefficients[n] * spread[n]} for n in names],
        f"log eval loss = intercept + sum coefficient x indicator; R^2 {rule.r2:.3f} over {rule.subsets} subsets")
    fitted = predict(rule, pl.DataFrame(means, schema=names, orient="row"))
    publish_table("instructmining-subsets", [
        {"subset": q.name, "examples": q.examples, "eval_loss": q.loss, "log_loss": float(y), "fitted": float(f),
         "model": q.model[:12]} for q, y, f in zip(quality, log_loss, fitted)],
        "The random subsets the rule was fitted on")

    scores = complete.select("uid").with_columns(score=pl.Series(predict(rule, complete)))
    ranked = select(scores, descending=False, label="predicted log eval loss")
    m = resolve_budget(params.budget, complete.height)
    sweep_rows = []
    if params.sweep:
        sizes = sorted({resolve_budget(s, complete.height) for s in params.sweep})
        tops = {f"top-{n}": pool.join(ranked.head(n).select("uid"), on="uid", how="semi") for n in sizes}
        results = subset_quality(tops, params.base, params.recipe, suite)
        sweep_rows = [{"size": n, "eval_loss": r.loss} for n, r in zip(sizes, results)]
        m = min(sweep_rows, key=lambda r: (r["eval_loss"], r["size"]))["size"]
        publish_table("instructmining-sweep", sweep_rows, "Eval loss of the rule's top-n against n")
    selection = ranked.head(m)

    publish_markdown("instructmining-fit", "\n".join([
        f"# InstructMining rule on `{dataset.name}@{dataset.version}`", "",
        f"log L = {rule.intercept:.4g} " + " ".join(f"{c:+.4g} x {n}" for n, c in rule.coefficients.items()), "",
        f"R^2 = {rule.r2:.3f} (adjusted {rule.adj_r2:.3f}), residual sd {rule.residual_std:.4f}, "
        f"{rule.subsets} random subsets of {size}; evaluation on `{Path(suite.path).name}`.",
        *([f"Size sweep: {sweep_rows}; chose {m}."] if sweep_rows else []),
    ]), "The fitted InstructMining rule")
    print(f"instructmining: rule R^2 {rule.r2:.3f} over {rule.subsets} subsets; kept {selection.height} of "
          f"{dataset.rows} ({table.height - table.drop_nulls().height} without every indicator)")
    return finish("instructmining", params, dataset, selection, signals)
