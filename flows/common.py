"""What every selection flow shares: the parameter fields every method takes, and ``finish``, which
saves the selection, writes the training file and publishes the artifacts."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, field_validator

from sft_select.storage import write_examples
from sft_select.tasks.core import DatasetRef, SignalRef, get_store
from sft_select.tasks.report import cost_table, publish_markdown, publish_table, stats, stats_rows
from sft_select.tasks.select import check_budget

EXPORT_SUFFIX = {"alpaca": ".json", "sharegpt": ".json", "messages": ".jsonl", "parquet": ".parquet"}


class MethodParams(BaseModel):
    """Fields every selection method takes (the Prefect UI shows them as a form)."""

    dataset: str = Field(description="Name of a dataset registered with `sft-select ingest`.")
    dataset_version: int | None = Field(None, description="Version of the dataset; the latest when empty.")
    budget: float | None = Field(
        0.1, description="How many examples to keep: a count (>= 1) or a fraction of the pool (< 1).")
    export: Literal["alpaca", "sharegpt", "messages", "parquet"] = Field(
        "alpaca", description="Training-file format: alpaca / sharegpt (LLaMA-Factory, Axolotl), "
                              "messages (TRL), parquet.")
    seed: int = Field(0, description="Random seed, for methods that sample.")

    @field_validator("budget")
    @classmethod
    def _meaningful_budget(cls, budget: float | None) -> float | None:
        return check_budget(budget)


class SelectionRef(BaseModel):
    """A saved selection: its id in the catalog and the training file written for it."""

    selection_id: str
    method: str
    dataset: str
    rows: int
    export_path: str


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


@task(name="finish-selection", cache_policy=NO_CACHE)
def finish(method: str, params: MethodParams, dataset: DatasetRef, selection: pl.DataFrame,
           signals: Sequence[SignalRef] = ()) -> SelectionRef:
    """Save the ordered selection (``uid, score, reason``), export the chosen examples as a training
    file, and publish the selection's statistics next to the pool's and a summary with signal costs."""
    store = get_store()
    info = store.datasets.get(dataset.name, dataset.version)
    run_id = flow_run.get_id()
    selection_id = store.selections.save(method=method, params=params.model_dump(mode="json"), dataset=info,
                                         selection=selection, flow_run_id=str(run_id) if run_id else None)
    pool = dataset.read()
    chosen = selection.select("uid").join(pool, on="uid", how="left", maintain_order="left")
    path = store.home / "exports" / f"{selection_id}{EXPORT_SUFFIX[params.export]}"
    write_examples(chosen, path, params.export if params.export != "parquet" else "parquet")

    publish_table(_key(method, "stats"), stats_rows({"pool": stats(pool), "selection": stats(chosen)}),
                  f"{method} on {dataset.name}@{dataset.version}: the selection next to the pool")
    head = selection.head(20).with_columns(pl.col("score").round(4))
    md = [
        f"# {method}: {selection.height} of {dataset.rows} examples from `{dataset.name}@{dataset.version}`",
        "",
        f"Selection `{selection_id}`; training file `{path.name}` ({params.export}).",
        "",
        "## Parameters",
        "```json",
        json.dumps(params.model_dump(mode="json"), indent=2),
        "```",
        "## Signals",
        cost_table(signals),
        "## First 20 selected",
        "| rank | uid | score | reason |",
        "|---:|---|---:|---|",
        *[f"| {i + 1} | `{r['uid'][:12]}` | {r['score']} | {r['reason']} |" for i, r in enumerate(head.to_dicts())],
    ]
    publish_markdown(_key(method, "summary"), "\n".join(md), f"{method} selection summary")
    return SelectionRef(selection_id=selection_id, method=method, dataset=f"{dataset.name}@{dataset.version}",
                        rows=selection.height, export_path=str(Path(path)))
