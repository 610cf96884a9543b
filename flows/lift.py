"""LIFT (Xu et al. 2023, "Rethinking the Instruction Quality: LIFT is What You Need"): expand the pool
with an LLM, then curate it for variety and quality.

LIFT first expands a pool with an LLM, then curates it. Without ``expand`` this flow is the curation
alone, on any registered dataset.

0. Expansion (``expand``). For each original x_i (the first ``limit``), the generator writes
   ``expansions`` new instructions from it, varied in topic, form and difficulty (one call, a numbered
   list), and then answers each new instruction. Both steps go through ``generate`` (each row stored
   with its provenance, the original's uid as parent; cached; cost cap; dry run); exact and near
   duplicates (cosine > ``dedup_tau``) of the pool and of each other are dropped and counted. The pool
   and the new pairs are registered as the dataset ``output``, and steps 1-3 curate that dataset.

1. Variety curation. Embed every example; standardise each dimension over the pool; project on the
   principal components that explain 95% of the variance; each row's variance across its
   components, ``v_i = Var_j(z_ij)``, measures how far it lies from the bulk. Keep the rows with
   ``v_i`` above the 80th percentile (the top 20%, the authors' share).
2. Quality curation. A judge scores each kept example on four criteria, 100 points in all:
   accuracy (35), explanations (25), clarity (15) and difficulty (25); ``Q_i`` is their sum. The
   length counts too: with ``L_i`` the characters of instruction, input and output (tabs and line
   breaks removed) and ``L_98`` the 98th percentile of ``L`` over the kept examples,
   ``S_len,i = 100 min(L_i / L_98, 1)``. The combined score, as the paper's code combines them:

       score_i = 0.9 Q_i + 0.1 S_len,i

3. Keep the best by ``score`` to the budget, skipping near-duplicates: an example whose cosine
   similarity to one already kept exceeds ``dedup_tau`` is not kept.

Deviations: embeddings come from the configured sentence encoder (the paper: OpenAI ada-002) over
the instruction, input and output; the number of components is the smallest that reaches 95% (the
authors' code passes the index of that component, one fewer). The judge is any backend at
temperature 0 (the authors' GPT-4 ran at 0.5) with our wording and no few-shot examples; in text
form (``scoring="text"``) it writes the four part scores one a line, and their sum is ``Q`` (the
paper's judge writes the total itself; the signal keeps all four parts). ``scoring="expected"``
(the default for local judges, which rarely write four parseable lines) asks for each criterion
alone as a digit 0-9 and takes the expected digit over the judge's first-token distribution,
scaled to the criterion's points: ``Q = sum_c points_c E_c / 9`` (four calls per example). A
multi-turn example is judged on its last exchange. The near-duplicate step (``dedup_tau``, 0.95
by default, ours) makes explicit the redundancy the paper removes; the authors' code has no
separate step for it. The budget defaults to 10% of the pool (the authors keep the top 10,000 of
their variety-curated set). Expansion: the paper's GPT-4 rewriting prompt and its rules are not
reproduced; our prompt asks for ``expansions`` new instructions a call, greedy, in our words, answered by
the same generator; the instructions are deduplicated only once answered (with the pairs); the cost cap
(``max_calls``, ``max_tokens``) covers the generator's calls, not the judge's.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.storage.examples import prompt_text
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.cluster import repr_filter
from sft_select.tasks.embed import embed, embed_signal, load_vectors
from sft_select.tasks.generate import CostCap, Generation, generate, register_generation, requests
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import GENERATED_ANSWER, LIFT_EXPAND, LIFT_EXPECTED, LIFT_POINTS, LIFT_QUALITY
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.select import resolve_budget
from sft_select.tasks.signal_task import DatasetRef, SignalRef, get_store

PAPER_VARIETY_SHARE = 0.2  # rows above the 80th percentile of row variance
PAPER_PCA_VARIANCE = 0.95
PAPER_QUALITY_WEIGHT = 0.9  # score = 0.9 Q + 0.1 S_len
PAPER_LENGTH_PERCENTILE = 98.0


def pca_row_variance(vectors: np.ndarray, explained: float = PAPER_PCA_VARIANCE) -> tuple[np.ndarray, int]:
    """LIFT's variety measure: standardise each column (mean 0, sd 1; a constant column to 0),
    project on the fewest principal components explaining ``explained`` of the variance (each with
    its largest loading positive, scikit-learn's convention), and return each row's variance across
    those components, with the number of components used."""
    x = np.asarray(vectors, dtype=np.float64)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    # A component's sign is arbitrary, but a row's variance across components is not sign-free (its
    # mean moves): fix each component's largest loading positive, as scikit-learn's PCA does.
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    u = u * np.where(signs == 0, 1.0, signs)
    power = s**2
    if power.sum() <= 0:  # every row alike: no direction to spread along
        return np.zeros(x.shape[0]), 0
    k = int(np.searchsorted(np.cumsum(power) / power.sum(), explained - 1e-12) + 1)
    k = min(k, len(s))
    projected = u[:, :k] * s[:k]
    return projected.var(axis=1), k


def variety_curation(row_variance: np.ndarray, share: float = PAPER_VARIETY_SHARE) -> np.ndarray:
    """Row indices whose variance is above the ``100 (1 - share)`` percentile (strictly, as the
    authors' code), in row order."""
    threshold = np.percentile(row_variance, 100.0 * (1.0 - share))
    return np.flatnonzero(row_variance > threshold)


def length_scores(lengths: np.ndarray, percentile: float = PAPER_LENGTH_PERCENTILE) -> np.ndarray:
    """``100 min(L / L_p, 1)``, with ``L_p`` the ``percentile`` of ``lengths`` (100 for every row when
    ``L_p`` is 0)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    cap = float(np.percentile(lengths, percentile)) if len(lengths) else 0.0
    if cap <= 0:
        return np.full(len(lengths), 100.0)
    return 100.0 * np.minimum(lengths / cap, 1.0)


def lift_length(examples: pl.DataFrame) -> pl.Series:
    """Characters of instruction + input + output with tabs and line breaks removed (the authors' length)."""
    text = pl.concat_str([pl.col("instruction").fill_null(""), pl.col("input").fill_null(""),
                          pl.col("output").fill_null("")])
    return examples.select(text.str.replace_all(r"[\t\n]", "").str.len_chars().alias("length"))["length"]


def combine(quality: np.ndarray, length_score: np.ndarray, weight: float = PAPER_QUALITY_WEIGHT) -> np.ndarray:
    """LIFT's combined score, ``weight Q + (1 - weight) S_len`` (0.9 and 0.1 in the paper)."""
    return weight * np.asarray(quality, dtype=np.float64) + (1.0 - weight) * np.asarray(length_score, dtype=np.float64)


def drop_near_duplicates(vectors: np.ndarray, order: np.ndarray, m: int, tau: float | None) -> tuple[list[int], int]:
    """Walk ``order`` (row indices, best first) and keep a row unless its cosine similarity to a row
    already kept exceeds ``tau`` (``None``: keep every row); stop at ``m`` kept: DEITA's repr filter
    (:func:`~sft_select.tasks.cluster.repr_filter`). Returns the kept rows and how many were
    skipped as near-duplicates on the way."""
    order = np.asarray(order, dtype=np.int64)
    if tau is None or m <= 0:
        return [int(i) for i in order[:max(m, 0)]], 0
    accepted, _ = repr_filter(vectors, order, m, tau)
    walked = len(order) if len(accepted) < m else int(np.flatnonzero(order == accepted[-1])[0]) + 1
    return [int(i) for i in accepted], walked - len(accepted)


class LiftParams(MethodParams):
    variety_share: float = Field(PAPER_VARIETY_SHARE, gt=0, le=1,
                                 description="Share of the pool the variety step keeps: the rows of largest variance "
                                             "in PCA space (paper: 0.2, above the 80th percentile).")
    pca_variance: float = Field(PAPER_PCA_VARIANCE, gt=0, le=1,
                                description="PCA keeps the fewest components explaining this share of the variance.")
    quality_weight: float = Field(PAPER_QUALITY_WEIGHT, ge=0, le=1,
                                  description="score = w * judge total + (1 - w) * length score (paper: 0.9).")
    length_percentile: float = Field(PAPER_LENGTH_PERCENTILE, gt=0, le=100,
                                     description="Lengths at or above this percentile get the full length score.")
    dedup_tau: float | None = Field(0.95, gt=0, le=1,
                                    description="Skip an example whose cosine similarity to one already kept exceeds "
                                                "this; empty: no near-duplicate step.")
    encoder: str | None = Field(None, description="Sentence encoder of the variety step; the configured default when "
                                                  "empty.")
    field: Literal["prompt", "output", "full"] = Field(
        "full", description="What is embedded: instruction and input, the output, or both.")
    scoring: Literal["auto", "text", "expected"] = Field(
        "auto", description="'text': the four part scores written by the judge, one a line; 'expected': each "
                            "criterion's expected digit 0-9 from the first-token log-probs (four calls); 'auto': "
                            "expected for local judges, text otherwise.")
    judge: str | None = Field(None, description="LLM backend: 'openai:<model>' (OPENAI_BASE_URL), 'local', "
                                                "'local:<model folder>'; empty: the configured default.")
    batch_size: int = Field(32, description="Examples per durable batch of ratings (and of generation).")
    expand: bool = Field(False, description="Expansion first: the generator writes new instructions from the "
                                            "originals and answers them; the pool and the new pairs are curated.")
    expansions: int = Field(3, ge=1, description="New instructions the generator writes from each original.")
    generator: str | None = Field(None, description="LLM spec of the generator (expansion); the configured default "
                                                    "when empty.")
    limit: int | None = Field(None, ge=1, description="Expand from the first this many originals; empty: all.")
    max_calls: int | None = Field(None, ge=1, description="Cost cap: generator calls this run may make.")
    max_tokens: int | None = Field(None, ge=1, description="Cost cap: generator tokens (prompt + completion).")
    output: str | None = Field(None, description="Name of the expanded dataset; default '<dataset>-lift'.")


def expand(params: LiftParams, dataset: DatasetRef) -> tuple[list[Generation], DatasetRef]:
    """Step 0: new instructions from the originals, answered, deduplicated against the pool and each other;
    the pool and the kept pairs registered as the expanded dataset."""
    pool = dataset.read()
    originals = pool[: params.limit]
    cap = CostCap(params.max_calls, params.max_tokens)
    generator = get_llm(params.generator)
    reqs = requests([{"prompt": prompt_text(r), "n": params.expansions} for r in originals.iter_rows(named=True)],
                    [[u] for u in originals["uid"]])
    written = generate(reqs, LIFT_EXPAND, generator, method="lift", dedup_tau=None, cap=cap,
                       batch_size=params.batch_size)
    parents = [json.loads(m)["generated"]["parents"] for m in written.examples["meta"]]
    answers = requests([{"prompt": i} for i in written.examples["instruction"]], parents,
                       [{"instruction": i, "expansion": {"signal": written.signal.id}}
                        for i in written.examples["instruction"]])
    answered = generate(answers, GENERATED_ANSWER, generator, method="lift", pool=pool, dedup_tau=params.dedup_tau,
                        encoder=params.encoder, cap=cap, batch_size=params.batch_size)
    for g in (written, answered):
        print(f"lift expansion ({g.report['prompt']}): {g.report['requests']} requests -> {g.report['generated']} "
              f"made ({g.report['parse_failures']} unparseable, {g.report['unanswered']} not asked) -> "
              f"{g.report['kept']} kept ({g.report['exact_duplicates']} exact and {g.report['near_duplicates']} near "
              "duplicates dropped)" + (f"; {g.report['stopped']}" if g.report["stopped"] else ""))
    output = params.output or f"{dataset.name}-lift"
    ref = register_generation(output, answered, extra=pool, source=f"generated: lift expansion of {dataset.name}@"
                              f"{dataset.version} by {answered.report['generator']}, with its {pool.height} rows")
    return [written, answered], ref


def _quality(params: LiftParams, judge, dataset: DatasetRef, candidates: list[str],
             scoring: str) -> tuple[pl.DataFrame, list[SignalRef]]:
    """``uid, quality`` (the judge's total out of 100; null where the judge failed) for the candidates."""
    store = get_store()
    if scoring == "text":
        signal = llm_signal(LIFT_QUALITY, judge)
        refs = [score_with_llm(signal, dataset, batch_size=params.batch_size, uids=candidates)]
        parts = store.signals.values(signal, candidates, alias="parts")
        total = [None if p is None else sum(json.loads(p).values()) for p in parts["parts"]]
        return pl.DataFrame({"uid": candidates, "quality": total}, schema={"uid": pl.String, "quality": pl.Float64}), refs
    refs, frame = [], pl.DataFrame({"uid": candidates}, schema={"uid": pl.String})
    for criterion, prompt in LIFT_EXPECTED.items():
        signal = llm_signal(prompt, judge)
        refs.append(score_with_llm(signal, dataset, batch_size=params.batch_size, uids=candidates))
        digit = store.signals.values(signal, candidates, alias=criterion)
        frame = frame.join(digit.with_columns(pl.col(criterion) * LIFT_POINTS[criterion] / 9.0), on="uid",
                           maintain_order="left")
    complete = pl.all_horizontal(pl.col(c).is_not_null() for c in LIFT_POINTS)
    return frame.select("uid", pl.when(complete).then(pl.sum_horizontal(list(LIFT_POINTS))).otherwise(None)
                        .cast(pl.Float64).alias("quality")), refs


@flow(name="lift", log_prints=True)
def lift(params: LiftParams) -> SelectionRef:
    """Keep the rows of largest PCA variance; score them (accuracy, explanations, clarity, difficulty,
    plus length); keep the best to the budget, without near-duplicates. With ``expand``, first add new
    instructions written from the originals and answered, and curate the expanded pool."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    generations: list[Generation] = []
    if params.expand:  # 0. expansion
        generations, dataset = expand(params, dataset)
        params = params.model_copy(update={"output": dataset.name})
    m = resolve_budget(params.budget, dataset.rows)
    pool = dataset.read().sort("uid")

    # 1. variety curation
    vectors_signal = embed_signal(params.encoder, field=params.field)
    embedded = embed(vectors_signal, dataset)
    uids, x = load_vectors(vectors_signal, pool["uid"])
    variance, components = pca_row_variance(x, params.pca_variance)
    rows = variety_curation(variance, params.variety_share)
    candidates = [uids[i] for i in rows]

    # 2. quality curation
    judge = get_llm(params.judge)
    scoring = params.scoring if params.scoring != "auto" else ("expected" if judge.name.startswith("local") else "text")
    params = params.model_copy(update={"judge": judge.name, "scoring": scoring})  # the selection records both
    quality, rated = _quality(params, judge, dataset, candidates, scoring)
    chosen = pool.join(pl.DataFrame({"uid": candidates}), on="uid", how="semi", maintain_order="left")
    length = length_scores(lift_length(chosen).to_numpy(), params.length_percentile)
    scored = quality.join(chosen.select("uid").with_columns(length_score=pl.Series(length)), on="uid",
                          maintain_order="left")
    score = combine(scored["quality"].fill_null(np.nan).to_numpy(), scored["length_score"].to_numpy(),
                    params.quality_weight)
    scored = scored.with_columns(score=pl.Series(score).fill_nan(None))

    # 3. the best to the budget, without near-duplicates
    ranked = scored.filter(pl.col("score").is_not_null()).sort(["score", "uid"], descending=[True, False])
    row_of = {u: i for i, u in enumerate(uids)}
    order = np.asarray([row_of[u] for u in ranked["uid"]], dtype=np.int64)
    kept, skipped = drop_near_duplicates(x, order, m, params.dedup_tau)
    keep = {uids[i] for i in kept}
    top = ranked.filter(pl.col("uid").is_in(list(keep)))
    selection = top.select("uid", "score", pl.format("{} x quality {} + {} x length score {}, rank {}",
                                                     pl.lit(params.quality_weight), pl.col("quality").round(2),
                                                     pl.lit(round(1.0 - params.quality_weight, 4)),
                                                     pl.col("length_score").round(2),
                                                     pl.int_range(1, pl.len() + 1)).alias("reason"))

    publish_table("lift-scores", histogram_rows(scored["score"], missing="no quality score (judge failed)"),
                  f"LIFT combined scores of the {len(candidates)} variety-curated examples of "
                  f"{dataset.name}@{dataset.version}")
    failed = scored["quality"].null_count()
    print(f"lift: {len(uids)} embedded -> PCA {components} components -> {len(candidates)} of largest row variance "
          f"({params.variety_share:.0%}) -> {ranked.height} scored by {judge.name} ({scoring}; {failed} without a "
          f"score) -> {selection.height} kept ({skipped} near-duplicates skipped, budget {m})")
    made = [g.signal_ref(dataset.fingerprint) for g in generations]
    return finish("lift", params, dataset, selection, [embedded, *rated, *made])


__all__ = ["LiftParams", "combine", "drop_near_duplicates", "expand", "length_scores", "lift", "lift_length",
           "pca_row_variance", "variety_curation"]
