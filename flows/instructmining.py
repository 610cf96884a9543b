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
3. The rule. ``rule="paper"``: the paper's final rule, no fine-tuning at all::

       log L = 1.0694 - 0.1498 * Rew + 8.257e-5 * Len - 0.9350 * KNN_6

   (Rew: reward-model score of the pair; Len: response length; KNN_6 as in 1). ``rule="fit"``
   (default): fit the same form by least squares over K subsets ``S_1 .. S_K`` of one size,

       log L(S_k) = beta_0 + sum_i beta_i * mean_{x in S_k} I_i(x) + eps_k

   with the subsets drawn to spread their quality (below), and keep the fit only when it is better
   than chance: the F-test of the regression against the intercept alone must give p <
   ``significance`` (0.05), else the run refuses (``on_insignificant="warn"``: goes on, saying so).
   The coefficients are published with their 95% intervals (t distribution), R^2, adjusted R^2
   and the F-test's p-value.
4. Rank every example by the rule, ``beta_0 + sum_i beta_i * I_i(x)`` (its predicted log loss, the
   lowest first) and keep the m best.

Subsets for the fit. Subsets drawn i.i.d. from one pool all have nearly the pool's mean
indicators and nearly the same quality, so the fit has nothing to learn from (the paper's subsets
differ in quality because they mix datasets of very different quality). Here subset k is drawn
without replacement with probability proportional to ``exp(t_k * z(x) . u_k)``: ``z`` the
standardised indicators, ``u_k`` a random unit direction, ``t_k`` spread evenly over [0, 3]
(``t_k = 0`` is a uniform draw), so the subsets' mean indicators, and with them their quality,
span the pool's range.
5. Optionally (``sweep``), fine-tune and evaluate the top-n for every n of a grid and keep the n
   with the lowest eval loss: the paper searched the size with BlendSearch (2,532 of 100,000) after
   observing double descent in the loss against the size.

Deviations: the paper fits on LLaMA-2-7B fine-tunes of many subsets drawn from several datasets and
evaluates on its own held-out sets; here the base model, recipe, subset count and size are
parameters, the subsets are tilted draws from the one pool (above), and (without ``eval_file``) ``heldout`` examples
of the pool, never selected, are the reference answers. Without a reward model (``reward_model``), the fitted
rule's reward slot is a judge's 0-100 quality score, and the UniEval dimensions are judge ratings (1-5);
without a judge they are left out. Lengths are counted in words. The paper pruned indicators by
their significance in the fit; here ``indicators`` picks them. The size search is a grid, not
BlendSearch. Examples missing an indicator (a failed signal) are neither drawn nor ranked.

``rule="paper"`` needs a reward-model score: ``reward_model`` computes it (the ``reward`` signal of
``tasks/reward.py``: a local sequence-classification checkpoint such as the paper's, OpenAssistant's
DeBERTa-v3 reward model, or ``default``, the small reward model the project trains on its shipped
preference file, whose scores are on its own scale), or ``reward_signal`` names a stored signal
holding one per example; with neither the run refuses (the judge's 0-100 ``quality`` is on another
scale and is never put in its place). The same reward score is the ``reward`` indicator of the fitted
rule. The paper's ``Len`` term takes ``output_length`` in words (the
paper's unit may differ; at 8.3e-5 per unit the term is small either way) and KNN_6 the configured
sentence encoder's embeddings of the whole example, so the published coefficients carry over only
approximately.
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
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.evaluate import ReferenceLoss
from sft_select.tasks.indicators import (LabelSettings, knn_distance, reference_suite, subset_quality,
                                         text_indicators)
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.lm_loss import lm_loss, lm_loss_signal
from sft_select.tasks.prompts import INDICATORS
from sft_select.tasks.report import publish_markdown, publish_table
from sft_select.tasks.reward import resolve_reward_model, reward_signal
from sft_select.tasks.reward import reward as reward_task
from sft_select.tasks.select import resolve_budget, select

Indicator = Literal["input_length", "output_length", "perplexity", "mtld", "knn", "quality", "naturalness",
                    "coherence", "understandability", "reward"]
TEXT = ("input_length", "output_length", "mtld")
JUDGED = ("quality", "naturalness", "coherence", "understandability")
DEFAULT = ["input_length", "output_length", "perplexity", "mtld", "knn"]


class Rule(BaseModel):
    """A rule ``log L = intercept + sum_i coefficients[i] * indicator_i``; the fit's statistics
    (``None`` for the paper's published rule): R^2, adjusted R^2, residual sd, the F-test's
    p-value against the intercept alone, and 95% intervals of the coefficients."""

    indicators: list[str]
    intercept: float
    coefficients: dict[str, float]
    r2: float | None = None
    adj_r2: float | None = None
    residual_std: float | None = None
    subsets: int | None = None
    p_value: float | None = None
    intervals: dict[str, tuple[float, float]] = {}


# Cao et al. 2023, the final rule: log L = 1.0694 - 0.1498 Rew + 8.257e-5 Len - 0.9350 KNN_6
PAPER_RULE = Rule(indicators=["reward", "output_length", "knn"], intercept=1.0694,
                  coefficients={"reward": -0.1498, "output_length": 8.257e-5, "knn": -0.9350})


def fit_rule(means: np.ndarray, log_loss: np.ndarray, names: list[str]) -> Rule:
    """Ordinary least squares with an intercept: one row of indicator means per subset, its log eval
    loss as the target. Needs more subsets than indicators + 1 (so that the fit can be judged).
    ``p_value``: the F-test of the regression, F = (R^2 / p) / ((1 - R^2) / (k - p - 1)) on (p,
    k - p - 1) degrees of freedom; ``intervals``: beta_i +- t_{0.975, k-p-1} * se_i, with se_i^2 the
    diagonal of s^2 (X'X)^-1."""
    from scipy import stats

    x, y = np.asarray(means, dtype=np.float64), np.asarray(log_loss, dtype=np.float64)
    k, p = x.shape
    if k <= p + 1:
        raise ValueError(f"{k} subsets cannot fit {p} indicators and an intercept: use at least {p + 2}")
    design = np.column_stack([np.ones(k), x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = k - p - 1
    ss_res = float(((y - design @ beta) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    f = (r2 / p) / max((1.0 - r2) / dof, 1e-300) if ss_tot > 0 else math.nan
    se = np.sqrt(np.diag(ss_res / dof * np.linalg.pinv(design.T @ design)))[1:]
    half = stats.t.ppf(0.975, dof) * se
    return Rule(indicators=list(names), intercept=float(beta[0]),
                coefficients={n: float(b) for n, b in zip(names, beta[1:])}, r2=r2,
                adj_r2=1.0 - (1.0 - r2) * (k - 1) / dof, residual_std=math.sqrt(ss_res / dof), subsets=k,
                p_value=float(stats.f.sf(f, p, dof)) if math.isfinite(f) else 1.0,
                intervals={n: (float(b - h), float(b + h)) for n, b, h in zip(names, beta[1:], half)})


class InsignificantFit(ValueError):
    """The fitted rule does not predict the subsets' eval loss better than chance."""


def check_fit(rule: Rule, significance: float, on_insignificant: Literal["refuse", "warn"]) -> str | None:
    """Refuse (raise) or warn (return the warning) when the fit's F-test p-value is not below
    ``significance``; None when the fit is significant."""
    if rule.p_value is not None and rule.p_value < significance:
        return None
    message = (f"the fitted rule is not better than chance: F-test p = {rule.p_value:.3g} >= {significance} "
               f"(R^2 {rule.r2:.3f} over {rule.subsets} subsets); its ranking would be noise. Fit on more or larger "
               "subsets, use rule='paper', or pass on_insignificant='warn' to use it anyway")
    if on_insignificant == "refuse":
        raise InsignificantFit(message)
    return message


def spread_draws(z: np.ndarray, size: int, count: int, rng: np.random.Generator,
                 max_tilt: float = 3.0) -> list[np.ndarray]:
    """``count`` subsets of ``size`` row indices of ``z`` (standardised indicators, one row per
    example), subset k drawn without replacement with probability proportional to
    ``exp(t_k * z @ u_k)``: ``u_k`` a random unit direction, ``t_k`` evenly spaced over
    [0, ``max_tilt``] (0: uniform). Sorted indices."""
    tilts = rng.permutation(np.linspace(0.0, max_tilt, count))
    draws = []
    for t in tilts:
        u = rng.normal(size=z.shape[1])
        logit = t * (z @ (u / (np.linalg.norm(u) or 1.0)))
        w = np.maximum(np.exp(logit - logit.max()), 1e-12)  # every example stays drawable
        draws.append(np.sort(rng.choice(len(z), size, replace=False, p=w / w.sum())))
    return draws


def predict(rule: Rule, indicators: pl.DataFrame) -> np.ndarray:
    """The rule's predicted log eval loss for each row of an indicator table."""
    x = indicators.select(rule.indicators).to_numpy().astype(np.float64)
    return rule.intercept + x @ np.asarray([rule.coefficients[n] for n in rule.indicators])


class InstructMiningParams(LabelSettings, MethodParams):
    rule: Literal["fit", "paper"] = Field(
        "fit", description="fit: fit the rule on fine-tuned subsets of this pool; paper: the paper's published rule "
                           "(reward, output length, KNN-6; needs reward_model or reward_signal), no fine-tuning.")
    reward_model: str | None = Field(
        None, description="Reward model that scores the reward indicator (Rew): a local sequence-classification "
                          "checkpoint folder (the paper: OpenAssistant's DeBERTa-v3 reward model), or 'default' (a small "
                          "reward model trained here on the shipped preference file). Empty: reward_signal, if any.")
    reward_signal: str | None = Field(
        None, description="Id (or unique prefix) of a stored signal holding a reward-model score per example: the "
                          "reward indicator (Rew), when reward_model is empty. rule='paper' refuses without either.")
    significance: float = Field(0.05, gt=0, lt=1, description="rule='fit': the F-test p-value the fit must beat.")
    on_insignificant: Literal["refuse", "warn"] = Field(
        "refuse", description="rule='fit': what to do with a fit no better than chance: refuse (fail) or warn.")
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
    if params.rule == "paper":
        names = list(PAPER_RULE.indicators)
        if params.knn != 6:
            raise ValueError(f"rule='paper' has a KNN-6 term: knn must be 6, not {params.knn}")
        if params.reward_signal is None and params.reward_model is None:
            raise ValueError("rule='paper' has a reward term (-0.1498 x Rew, a reward-model score): pass reward_model "
                             "(a reward-model checkpoint folder, or 'default') or reward_signal=<id of a stored signal "
                             "holding one per example>, or use rule='fit' (the judge's quality score is on another "
                             "scale and is not used in its place)")
    if params.judge is None and set(names) & set(JUDGED):
        raise ValueError(f"indicators {sorted(set(names) & set(JUDGED))} are judge-scored: set `judge`")
    if "reward" in names and params.reward_signal is None and params.reward_model is None:
        raise ValueError("the reward indicator needs reward_model or reward_signal (a stored signal of reward-model "
                         "scores)")
    store, uids = get_store(), pool["uid"]
    table, signals = text_indicators(pool), []
    if "reward" in names:
        if params.reward_model is not None:
            reward = reward_signal(resolve_reward_model(params.reward_model))
            signals.append(reward_task(reward, dataset))
        else:
            reward = store.signals.get(params.reward_signal)
        table = table.join(store.signals.values(reward, uids, alias="reward"), on="uid", how="left")
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


def fit_on_subsets(params: InstructMiningParams, pool: pl.DataFrame, complete: pl.DataFrame,
                   suite: ReferenceLoss) -> tuple[Rule, str]:
    """Step 3 with ``rule="fit"``: draw the subsets with spread quality, fine-tune and evaluate each,
    fit the rule, publish it with its intervals and the subsets; refuse an insignificant fit (or
    return its warning). Returns the rule and a line describing the fit."""
    names = complete.columns[1:]
    size = min(params.subset_size, complete.height // 2)
    if size < params.subset_size:
        print(f"instructmining: subsets of {size} (half of the {complete.height} examples that can be drawn)")
    x = complete.select(names).to_numpy().astype(np.float64)
    z = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    draws = spread_draws(z, size, params.subsets, np.random.default_rng(params.seed))
    rows = pool.join(complete, on="uid", how="inner", maintain_order="left")  # examples and indicators
    quality = subset_quality({f"subset-{k + 1}": rows[d].select(pool.columns) for k, d in enumerate(draws)},
                             params.base, params.recipe, suite)
    means = np.stack([rows[d].select(names).to_numpy().mean(axis=0) for d in draws])
    log_loss = np.log([q.loss for q in quality])
    rule = fit_rule(means, log_loss, names)

    spread = {n: float(complete[n].std() or 0.0) for n in names}
    publish_table("instructmining-rule", [{"term": "intercept", "coefficient": rule.intercept}] + [
        {"term": n, "coefficient": rule.coefficients[n], "ci95_low": rule.intervals[n][0],
         "ci95_high": rule.intervals[n][1], "pool_std": spread[n], "effect_of_1_std": rule.coefficients[n] * spread[n]}
        for n in names],
        f"log eval loss = intercept + sum coefficient x indicator; R^2 {rule.r2:.3f}, F-test p {rule.p_value:.3g} "
        f"over {rule.subsets} subsets")
    fitted = predict(rule, pl.DataFrame(means, schema=names, orient="row"))
    publish_table("instructmining-subsets", [
        {"subset": q.name, "examples": q.examples, "eval_loss": q.loss, "log_loss": float(y), "fitted": float(f),
         "model": q.model[:12]} for q, y, f in zip(quality, log_loss, fitted)],
        "The subsets the rule was fitted on")
    warning = check_fit(rule, params.significance, params.on_insignificant)
    if warning:
        print(f"instructmining: WARNING: {warning}")
    return rule, "\n".join([
        f"R^2 = {rule.r2:.3f} (adjusted {rule.adj_r2:.3f}), F-test p = {rule.p_value:.3g}, residual sd "
        f"{rule.residual_std:.4f}, {rule.subsets} subsets of {size} drawn with spread quality; evaluation on "
        f"`{Path(suite.path).name}`.", "",
        "| term | coefficient | 95% interval |", "|---|---:|---|",
        *[f"| {n} | {rule.coefficients[n]:.4g} | [{rule.intervals[n][0]:.4g}, {rule.intervals[n][1]:.4g}] |"
          for n in names],
        *([f"\n**Warning**: {warning}"] if warning else [])])


@flow(name="instructmining", log_prints=True)
def instructmining(params: InstructMiningParams) -> SelectionRef:
    """Rank examples by a linear rule from indicators to eval loss (the paper's, or one fitted on
    subsets of this pool); keep the examples it rates best."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    pool = dataset.read().sort("uid")
    table, signals = indicator_table(params, dataset, pool)
    complete = table.drop_nulls()

    # held-out reference answers: a file, or part of the pool (then never drawn nor selected)
    suite, held = (None, set()) if params.rule == "paper" and not params.sweep else reference_suite(
        pool, params.eval_file, params.heldout, params.seed)
    complete = complete.filter(~pl.col("uid").is_in(list(held)))
    if params.rule == "paper":
        rule, about = PAPER_RULE, "The paper's published rule (Cao et al. 2023); nothing fitted here."
    else:
        rule, about = fit_on_subsets(params, pool, complete, suite)

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
        about,
        *([f"Size sweep: {sweep_rows}; chose {m}."] if sweep_rows else []),
    ]), "The InstructMining rule")
    print(f"instructmining: {params.rule} rule" + (f", R^2 {rule.r2:.3f}, F-test p {rule.p_value:.3g} over "
                                                  f"{rule.subsets} subsets" if rule.subsets else "")
          + f"; kept {selection.height} of {dataset.rows} ({table.height - table.drop_nulls().height} without "
          "every indicator)")
    return finish("instructmining", params, dataset, selection, signals)
