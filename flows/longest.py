"""Longest-response baseline (Zhao et al. 2024, "Long Is More for Alignment").

Rank examples by the length of the response and keep the m longest. Score = length of the last
assistant turn in characters. Deviation: the paper counts tokens of the response; characters need
no tokenizer and order responses almost identically.
"""

from __future__ import annotations

import polars as pl
from prefect import flow

from sft_select.flows.common import MethodParams, SelectionRef, finish
from sft_select.tasks.signal_task import DatasetRef
from sft_select.tasks.select import resolve_budget, select


class LongestParams(MethodParams):
    pass


@flow(name="longest", log_prints=True)
def longest(params: LongestParams) -> SelectionRef:
    """Keep the m examples with the longest responses."""
    dataset = DatasetRef.load(params.dataset, params.dataset_version)
    m = resolve_budget(params.budget, dataset.rows)
    lengths = dataset.read(["uid", "output"]).select("uid", score=pl.col("output").str.len_chars().cast(pl.Float64))
    selection = select(lengths, m=m, label="response characters")
    print(f"longest: {selection.height} of {dataset.rows} examples, shortest kept {selection['score'].min():.0f} chars")
    return finish("longest", params, dataset, selection)
