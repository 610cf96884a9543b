"""AlpaGasus (Chen et al. 2023, "AlpaGasus: Training a Better Alpaca with Fewer Data").

Algorithm:
  1. A strong LLM judge (ChatGPT in the paper; temperature 0, at most 256 tokens) sees each
     example's instruction, input and response and rates the response's *accuracy* from 0 to 5,
     writing the score on the first line and an explanation after it.
  2. Keep the examples rated >= 4.5 (9,229 of Alpaca's 52k with ChatGPT), or the m best rated.

``criterion="helpfulness"`` is the paper's other rating dimension (same scale and format). The
prompts (``tasks/prompts.py``) are our own wording of the paper's rubric.

Deviations: the judge is any backend (``judge``: "openai:<model>" on any OpenAI-compatible server,
or the local default; ``None`` takes the configured one), and the rating is a signal, so it is
paid for once per example and judge and then shared by every run and dataset. For a multi-turn
example the judge sees the last exchange only (its instruction, input and response). An answer
whose first line holds no score in [0, 5] is stored as an error with its raw text and the example
is not selected (the paper does not say what it did with such answers).

``scoring="expected"`` (the default for local judges) asks for the score digit alone and reads the
judge's first-token distribution over "0".."5", taking the expected score sum_k k * p(k) (the
device DEITA uses): a 135M local model rarely writes a parseable first line (79 of 80 failed on
alpaca_9k), but its digit distribution always gives a rating. It is a deviation from the paper's
text rating, and a model that small is a weak judge: use a capable judge for real selections.

Threshold (``threshold="paper"``, the default): 4.5 on the text rating, as the paper. The
expected score is another scale (it averages over the judge's doubt, so even good answers sit
well below 4.5: a run on 1,500 examples of a real pool kept 1), so for it the paper's threshold is
calibrated by the share it kept, 9,229 of 52,002 (17.7%): the threshold is the pool's
``1 - 0.177`` quantile of expected scores (ties at it are kept, as ``>=`` keeps them). A number
is used as it is on either scale; empty applies none. The resolved value is recorded with the
selection.
"""

from __future__ import annotations

import math
from typing import Literal

import polars as pl
from prefect import flow
from pydantic import Field

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.signal_task import DatasetRef, get_store
from sft_select.tasks.backends.chat import get_llm
from sft_select.tasks.judge import llm_signal, score_with_llm
from sft_select.tasks.prompts import ALPAGASUS
from sft_select.tasks.report import histogram_rows, publish_table
from sft_select.tasks.select import resolve_budget, select

PAPER_THRESHOLD = 4.5
PAPER_KEPT_SHARE = 9229 / 52002  # what the paper's threshold kept of Alpaca with ChatGPT as the judge


def calibrated_threshold(scores: pl.Series, share: float = PAPER_KEPT_SHARE) -> float | None:
    """The expected score at or above which ``share`` of the rated examples lie: the paper's 4.5
    carried over to the expected-score scale by the share of the pool it kept (None when nothing
    is rated)."""
    rated = scores.drop_nulls().drop_nans().sort(descending=True)
    if rated.is_empty():
        return None
    return float(rated[max(math.ceil(share * rated.len()), 1) - 1])


class AlpaGasusParams(MethodParams):
    budget: float | None = Field(
        None, description="Keep at most this many of the best rated: a count (>= 1) or a fraction (< 1); "
                          "empty keeps every example at or above the threshold.")
    threshold: float | Literal["paper"] | None = Field(
        "paper", description="Keep ratings >= this; 'paper': 4.5 on the text rating, and on the expected score the "
                             "value that keeps the share the paper's 4.5 kept (17.7%) of the pool; empty: none.")
    criterion: Literal["accuracy", "helpfulness"] = Field(
        "accuracy", description="What the judge rates: accuracy (the paper's main filter) or helpfulness.")
    scoring: Literal["auto", "text", "expected"] = Field(
        "auto", description="'text': the paper's form, the score read from the first line of the judge's answer; "
                            "'expected': the expected score over the tokens 0-5 at the first position (needs "
                            "log-probs); 'auto': expected for local judges, text otherwise.")
    judge: str | None = Field(
        None, description="LLM backend: 'openai:<model>' (OPENAI_BASE_URL, any compatible server), 'local', "
                          "'local:<model folder>'; empty: the configured default (SFT_SELECT_LLM).")
    batch_size: int = Field(32, description="Examples per durable batch of ratings.")


@flow(name="alpagasus", log_prints=True)
def alpagasus(params: AlpaGasusParams) -> SelectionRef:
    """Rate every example 0-5 with an LLM judge; keep ratings >= 4.5 (or the m best)."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    judge = get_llm(params.judge)
    scoring = params.scoring if params.scoring != "auto" else ("expected" if judge.name.startswith("local") else "text")
    signal = llm_signal(ALPAGASUS[params.criterion, scoring], judge)
    # the selection records the judge and the scoring actually used
    params = params.model_copy(update={"judge": signal.model, "scoring": scoring})

    rated = score_with_llm(signal, dataset, batch_size=params.batch_size)
    scores = get_store().signals.values(signal, dataset.read(["uid"])["uid"], alias="score")

    threshold = params.threshold
    if threshold == "paper":
        threshold = PAPER_THRESHOLD if scoring == "text" else calibrated_threshold(scores["score"])
    params = params.model_copy(update={"threshold": threshold})  # the selection records the value applied
    m = resolve_budget(params.budget, dataset.rows) if params.budget is not None else None
    selection = select(scores, m=m, threshold=threshold, label=f"{params.criterion} rating")

    publish_table("alpagasus-ratings", histogram_rows(scores["score"], missing="no rating (error)"),
                  f"{params.criterion} ratings by {signal.model} on {dataset.name}@{dataset.version}")
    print(f"alpagasus: {selection.height} of {dataset.rows} examples kept ({params.criterion} by {signal.model}; "
          f"{rated.computed} rated now, {rated.reused} reused, {rated.errors} without a rating)")
    return finish("alpagasus", params, dataset, selection, [rated])
